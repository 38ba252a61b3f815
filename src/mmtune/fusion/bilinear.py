"""Low-rank bilinear fusion: the modalities' features multiplied pairwise, so the model can read how they agree.

A concatenation followed by an MLP sees each modality's features side by side; to answer "does the picture show
what the note names" it has to learn an XOR of two directions from the rows, which a few hundred rows do not
teach. Multiplying low-rank projections of two modalities (factorized bilinear pooling, Yu et al. 2017; low-rank
multimodal fusion, Liu et al. 2018) writes that interaction into the first layer: ``sum_r u_r v_r`` is a
bilinear form of the two inputs."""
from __future__ import annotations

from itertools import combinations
from typing import Dict, Literal, Sequence

import torch
from pydantic import Field
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Fusion, SharedLayers
from .common import Placeholders, mlp, safe


class BilinearFusion(Fusion):
    """u_k = W_k LayerNorm(x_k) (``rank`` wide) per modality; fused = [u_1 .. u_K, u_i * u_j for every pair i < j],
    then dropout and the shared layers. An absent modality's x_k is its placeholder (``allow_missing``) or zeros."""


    class Config(SharedLayers):
        type: Literal["bilinear"] = "bilinear"
        rank: int = Field(16, ge=1)
        """Width of each modality's projection, and of each pairwise product."""


    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, cfg.rank, cfg.hidden_dims, cfg.dropout, inputs.allow_missing)

    def __init__(self, in_dims: Dict[str, int], rank: int = 16, hidden_dims: Sequence[int] = (256,),
                 dropout: float = 0.1, allow_missing: bool = False):
        super().__init__()
        self.keys = sorted(in_dims)
        self.pairs = list(combinations(range(len(self.keys)), 2))
        self.placeholders = Placeholders(in_dims, allow_missing)
        self.proj = nn.ModuleDict({safe(k): nn.Sequential(nn.LayerNorm(in_dims[k]), nn.Linear(in_dims[k], rank))
                                   for k in self.keys})
        self.dropout = nn.Dropout(dropout)
        width = rank * (len(self.keys) + len(self.pairs))
        self.shared = mlp(width, hidden_dims, dropout)
        self.out_dim = hidden_dims[-1] if hidden_dims else width

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        us = [self.proj[safe(k)](self.placeholders(k, outputs[k].pooled, present[k])) for k in self.keys]
        parts = us + [us[i] * us[j] for i, j in self.pairs]
        return self.shared(self.dropout(torch.cat(parts, dim=-1)))
