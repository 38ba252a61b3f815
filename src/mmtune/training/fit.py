"""``fit``: config + tables in, a run bundle out. The training loop itself is Lightning's."""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import lightning as L
import pandas as pd
import torch

from ..bundle import MARKER, write_bundle
from ..config import Config, load_config
from ..data.collate import Collator
from ..data.datamodule import PreparedData, make_loader, prepare_data
from ..data.manifest import TableSource
from ..evaluation import classification_metrics
from ..finetune import apply_strategy, trainable_parameter_count
from ..inference import predict_proba_batches
from ..models import build_model
from .module import ClassifierModule

log = logging.getLogger("mmtune")


@dataclass
class FitResult:
    run_dir: Path
    metrics: Dict[str, Any]
    config: Config

    def load(self):
        """The bundle as a :class:`~mmtune.Predictor`."""
        from ..serving.predictor import Predictor

        return Predictor.load(self.run_dir)


def quiet_libraries() -> None:
    """Silence download/loading progress bars and advice that say nothing to a user of mmtune."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")


def fit(config: Union[Config, str, Path, Mapping[str, Any]], train: Optional[TableSource] = None,
        val: Optional[TableSource] = None, test: Optional[TableSource] = None, *,
        overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False,
        callbacks: Sequence[L.Callback] = ()) -> FitResult:
    """Fine-tune the configured model and write its run bundle.

    ``train`` / ``val`` / ``test`` (DataFrames or manifest paths) take precedence over the config's
    ``data.*`` paths. ``resume`` continues from ``checkpoints/last.ckpt``; ``overwrite`` deletes an
    existing run of the same name first. Returns the bundle folder and its metrics.

    Raises ConfigError (bad config), BadRowsError (bad rows with ``on_bad_rows: error``),
    FileExistsError (the run folder is taken and neither ``resume`` nor ``overwrite`` is set).
    """
    quiet_libraries()
    cfg = config if isinstance(config, Config) and not overrides else load_config(config, overrides)
    run_dir = cfg.run_dir
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            if not last_ckpt.is_file():
                raise FileNotFoundError(f"cannot resume: {str(last_ckpt)!r} does not exist")
        else:
            state = "a finished run" if (run_dir / MARKER).is_file() else "an unfinished run"
            raise FileExistsError(
                f"{str(run_dir)!r} already holds {state}: pass --resume to continue it, --overwrite to replace it, "
                "or choose another name (--set name=...)."
            )
    elif resume:
        raise FileNotFoundError(f"cannot resume: {str(run_dir)!r} holds no run")

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    modalities = cfg.modalities
    data = prepare_data(cfg.data, modalities, train, val, test)
    task = cfg.data.label_column
    model = build_model(cfg.model, {task: len(data.class_names)})
    apply_strategy(model, cfg.finetune.strategy, cfg.finetune.unfreeze_last)
    log.info("trainable parameters: %d", trainable_parameter_count(model))

    collator = Collator({n: e.processor for n, e in model.encoders.items()}, modalities)
    t = cfg.trainer
    eval_bs = t.eval_batch_size or 2 * t.batch_size
    loaders = {
        "train": make_loader(data.dataset("train", modalities), collator, t.batch_size, True, cfg.data.num_workers, t.seed),
        "val": make_loader(data.dataset("val", modalities), collator, eval_bs, False, cfg.data.num_workers),
    }
    module = ClassifierModule(model, task, len(data.class_names), cfg.optim, cfg.schedule, cfg.finetune, t.monitor)
    previous_logs = _read_previous_logs(run_dir, last_ckpt) if resume else None
    trainer = build_trainer(cfg, run_dir, len(loaders["train"]), callbacks)
    if previous_logs is not None:
        _continue_logs(trainer, previous_logs)
    run_dir.mkdir(parents=True, exist_ok=True)
    # from_pretrained leaves models in eval mode and Lightning keeps the mode it finds: set it here
    # (the classifier keeps fully frozen encoders and frozen batch-norm layers in eval mode).
    module.train()
    trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=str(last_ckpt) if resume else None)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state, strict=False)
    model.cpu()
    metrics = evaluate_splits(model, task, data, collator, eval_bs, modalities)
    metrics["best_checkpoint"] = Path(best).name if best else None
    metrics["epochs_trained"] = int(trainer.current_epoch)
    metrics["trainable_parameters"] = trainable_parameter_count(model)
    write_bundle(run_dir, cfg, model, data.class_names, task, metrics, data.rejected)
    return FitResult(run_dir, metrics, cfg)


def _read_previous_logs(run_dir: Path, last_ckpt: Path) -> Optional[pd.DataFrame]:
    """Log rows up to the epoch the checkpoint holds (rows logged after it are redone on resume)."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    done_epoch = torch.load(last_ckpt, map_location="cpu", weights_only=False)["epoch"]
    df = pd.read_csv(path)
    return df[df["epoch"].isna() | (df["epoch"] <= done_epoch)] if "epoch" in df else df


def _continue_logs(trainer: L.Trainer, previous: pd.DataFrame) -> None:
    """Lightning's CSV logger starts a fresh metrics.csv; put the rows before the checkpoint back so
    that a resumed run keeps one log from epoch 0."""
    writer = trainer.logger.experiment  # creating it clears the old file
    from ..io import atomic_write_with

    atomic_write_with(writer.metrics_file_path, lambda tmp: previous[sorted(previous.columns)].to_csv(tmp, index=False))
    writer.metrics_keys = sorted(previous.columns)


def build_trainer(cfg: Config, run_dir: Path, n_train_batches: int, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning Trainer the config describes: best and last checkpoints, early stopping, CSV logs."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.trainer
    mode = "min" if t.monitor.endswith("loss") else "max"
    callbacks: list = [ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best", monitor=t.monitor,
                                       mode=mode, save_top_k=1, save_last=True, enable_version_counter=False)]
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=t.monitor, mode=mode, patience=t.early_stopping_patience))
    callbacks.extend(extra_callbacks)
    kwargs: Dict[str, Any] = {}
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = t.limit_train_batches
    return L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        callbacks=callbacks,
        logger=CSVLogger(save_dir=str(run_dir), name="logs", version=""),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_train_batches)),
        default_root_dir=str(run_dir),
        **kwargs,
    )


def evaluate_splits(model, task: str, data: PreparedData, collator: Collator, batch_size: int,
                    modalities) -> Dict[str, Any]:
    """scikit-learn metrics of ``model`` on the val and (when present) test splits."""
    out: Dict[str, Any] = {}
    for split in ("val", "test"):
        if split not in data.frames:
            continue
        ds = data.dataset(split, modalities)
        loader = make_loader(ds, collator, batch_size, False)
        proba = predict_proba_batches(model, task, loader)
        out[split] = classification_metrics(ds.labels, proba)
    return out
