"""The LightningModule: it is given its parts (objective, metrics, optimizer and schedule factories, batch
transforms) and only runs the steps; checkpoints hold trainable weights only and load strictly."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import lightning as L
import torch

from ..encoders.base import batch_encoded
from .objective import EpochMetrics, Objective


class ClassifierModule(L.LightningModule):
    """Trains a :class:`~mmtune.models.MultimodalClassifier`. Logs ``train_loss``, ``train_acc`` and per
    validation epoch ``val_loss`` and the configured metrics (means over tasks, per task too with several).
    Checkpoints hold only trainable parameters and buffers (``keep_frozen``: everything): frozen encoder
    weights are rebuilt from the pretrained checkpoint, which keeps checkpoints small."""

    def __init__(self, model, objective: Objective, train_metrics: EpochMetrics, val_metrics: EpochMetrics,
                 make_optimizer: Callable, make_schedule: Callable, transforms: Sequence[Callable] = (),
                 mixup: Optional[Callable] = None, keep_frozen: bool = False, reweight_from_epoch: Optional[int] = None):
        super().__init__()
        self.reweight_from_epoch = reweight_from_epoch
        """Deferred re-weighting (Cao et al., 2019): the class weights apply to training from this epoch (0-based)
        on, and never to the validation loss, which stays comparable across the switch. None: always."""
        self.model, self.objective = model, objective
        self.train_metrics, self.val_metrics = train_metrics, val_metrics
        self.make_optimizer, self.make_schedule = make_optimizer, make_schedule
        self.transforms, self.mixup, self.keep_frozen = list(transforms), mixup, keep_frozen
        self.strict_loading = False  # frozen weights are not in checkpoints; on_load_checkpoint checks the keys
        import torchmetrics

        # the validation loss as a sum and a count, gathered over the processes of a distributed run: the mean
        # over every row, not a mean of per-process means
        self.val_loss = torchmetrics.MeanMetric()
        self._compiled = None

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        run = self._compiled if self._compiled is not None and self.training else self.model
        return run(batch.get("inputs"), batch["present"], encoded=batch_encoded(batch))

    def compile_model(self, backend) -> None:
        """Training steps run the model through ``torch.compile`` (``backend``: True for the default); the
        module keeps the plain model, so checkpoints and the bundle hold the same keys."""
        kwargs = {} if backend is True else {"backend": backend}
        object.__setattr__(self, "_compiled", torch.compile(self.model, **kwargs))

    def on_train_epoch_start(self):
        if self.reweight_from_epoch is not None:
            self.objective.weighting = self.current_epoch >= self.reweight_from_epoch

    def on_validation_epoch_start(self):
        if self.reweight_from_epoch is not None:
            self.objective.weighting = False

    def training_step(self, batch, batch_idx):
        for transform in self.transforms:
            batch = transform(batch)
        if self.mixup is not None:
            logits, loss = self.mixup(self.model, batch, self.objective)
        else:
            logits = self(batch)
            loss = self.objective(logits, batch["labels"], batch.get("weights"), penalty=True, rows=batch["index"])
        self.train_metrics.update(logits, batch["labels"])
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["index"].shape[0])
        return loss

    def on_train_epoch_end(self):
        for key, value in self.train_metrics.compute().items():
            if "/" not in key:
                self.log(key, value)

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        self.val_metrics.update(logits, batch["labels"])
        self.val_loss.update(self.objective(logits, batch["labels"]).detach(), weight=batch["index"].shape[0])

    def on_validation_epoch_end(self):
        self.log("val_loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        for key, value in self.val_metrics.compute().items():
            self.log(key, value, prog_bar=key == "val_acc")

    def configure_optimizers(self):
        opt = self.make_optimizer(self.model)
        schedule = self.make_schedule(opt, lambda: self.trainer.estimated_stepping_batches)
        return opt if schedule is None else {"optimizer": opt, "lr_scheduler": schedule}

    # ---- checkpoints without frozen weights, loaded strictly ------------------------------
    def checkpoint_keys(self) -> set:
        """The state-dict keys a checkpoint of this module holds."""
        keys = set(self.state_dict().keys())
        if self.keep_frozen:
            return keys
        return keys - {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        keep = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Lightning loads with strict=False (frozen weights are absent by design); the key set is checked here.
        check_checkpoint_keys(self.checkpoint_keys(), checkpoint.get("state_dict", {}), "the checkpoint")

    def load_checkpoint_weights(self, path) -> None:
        """Load a checkpoint's weights (``weights_only``: nothing in it is executed), refusing one whose keys
        are not exactly this module's. A folder (DeepSpeed ZeRO's sharded checkpoint) is consolidated first with
        DeepSpeed's own converter; any other folder is refused with its name."""
        state = _read_state(Path(path))
        check_checkpoint_keys(self.checkpoint_keys(), state, f"checkpoint {str(path)!r}")
        self.load_state_dict(state, strict=False)


