"""Prediction speed and accuracy of the demo bundle: eager PyTorch, ONNX fp32 and ONNX int8, same rows, one run.

    .venv/bin/python bench/predict.py [--run runs/demo-fused] [--repeat 3] [--rounds 7] [--single 200] [--image-size 224]

With no bundle at --run, the demo's fused model is trained first (--rows, --epochs; `mmtune demo` makes the
same one). The bundle is exported twice into a temporary folder, each checked against the model on its validation
split: as `mmtune export --quantize int8` ships it (``static-int8``: the convolution chains static int8, calibrated
on the validation rows, the matrix products dynamic int8) and with ``--int8-convolutions float`` (``int8``: only the
matrix products int8). Batch throughput: predict_proba over the test rows repeated --repeat times, input decoding
included; the four backends take turns for --rounds rounds, so that a change in the machine's speed during the run
reaches them alike (each round after one untimed batch), and each one's median round is reported. Single row:
--single calls of predict_proba on one row (p50 / p99). The input path alone (validation, decoding, tokenising,
resizing: the same for every backend) is timed too. Rows are batched by their texts' token counts; eager and static int8
also take their turns sorting them by characters instead (``token_order_speedup``: that time over this one, and
``padded_positions``: the text positions, padding included, of each order's batches). The last line printed is one JSON object: ``int8_*`` are the float-convolution figures, ``static_int8_*`` the shipped ones, and
``static_int8_convolutions`` says whether the export kept the static convolutions (``static``) or fell back
(``float``: they lost more than a point on the validation rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _scratch import scratch


def demo_bundle(folder: Path, rows: int, epochs: int, image_size: int = 0) -> Path:
    from mmtune.config import load_config
    from mmtune.demo import demo_config_path, make_dataset
    from mmtune.recipe.fit import fit

    data = make_dataset(folder / "data", n=rows, seed=0)
    cfg = load_config(demo_config_path(), [f"output_dir={folder}", f"data.train={data['train']}", f"data.test={data['test']}",
                                           f"trainer.max_epochs={epochs}", "trainer.progress_bar=false",
                                           "evaluation.linear_probe=false", "evaluation.explain=0",
                                           "evaluation.modality_contribution=false", "evaluation.report=false"]
                      + ([f"model.encoders.image.image_size={image_size}"] if image_size else []))
    return fit(cfg).run_dir


def bundle_and_work(run: str, work, prefix: str, rows: int, epochs: int, image_size: int = 0):
    """``(bundle, work folder)``: the work folder is ``work`` (or a temporary one, removed at exit); the bundle is the
    one at ``run``, or the demo's, trained into the work folder when ``run`` holds none."""
    tmp = Path(work) if work else scratch(prefix)
    tmp.mkdir(parents=True, exist_ok=True)
    bundle = Path(run)
    if not (bundle / "bundle.json").is_file():
        print(f"no bundle at {bundle}: training the demo model ({rows} rows, {epochs} epochs)", flush=True)
        bundle = demo_bundle(tmp, rows, epochs, image_size)
    return bundle, tmp


def test_rows(run: Path) -> pd.DataFrame:
    from mmtune.bundle import read_bundle
    from mmtune.data.manifest import read_table
    from mmtune.data.manifest import absolute_paths

    cfg = read_bundle(run, model=False).config
    source = cfg.data.test or cfg.data.val
    if source is None:
        sys.exit(f"{run}: its config names no test manifest; pass a bundle trained with data.test")
    df, base = read_table(source)
    absolute_paths(df, cfg, base)
    return df


def by_characters(pred):
    """``pred`` made to sort its rows by their texts' characters (longest first), as prediction did before it
    counted tokens: the baseline of ``token_order_speedup``."""
    from mmtune.modalities import modality_of

    def order(ds, keep=None):
        text = [c for m, c in ds.columns if modality_of(m).free_text and isinstance(c, str)]
        if not text or len(ds) < 2:
            return np.arange(len(ds))
        return np.argsort(-sum(ds.df[c].fillna("").astype(str).str.len().to_numpy() for c in text), kind="stable")

    pred.length_order = order
    return pred


