"""Gated multimodal unit (Arevalo et al., 2017), for any number of modalities."""
from __future__ import annotations

from typing import Dict, Literal, Sequence

import torch
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Projected, Fusion
from .common import Placeholders, mlp, safe


class GatedFusion(Fusion):
    """h_k = tanh(W_k x_k); per-dimension gates z = softmax over modalities of W_z [x_1..x_K];
    fused = sum_k z_k * h_k. An absent modality's gate is closed (its logit set to -inf)."""


    class Config(Projected):
        type: Literal["gated"] = "gated"


    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, cfg.width, cfg.hidden_dims, cfg.dropout, inputs.allow_missing)

    def __init__(self, in_dims: Dict[str, int], width: int = 128, hidden_dims: Sequence[int] = (),
                 dropout: float = 0.1, allow_missing: bool = False):
        super().__init__()
        self.keys = sorted(in_dims)
        self.width = width
        self.placeholders = Placeholders(in_dims, allow_missing)
        self.proj = nn.ModuleDict({safe(k): nn.Linear(in_dims[k], width) for k in self.keys})
        self.gate = nn.Linear(sum(in_dims.values()), width * len(self.keys))
        self.dropout = nn.Dropout(dropout)
        self.shared = mlp(width, hidden_dims, dropout)
        self.out_dim = hidden_dims[-1] if hidden_dims else width
        self.last_gates = None

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        xs = [self.placeholders(k, outputs[k].pooled, present[k]) for k in self.keys]
        h = torch.stack([torch.tanh(self.proj[safe(k)](x)) for k, x in zip(self.keys, xs)], dim=1)  # (B, K, W)
        logits = self.gate(torch.cat(xs, dim=-1)).view(-1, len(self.keys), self.width)
        avail = torch.stack([present[k] for k in self.keys], dim=1)  # (B, K)
        if len(self.placeholders.values) == 0:
            # a row with nothing present keeps all gates open (its inputs are zeros anyway)
            avail = avail | ~avail.any(1, keepdim=True)
            logits = logits.masked_fill(~avail.unsqueeze(-1), float("-inf"))
        z = torch.softmax(logits, dim=1)
        self.last_gates = z.detach()
        return self.shared(self.dropout((z * h).sum(1)))
