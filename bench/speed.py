"""Training and prediction speed on the demo task, against a plain PyTorch loop in the same run.

    .venv/bin/python bench/speed.py [--rows 800] [--epochs 3]

Both trainers use the same model (demo config), data, DataLoader and batch size. Training
throughput counts the training part of each epoch (validation excluded) after the first epoch
(warm-up). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch

import mmtune
from mmtune.config import load_config
from mmtune.data.collate import Collator
from mmtune.data.datamodule import make_loader, prepare_data
from mmtune.demo import demo_config_path, make_dataset
from mmtune.finetune import apply_strategy, param_groups
from mmtune.models import build_model
from mmtune.logs import quiet_libraries

from _scratch import scratch


class TrainTimer(L.Callback):
    """Seconds spent in the training part of each epoch (up to the start of validation)."""

    def __init__(self):
        self.epochs = []
        self._t = None

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_validation_start(self, trainer, module):
        if self._t is not None and not trainer.sanity_checking:
            self.epochs.append(time.perf_counter() - self._t)
            self._t = None


def plain_loop(cfg, data, epochs: int):
    """forward, loss, backward, step — nothing else."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, {t.name: len(t.classes) for t in data.tasks})
    apply_strategy(model, cfg.finetune)
    collator = Collator({n: e.processor for n, e in model.encoders.items()}, cfg.modalities)
    loader = make_loader(data.dataset("train", cfg.modalities), collator, cfg.trainer.batch_size, True)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.finetune.encoder_lr), lr=cfg.optim.lr)
    task = cfg.data.label_column
    model.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for batch in loader:
            logits = model(batch["inputs"], batch["present"])[task]
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"][task])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--single", type=int, default=100, help="single-row predictions to time")
    args = ap.parse_args()
    quiet_libraries()
    work = scratch("mmtune-bench-")
    paths = make_dataset(work / "data", n=args.rows, image_size=96, seed=0)
    cfg = load_config(demo_config_path(), [
        f"output_dir={work / 'runs'}", f"data.train={paths['train']}", f"data.test={paths['test']}",
        f"trainer.max_epochs={args.epochs}", "trainer.early_stopping_patience=null", "trainer.progress_bar=false",
        "schedule.name=constant", "evaluation.report=false", "evaluation.explain=0",
        "evaluation.modality_contribution=false", "evaluation.linear_probe=false",
    ])
    data = prepare_data(cfg.data, cfg.modalities)
    n_train = len(data.frames["train"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n_train} training rows, "
          f"batch {cfg.trainer.batch_size}, strategy {cfg.finetune.type}", flush=True)

    # The plain loop runs before and after fit, so that drift of the machine's speed over the run
    # weighs on both sides alike; each run's first epoch is warm-up and not counted.
    plain_a = plain_loop(cfg, data, args.epochs)
    timer = TrainTimer()
    res = mmtune.fit(cfg, callbacks=[timer])
    plain_b = plain_loop(cfg, data, args.epochs)
    fit_times = timer.epochs
    plain = plain_a[1:] + plain_b[1:]
    plain_sps = n_train * len(plain) / sum(plain)
    fit_sps = n_train * (len(fit_times) - 1) / sum(fit_times[1:])
    print(f"plain loop epochs (s): {[round(t, 2) for t in plain_a]} before, {[round(t, 2) for t in plain_b]} after")
    print(f"mmtune fit epochs (s): {[round(t, 2) for t in fit_times]}")

    pred = mmtune.load(res.run_dir)
    test = pd.read_csv(paths["test"])
    test["image"] = [str(Path(paths["test"]).parent / p) for p in test["image"]]
    pred.predict_proba(test.head(8))  # warm-up
    t = time.perf_counter()
    pred.predict_proba(test, batch_size=64)
    batch_rps = len(test) / (time.perf_counter() - t)
    lat = []
    for i in range(args.single):
        row = test.iloc[[i % len(test)]]
        t = time.perf_counter()
        pred.predict_proba(row)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "fit_samples_per_s": round(fit_sps, 2),
        "plain_loop_samples_per_s": round(plain_sps, 2),
        "ratio": round(fit_sps / plain_sps, 3),
        "predict_rows_per_s": round(batch_rps, 1),
        "predict_p50_ms": round(p50, 2),
        "predict_p99_ms": round(p99, 2),
        "peak_rss_mb": round(peak_mb, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
