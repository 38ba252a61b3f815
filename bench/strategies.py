"""Every fine-tuning strategy on the demo task: trainable parameters, peak memory, seconds per
epoch, validation accuracy; and the embedding cache's epoch-time gain.

    .venv/bin/python bench/strategies.py [--rows 600] [--epochs 3]

Each strategy runs in its own process (so peak resident memory is its own), with the demo config,
the same data and the same number of epochs. Seconds per epoch is the mean training time of the
epochs after the first (validation excluded); for ``frozen (cache)`` the cache is built before training
(it counts in ``total_s``, not in the epochs).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

from _scratch import scratch

STRATEGIES = [
    ("full", {}),
    ("partial", {"finetune.unfreeze_last": 1}),
    ("gradual", {"finetune.unfreeze_last": 1}),
    ("lora", {"finetune.r": 8}),
    ("ia3", {}),
    ("bitfit", {}),
    ("frozen (cache)", {"finetune.cache": True}),
    ("frozen (no cache)", {"finetune.cache": False}),
]


def run_one(name, extra, paths, work, epochs, queue):
    import lightning as L

    import mmtune
    from mmtune.config import load_config
    from mmtune.demo import demo_config_path
    from mmtune.logs import quiet_libraries

    quiet_libraries()

    class Timer(L.Callback):
        def __init__(self):
            self.epochs, self._t = [], None

        def on_train_epoch_start(self, trainer, module):
            self._t = time.perf_counter()

        def on_validation_start(self, trainer, module):
            if self._t is not None:
                self.epochs.append(time.perf_counter() - self._t)
                self._t = None

    strategy = name.split()[0]
    overrides = [f"output_dir={work}", f"name={strategy}-{len(extra)}-{abs(hash(name)) % 1000}",
                 f"data.train={paths['train']}", f"data.test={paths['test']}", f"finetune.type={strategy}",
                 f"trainer.max_epochs={epochs}", "trainer.early_stopping_patience=null", "trainer.progress_bar=false",
                 "schedule.name=constant", "optim.lr=0.002", "finetune.encoder_lr=0.0003"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    if strategy in ("lora", "ia3"):
        overrides.append("finetune.encoder_lr=0.002")
    timer = Timer()
    t0 = time.perf_counter()
    res = mmtune.fit(load_config(demo_config_path(), overrides), overwrite=True, callbacks=[timer])
    queue.put({
        "strategy": name,
        "trainable_parameters": res.metrics["trainable_parameters"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "first_epoch_s": round(timer.epochs[0], 2),
        "s_per_epoch": round(sum(timer.epochs[1:]) / max(1, len(timer.epochs) - 1), 3),
        "val_accuracy": round(res.metrics["val"]["label"]["accuracy"], 3),
        "test_accuracy": round(res.metrics["test"]["label"]["accuracy"], 3),
        "total_s": round(time.perf_counter() - t0, 1),
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated strategy names to run (default: all), e.g. "
                    "'frozen (cache),frozen (no cache)'")
    args = ap.parse_args()
    chosen = [s for s in STRATEGIES if args.only is None or s[0] in args.only.split(",")]
    from mmtune.demo import make_dataset

    work = scratch("mmtune-strategies-")
    paths = make_dataset(work / "data", n=args.rows, image_size=96, seed=0)
    ctx = mp.get_context("spawn")
    rows = []
    for name, extra in chosen:
        q = ctx.Queue()
        p = ctx.Process(target=run_one, args=(name, extra, paths, work / "runs", args.epochs, q))
        p.start()
        result = q.get()
        p.join()
        rows.append(result)
        print(f"{name:<18} trainable {result['trainable_parameters']:>10,}  peak {result['peak_rss_mb']:>7.0f} MB  "
              f"{result['s_per_epoch']:>7.2f} s/epoch  val acc {result['val_accuracy']:.3f}  "
              f"test acc {result['test_accuracy']:.3f}", flush=True)
    by = {r["strategy"]: r for r in rows}
    if not {"frozen (no cache)", "frozen (cache)"} <= set(by):
        print(json.dumps({"rows": args.rows, "epochs": args.epochs, "strategies": rows}))
        return
    ratio = by["frozen (no cache)"]["s_per_epoch"] / max(by["frozen (cache)"]["s_per_epoch"], 1e-9)
    print(f"cached vs uncached epoch time: {ratio:.1f}x faster")
    print(json.dumps({"rows": args.rows, "epochs": args.epochs, "cache_speedup": round(ratio, 1), "strategies": rows}))


if __name__ == "__main__":
    sys.exit(main())
