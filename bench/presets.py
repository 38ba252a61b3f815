"""Each preset and the linear probe on two generated tasks: test accuracy and wall time.

    .venv/bin/python bench/presets.py [--rows 800] [--best-seconds 600] [--tasks demo,orders] [--presets fast,balanced,best]

Tasks (generated offline, seeded):
  demo    the embedded demo: a picture's colour family x a note's verdict, 4 classes (EfficientNet-Lite0 96 px
          + MiniLM-L6)
  orders  a note's verdict x whether the order was late (a number among other columns), 4 classes
          (MiniLM-L6 + the tabular encoder; the probe sees only the text, the one pretrained encoder)

Each task's config names only its data and encoders; the preset chooses the rest (``best`` with a budget of
``--best-seconds`` for search and refit). Every fit runs in its own output folder (its own embedding cache, so
each time includes the one pass through the encoders) without the report and explanations. The linear probe is
the one each fit runs before training (`metrics.json["linear_probe"]`); its time is that step's.
The last line printed is one JSON object keyed by preset name (and ``linear_probe``): per task
``accuracy`` (test) and ``seconds``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from _scratch import scratch


def make_orders(out: Path, n: int, seed: int = 0):
    """A note's verdict (text) x late or on time (``days_late`` > 3, among noise columns) -> 4 classes."""
    import pandas as pd

    from mmtune.demo import _note

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        verdict = "keep" if i % 2 == 0 else "return"
        late = (i // 2) % 2 == 0
        rows.append({"id": f"o{i:05d}", "text": _note(rng, verdict),
                     "days_late": round(rng.uniform(3.5, 12) if late else rng.uniform(0, 2.5), 2),
                     "price": round(rng.uniform(5, 200), 2), "channel": rng.choice(["web", "shop", "phone"]),
                     "label": f"{'late' if late else 'on-time'}-{verdict}"})
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    n_test = n // 4
    paths = {"train": out / "train.csv", "test": out / "test.csv"}
    pd.DataFrame(rows[n_test:]).to_csv(paths["train"], index=False)
    pd.DataFrame(rows[:n_test]).to_csv(paths["test"], index=False)
    return paths


def task_configs(work: Path, rows: int):
    from mmtune.demo import make_dataset

    demo = make_dataset(work / "demo-data", n=rows, image_size=96, seed=0)
    orders = make_orders(work / "orders-data", rows)
    return {
        "demo": ({"data": {"columns": {"image": "image", "text": "text"}, "id_column": "id"},
                  "model": {"encoders": {"image": {"modality": "image", "checkpoint": "efficientnet-lite0", "image_size": 96},
                                         "text": {"modality": "text", "checkpoint": "minilm-l6", "max_length": 32}}}}, demo),
        "orders": ({"data": {"columns": {"text": "text", "tabular": ["days_late", "price", "channel"]}, "id_column": "id"},
                    "model": {"encoders": {"text": {"modality": "text", "checkpoint": "minilm-l6", "max_length": 32},
                                           "table": {"modality": "tabular", "checkpoint": "tabular"}}}}, orders),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=800)
    p.add_argument("--best-seconds", type=int, default=600)
    p.add_argument("--tasks", default="demo,orders")
    p.add_argument("--presets", default="fast,balanced,best")
    p.add_argument("--work", default=None, help="where data and runs go (default: a temporary folder)")
    args = p.parse_args()

    import mmtune
    from mmtune.logs import quiet_libraries

    quiet_libraries()
    work = Path(args.work or scratch("mmtune-presets-"))
    tasks = {k: v for k, v in task_configs(work, args.rows).items() if k in args.tasks.split(",")}
    out = {}
    for task, (cfg, paths) in tasks.items():
        for preset in args.presets.split(","):
            raw = json.loads(json.dumps(cfg))
            raw.update(name=f"{task}-{preset}", output_dir=str(work / "runs" / preset), preset=preset)
            raw["data"].update(train=str(paths["train"]), test=str(paths["test"]))
            raw["evaluation"] = {"report": False, "explain": 0}
            raw["trainer"] = {"progress_bar": False}
            if preset == "best":
                raw["trainer"]["max_time"] = {"seconds": args.best_seconds}
            print(f"\n== {task}: preset {preset}", flush=True)
            t0 = time.perf_counter()
            res = mmtune.fit(raw, overwrite=True)
            seconds = time.perf_counter() - t0
            m = res.metrics
            out.setdefault(preset, {})[task] = {"accuracy": round(m["test"]["label"]["accuracy"], 4),
                                                "seconds": round(seconds, 1)}
            if "search" in m:
                out[preset][task]["trials"] = len(m["search"]["trials"])
                out[preset][task]["best_params"] = m["search"]["best_params"]
            probe = (m.get("linear_probe") or {}).get("label")
            if probe and task not in out.get("linear_probe", {}):
                out.setdefault("linear_probe", {})[task] = {"accuracy": round(probe["test"]["accuracy"], 4),
                                                            "seconds": round(m.get("linear_probe_seconds", 0.0), 1)}
            print(f"   test accuracy {out[preset][task]['accuracy']:.3f} in {seconds:.0f} s "
                  f"(linear probe {probe['test']['accuracy']:.3f})" if probe else "", flush=True)
    print(f"\n{'':14}" + "".join(f"{t:>22}" for t in tasks))
    for name, per in out.items():
        print(f"{name:<14}" + "".join(f"{per[t]['accuracy']:>12.3f} {per[t]['seconds']:>7.0f} s" if t in per else f"{'':>22}"
                                      for t in tasks))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
