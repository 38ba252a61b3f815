"""The attention heads folded into ONNX's Attention node (its 3-D form) against the exporter's 4-D form: the same
bundle exported both ways, each graph's model alone timed on the same batches, the two taking turns.

    .venv/bin/python bench/attention.py [--run runs/demo-fused] [--rounds 15] [--repeat 3]

With no bundle at --run, the demo's fused model is trained first, as bench/predict.py does. Both exports are int8
as `mmtune export --quantize int8` ships them; fp32 (``model.onnx``) and int8 (``model.int8.onnx``) are timed.
The batches are collated once (the test rows repeated --repeat times, batch 64), so the figures are the graph alone.
The last line printed is one JSON object: seconds per pass for each graph, the ratios folded / plain, the most the
probabilities differ between the two forms, and how many Transpose nodes the fold removed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from predict import bundle_and_work, test_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-fused")
    ap.add_argument("--rows", type=int, default=800, help="demo rows, when the bundle has to be trained first")
    ap.add_argument("--epochs", type=int, default=15, help="demo epochs, when the bundle has to be trained first")
    ap.add_argument("--rounds", type=int, default=15, help="timed passes per graph, the graphs taking turns")
    ap.add_argument("--repeat", type=int, default=3, help="the test rows repeated this many times per pass")
    ap.add_argument("--work", help="folder for the trained demo bundle and the exports (default: a temporary one)")
    args = ap.parse_args()

    import onnx
    import torch

    import mmtune
    from mmtune.logs import quiet_libraries
    from mmtune.serving import export
    from mmtune.serving.runners import OnnxRunner

    quiet_libraries()
    run, tmp = bundle_and_work(args.run, args.work, "mmtune-bench-attention-", args.rows, args.epochs)
    export.export_onnx(run, tmp / "folded", quantize="int8", log=lambda *_: None)
    fold = export.fold_attention_heads
    export.fold_attention_heads = lambda path: 0
    try:
        export.export_onnx(run, tmp / "plain", quantize="int8", log=lambda *_: None)
    finally:
        export.fold_attention_heads = fold

    def count(folder: Path, op: str) -> int:
        return sum(n.op_type == op for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)

    pred = mmtune.load(tmp / "folded", backend="onnx")
    rows = pd.concat([test_rows(run)] * args.repeat, ignore_index=True)
    ds = pred.dataset(rows, with_labels=False)
    batches = list(pred.batches(ds, 64, pred.length_order(ds)))
    results, diffs = {}, []
    for file in ("model.onnx", "model.int8.onnx"):
        runners = {form: OnnxRunner(tmp / form / file, pred.runner.output_modality, torch.device("cpu"))
                   for form in ("plain", "folded")}
        proba = {form: r.proba(pred.tasks, iter(batches)) for form, r in runners.items()}  # also the warm-up
        diffs.append(max(float(np.abs(proba["plain"][t] - proba["folded"][t]).max()) for t in proba["plain"]))
        seconds = {form: [] for form in runners}
        for _ in range(args.rounds):
            for form, r in runners.items():
                t = time.perf_counter()
                r.proba(pred.tasks, iter(batches))
                seconds[form].append(time.perf_counter() - t)
        key = "int8" if "int8" in file else "fp32"
        for form in runners:
            results[f"{key}_{form}_s"] = round(statistics.median(seconds[form]), 4)
        results[f"{key}_ratio"] = round(statistics.median(b / a for a, b in zip(seconds["plain"], seconds["folded"])), 3)
    print(f"{len(rows)} rows in {len(batches)} batches, {args.rounds} passes per graph, {torch.get_num_threads()} threads")
    print(f"{'graph':16} {'plain s':>8} {'folded s':>9} {'folded/plain':>13}")
    for key in ("fp32", "int8"):
        print(f"{key:16} {results[f'{key}_plain_s']:8.4f} {results[f'{key}_folded_s']:9.4f} {results[f'{key}_ratio']:13.3f}")
    results["max_abs_prob_diff"] = float(f"{max(diffs):.3g}")
    results["transposes_removed"] = count(tmp / "plain", "Transpose") - count(tmp / "folded", "Transpose")
    results["attention_nodes"] = count(tmp / "folded", "Attention")
    print(f"probabilities differ by at most {results['max_abs_prob_diff']:.3g}; the fold removed "
          f"{results['transposes_removed']} Transpose nodes around {results['attention_nodes']} Attention nodes")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
