"""Training with Lightning's Trainer: checkpoints (best and last), early stopping, CSV logs that survive a
resume, and the callbacks the config and strategy need."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import lightning as L
import pandas as pd

from ..io import atomic_write_with
from ..schema import monitor_mode
from ..data.datamodule import label_codes
from .module import build_module


class ConfigInCheckpoint(L.Callback):
    """Stores the resolved config in every checkpoint, so that a resume can tell what changed."""

    def __init__(self, cfg):
        self.cfg = cfg.to_dict()

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint["mmtune_config"] = self.cfg


class StrategyEpochs(L.Callback):
    """At the start of each epoch, let a strategy whose trainable set changes by epoch (gradual) apply it."""

    def __init__(self, strategy):
        self.strategy = strategy

    def on_train_epoch_start(self, trainer, module):
        self.strategy.apply(module.model, epoch=trainer.current_epoch)
        module.model.train()


def train(cfg, model, strategy, data, run_dir: Path, previous: Optional[Dict[str, Any]],
          callbacks: Sequence[L.Callback] = ()) -> Dict[str, Any]:
    """Fit ``model`` on ``data`` (a TableDataModule) and restore the best epoch's weights; a fusion fitted
    without gradients (stacking) is fitted directly instead. Returns ``best_checkpoint``, ``epochs_trained``,
    this process's ``global_rank``, the training ``device`` and the trained ``model`` — after a strategy that
    shards the weights (FSDP, DeepSpeed), an unsharded copy holding the consolidated checkpoint's weights."""
    import torch

    group = cfg.data.group_column
    groups = None if group is None else label_codes(data.prepared.frames["train"][group])
    if groups is not None and len(groups) != len(data.datasets["train"]):
        groups = None  # synthetic rows (synthesis) belong to no group: a fitted-directly fusion folds by rows
    direct = model.fusion.fit_directly(model, data.datasets["train"], data.tasks, cfg.trainer.seed, groups)
    if direct is not None:
        return {"best_checkpoint": None, "epochs_trained": 0, "global_rank": 0, "device": torch.device("cpu"),
                "model": model, **direct}
    from ..distributed import is_main_process, shards_weights

    module = build_module(cfg, model, data.tasks, strategy, data.class_weights(), data.class_counts())
    extra = ([StrategyEpochs(strategy)] if strategy.varies_by_epoch else []) + [ConfigInCheckpoint(cfg), *callbacks]
    trainer = build_trainer(cfg, run_dir, math.ceil(len(data.datasets["train"]) / cfg.trainer.batch_size), extra)
    # FSDP / DeepSpeed leave the live weights sharded across the processes: the main process continues with an
    # unsharded copy made now, into which the consolidated checkpoint is loaded after training
    sharded = shards_weights(trainer.strategy)
    twin = copy.deepcopy(model) if sharded and is_main_process() else None
    last = run_dir / "checkpoints" / "last.ckpt"
    if previous is not None:
        _continue_logs(trainer, _previous_logs(run_dir, previous["epoch"]))
    # from_pretrained leaves models in eval mode and Lightning keeps the mode it finds: set it here
    # (the classifier keeps fully frozen encoders and frozen batch-norm layers in eval mode).
    module.train()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if previous is not None else None, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    restore = best if cfg.trainer.restore_best and best else None
    if sharded:
        trainer.save_checkpoint(str(last))  # every process takes part; the file (or folder) holds whole weights
        if twin is not None:
            build_module(cfg, twin, data.tasks, strategy, data.class_weights(), data.class_counts()).load_checkpoint_weights(restore or last)
            model = twin
    elif restore and trainer.global_rank == 0:
        module.load_checkpoint_weights(restore)
    out = {"best_checkpoint": Path(best).name if best else None, "epochs_trained": int(trainer.current_epoch),
           "global_rank": int(trainer.global_rank), "device": trainer.strategy.root_device, "model": model}
    if restore and cfg.trainer.average_best > 1 and not sharded and trainer.global_rank == 0:
        out["soup"] = soup(module, trainer.checkpoint_callback, cfg.trainer, data)
    return out


