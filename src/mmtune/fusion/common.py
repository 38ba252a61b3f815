"""Pieces the fusion modules share: masking with learned placeholders, masked pooling, token access."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ..encoders.base import EncoderOutput


def safe(key: str) -> str:
    """A module-name-safe form of an output key ("clip.image" -> "clip__image")."""
    return key.replace(".", "__")


def mlp(in_dim: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers = []
    d = in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
        d = h
    return nn.Sequential(*layers)


class Placeholders(nn.Module):
    """A learned vector per output key that stands in for an absent modality's pooled features.

    Without ``allow_missing`` no parameters exist and an absent modality becomes zeros."""

    def __init__(self, dims: Dict[str, int], allow_missing: bool):
        super().__init__()
        self.values = nn.ParameterDict(
            {safe(k): nn.Parameter(torch.zeros(d)) for k, d in dims.items()} if allow_missing else {}
        )

    def forward(self, key: str, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        keep = present.to(pooled.dtype).unsqueeze(-1)
        if safe(key) in self.values:
            return pooled * keep + self.values[safe(key)].to(pooled.dtype) * (1 - keep)
        return pooled * keep


def tokens_of(out: EncoderOutput):
    """(tokens, mask) of an output; an output without tokens contributes its pooled vector as one token."""
    if out.tokens is None:
        tok = out.pooled.unsqueeze(1)
        return tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)
    mask = out.mask if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool, device=out.tokens.device)
    return out.tokens, mask.bool()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
