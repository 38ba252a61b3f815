"""``fit``: config + tables in, a run bundle out. The training loop itself is Lightning's."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import lightning as L
import pandas as pd
import torch

import numpy as np

from ..bundle import RunClaim, write_bundle
from ..config import RESUMABLE_KEYS, Config, config_differences, load_config
from ..data.collate import Collator
from ..data.datamodule import PreparedData, make_loader, prepare_data
from ..data.manifest import TableSource
from ..evaluation.evaluate import finalize
from ..evaluation.report import build_report
from ..finetune import apply_strategy, trainable_parameter_count
from ..finetune.feature_cache import CachedDataset
from ..finetune.lora import add_adapters, merge_adapters
from ..models import build_model
from .module import ClassifierModule, GradualUnfreezing

log = logging.getLogger("mmtune")


@dataclass
class FitResult:
    run_dir: Path
    metrics: Dict[str, Any]
    config: Config
    model: Any = None
    """The trained model as it is in memory after fit (LoRA merged, on the CPU) — what the bundle holds."""
    tasks: Any = None
    """The tasks with their classes and fitted calibration."""

    def in_memory(self):
        """A :class:`~mmtune.Predictor` over the in-memory model (no reloading from the bundle)."""
        from ..serving.predictor import Predictor

        return Predictor(self.model, self.config, self.tasks, self.run_dir)

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
    ``data.*`` paths. ``resume`` continues from ``checkpoints/last.ckpt`` (refused when the config changed
    in a way that changes the model or its training); ``overwrite`` builds the new run beside an existing
    one of the same name and replaces it only once complete. Returns the bundle folder and its metrics.

    Raises ConfigError (bad config), BadRowsError (bad rows with ``on_bad_rows: error``),
    FileExistsError (the run folder is taken and neither ``resume`` nor ``overwrite`` is set),
    RunInUseError (another process is writing the same run).
    """
    quiet_libraries()
    cfg = config if isinstance(config, Config) and not overrides else load_config(config, overrides)
    with RunClaim(cfg.run_dir, resume, overwrite) as claim:
        metrics, model, tasks = _fit_in(claim.work_dir, cfg, train, val, test, claim.resume, callbacks)
        claim.commit()
    return FitResult(cfg.run_dir, metrics, cfg, model, tasks)


def _fit_in(run_dir: Path, cfg: Config, train, val, test, resume: bool, callbacks):
    """The run itself, written into ``run_dir`` (the run folder, or the staging folder of an overwrite)."""
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    previous = _read_resume_state(last_ckpt, cfg) if resume else None

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    modalities = cfg.modalities
    data = prepare_data(cfg.data, modalities, train, val, test, cfg.imbalance.sample_weight_column)
    tasks = data.tasks
    _check_loss_options(cfg, tasks)
    allow_missing = bool(cfg.data.allow_missing) or cfg.model.modality_dropout > 0
    model = build_model(cfg.model, {t.name: len(t.classes) for t in tasks}, allow_missing=allow_missing)
    ft = cfg.finetune
    if ft.strategy in ("lora", "ia3"):
        add_adapters(model, ft)
    apply_strategy(model, ft)
    log.info("trainable parameters: %d", trainable_parameter_count(model))

    t = cfg.trainer
    eval_bs = t.eval_batch_size or 2 * t.batch_size
    datasets, collate = _datasets(cfg, model, data, modalities, eval_bs)
    synthesis_report = None
    if cfg.synthesis.method != "none":
        from ..synthesis.oversample import synthesize_cached

        keys = sorted(datasets["train"].outputs)
        datasets["train"], synthesis_report = synthesize_cached(datasets["train"], keys, cfg.synthesis, tasks[0].name, t.seed,
                                                                 tasks[0].classes)
    loaders = {split: make_loader(ds, collate, eval_bs, False,
                                  cfg.data.num_workers if not isinstance(ds, CachedDataset) else 0)
               for split, ds in datasets.items() if split != "train"}
    loaders["train"] = _train_loader(cfg, model, datasets["train"], collate, modalities, tasks)
    if cfg.model.fusion.type == "stacking":
        from .stacking import fit_stacking

        fit_stacking(model, datasets["train"], tasks[0], cfg.model.fusion.stacking_folds, t.seed)
        best, epochs = "", 0
    else:
        module = ClassifierModule(model, tasks, cfg.optim, cfg.schedule, ft, t.monitor, cfg.model.modality_dropout,
                                  cfg.augment, cfg.regularization, cfg.imbalance,
                                  _class_weights(cfg, tasks, datasets["train"]), t.epoch_metrics)
        extra = ([GradualUnfreezing(ft)] if ft.strategy == "gradual" else []) + [_ConfigInCheckpoint(cfg)]
        extra += list(callbacks)
        previous_logs = _previous_logs(run_dir, previous["epoch"]) if previous is not None else None
        trainer = build_trainer(cfg, run_dir, len(loaders["train"]), extra)
        if previous_logs is not None:
            _continue_logs(trainer, previous_logs)
        # from_pretrained leaves models in eval mode and Lightning keeps the mode it finds: set it here
        # (the classifier keeps fully frozen encoders and frozen batch-norm layers in eval mode).
        module.train()
        trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=str(last_ckpt) if resume else None,
                    weights_only=True)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if t.restore_best and best:
            module.load_checkpoint_weights(best)
        epochs = int(trainer.current_epoch)
    model.cpu()
    trainable = trainable_parameter_count(model)
    merge_adapters(model)  # LoRA / IA3 folded into plain weights: what the bundle ships
    images = {s: _image_paths(data, s) for s in data.frames} if "image" in modalities else None
    metrics, predictions = finalize(model, tasks, loaders, data.frames, cfg.evaluation, modalities,
                                    cfg.data.id_column, images, cfg.data.text_column if "text" in modalities else None)
    metrics["best_checkpoint"] = Path(best).name if best else None
    metrics["epochs_trained"] = epochs
    metrics["trainable_parameters"] = trainable
    if synthesis_report is not None:
        metrics["synthesis"] = synthesis_report
    if cfg.evaluation.baselines and len(modalities) > 1:
        metrics["baselines"] = fit_baselines(cfg, metrics, train, val, test)
    report = (lambda: build_report(run_dir)) if cfg.evaluation.report else None
    write_bundle(run_dir, cfg, model, tasks, metrics, data.rejected, predictions, before_marker=report)
    return metrics, model, tasks


