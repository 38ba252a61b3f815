"""The LightningModule: loss, metrics, optimizer groups and schedule around the one model class."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from ..finetune import param_groups


class ClassifierModule(L.LightningModule):
    """Trains a :class:`~mmtune.models.MultimodalClassifier` on one single-label task.

    Logs ``train_loss``, ``train_acc`` and, per validation epoch, ``val_loss``, ``val_acc`` and
    ``val_f1_macro``. Checkpoints hold only trainable parameters and buffers: frozen encoder
    weights are rebuilt from the pretrained checkpoint, which keeps checkpoints small.
    """

    def __init__(self, model, task: str, num_classes: int, optim_cfg, schedule_cfg, finetune_cfg, monitor: str = "val_loss"):
        super().__init__()
        self.model = model
        self.task = task
        self.num_classes = num_classes
        self.optim_cfg = optim_cfg
        self.schedule_cfg = schedule_cfg
        self.finetune_cfg = finetune_cfg
        self.monitor = monitor
        self.strict_loading = False  # frozen weights are not in checkpoints
        kind = "multiclass"
        self.train_acc = torchmetrics.Accuracy(task=kind, num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task=kind, num_classes=num_classes)
        self.val_f1 = torchmetrics.F1Score(task=kind, num_classes=num_classes, average="macro")

    def forward(self, inputs, present=None):
        return self.model(inputs, present)[self.task]

    def training_step(self, batch, batch_idx):
        logits = self(batch["inputs"], batch["present"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.train_acc(logits.detach(), batch["labels"])
        bs = batch["labels"].shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["inputs"], batch["present"])
        loss = F.cross_entropy(logits, batch["labels"])
        bs = batch["labels"].shape[0]
        self.val_acc(logits, batch["labels"])
        self.val_f1(logits, batch["labels"])
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("val_f1_macro", self.val_f1, on_epoch=True, batch_size=bs)

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        groups = param_groups(self.model, o.lr, o.weight_decay, self.finetune_cfg.encoder_lr)
        if o.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=o.lr)
        elif o.name == "adam":
            opt = torch.optim.Adam(groups, lr=o.lr)  # weight_decay per group = L2 added to the gradient
        elif o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        else:  # pragma: no cover - the config schema rejects it first
            raise ValueError(f"unknown optimizer {o.name!r}")
        s = self.schedule_cfg
        if s.name == "constant":
            return opt
        if s.name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_epochs, gamma=s.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if s.name == "plateau":
            mode = "min" if self.monitor.endswith("loss") else "max"
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=s.gamma, patience=s.patience, min_lr=s.min_lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "monitor": self.monitor}}
        if s.name == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, s.warmup_fraction, s.min_lr, o.lr))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        raise ValueError(f"unknown schedule {s.name!r}")  # pragma: no cover

    # ---- checkpoints without frozen weights --------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}


def cosine_with_warmup(total_steps: int, warmup_fraction: float, min_lr: float, base_lr: float):
    """A multiplier function for LambdaLR: linear from 0 to 1 over the warmup steps, then cosine
    down to ``min_lr / base_lr`` at ``total_steps``."""
    warmup = int(round(total_steps * warmup_fraction))
    floor = min(1.0, min_lr / base_lr) if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
