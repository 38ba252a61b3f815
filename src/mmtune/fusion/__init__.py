"""Fusion modules: ``forward(outputs: Dict[str, EncoderOutput], present: Dict[str, BoolTensor]) -> Tensor``.

Keys are iterated sorted, so the order never depends on dict insertion; a missing modality is
a mask (and, with ``allow_missing``, a learned placeholder), never a crash. Each module has
``out_dim`` and ``uses_tokens`` (whether it reads token sequences or only pooled vectors)."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .attention import CrossAttentionFusion
from .concat import ConcatFusion
from .gated import GatedFusion
from .late import LateFusion
from .single_stream import SingleStreamFusion
from .stacking import StackingFusion

__all__ = ["ConcatFusion", "CrossAttentionFusion", "GatedFusion", "LateFusion", "SingleStreamFusion",
           "StackingFusion", "build_fusion"]


def build_fusion(cfg, in_dims: Dict[str, int], token_dims: Dict[str, int], allow_missing: bool = False,
                 num_classes: int = 0) -> nn.Module:
    """The fusion module a ``FusionConfig`` names, for encoder outputs whose pooled widths are
    ``in_dims`` and token widths ``token_dims``. Raises ValueError for an unknown type."""
    t = cfg.type
    if t == "concat":
        return ConcatFusion(in_dims, cfg.hidden_dims, cfg.dropout, allow_missing)
    if t == "gated":
        return GatedFusion(in_dims, cfg.width, cfg.hidden_dims, cfg.dropout, allow_missing)
    if t == "late":
        return LateFusion(in_dims, cfg.width, cfg.hidden_dims, cfg.dropout, cfg.late_weights, allow_missing)
    if t == "single_stream":
        return SingleStreamFusion(token_dims, cfg.width, cfg.layers, cfg.heads, cfg.hidden_dims, cfg.dropout, allow_missing)
    if t == "cross_attention":
        return CrossAttentionFusion(token_dims, cfg.width, cfg.heads, cfg.hidden_dims, cfg.dropout, allow_missing)
    if t == "stacking":
        return StackingFusion(in_dims, num_classes)
    raise ValueError(f"unknown fusion type {t!r}; valid: concat, single_stream, late, stacking, cross_attention, gated")
