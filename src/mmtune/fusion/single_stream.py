"""Single-stream transformer: every modality's tokens in one sequence, classified from a fusion token."""
from __future__ import annotations

from typing import Dict, Literal, Sequence

import torch
from pydantic import Field
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Attending, Fusion
from .common import mlp, safe, tokens_of


class SingleStreamFusion(Fusion):
    """Tokens of each output are projected to ``width`` and tagged with a learned modality embedding;
    a learned fusion token is prepended; a small transformer encoder runs over the whole sequence
    with padding and absent modalities masked out; the fusion token's final state is the output.
    With ``allow_missing``, an absent modality is represented by a learned placeholder token."""


    class Config(Attending):
        type: Literal["single_stream"] = "single_stream"
        layers: int = Field(2, ge=1)
        """Transformer layers over the joint sequence."""

    reads_tokens = True

    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.token_dims, cfg.width, cfg.layers, cfg.heads, cfg.hidden_dims, cfg.dropout, inputs.allow_missing)

    def __init__(self, token_dims: Dict[str, int], width: int = 128, layers: int = 2, heads: int = 4,
                 hidden_dims: Sequence[int] = (), dropout: float = 0.1, allow_missing: bool = False):
        super().__init__()
        self.keys = sorted(token_dims)
        self.proj = nn.ModuleDict({safe(k): nn.Linear(token_dims[k], width) for k in self.keys})
        self.modality_embedding = nn.Parameter(torch.randn(len(self.keys), width) * 0.02)
        self.fusion_token = nn.Parameter(torch.randn(width) * 0.02)
        self.placeholder = nn.Parameter(torch.randn(len(self.keys), width) * 0.02) if allow_missing else None
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.shared = mlp(width, hidden_dims, dropout)
        self.out_dim = hidden_dims[-1] if hidden_dims else width

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        ref = outputs[self.keys[0]].pooled
        b = ref.shape[0]
        seq = [self.fusion_token.to(ref.dtype).expand(b, 1, -1)]
        valid = [torch.ones(b, 1, dtype=torch.bool, device=ref.device)]
        for i, k in enumerate(self.keys):
            tok, mask = tokens_of(outputs[k])
            seq.append(self.proj[safe(k)](tok) + self.modality_embedding[i])
            valid.append(mask & present[k].unsqueeze(1))
            if self.placeholder is not None:
                seq.append((self.placeholder[i] + self.modality_embedding[i]).expand(b, 1, -1))
                valid.append(~present[k].unsqueeze(1))
        x = torch.cat(seq, dim=1)
        h = self.transformer(x, src_key_padding_mask=~torch.cat(valid, dim=1))
        return self.shared(self.norm(h[:, 0]))
