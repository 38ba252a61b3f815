"""Smaller models from a bundle: global magnitude pruning, or whole attention heads removed.

Unstructured: the smallest-magnitude weights of every linear and convolution layer (encoders, fusion, heads),
ranked together, set to zero with ``torch.nn.utils.prune`` and made permanent. The tensors keep their shapes:
the bundle compresses better, but dense CPU kernels run no faster.

Structured: whole attention heads of the transformer encoders — each head's query, key and value rows and its
columns of the attention output projection are cut out, the lowest-norm heads first (at least one kept per
layer) — and the expanded channels of inverted-residual CNN blocks (EfficientNet-Lite: the expand convolution's
filters, the depthwise filters, the projection's input columns and their batch norms), the lowest batch-norm
scale first. The tensors really shrink, so the model is smaller and faster. A pruned bundle records the heads
and channels each block keeps (``pruned.json``); :func:`apply_pruning` reshapes a freshly built model the same
way before its weights are loaded, so ``mmtune.load`` reads it like any other bundle.

An optional short fine-tuning (``finetune_epochs``) recovers accuracy; with unstructured pruning the masks stay
in place while it trains, so pruned weights stay zero."""
from __future__ import annotations

import gzip
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .models.pruning import (PRUNED, apply_pruning, attention_blocks, channel_blocks,  # noqa: F401  (public here too)
                             prune_channels, prune_heads)


def prunable_weights(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """The weights of every linear and convolution layer (embedding tables and norms are left alone)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.numel() > 1]


def prune_unstructured(model: nn.Module, sparsity: float) -> None:
    """Global magnitude pruning with ``torch.nn.utils.prune`` (masks attached; :func:`make_permanent` folds them)."""
    from torch.nn.utils import prune

    prune.global_unstructured(prunable_weights(model), pruning_method=prune.L1Unstructured, amount=float(sparsity))


def make_permanent(model: nn.Module) -> None:
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def sparsity_of(model: nn.Module) -> float:
    ws = [m.weight for m, _ in prunable_weights(model)]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws) / max(total, 1))


def finetune(model, config, tasks, epochs: int, log=print) -> None:
    """A short fine-tuning of every parameter on the run's training split (its config's data), with the run's
    loss, at a tenth of its learning rate, constant, without weight decay — through the run's own Lightning module
    and a Lightning ``Trainer`` (no validation, no checkpoints); pruning masks, if attached, keep pruned weights at
    zero."""
    import lightning as L

    from .data.datamodule import TableDataModule
    from .finetune import build_strategy
    from .finetune.strategies import STRATEGIES
    from .training.module import build_module

    if config.data.train is None and config.data.align is None:
        raise ValueError("--finetune-epochs needs the run's training data, and its config names none (data.train): "
                         "the run was fitted on tables passed in directly")
    torch.manual_seed(config.trainer.seed)
    data = TableDataModule(config).read()
    strategy = build_strategy(STRATEGIES.get("full").Config())
    for p in model.parameters():
        p.requires_grad_(True)
    data.attach(model, strategy)
    short = config.model_copy(deep=True)
    short.optim.lr, short.optim.weight_decay, short.schedule.name = config.optim.lr * 0.1, 0.0, "constant"
    module = build_module(short, model, tasks, strategy, data.class_weights())

    class Said(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            loss = float(trainer.callback_metrics.get("train_loss_epoch", float("nan")))
            log(f"  fine-tuning epoch {trainer.current_epoch + 1}/{epochs}: loss {loss:.4f}")

    on_gpu = next(model.parameters()).is_cuda  # the model stays where it is
    trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if on_gpu else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Said()])
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    model.eval()


def write_pruned(run_dir: Path, out: Path, model, pruned: Dict[str, Any]) -> Path:
    """A copy of the bundle in ``run_dir`` with ``model``'s weights and ``pruned.json``; bundle.json last."""
    from safetensors.torch import save_model

    from .bundle import MARKER, check_bundle, file_manifest
    from .io import atomic_write_dir

    def write(tmp: Path) -> None:
        for f in run_dir.iterdir():
            if f.name in (MARKER, "model.safetensors", "checkpoints", "logs", "export", "explanations", PRUNED) or f.name.startswith("."):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / PRUNED).write_text(json.dumps(pruned, indent=2))
        meta = check_bundle(run_dir)
        if isinstance(meta["files"], dict):  # format 3: the new files' sizes and hashes
            tops = {f.split("/", 1)[0] for f in meta["files"]} | {PRUNED}
            meta["files"] = file_manifest(tmp, sorted(f for f in tops if (tmp / f).exists()))
        else:
            meta["files"] = sorted(set(meta["files"]) | {PRUNED})
        meta["pruned_from"] = str(run_dir.resolve())
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))

    return atomic_write_dir(out, write)


