"""Cascade / stacking: unimodal classifiers, then a meta-classifier on their out-of-fold outputs."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..encoders.base import EncoderOutput
from .common import safe


class StackingFusion(nn.Module):
    """One linear classifier per output key (a unimodal model on that encoder's pooled features);
    the output is the concatenation of their class probabilities (uniform for an absent modality),
    on which the head — the meta-classifier — decides. The branches and the meta-classifier are
    fitted by :func:`mmtune.training.stacking.fit_stacking` (the meta-classifier on out-of-fold
    probabilities, so it learns how far to trust each modality on data that modality did not see)."""

    uses_tokens = False

    def __init__(self, in_dims: Dict[str, int], num_classes: int):
        super().__init__()
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