class _ConfigInCheckpoint(L.Callback):
    """Stores the resolved config in every checkpoint, so that a resume can tell what changed."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.to_dict()

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint["mmtune_config"] = self.cfg


def _read_resume_state(last_ckpt: Path, cfg: Config) -> Dict[str, Any]:
    """The checkpoint's epoch, after checking it was written for this config (``weights_only``: a planted
    pickle is refused, never run). Raises ValueError naming the keys that differ."""
    try:
        ckpt = torch.load(last_ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError… for a bad file
        raise ValueError(f"cannot resume: {str(last_ckpt)!r} is not a readable mmtune checkpoint "
                         f"({type(exc).__name__}); start again with --overwrite") from None
    before = ckpt.get("mmtune_config")
    if before is not None:
        changed = config_differences(before, cfg.to_dict(), RESUMABLE_KEYS)
        if changed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise ValueError(f"cannot resume {str(cfg.run_dir)!r}: the config differs from the one it was trained "
                             f"with at {shown}{more}. Resume with the original settings, or start a new run "
                             "(--overwrite or another name).")
    return {"epoch": int(ckpt.get("epoch", 0))}


def _train_loader(cfg: Config, model, ds, collate, modalities, tasks):
    """The training loader: shuffled, or drawn by the class-balancing sampler; with text augmentation
    in its collator (training only)."""
    from ..data.samplers import balanced_sampler
    from ..data.transforms import TextAugment

    t = cfg.trainer
    sampler = None
    if cfg.imbalance.sampler:
        task = next((x for x in tasks if not x.multilabel), None)
        if task is None:
            raise ValueError("imbalance.sampler needs a single-label task to balance")
        labels = ds.labels[task.name]
        labels = labels.tolist() if hasattr(labels, "tolist") else labels
        # classes only: sample weights act in the loss, so a row counts w once (not w from the sampler and w again)
        sampler = balanced_sampler(labels, None, t.seed)
    if not isinstance(ds, CachedDataset):
        mask = next((getattr(e.processor, "tokenizer", None) for e in model.encoders.values()
                     if getattr(e.processor, "tokenizer", None) is not None), None)
        augment = TextAugment(cfg.augment.text, getattr(mask, "mask_token", None) or getattr(mask, "unk_token", None), t.seed)
        collate = Collator(collate.processors, modalities, text_augment=augment)
    return make_loader(ds, collate, t.batch_size, True, cfg.data.num_workers if not isinstance(ds, CachedDataset) else 0,
                       t.seed, sampler)


def _check_loss_options(cfg: Config, tasks) -> None:
    """Loss settings that depend on the classes found in the data."""
    if cfg.imbalance.focal_alpha is not None:
        wide = [t for t in tasks if not t.multilabel and len(t.classes) != 2]
        if wide:
            raise ValueError(f"imbalance.focal_alpha is defined for binary tasks; task {wide[0].name!r} has "
                             f"{len(wide[0].classes)} classes: use imbalance.class_weights to weight classes there")


def _class_weights(cfg: Config, tasks, train_ds) -> Dict[str, torch.Tensor]:
    from ..losses import class_weights

    scheme = cfg.imbalance.class_weights
    out = {}
    for task in tasks:
        if task.multilabel or scheme == "none":
            continue
        labels = train_ds.labels[task.name]
        labels = np.asarray(labels.tolist() if hasattr(labels, "tolist") else labels, dtype=int)
        w = class_weights(np.bincount(labels, minlength=len(task.classes)), scheme, cfg.imbalance.effective_beta,
                          task.classes)
        if w is not None:
            out[task.name] = w
    return out


def _image_paths(data: PreparedData, split: str):
    from ..data.manifest import resolve_image_path
    from ..values import is_blank

    col = data.spec.image_column
    base = data.base_dirs.get(split)
    return [None if is_blank(v) else str(resolve_image_path(v, base).resolve()) for v in data.frames[split][col]]


def fit_baselines(cfg: Config, fused_metrics: Dict[str, Any], train, val, test) -> Dict[str, Any]:
    """Train each modality alone with the same settings (encoders reading only it) and report the
    fused model's gain over the best of them, on the test split (validation when there is none)."""
    split = "test" if "test" in fused_metrics else "val"
    task = cfg.tasks[0].name
    models = {"fused": {k: fused_metrics[split][task].get(k) for k in ("accuracy", "f1_macro")}}
    for modality in cfg.modalities:
        if not any(e.modality == modality for e in cfg.model.encoders.values()):
            continue  # a joint encoder (CLIP) has no single-modality counterpart here
        sub = cfg.only_modality(modality, f"{cfg.name}-{modality}-only")
        sub.evaluation.baselines = False
        sub.evaluation.report = False
        sub.evaluation.modality_contribution = False
        res = fit(sub, train, val, test, overwrite=True)
        models[f"{modality} only"] = {k: res.metrics[split][task].get(k) for k in ("accuracy", "f1_macro")}
    best_single = max(v["accuracy"] for k, v in models.items() if k != "fused")
    return {"split": split, "task": task, "models": models,
            "fusion_gain": models["fused"]["accuracy"] - best_single}


