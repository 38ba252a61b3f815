"""Cross-attention fusion: each modality's tokens attend to the other modalities' tokens."""
from __future__ import annotations

from typing import Dict, Literal, Sequence

import torch
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Attending, Fusion
from .common import masked_mean, mlp, safe, tokens_of


class CrossAttentionFusion(Fusion):
    """For each output k: project its tokens to ``width``; queries from k attend to the tokens of every
    other output (text->image and image->text for two modalities), padding and absent modalities
    masked; residual + layer norm + feed-forward; masked mean over k's own tokens. The summaries are
    concatenated and passed through the shared MLP. A learned "null" key is always attendable, so a row
    whose other modalities are all absent stays finite. ``last_attention[k]`` keeps the last batch's
    attention weights (B, T_k, T_others + 1) for visualisation; ``last_attention_keys[k]`` says which
    output each key position belongs to."""


    class Config(Attending):
        type: Literal["cross_attention"] = "cross_attention"

    reads_tokens = True

    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.token_dims, cfg.width, cfg.heads, cfg.hidden_dims, cfg.dropout, inputs.allow_missing)

    def __init__(self, token_dims: Dict[str, int], width: int = 128, heads: int = 4,
                 hidden_dims: Sequence[int] = (256,), dropout: float = 0.1, allow_missing: bool = False):
        super().__init__()
        if len(token_dims) < 2:
            raise ValueError("fusion 'cross_attention' needs at least two encoder outputs to attend between")
        self.keys = sorted(token_dims)
        self.proj = nn.ModuleDict({safe(k): nn.Linear(token_dims[k], width) for k in self.keys})
        self.attn = nn.ModuleDict({safe(k): nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True) for k in self.keys})
        self.norm1 = nn.ModuleDict({safe(k): nn.LayerNorm(width) for k in self.keys})
        self.norm2 = nn.ModuleDict({safe(k): nn.LayerNorm(width) for k in self.keys})
        self.ff = nn.ModuleDict({safe(k): nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                 for k in self.keys})
        self.null_key = nn.Parameter(torch.randn(width) * 0.02)
        self.placeholder = nn.Parameter(torch.zeros(len(self.keys), width)) if allow_missing else None
        self.shared = mlp(width * len(self.keys), hidden_dims, dropout)
        self.out_dim = hidden_dims[-1] if hidden_dims else width * len(self.keys)
        self.last_attention: Dict[str, torch.Tensor] = {}
        self.last_attention_keys: Dict[str, list] = {}

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        projected, masks = {}, {}
        for k in self.keys:
            tok, mask = tokens_of(outputs[k])
            projected[k] = self.proj[safe(k)](tok)
            masks[k] = mask & present[k].unsqueeze(1)
        summaries = []
        for i, k in enumerate(self.keys):
            others = [o for o in self.keys if o != k]
            b = projected[k].shape[0]
            null = self.null_key.to(projected[k].dtype).expand(b, 1, -1)
            kv = torch.cat([null] + [projected[o] for o in others], dim=1)
            kv_valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=kv.device)] + [masks[o] for o in others], dim=1)
            attended, weights = self.attn[safe(k)](projected[k], kv, kv, key_padding_mask=~kv_valid,
                                             need_weights=True, average_attn_weights=True)
            self.last_attention[k] = weights.detach()
            self.last_attention_keys[k] = ["null"] + [o for o in others for _ in range(projected[o].shape[1])]
            x = self.norm1[safe(k)](projected[k] + attended)
            x = self.norm2[safe(k)](x + self.ff[safe(k)](x))
            summary = masked_mean(x, masks[k])
            if self.placeholder is not None:
                keep = present[k].to(summary.dtype).unsqueeze(-1)
                summary = summary * keep + self.placeholder[i] * (1 - keep)
            summaries.append(summary)
        return self.shared(torch.cat(summaries, dim=-1))