def _read_state(path: Path) -> Dict[str, Any]:
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        except Exception as exc:  # a planted pickle (refused, never run), a truncated file, another kind of file
            raise ValueError(f"checkpoint {str(path)!r} is not a readable mmtune checkpoint ({type(exc).__name__}): "
                             "nothing in it was run; delete it, or start the run again with --overwrite") from None
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {str(path)!r} is not a readable mmtune checkpoint (no state_dict)")
        return state
    if path.is_dir() and (path / "latest").is_file():  # DeepSpeed: <ckpt>/latest names the tag folder
        # the shards this run has just written, consolidated by DeepSpeed's own converter
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return {k[len("_forward_module."):] if k.startswith("_forward_module.") else k: v
                for k, v in get_fp32_state_dict_from_zero_checkpoint(str(path)).items()}
    raise ValueError(f"best checkpoint {str(path)!r} is neither a file nor a DeepSpeed checkpoint folder; with FSDP "
                     "set the strategy's state_dict_type to 'full' so that the best epoch can be restored")


def check_checkpoint_keys(expected: set, state: Dict[str, Any], what: str) -> None:
    """Raise ValueError naming the missing and unexpected keys when ``state`` does not hold exactly ``expected``."""
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"{what} does not match this model: {'; '.join(parts)}. It was written for a different "
                         "model configuration.")


def _reweight_epoch(cfg) -> Optional[int]:
    """``imbalance.reweight_last`` epochs before ``trainer.max_epochs`` (0-based), or None."""
    last = cfg.imbalance.reweight_last
    return None if not last else max(0, cfg.trainer.max_epochs - last)


def build_module(cfg, model, tasks, strategy, class_weights: Optional[Dict[str, torch.Tensor]] = None,
                 class_counts: Optional[Dict[str, torch.Tensor]] = None) -> ClassifierModule:
    """The module a config describes, its parts built from the tables (loss, optimizer, schedule) and
    the batch transforms."""
    from ..losses import build_loss
    from ..optim import optimizer_factory, schedule_factory
    from .transforms import Mixup, batch_transforms

    if cfg.task == "matching":
        from .matching import InBatchRecall, MatchObjective

        objective = MatchObjective(model, bool(tasks), cfg.matching.pair_weight, cfg.matching.hard_negatives)
        metrics = InBatchRecall("train"), InBatchRecall("val")
    else:
        objective = Objective(build_loss(cfg.loss), tasks, class_weights, cfg.regularization.l1, model, class_counts)
        metrics = EpochMetrics(tasks, ["accuracy"], "train"), EpochMetrics(tasks, cfg.trainer.epoch_metrics, "val", calibrated=True)
    module = ClassifierModule(
        model, objective, *metrics,
        optimizer_factory(cfg.optim, cfg.finetune, include_frozen_encoders=strategy.keeps_frozen_weights),
        schedule_factory(cfg.schedule, cfg.optim, cfg.trainer.monitor), batch_transforms(cfg, model),
        Mixup(cfg.augment.mixup_alpha) if cfg.augment.mixup_alpha > 0 else None, keep_frozen=strategy.keeps_frozen_weights,
        reweight_from_epoch=_reweight_epoch(cfg))
    if cfg.trainer.compile:
        module.compile_model(cfg.trainer.compile)
    return module
