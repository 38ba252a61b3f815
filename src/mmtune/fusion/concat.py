"""Single stream by concatenation: pooled features side by side, then a shared MLP."""
from __future__ import annotations

from typing import Dict, Literal, Sequence

import torch

from ..encoders.base import EncoderOutput
from .base import SharedLayers, Fusion
from .common import Placeholders, mlp


class ConcatFusion(Fusion):
    """Concatenate each output's pooled vector (absent: a learned placeholder with ``allow_missing``,
    else zeros) and pass the result through the shared layers."""


    class Config(SharedLayers):
        type: Literal["concat"] = "concat"


    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, cfg.hidden_dims, cfg.dropout, inputs.allow_missing)

    def __init__(self, in_dims: Dict[str, int], hidden_dims: Sequence[int] = (256,), dropout: float = 0.1,
                 allow_missing: bool = False):
        super().__init__()
        self.keys = sorted(in_dims)
        total = sum(in_dims[k] for k in self.keys)
        self.placeholders = Placeholders(in_dims, allow_missing)
        self.shared = mlp(total, hidden_dims, dropout)
        self.out_dim = hidden_dims[-1] if hidden_dims else total

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.placeholders(k, outputs[k].pooled, present[k]) for k in self.keys]
        return self.shared(torch.cat(parts, dim=-1))