def average_states(states: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The element-wise mean of state dicts with the same keys (floating tensors; others from the first)."""
    import torch

    out = {}
    for k, v in states[0].items():
        if torch.is_tensor(v) and v.is_floating_point():
            out[k] = torch.stack([s[k].to(torch.float64) for s in states]).mean(0).to(v.dtype)
        else:
            out[k] = v
    return out


def soup(module, checkpoints, t, data) -> Dict[str, Any]:
    """Load into ``module`` the average of the best epochs' weights (the checkpoints ``checkpoints`` kept, best
    first): all of them (``uniform``), or (``greedy``) each added only when the average's validation metric does
    not get worse. Returns what went in."""
    from .module import _read_state

    mode = monitor_mode(t.monitor)
    ranked = sorted(checkpoints.best_k_models.items(), key=lambda kv: float(kv[1]), reverse=mode == "max")
    names = [Path(p).name for p, _ in ranked]
    scores = {n: float(v) for n, (_, v) in zip(names, ranked)}
    states = [_read_state(Path(p)) for p, _ in ranked]
    if t.soup == "uniform":
        module.load_state_dict(average_states(states), strict=False)
        return {"kind": "uniform", "members": names, "scores": scores}
    chosen, value = [0], _validate(module, t.monitor, data)
    for i in range(1, len(states)):
        module.load_state_dict(average_states([states[j] for j in chosen + [i]]), strict=False)
        v = _validate(module, t.monitor, data)
        if v < value if mode == "max" else v > value:  # worse: leave this one out
            continue
        chosen.append(i)
        value = v
    module.load_state_dict(average_states([states[j] for j in chosen]), strict=False)
    return {"kind": "greedy", "members": [names[j] for j in chosen], "candidates": names, "scores": scores,
            t.monitor: value}


def _validate(module, monitor: str, data) -> float:
    """The monitored validation metric of ``module`` now (a Lightning validation pass that logs nothing)."""
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.validate(module, dataloaders=data.val_dataloader(), verbose=False)[0][monitor])


def _previous_logs(run_dir: Path, done_epoch: int) -> Optional[pd.DataFrame]:
    """Log rows up to the epoch the checkpoint holds (rows logged after it are redone on resume)."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df[df["epoch"].isna() | (df["epoch"] <= done_epoch)] if "epoch" in df else df


def _continue_logs(trainer: L.Trainer, previous: Optional[pd.DataFrame]) -> None:
    """Lightning's CSV logger starts a fresh metrics.csv; put the rows before the checkpoint back so
    that a resumed run keeps one log from epoch 0."""
    if previous is None:
        return
    writer = trainer.loggers[0].experiment  # creating it clears the old file
    atomic_write_with(writer.metrics_file_path, lambda tmp: previous[sorted(previous.columns)].to_csv(tmp, index=False))
    writer.metrics_keys = sorted(previous.columns)


def build_trainer(cfg, run_dir: Path, n_train_batches: int, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning Trainer the config describes: best and last checkpoints, early stopping, CSV logs."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.trainer
    mode = monitor_mode(t.monitor)
    # "best" follows the monitored metric; "last" is written after every epoch whether or not the metric
    # improved (Lightning's own save_last only writes it when a monitored checkpoint was saved), so that a
    # resume continues from the latest epoch.
    # the best epoch ("best"), or with average_best > 1 the k best ("best-e<epoch>"), which a soup averages
    best_name = "best" if t.average_best == 1 else "best-e{epoch:03d}"
    callbacks: list = [ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename=best_name, monitor=t.monitor,
                                       mode=mode, save_top_k=t.average_best, save_last=False, enable_version_counter=False,
                                       auto_insert_metric_name=False),
                       ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="last", monitor=None,
                                       save_top_k=1, every_n_epochs=1, enable_version_counter=False)]
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=t.monitor, mode=mode, patience=t.early_stopping_patience))
    callbacks.extend(extra_callbacks)
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if t.tensorboard:
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("trainer.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
    kwargs: Dict[str, Any] = {}
    probe = getattr(cfg.finetune, "probe_epochs", 0)
    if probe and t.early_stopping_patience is not None:
        # LP-FT: the fine-tuning after the head-first epochs gets its own patience (the first fine-tuned epochs
        # often read worse than the probe while the encoders adapt; stopping there would ship the probe)
        wanted = probe + t.early_stopping_patience + 1
        kwargs["min_epochs"] = min(t.max_epochs, wanted) if t.max_epochs and t.max_epochs > 0 else wanted
    for key in ("limit_train_batches", "max_time", "val_check_interval"):
        if getattr(t, key) is not None:
            kwargs[key] = getattr(t, key)
    return L.Trainer(
        max_epochs=t.max_epochs, max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val, callbacks=callbacks, logger=loggers,
        enable_progress_bar=t.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_train_batches)), default_root_dir=str(run_dir), **kwargs,
    )
