"""The LightningModule: loss, metrics, optimizer groups and schedule around the one model class."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from ..finetune import param_groups
from ..finetune.param_groups import decayed_parameter_ids
from ..finetune.feature_cache import as_encoder_outputs


class ClassifierModule(L.LightningModule):
    """Trains a :class:`~mmtune.models.MultimodalClassifier` on one or more tasks.

    Loss: the weighted sum over tasks of cross-entropy (single-label) or binary cross-entropy
    (multi-label). Logs ``train_loss``, ``train_acc`` and per validation epoch ``val_loss``,
    ``val_acc`` and ``val_f1_macro`` — means over tasks (subset accuracy for a multi-label task) —
    plus ``val_acc/<task>`` and ``val_f1_macro/<task>`` when there are several tasks.
    Checkpoints hold only trainable parameters and buffers: frozen encoder weights are rebuilt
    from the pretrained checkpoint, which keeps checkpoints small.
    """

    def __init__(self, model, tasks, optim_cfg, schedule_cfg, finetune_cfg, monitor: str = "val_loss",
                 modality_dropout: float = 0.0, augment_cfg=None, regularization_cfg=None, imbalance_cfg=None,
                 class_weights: Optional[Dict[str, torch.Tensor]] = None, epoch_metrics=None):
        super().__init__()
        self.model = model
        self.tasks = {t.name: t for t in tasks}
        self.optim_cfg = optim_cfg
        self.schedule_cfg = schedule_cfg
        self.finetune_cfg = finetune_cfg
        self.monitor = monitor
        self.modality_dropout = modality_dropout
        self.augment_cfg = augment_cfg
        self.reg = regularization_cfg
        self.imb = imbalance_cfg
        for name, w in (class_weights or {}).items():
            self.register_buffer(f"class_weight_{name}", w, persistent=False)
        self._class_weight_names = set(class_weights or {})
        self.image_augment = None
        if augment_cfg is not None and augment_cfg.image.enabled:
            from ..data.transforms import ImageAugment

            self.image_augment = ImageAugment(augment_cfg.image)
        self._image_norm = _image_normalisations(model)
        self._token_info = _token_info(model)
        self._l1_ids = decayed_parameter_ids(model)  # the same weights as weight decay
        self.strict_loading = False  # frozen weights are not in checkpoints; on_load_checkpoint checks the keys
        self.train_acc = torch.nn.ModuleDict()
        self.val_metrics = torch.nn.ModuleDict()
        names = list(epoch_metrics or ["accuracy", "f1_macro"])
        for t in tasks:
            self.train_acc[t.name] = _metric("accuracy", t)
            self.val_metrics[t.name] = torch.nn.ModuleDict(
                {m: _metric(m, t) for m in names if _metric(m, t) is not None})

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        encoded = batch.get("encoded")
        return self.model(batch.get("inputs"), batch["present"],
                          encoded=as_encoder_outputs(encoded) if encoded is not None else None)

    def row_losses(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row loss of one task: BCE (multi-label), focal loss, or cross-entropy with class weights
        and label smoothing as configured."""
        t = self.tasks[name]
        if t.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean(1)
        weight = getattr(self, f"class_weight_{name}") if name in self._class_weight_names else None
        if self.imb is not None and self.imb.focal_gamma is not None:
            from ..losses import focal_loss

            return focal_loss(logits, target, self.imb.focal_gamma, self.imb.focal_alpha, weight)
        smoothing = self.reg.label_smoothing if self.reg is not None else 0.0
        return F.cross_entropy(logits.float(), target, weight=weight, reduction="none", label_smoothing=smoothing)

    def loss(self, logits: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor],
             weights: Optional[torch.Tensor] = None, mix: Optional[tuple] = None) -> torch.Tensor:
        """Weighted sum over tasks of the (sample-weighted) mean row loss; with ``mix`` = (lam, perm) the
        targets are mixed like the features were."""
        total = 0.0
        for name, t in self.tasks.items():
            rows = self.row_losses(name, logits[name], labels[name])
            if mix is not None:
                lam, perm = mix
                rows = lam * rows + (1 - lam) * self.row_losses(name, logits[name], labels[name][perm])
            if weights is not None:
                part = (rows * weights).sum() / weights.sum().clamp_min(1e-12)
            else:
                part = rows.mean()
            total = total + t.weight * part
        if self.reg is not None and self.reg.l1 > 0 and self.training:
            total = total + self.reg.l1 * sum(p.abs().sum() for p in self.model.parameters()
                                              if p.requires_grad and id(p) in self._l1_ids)
        return total

    def _drop_modalities(self, present: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hide each present modality of a row with probability ``modality_dropout``, never all of them."""
        if self.modality_dropout <= 0 or len(present) < 2:
            return present
        keys = sorted(present)
        avail = torch.stack([present[k] for k in keys], 1)
        drop = torch.rand(avail.shape, device=avail.device) < self.modality_dropout
        kept = avail & ~drop
        none_left = ~kept.any(1)
        kept[none_left] = avail[none_left]
        return {k: kept[:, i] for i, k in enumerate(keys)}

    @staticmethod
    def _target(t, y):
        return y.int() if t.multilabel else y

    def augment_inputs(self, inputs: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
        """Training batches only: kornia image augmentation and token-level text augmentation."""
        if inputs is None or self.augment_cfg is None:
            return inputs
        out = dict(inputs)
        if self.image_augment is not None:
            for name, (mean, std) in self._image_norm.items():
                if name in out and "pixel_values" in out[name]:
                    out[name] = {**out[name], "pixel_values": self.image_augment(out[name]["pixel_values"], mean, std)}
        tc = self.augment_cfg.text
        if tc.token_mask > 0 or tc.token_dropout > 0:
            from ..data.transforms import augment_tokens

            for name, (mask_id, special) in self._token_info.items():
                if name in out and "input_ids" in out[name]:
                    ids, att = augment_tokens(out[name]["input_ids"], out[name].get("attention_mask"), tc, mask_id, special)
                    out[name] = {**out[name], "input_ids": ids, **({"attention_mask": att} if att is not None else {})}
        return out

    def training_step(self, batch, batch_idx):
        batch = {**batch, "present": self._drop_modalities(batch["present"]),
                 "inputs": self.augment_inputs(batch.get("inputs"))}
        alpha = self.augment_cfg.mixup_alpha if self.augment_cfg is not None else 0.0
        if alpha > 0:  # manifold mixup on the fused representation
            encoded = batch.get("encoded")
            outputs = as_encoder_outputs(encoded) if encoded is not None else self.model.encode(batch["inputs"])
            feats = self.model.fuse(outputs, batch["present"])
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
            perm = torch.randperm(feats.shape[0], device=feats.device)
            feats = lam * feats + (1 - lam) * feats[perm]
            logits = {t: head(feats) for t, head in self.model.heads.items()}
            loss = self.loss(logits, batch["labels"], batch.get("weights"), mix=(lam, perm))
        else:
            logits = self(batch)
            loss = self.loss(logits, batch["labels"], batch.get("weights"))
        bs = batch["index"].shape[0]
        for name, t in self.tasks.items():
            self.train_acc[name].update(logits[name].detach(), self._target(t, batch["labels"][name]))
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        return loss

    def on_train_epoch_end(self):
        accs = [m.compute() for m in self.train_acc.values()]
        self.log("train_acc", torch.stack(accs).mean())
        for m in self.train_acc.values():
            m.reset()

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        loss = self.loss(logits, batch["labels"])
        bs = batch["index"].shape[0]
        for name, t in self.tasks.items():
            y = self._target(t, batch["labels"][name])
            for metric in self.val_metrics[name].values():
                metric.update(logits[name], y)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)

    def on_validation_epoch_end(self):
        values: Dict[str, list] = {}
        for name, metrics in self.val_metrics.items():
            for mname, metric in metrics.items():
                v = metric.compute()
                metric.reset()
                key = "val_acc" if mname == "accuracy" else f"val_{mname}"
                values.setdefault(key, []).append(v)
                if len(self.tasks) > 1:
                    self.log(f"{key}/{name}", v)
        for key, vs in values.items():
            self.log(key, torch.stack(vs).mean(), prog_bar=key == "val_acc")

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        o, ft = self.optim_cfg, self.finetune_cfg
        groups = param_groups(self.model, o.lr, o.weight_decay, ft.encoder_lr, ft.fusion_lr, ft.head_lr,
                              ft.layer_decay, include_frozen_encoders=ft.strategy == "gradual")
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

    # ---- checkpoints without frozen weights, loaded strictly ------------------------------
    def checkpoint_keys(self) -> set:
        """The state-dict keys a checkpoint of this module holds: everything but frozen encoder weights
        (gradual unfreezing keeps everything: its groups thaw during training)."""
        keys = set(self.state_dict().keys())
        if self.finetune_cfg.strategy == "gradual":
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
        are not exactly this module's."""
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        check_checkpoint_keys(self.checkpoint_keys(), state, f"checkpoint {str(path)!r}")
        self.load_state_dict(state, strict=False)


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


def _metric(name: str, task):
    """A torchmetrics metric for ``task`` (None when it has no meaning there, e.g. balanced accuracy of a
    multi-label task)."""
    n = len(task.classes)
    if task.multilabel:
        kw = {"task": "multilabel", "num_labels": n}
        if name == "accuracy":
            return torchmetrics.classification.MultilabelExactMatch(num_labels=n)
        if name == "balanced_accuracy":
            return None
    else:
        kw = {"task": "multiclass", "num_classes": n}
        if name == "accuracy":
            return torchmetrics.Accuracy(**kw)
        if name == "balanced_accuracy":
            return torchmetrics.Accuracy(**kw, average="macro")
    if name == "f1_macro":
        return torchmetrics.F1Score(**kw, average="macro")
    if name == "auroc":
        return torchmetrics.AUROC(**kw, average="macro")
    if name == "precision_macro":
        return torchmetrics.Precision(**kw, average="macro")
    if name == "recall_macro":
        return torchmetrics.Recall(**kw, average="macro")
    raise ValueError(f"unknown epoch metric {name!r}")


def _token_info(model) -> Dict[str, tuple]:
    """Encoder name -> (mask token id, special token ids) of its tokenizer."""
    out = {}
    for name, enc in model.encoders.items():
        proc = enc.processor
        proc = getattr(proc, "parts", {}).get("text", proc)
        tok = getattr(proc, "tokenizer", None)
        if tok is not None:
            mask_id = tok.mask_token_id if getattr(tok, "mask_token_id", None) is not None else tok.unk_token_id
            out[name] = (mask_id, [i for i in tok.all_special_ids if i is not None])
    return out


def _image_normalisations(model) -> Dict[str, tuple]:
    """Encoder name -> (mean, std) of its image processor, to undo and redo normalisation around augmentation."""
    out = {}
    for name, enc in model.encoders.items():
        proc = enc.processor
        proc = getattr(proc, "parts", {}).get("image", proc)
        if hasattr(proc, "normalization"):
            out[name] = proc.normalization()
    return out


class GradualUnfreezing(L.Callback):
    """At the start of each epoch, thaw the layer groups ``finetune.strategy: gradual`` calls for."""

    def __init__(self, finetune_cfg):
        self.ft = finetune_cfg

    def on_train_epoch_start(self, trainer, module):
        from ..finetune import apply_strategy

        apply_strategy(module.model, self.ft, epoch=trainer.current_epoch)
        module.model.train()


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
