"""Where an ONNX export's time goes: onnxruntime's profiler over the test rows, per operator type and per kind of
convolution, the graph alone (the batches collated once, before the clock starts).

    .venv/bin/python bench/onnx_profile.py [--run runs/demo-fused] [--export W/export] [--file model.int8.onnx]
                                           [--repeat 3] [--passes 3]

With no bundle at --run, the demo's fused model is trained first, as bench/predict.py does; with no export at
--export, the bundle is exported into the work folder as `mmtune export --quantize int8` ships it. The graph runs on
one thread, as each of the ONNX backend's side-by-side sessions does (a call with several batches runs one batch
per core), so the seconds are CPU seconds of one core, summed over the batches of one pass over the test rows
repeated --repeat times. onnxruntime's optimized graph names the convolutions' kinds: ``picture`` (reads fewer
than 4 channels), ``depthwise`` (one channel per group), ``pointwise`` (1x1) and ``other``. The last line printed is
one JSON object: ``rows``, ``kernel_s`` (all nodes), ``op_s`` (per operator type) and ``conv_s`` (per kind).
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pandas as pd

from predict import bundle_and_work, test_rows


def conv_kinds(model_path: Path) -> dict:
    """Node name -> kind, for the convolutions of an (optimized) ONNX graph whose weights are 4-D initializers."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    kinds = {}
    for node in graph.node:
        if "Conv" not in node.op_type:
            continue
        weight = node.input[3] if node.op_type == "QLinearConv" else (node.input[1] if len(node.input) > 1 else "")
        w = dims.get(weight)
        group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        if not w or len(w) != 4:
            kinds[node.name] = "other"
        elif w[1] * group < 4:
            kinds[node.name] = "picture"
        elif group > 1 and w[1] == 1:
            kinds[node.name] = "depthwise"
        elif w[2:] == [1, 1]:
            kinds[node.name] = "pointwise"
        else:
            kinds[node.name] = "other"
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-fused")
    ap.add_argument("--export", help="an export bundle of --run (default: exported into the work folder)")
    ap.add_argument("--file", default="model.int8.onnx", help="the export's graph: model.int8.onnx or model.onnx")
    ap.add_argument("--rows", type=int, default=800, help="demo rows, when the bundle has to be trained first")
    ap.add_argument("--epochs", type=int, default=15, help="demo epochs, when the bundle has to be trained first")
    ap.add_argument("--repeat", type=int, default=3, help="the test rows repeated this many times per pass")
    ap.add_argument("--passes", type=int, default=3, help="profiled passes (after one that is not)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--work", help="folder for the trained demo bundle, the export and the profile (default: temporary)")
    args = ap.parse_args()

    import onnxruntime as ort

    import mmtune
    from mmtune.logs import quiet_libraries
    from mmtune.serving.export import export_onnx
    from mmtune.serving.runners import DISABLED_OPTIMIZERS, graph_feed

    quiet_libraries()
    run, tmp = bundle_and_work(args.run, args.work, "mmtune-bench-onnx-profile-", args.rows, args.epochs)
    export = Path(args.export) if args.export else tmp / "export"
    if not (export / "export.json").is_file():
        export_onnx(run, export, quantize="int8", log=lambda *_: None)
    if not (export / args.file).is_file():
        raise SystemExit(f"{str(export)!r} has no {args.file!r}; its graphs: "
                         f"{', '.join(sorted(p.name for p in export.glob('*.onnx'))) or 'none'}")
    pred = mmtune.load(export, backend="onnx")
    rows = pd.concat([test_rows(run)] * args.repeat, ignore_index=True)
    ds = pred.dataset(rows, with_labels=False)
    batches = list(pred.batches(ds, args.batch_size, pred.length_order(ds)))

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # not the note that an optimized graph is this CPU's own
    opts.optimized_model_filepath = str(tmp / "profiled.optimized.onnx")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "onnx-profile")
    session = ort.InferenceSession(str(export / args.file), opts, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=DISABLED_OPTIMIZERS)
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs() if o.name.startswith("proba/")]
    feeds = [graph_feed(b, inputs) for b in batches]
    for feed in feeds:  # one pass of warm-up (allocations, caches): its events are left out below
        session.run(names, feed)
    warm_runs = len(feeds)
    for _ in range(args.passes):
        for feed in feeds:
            session.run(names, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    kinds = conv_kinds(tmp / "profiled.optimized.onnx")

    runs_seen = 0
    op_s: collections.Counter = collections.Counter()
    conv_s: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs_seen += 1
            continue
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        # node events come before their run's model_run event: count those of the runs after the warm-up
        if runs_seen < warm_runs:
            continue
        seconds = e["dur"] / 1e6 / args.passes
        op_s[e["args"]["op_name"]] += seconds
        node = e["name"][: -len("_kernel_time")]
        if node in kinds:
            conv_s[kinds[node]] += seconds
    kernel_s = sum(op_s.values())
    print(f"{args.file} of {export}: {len(rows)} rows in {len(batches)} batches, one thread, {args.passes} passes "
          f"profiled; seconds per pass")
    print(f"{'operator':28} {'s':>8} {'share':>6}")
    for op, s in op_s.most_common(15):
        print(f"{op:28} {s:8.4f} {s / kernel_s:6.1%}")
    print("convolutions: " + ", ".join(f"{k} {s:.4f} s" for k, s in conv_s.most_common()))
    print(json.dumps({"rows": len(rows), "kernel_s": round(kernel_s, 4),
                      "op_s": {k: round(v, 4) for k, v in op_s.most_common()},
                      "conv_s": {k: round(v, 4) for k, v in conv_s.most_common()}}))


if __name__ == "__main__":
    main()
