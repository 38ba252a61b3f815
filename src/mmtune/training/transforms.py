"""Transforms of training batches, as objects the LightningModule is given: modality dropout, the
modalities' input augmentations (from the modality table), and manifold mixup."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch

from ..encoders.base import batch_encoded
from ..modalities import MODALITIES, kind


class ModalityDropout:
    """Hide each present modality of a row with probability ``p``, never all of them."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        present = batch["present"]
        if self.p <= 0 or len(present) < 2:
            return batch
        keys = sorted(present)
        avail = torch.stack([present[k] for k in keys], 1)
        kept = avail & ~(torch.rand(avail.shape, device=avail.device) < self.p)
        none_left = ~kept.any(1)
        kept[none_left] = avail[none_left]
        return {**batch, "present": {k: kept[:, i] for i, k in enumerate(keys)}}


class InputAugment:
    """Each modality's batch augmentations (image: kornia on pixels; text: token masking and dropout),
    applied to the encoders' input tensors. Cached batches (no inputs) pass unchanged."""

    def __init__(self, per_encoder: List[Tuple[str, Callable[[Dict[str, Any]], Dict[str, Any]]]]):
        self.per_encoder = per_encoder

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        inputs = batch.get("inputs")
        if inputs is None or not self.per_encoder:
            return batch
        inputs = dict(inputs)
        for name, fn in self.per_encoder:
            if name in inputs:
                inputs[name] = fn(inputs[name])
        return {**batch, "inputs": inputs}


class Mixup:
    """Manifold mixup on the fused representation: Beta(alpha, alpha) mixing of rows and of their targets."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, model, batch: Dict[str, Any], objective) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        outputs = batch_encoded(batch)
        outputs = model.encode(batch["inputs"]) if outputs is None else outputs
        feats = model.fuse(outputs, batch["present"])
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        perm = torch.randperm(feats.shape[0], device=feats.device)
        feats = lam * feats + (1 - lam) * feats[perm]
        logits = {t: head(feats) for t, head in model.heads.items()}
        return logits, objective(logits, batch["labels"], batch.get("weights"), mix=(lam, perm), penalty=True)


def batch_transforms(cfg, model) -> List[Callable[[Dict[str, Any]], Dict[str, Any]]]:
    """The training-batch transforms the config asks for, in order: modality dropout, input augmentation."""
    out: List[Callable] = []
    if cfg.model.modality_dropout > 0:
        out.append(ModalityDropout(cfg.model.modality_dropout))
    kinds = sorted({kind(m) for m in cfg.modalities})  # each kind once: its augmentations cover all its fields
    per_encoder = [pair for k in kinds for pair in MODALITIES.get(k).batch_augments(getattr(cfg.augment, k, None), model)]
    if per_encoder:
        out.append(InputAugment(per_encoder))
    return out
