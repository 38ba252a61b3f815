"""Fusion modules and their table.

``forward(outputs: Dict[str, EncoderOutput], present: Dict[str, BoolTensor]) -> Tensor``. Keys are
iterated sorted, so the order never depends on dict insertion; a missing modality is a mask (and, with
``allow_missing``, a learned placeholder), never a crash. Each fusion owns its ``Config`` and declares
its constraints (:class:`~mmtune.fusion.base.Fusion`); :data:`FUSIONS` is the one list of their names."""
from __future__ import annotations

from typing import Dict

from ..registry import Registry
from .attention import CrossAttentionFusion
from .base import Fusion, FusionConfig, FusionInputs
from .bilinear import BilinearFusion
from .concat import ConcatFusion
from .gated import GatedFusion
from .late import LateFusion
from .single_stream import SingleStreamFusion
from .stacking import StackingFusion

FUSIONS: Registry = Registry("fusion")
"""Fusion name (``model.fusion.type``) -> Fusion class."""
for _cls in (ConcatFusion, SingleStreamFusion, LateFusion, StackingFusion, CrossAttentionFusion, GatedFusion,
             BilinearFusion):
    FUSIONS.register(_cls.Config.model_fields["type"].default, _cls)

__all__ = ["FUSIONS", "BilinearFusion", "ConcatFusion", "CrossAttentionFusion", "Fusion", "FusionConfig", "FusionInputs", "GatedFusion",
           "LateFusion", "SingleStreamFusion", "StackingFusion", "build_fusion", "fusion_class"]


def fusion_class(cfg_or_name) -> type:
    """The Fusion class a config section (or a name) chooses."""
    return FUSIONS.get(getattr(cfg_or_name, "type", cfg_or_name))


def build_fusion(cfg, in_dims: Dict[str, int], token_dims: Dict[str, int], allow_missing: bool = False,
                 num_classes: int = 0) -> Fusion:
    """The fusion module ``cfg`` (a fusion's Config) names, for encoder outputs whose pooled widths are
    ``in_dims`` and token widths ``token_dims``."""
    return fusion_class(cfg).build(cfg, FusionInputs(in_dims, token_dims, allow_missing, num_classes))
