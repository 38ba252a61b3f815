"""Training throughput against the hardware: full fine-tuning of the demo model (EfficientNet-Lite0 96 px +
MiniLM-L6, concat fusion) through mmtune's Lightning module, and the same model, data and optimizer through a
plain PyTorch loop.

    .venv/bin/python bench/throughput.py [--batch 32] [--steps 20] [--warmup 3] [--device cpu|cuda]
                                         [--precision 32-true|bf16-mixed] [--workers 0]

Figures (each measured in this run):
  samples_per_s        training samples per second through mmtune (Lightning), steady state (after --warmup)
  flops_per_sample     model FLOPs of one training sample: the forward counted by torch.utils.flop_counter on
                       one batch (matmuls and convolutions), times 3 for forward + backward
  achieved_flops       samples_per_s x flops_per_sample
  peak_flops           the machine's matmul rate measured here (square matmuls in the training dtype)
  mfu                  achieved / peak
  plain_loop_ratio     mmtune's samples/s divided by the plain loop's (1.0: no overhead)
  data_wait_fraction   in mmtune's loop, the share of step time spent waiting for the next batch
On a GPU the default is bf16-mixed (where supported) and batch 128. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _scratch import scratch


def build(args, work: Path):
    """The demo model and data module as fit builds them (full fine-tuning)."""
    import lightning as L

    from mmtune.config import load_config
    from mmtune.data.datamodule import TableDataModule
    from mmtune.demo import demo_config_path, make_dataset
    from mmtune.finetune import build_strategy
    from mmtune.models import build_model

    paths = make_dataset(work / "data", n=max(args.rows, args.batch * (args.steps + args.warmup + 2)), image_size=96,
                         seed=0, test_fraction=0.0)
    cfg = load_config(demo_config_path(), [f"output_dir={work}", f"data.train={paths['train']}", "data.test=null",
                                           "finetune.type=full", f"trainer.batch_size={args.batch}",
                                           f"data.num_workers={args.workers}", f"trainer.precision={args.precision}",
                                           "trainer.progress_bar=false", "data.val_fraction=0.05"])
    L.seed_everything(0, verbose=False)
    data = TableDataModule(cfg, None, None, None).read()
    model = build_model(cfg.model, {t.name: t.outputs for t in data.tasks})
    data.fit_encoders(model)
    strategy = build_strategy(cfg.finetune)
    strategy.prepare(model)
    strategy.apply(model)
    data.attach(model, strategy)
    return cfg, data, model, strategy


def matmul_peak(device, dtype, n: int, seconds: float = 4.0) -> float:
    """FLOP/s of n x n matmuls in ``dtype`` on ``device`` (the best of a few timed rounds)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(2):
            a @ b
        _sync(device)
        best = max(best, 2 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(module, batch, device) -> float:
    """3 x the forward FLOPs counted on one batch: a full fine-tuning backward costs twice its forward (the usual
    MFU convention). The backward is not counted directly: torch's counter ignores ``groups`` in
    ``convolution_backward`` and so counts EfficientNet's depthwise convolutions about 40x too high."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(batch)
    return 3 * counter.get_total_flops() / int(batch["index"].shape[0])


def lightning_run(cfg, data, model, strategy, args, device):
    """mmtune's module under Lightning: samples/s and the data-wait share, from per-batch timestamps."""
    import lightning as L

    from mmtune.training.module import build_module

    stamps = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            _sync(device)
            stamps.append(("start", time.perf_counter()))

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            _sync(device)
            stamps.append(("end", time.perf_counter()))

    module = build_module(cfg, model, data.tasks, strategy, data.class_weights())
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=device.type, devices=1,
                        precision=cfg.trainer.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Clock()])
    module.train()
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    starts = [t for k, t in stamps if k == "start"][args.warmup:]
    ends = [t for k, t in stamps if k == "end"][args.warmup:]
    total = ends[-1] - starts[0]
    wait = sum(s - e for s, e in zip(starts[1:], ends[:-1]))
    return {"samples_per_s": args.batch * len(starts) / total, "data_wait_fraction": wait / total}


def plain_run(cfg, data, model, strategy, args, device):
    """The same model, data loader, objective and optimizer in a plain PyTorch loop."""
    import torch

    from mmtune.training.module import build_module

    module = build_module(cfg, model, data.tasks, strategy, data.class_weights()).to(device)
    opt = module.make_optimizer(module.model)
    module.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision.startswith("bf16") else None
    loader = data.train_dataloader()
    times, it = [], iter(loader)
    for step in range(args.warmup + args.steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        _sync(device)
        t0 = time.perf_counter()
        batch = _to(batch, device)
        with autocast if autocast is not None else _null():
            logits = module(batch)
            loss = module.objective(logits, batch["labels"], batch.get("weights"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"samples_per_s": args.batch * args.steps / sum(times[args.warmup:])}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _to(node, device):
    import torch

    if torch.is_tensor(node):
        return node.to(device, non_blocking=True)
    if isinstance(node, dict):
        return {k: _to(v, device) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_to(v, device) for v in node)
    return node


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    bf16 = gpu and torch.cuda.is_bf16_supported()
    args.batch = args.batch or (128 if gpu else 32)
    args.precision = args.precision or ("bf16-mixed" if bf16 else "32-true")

    from mmtune.logs import quiet_libraries

    quiet_libraries()
    work = scratch("mmtune-throughput-")
    cfg, data, model, strategy = build(args, work)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    peak = matmul_peak(device, dtype, args.peak_n or (8192 if gpu else 2048))

    from mmtune.training.module import build_module

    probe = build_module(cfg, model, data.tasks, strategy, data.class_weights()).to(device)
    probe.train()
    batch = _to(next(iter(data.train_dataloader())), device)
    flops = flops_per_sample(probe, batch, device)
    mmtune_run = lightning_run(cfg, data, model, strategy, args, device)
    model.to(device)
    plain = plain_run(cfg, data, model, strategy, args, device)

    achieved = mmtune_run["samples_per_s"] * flops
    out = {"device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
           "precision": args.precision, "batch": args.batch, "steps": args.steps,
           "samples_per_s": round(mmtune_run["samples_per_s"], 2),
           "flops_per_sample": round(flops / 1e9, 3), "achieved_gflops": round(achieved / 1e9, 1),
           "peak_gflops": round(peak / 1e9, 1), "mfu": round(achieved / peak, 4),
           "plain_samples_per_s": round(plain["samples_per_s"], 2),
           "plain_loop_ratio": round(mmtune_run["samples_per_s"] / plain["samples_per_s"], 3),
           "data_wait_fraction": round(mmtune_run["data_wait_fraction"], 4)}
    print(f"device {out['device']}, {out['precision']}, batch {args.batch}, {args.steps} steps after {args.warmup} warm-up")
    print(f"mmtune (Lightning): {out['samples_per_s']:.1f} samples/s; plain PyTorch loop: "
          f"{out['plain_samples_per_s']:.1f} samples/s (ratio {out['plain_loop_ratio']:.2f})")
    print(f"model FLOPs per training sample: {out['flops_per_sample']:.2f} GFLOP (forward + backward); achieved "
          f"{out['achieved_gflops']:.1f} GFLOP/s of a measured matmul peak {out['peak_gflops']:.1f} GFLOP/s: "
          f"MFU {out['mfu']:.3f}")
    print(f"waiting for data: {100 * out['data_wait_fraction']:.1f} % of step time")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