def padded_positions(pred, ds, batch_size: int, order) -> int:
    """The text positions (padding included) the batches of ``ds`` in ``order`` hold, over every padded input."""
    total = 0
    for batch in pred.batches(ds, batch_size, order):
        total += sum(int(t["attention_mask"].numel()) for t in batch["inputs"].values() if "attention_mask" in t)
    return total


def timed(fn, times: int = 3) -> float:
    out = []
    for _ in range(times):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-fused")
    ap.add_argument("--rows", type=int, default=800, help="demo rows, when the bundle has to be trained first")
    ap.add_argument("--epochs", type=int, default=15, help="demo epochs, when the bundle has to be trained first")
    ap.add_argument("--image-size", type=int, default=0,
                    help="the demo's picture side, when the bundle has to be trained first (default: the demo's 96)")
    ap.add_argument("--repeat", type=int, default=3, help="the test rows repeated this many times for throughput")
    ap.add_argument("--rounds", type=int, default=7,
                    help="throughput timings per backend, the backends taking turns (the median is reported)")
    ap.add_argument("--single", type=int, default=200, help="single-row calls")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--work", help="folder for the trained demo bundle and the export (default: a temporary one)")
    args = ap.parse_args()

    import torch

    import mmtune
    from mmtune.logs import quiet_libraries
    from mmtune.serving.export import export_onnx

    quiet_libraries()
    run, tmp = bundle_and_work(args.run, args.work, "mmtune-bench-predict-", args.rows, args.epochs, args.image_size)
    rows = test_rows(run)
    many = pd.concat([rows] * args.repeat, ignore_index=True)
    # int8 as `mmtune export --quantize int8` ships it (convolutions static, calibrated on the validation split),
    # and with --int8-convolutions float: the same run's export, checked on its validation split
    export, float_conv = tmp / "export", tmp / "export-float-conv"
    report = export_onnx(run, export, quantize="int8")
    export_onnx(run, float_conv, quantize="int8", convolutions="float", log=lambda *_: None)
    print(f"cpu threads: {torch.get_num_threads()}; rows: {len(rows)} test rows x {args.repeat}", flush=True)

    results, proba, preds = {}, {}, {}
    for name, path, backend in (("torch", run, "torch"), ("onnx", export, "onnx"), ("int8", float_conv, "onnx-int8"),
                                ("static-int8", export, "onnx-int8")):
        preds[name] = mmtune.load(path, backend=backend)
    # the same two backends batching rows of similar characters instead of similar token counts
    chars = {"torch": by_characters(mmtune.load(run, backend="torch")),
             "static-int8": by_characters(mmtune.load(export, backend="onnx-int8"))}
    # the backends timed in turn, round after round, so that a change in the machine's speed during the run
    # (another tenant, the clock) reaches every backend alike; each backend's median round. Each round starts with
    # one untimed batch, so that a backend does not pay for the caches the one before it filled.
    timed_preds = {**preds, **{f"{k} by characters": p for k, p in chars.items()}}
    timings = {name: [] for name in timed_preds}
    for _ in range(args.rounds):
        for name, pred in timed_preds.items():
            pred.predict_proba(rows.head(args.batch_size), batch_size=args.batch_size)
            timings[name].append(timed(lambda: pred.predict_proba(many, batch_size=args.batch_size), 1))
    for name, pred in preds.items():
        seconds = statistics.median(timings[name])
        proba[name] = pred.predict_proba(rows, calibrated=False).drop(columns=[pred.spec.id_column] if pred.spec.id_column else []).to_numpy()
        single = []
        for i in range(args.single):
            one = rows.iloc[[i % len(rows)]]
            t = time.perf_counter()
            pred.predict_proba(one)
            single.append(1000 * (time.perf_counter() - t))
        ds = pred.dataset(many, with_labels=False)
        input_s = timed(lambda: (pred.dataset(many, with_labels=False),
                                 list(pred.batches(ds, args.batch_size, pred.length_order(ds)))))
        task = pred.tasks[0]
        metric = pred.evaluate(rows)[task.name]
        results[name] = {"rows_per_s": len(many) / seconds, "p50_ms": float(np.percentile(single, 50)),
                         "p99_ms": float(np.percentile(single, 99)), "accuracy": metric.get("accuracy", metric.get("r2")),
                         "input_s": input_s, "model_s": max(seconds - input_s, 0.0), "seconds": seconds}
    base = results["torch"]
    print(f"\n{'backend':11} {'rows/s':>8} {'speedup':>8} {'p50 ms':>7} {'p99 ms':>7} {'accuracy':>9} "
          f"{'input s':>8} {'rest s':>7}")
    for name, r in results.items():
        print(f"{name:11} {r['rows_per_s']:8.1f} {r['rows_per_s'] / base['rows_per_s']:8.2f} {r['p50_ms']:7.1f} "
              f"{r['p99_ms']:7.1f} {r['accuracy']:9.4f} {r['input_s']:8.2f} {r['seconds'] - r['input_s']:7.2f}")
    print(f"(input s: validating, decoding and collating the {len(many)} rows alone, on the same threads; "
          "rest: the model, and what the input path does not overlap with it)")
    print(f"export parity on {report.rows_checked} rows: max |Δ prob| {report.max_abs_prob_diff:.2e}; "
          f"int8 vs fp32 max |Δ prob| {float(np.abs(proba['int8'] - proba['onnx']).max()):.3f}; static int8 vs fp32 "
          f"{float(np.abs(proba['static-int8'] - proba['onnx']).max()):.3f}")
    print(f"static int8 as shipped: convolutions {report.int8['convolutions']}"
          + (f" ({report.int8['convolutions_note']})" if report.int8.get("convolutions_note") else "")
          + f"; decisions changed on the test rows against fp32: int8 "
          f"{int((proba['int8'].argmax(1) != proba['onnx'].argmax(1)).sum())}, static int8 "
          f"{int((proba['static-int8'].argmax(1) != proba['onnx'].argmax(1)).sum())} of {len(rows)}")
    ds = preds["torch"].dataset(many, with_labels=False)
    positions = {"tokens": padded_positions(preds["torch"], ds, args.batch_size, preds["torch"].length_order(ds)),
                 "characters": padded_positions(preds["torch"], ds, args.batch_size, chars["torch"].length_order(ds))}
    order_speedup = {k: round(statistics.median(timings[f"{k} by characters"]) / statistics.median(timings[k]), 3)
                     for k in chars}
    print(f"rows sorted by token count, against by characters: {positions['tokens']:,} text positions against "
          f"{positions['characters']:,} (padding included); time by characters / by tokens: "
          + ", ".join(f"{k} {v:.3f}" for k, v in order_speedup.items()))
    best = max(("onnx", "int8", "static-int8"), key=lambda k: results[k]["rows_per_s"])
    print(json.dumps({
        "torch_rows_per_s": round(results["torch"]["rows_per_s"], 1),
        "onnx_rows_per_s": round(results["onnx"]["rows_per_s"], 1),
        "int8_rows_per_s": round(results["int8"]["rows_per_s"], 1),
        "onnx_speedup": round(results["onnx"]["rows_per_s"] / base["rows_per_s"], 2),
        "int8_speedup": round(results["int8"]["rows_per_s"] / base["rows_per_s"], 2),
        "int8_accuracy_delta": round(results["int8"]["accuracy"] - results["torch"]["accuracy"], 4),
        "static_int8_speedup": round(results["static-int8"]["rows_per_s"] / base["rows_per_s"], 2),
        "static_int8_accuracy_delta": round(results["static-int8"]["accuracy"] - results["torch"]["accuracy"], 4),
        "static_int8_convolutions": report.int8["convolutions"],
        "p50_ms_best": round(min(r["p50_ms"] for r in results.values()), 2),
        "max_abs_prob_diff": float(f"{float(np.abs(proba['onnx'] - proba['torch']).max()):.3g}"),
        "torch_p50_ms": round(results["torch"]["p50_ms"], 2),
        "input_share_best": round(results[best]["input_s"] / results[best]["seconds"], 3),
        "padded_positions": positions,
        "token_order_speedup": order_speedup,
    }))


if __name__ == "__main__":
    main()
