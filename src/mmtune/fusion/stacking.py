"""Cascade / stacking: unimodal classifiers, then a meta-classifier on their out-of-fold outputs."""
from __future__ import annotations

from typing import Dict, Literal

import torch
from pydantic import Field
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Fusion, FusionConfig
from .common import safe


class StackingFusion(Fusion):
    """One linear classifier per output key (a unimodal model on that encoder's pooled features);
    the output is the concatenation of their class probabilities (uniform for an absent modality),
    on which the head — the meta-classifier — decides. The branches and the meta-classifier are
    fitted by :func:`mmtune.training.stacking.fit_stacking` (the meta-classifier on out-of-fold
    probabilities, so it learns how far to trust each modality on data that modality did not see)."""

    class Config(FusionConfig):
        type: Literal["stacking"] = "stacking"
        folds: int = Field(5, ge=2)
        """Folds of the out-of-fold predictions the meta-classifier learns from."""

    needs_cache = True
    linear_head = True
    single_task = True

    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, inputs.num_classes, cfg.folds)

    def fit_directly(self, model, train, tasks, seed, groups=None):
        from ..training.stacking import fit_stacking

        fit_stacking(model, train, tasks[0], self.folds, seed, groups)
        return {}

    def __init__(self, in_dims: Dict[str, int], num_classes: int, folds: int = 5):
        super().__init__()
        self.folds = folds
        self.keys = sorted(in_dims)
        self.num_classes = num_classes
        self.branches = nn.ModuleDict({safe(k): nn.Linear(in_dims[k], num_classes) for k in self.keys})
        self.out_dim = num_classes * len(self.keys)

    def branch_proba(self, key: str, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.branches[safe(key)](pooled), dim=-1)
        keep = present.to(p.dtype).unsqueeze(-1)
        return p * keep + (1.0 / self.num_classes) * (1 - keep)

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.branch_proba(k, outputs[k].pooled, present[k]) for k in self.keys], dim=-1)