def _datasets(cfg: Config, model, data: PreparedData, modalities, eval_bs: int):
    """Raw datasets with the encoders' collator, or — frozen strategy with the cache on — datasets of
    cached encoder outputs (computed once per dataset and checkpoint)."""
    splits = [s for s in ("train", "val", "test") if s in data.frames]
    if cfg.finetune.strategy == "frozen" and cfg.finetune.cache:
        from ..finetune.feature_cache import build_cached_dataset, encoder_fingerprint, first

        cache_dir = Path(cfg.finetune.cache_dir or Path(cfg.output_dir) / ".cache")
        specs = {n: e.model_dump(mode="json") for n, e in cfg.model.encoders.items()}
        prints = {n: encoder_fingerprint(enc, specs[n]) for n, enc in model.encoders.items()}
        return {s: build_cached_dataset(model, specs, data.dataset(s, modalities), modalities, cache_dir, eval_bs, prints)
                for s in splits}, first
    collator = Collator({n: e.processor for n, e in model.encoders.items()}, modalities)
    return {s: data.dataset(s, modalities) for s in splits}, collator


def _previous_logs(run_dir: Path, done_epoch: int) -> Optional[pd.DataFrame]:
    """Log rows up to the epoch the checkpoint holds (rows logged after it are redone on resume)."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df[df["epoch"].isna() | (df["epoch"] <= done_epoch)] if "epoch" in df else df


def _continue_logs(trainer: L.Trainer, previous: pd.DataFrame) -> None:
    """Lightning's CSV logger starts a fresh metrics.csv; put the rows before the checkpoint back so
    that a resumed run keeps one log from epoch 0."""
    writer = trainer.loggers[0].experiment  # creating it clears the old file
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
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if t.tensorboard:
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("trainer.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
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
        logger=loggers,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_train_batches)),
        default_root_dir=str(run_dir),
        **kwargs,
    )
