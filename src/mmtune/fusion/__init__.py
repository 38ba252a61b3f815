"""Fusion modules: ``forward(outputs: Dict[str, EncoderOutput], present: Dict[str, BoolTensor]) -> Tensor``.

Keys are iterated sorted, so the order never depends on dict insertion; a missing modality is
a mask, never a crash."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .concat import ConcatFusion

__all__ = ["ConcatFusion", "build_fusion"]


def build_fusion(cfg, in_dims: Dict[str, int]) -> nn.Module:
    """The fusion module a ``FusionConfig`` names, for encoders whose pooled widths are ``in_dims``."""
    if cfg.type == "concat":
        return ConcatFusion(in_dims, cfg.hidden_dims, cfg.dropout)
    raise ValueError(f"unknown fusion type {cfg.type!r}; valid: concat")
