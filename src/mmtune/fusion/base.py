"""The fusion contract: a module, its own config class, and the constraints it declares.

A fusion maps encoder outputs and present-masks to one feature vector per row:
``forward(outputs: Dict[str, EncoderOutput], present: Dict[str, BoolTensor]) -> Tensor (B, out_dim)``.
It is registered in :data:`mmtune.fusion.FUSIONS` under the name its config's ``type`` takes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from pydantic import Field, model_validator
from torch import nn

from ..schema import PartConfig


class FusionConfig(PartConfig):
    """Base of every fusion's settings (``model.fusion`` in the config)."""


class SharedLayers(FusionConfig):
    """Settings most fusions share: the layers after the fusion and their dropout."""

    hidden_dims: List[int] = Field(default_factory=lambda: [256])
    """Widths of the shared layers after the fusion (empty: none)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout inside the fusion."""


class Projected(SharedLayers):
    width: int = Field(128, ge=4)
    """Common width the modalities are projected to."""


class Attending(Projected):
    heads: int = Field(4, ge=1)
    """Attention heads; must divide ``width``."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "Attending":
        if self.width % self.heads:
            raise ValueError(f"model.fusion.heads ({self.heads}) must divide model.fusion.width ({self.width})")
        return self


@dataclass
class FusionInputs:
    """What a fusion is built for: pooled and token widths per encoder output key, whether absent
    modalities get learned placeholders, and the class count of the (first) task."""

    pooled_dims: Dict[str, int]
    token_dims: Dict[str, int]
    allow_missing: bool = False
    num_classes: int = 0


class Fusion(nn.Module):
    """Base of the fusion modules. Subclasses set ``Config`` and ``out_dim`` and implement ``build`` and
    ``forward``; the class attributes below are the constraints the config's checks ask about."""

    Config: type = FusionConfig
    reads_tokens: bool = False
    """Reads token sequences, not only pooled vectors (so pooled-only encoder parameters stay frozen,
    and synthetic rows, which have pooled features only, cannot feed it)."""
    needs_cache: bool = False
    """Fitted on cached encoder outputs only (``finetune.type: frozen`` with ``cache: true``)."""
    linear_head: bool = False
    """The head must be one linear layer (``model.head.hidden_dims`` empty)."""
    single_task: bool = False
    """Supports one single-label task only."""
    out_dim: int

    @classmethod
    def build(cls, cfg: Any, inputs: FusionInputs) -> "Fusion":
        raise NotImplementedError

    def fit_directly(self, model: nn.Module, train: Any, tasks: List[Any], seed: int,
                     groups: Optional[Any] = None) -> Optional[Dict[str, Any]]:
        """A fusion fitted without gradient steps (stacking) does it here and returns a report; the others
        return None and are trained by Lightning. ``groups``: each training row's group (``data.group_column``),
        for folds that keep a group on one side."""
        return None