def _latency_ms(pred, row, calls: int = 50) -> float:
    pred.predict_proba(row)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        pred.predict_proba(row)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def prune_run(run_dir, sparsities: List[float], data, structured: bool = False, finetune_epochs: int = 0,
              out_dir=None, log=print) -> List[Dict[str, Any]]:
    """Prune the bundle in ``run_dir`` at each sparsity (a share of the prunable weights, or of the attention heads
    with ``structured``), optionally fine-tune, write a bundle for each (``out_dir/<run>-pruned-<kind>-<s>``,
    default beside the run) and measure it on ``data`` next to the unpruned model: the task's main metric, parameter
    count (and non-zero ones), bundle size (and gzip size), single-row latency. Returns one dict per model."""
    from .data.manifest import absolute_paths, read_table
    from .evaluation.metrics import main_metric
    from .serving.predictor import Predictor

    from .io import check_output

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir.parent
    kind = "structured" if structured else "weights"
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ValueError(f"--sparsity {s}: each value must lie strictly between 0 and 1")
    if not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is not a folder")
    for s in sparsities:  # each pruned bundle replaces only an earlier pruned bundle of its name
        check_output(out_dir / f"{run_dir.name}-pruned-{kind}-{s:g}", inputs={"run bundle": [run_dir]}, kind="folder",
                     replaces=PRUNED)
    df, base = read_table(data)
    from .serving.matching import classifier_only

    absolute_paths(df, classifier_only(Predictor.load(run_dir, ensemble=False), "mmtune prune").config, base)

    def measure(pred, name, folder: Path, sparsity) -> Dict[str, Any]:
        task = pred.tasks[0]
        m = pred.evaluate(df)[task.name]
        weights = folder / "model.safetensors"
        raw = weights.read_bytes()
        params = sum(p.numel() for p in pred.model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in pred.model.parameters())
        pred.predict_proba(df.head(32))
        t = time.perf_counter()
        pred.predict_proba(df)
        rows_per_s = len(df) / (time.perf_counter() - t)
        return {"model": name, "sparsity": sparsity, "metric": main_metric(task), "value": float(m[main_metric(task)]),
                "parameters": params, "nonzero": nonzero, "bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6)),
                "p50_ms": _latency_ms(pred, df.head(1)), "rows_per_s": rows_per_s, "bundle": str(folder)}

    base_pred = Predictor.load(run_dir, ensemble=False)
    results = [measure(base_pred, "unpruned", run_dir, 0.0)]
    for s in sparsities:
        pred = Predictor.load(run_dir, ensemble=False)
        model = pred.model
        pruned: Dict[str, Any] = {"kind": kind, "sparsity": s}
        if structured:
            pruned["heads"], pruned["channels"] = prune_heads(model, s), prune_channels(model, s)
            if not pruned["heads"] and not pruned["channels"]:
                raise ValueError("--structured: the model has no transformer encoder with attention heads and no "
                                 "inverted-residual CNN (EfficientNet-Lite) whose channels could be removed")
        else:
            prune_unstructured(model, s)
        if finetune_epochs:
            log(f"sparsity {s}: fine-tuning {finetune_epochs} epoch(s)")
            finetune(model, pred.config, pred.tasks, finetune_epochs, log)
        make_permanent(model)
        pruned["weight_sparsity"] = sparsity_of(model)
        folder = write_pruned(run_dir, out_dir / f"{run_dir.name}-pruned-{kind}-{s:g}", model, pruned)
        in_memory = Predictor(model, pred.config, pred.tasks, pred.calibration, folder)
        reloaded = Predictor.load(folder, ensemble=False)
        row = measure(reloaded, f"{kind} {s:g}", folder, s)
        a = in_memory.predict_proba(df.head(16), calibrated=False)
        b = reloaded.predict_proba(df.head(16), calibrated=False)
        row["reload_max_abs_diff"] = float((a.select_dtypes("number") - b.select_dtypes("number")).abs().to_numpy().max())
        results.append(row)
    log(table(results))
    return results


def table(results: List[Dict[str, Any]]) -> str:
    base = results[0]
    lines = [f"{'model':16} {base['metric']:>9} {'change':>8} {'params':>11} {'non-zero':>11} {'MB':>7} {'gzip MB':>8} "
             f"{'p50 ms':>7} {'rows/s':>7}"]
    for r in results:
        lines.append(f"{r['model']:16} {r['value']:9.4f} {r['value'] - base['value']:+8.4f} {r['parameters']:11d} "
                     f"{r['nonzero']:11d} {r['bytes'] / 2**20:7.1f} {r['gzip_bytes'] / 2**20:8.1f} {r['p50_ms']:7.1f} "
                     f"{r['rows_per_s']:7.1f}")
    return "\n".join(lines)
