"""Validation that flatters, and a group column that makes it honest: a planted task where each group (a speaker)
has its own shortcut — a token seen only in that group's rows, and one label per group — so the shortcut works for
every row of a known group and for no row of a new one.

    .venv/bin/python bench/groups.py [--groups 40] [--rows 8] [--seeds 3]

For each seed: a random validation split and a grouped one (``data.group_column: speaker``), the same model (the
tabular encoder over the token and a noise number), test rows from unseen groups. Prints validation and test
accuracy and whether the validation-flatters warning fired; the last line is one JSON object with the means.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from _scratch import scratch


def planted(n_groups: int, rows: int, seed: int, offset: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(offset, offset + n_groups):
        y = "a" if rng.random() < 0.5 else "b"
        out += [{"speaker": f"s{g}", "token": f"t{g}", "noise": float(rng.normal()), "y": y} for _ in range(rows)]
    return pd.DataFrame(out)


def fit(work: Path, name: str, train, test, group=None):
    import mmtune

    cfg = {"name": name, "output_dir": str(work), "data": {"columns": {"tabular": ["token", "noise"]},
                                                           "label_column": "y", "group_column": group},
           "model": {"encoders": {"t": {"modality": "tabular", "checkpoint": "tabular", "dim": 16}},
                     "fusion": {"hidden_dims": [32], "dropout": 0.0}},
           "finetune": {"type": "full"}, "optim": {"lr": 1e-2, "weight_decay": 0.0},
           "trainer": {"max_epochs": 25, "batch_size": 32, "progress_bar": False, "early_stopping_patience": None},
           "evaluation": {"report": False, "linear_probe": False, "explain": 0, "modality_contribution": False}}
    m = mmtune.fit(cfg, train=train, test=test).metrics
    return m["val"]["y"]["accuracy"], m["test"]["y"]["accuracy"], bool(m.get("warnings"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=40)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    from mmtune.logs import quiet_libraries

    quiet_libraries()
    work = scratch("mmtune-bench-groups-")
    got = {"random": [], "grouped": []}
    print(f"{'seed':<5} {'split':<8} {'val acc':>8} {'test acc':>9} {'warning':>8}")
    for seed in range(args.seeds):
        train = planted(args.groups, args.rows, 10 + seed)
        test = planted(max(5, args.groups // 3), args.rows, 20 + seed, offset=10_000)
        for split, group in (("random", None), ("grouped", "speaker")):
            val, tst, warned = fit(work, f"{split}-{seed}", train, test, group)
            got[split].append((val, tst, warned))
            print(f"{seed:<5} {split:<8} {val:>8.3f} {tst:>9.3f} {str(warned):>8}", flush=True)
    out = {f"{s}_{k}": round(float(np.mean([r[i] for r in rows])), 4) for s, rows in got.items()
           for i, k in enumerate(("val_acc", "test_acc"))}
    out.update({f"{s}_warned": sum(r[2] for r in rows) for s, rows in got.items()}, seeds=args.seeds)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
