"""Late (parallel) fusion: a classifier per modality, their logits combined by weights."""
from __future__ import annotations

from typing import Dict, Literal, Sequence

import torch
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Projected, Fusion
from .common import mlp, safe


class LateFusion(Fusion):
    """Each modality k gets its own branch h_k = MLP_k(x_k). The output is the concatenation of
    w_k * h_k, where w = softmax of learned weights (or uniform, ``weights="mean"``) over the
    modalities present in the row. Followed by a *linear* head W = [W_1 .. W_K], the logits are
    exactly sum_k w_k (W_k h_k) + b: each modality's own head, combined by the weights — late fusion,
    written as one model so that every fusion shares the same head interface."""


    class Config(Projected):
        type: Literal["late"] = "late"
        weights: Literal["learned", "mean"] = "learned"
        """Combine the per-modality logits with learned weights or a plain mean."""

    linear_head = True

    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, cfg.width, cfg.hidden_dims, cfg.dropout, cfg.weights, inputs.allow_missing)

    def __init__(self, in_dims: Dict[str, int], width: int = 128, hidden_dims: Sequence[int] = (),
                 dropout: float = 0.1, weights: str = "learned", allow_missing: bool = False):
        super().__init__()
        self.keys = sorted(in_dims)
        dims = list(hidden_dims) or [width]
        self.branches = nn.ModuleDict({safe(k): mlp(in_dims[k], dims, dropout) for k in self.keys})
        self.weight_logits = nn.Parameter(torch.zeros(len(self.keys))) if weights == "learned" else None
        self.branch_dim = dims[-1]
        self.out_dim = self.branch_dim * len(self.keys)

    def modality_weights(self, present: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) weights over the modalities, zero for an absent one (unless all are absent)."""
        avail = torch.stack([present[k] for k in self.keys], dim=1)
        avail = avail | ~avail.any(1, keepdim=True)
        logits = self.weight_logits if self.weight_logits is not None else torch.zeros(len(self.keys), device=avail.device)
        logits = logits.unsqueeze(0).expand(avail.shape[0], -1).masked_fill(~avail, float("-inf"))
        return torch.softmax(logits, dim=1)

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.modality_weights(present)
        parts = []
        for i, k in enumerate(self.keys):
            # an absent modality's weight is zero: its branch contributes nothing (no placeholder needed)
            h = self.branches[safe(k)](outputs[k].pooled * present[k].to(outputs[k].pooled.dtype).unsqueeze(-1))
            parts.append(h * w[:, i : i + 1].to(h.dtype))
        return torch.cat(parts, dim=-1)
