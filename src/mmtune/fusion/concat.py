"""Single stream by concatenation: pooled features side by side, then a shared MLP."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ..encoders.base import EncoderOutput


def mlp(in_dim: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers = []
    d = in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
        d = h
    return nn.Sequential(*layers)


class ConcatFusion(nn.Module):
    """Concatenate each output's pooled vector (zeros where its modality is absent) and pass the
    result through the shared layers. ``out_dim`` is the last hidden width (or the concatenated
    width when there are no shared layers)."""

    def __init__(self, in_dims: Dict[str, int], hidden_dims: Sequence[int] = (256,), dropout: float = 0.1):
        super().__init__()
        self.keys = sorted(in_dims)
        total = sum(in_dims[k] for k in self.keys)
        self.shared = mlp(total, hidden_dims, dropout)
        self.out_dim = hidden_dims[-1] if hidden_dims else total

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for k in self.keys:
            pooled = outputs[k].pooled
            parts.append(pooled * present[k].to(pooled.dtype).unsqueeze(-1))
        return self.shared(torch.cat(parts, dim=-1))
