"""Classification heads: fused features -> logits for one task."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Optional hidden layers, then a linear layer to ``num_classes`` logits."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dims: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        layers = []
        d = in_dim
        for h in hidden_dims:
            layers += [nn.Dropout(dropout), nn.Linear(d, h), nn.GELU()]
            d = h
        layers += [nn.Dropout(dropout), nn.Linear(d, num_classes)]
        self.net = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


__all__ = ["ClassificationHead"]
