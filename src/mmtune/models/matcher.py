"""The matcher: two towers that map a query and a response into one space where partners agree.

Each side is the encoder outputs whose field is read from that side's column (``data.query`` /
``data.response``): an encoder per side (separate weights), one encoder reading both columns (shared weights,
:class:`~mmtune.encoders.fields.SharedFieldsEncoder`), or a joint encoder such as CLIP (its image output on one
side, its text output on the other). A projection per side (``matching.dim`` wide, L2-normalised) and a pair
head (the learned temperature of the contrastive loss and the bias of the pair score) sit on top.

The model keeps the classifier's attribute names — ``encoders``, ``fusion`` (the projections), ``heads`` —
so every fine-tuning strategy, the optimizer's parameter groups, LoRA, the embedding cache and the bundle
treat it as they treat a classifier."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Encoder, EncoderOutput, build_encoder
from .classifier import MultimodalClassifier, output_fields, run_encoders, train_keeping_frozen

SIDES = ("query", "response")


class Towers(nn.Module):
    """Per side: the side's pooled encoder outputs (concatenated in sorted key order) → a linear projection →
    L2 normalisation. With ``shared`` (both sides as wide) the two sides use one projection."""

    reads_tokens = False

    def __init__(self, sides: Mapping[str, List[str]], dims: Mapping[str, int], dim: int, shared: bool = False,
                 projection: str = "linear"):
        super().__init__()
        self.sides = {s: sorted(keys) for s, keys in sides.items()}
        widths = {s: sum(dims[k] for k in keys) for s, keys in self.sides.items()}
        self.proj = nn.ModuleDict()
        self.shared = shared and widths["query"] == widths["response"]
        if projection == "none":  # the encoders' own space (a joint encoder's aligned outputs)
            if widths["query"] != widths["response"]:
                raise ValueError(f"matching.projection=none needs both sides as wide (query {widths['query']}, "
                                 f"response {widths['response']}): use projection=linear")
            self.out_dim = widths["query"]
            return
        self.proj["query"] = nn.Linear(widths["query"], dim)
        if not self.shared:
            self.proj["response"] = nn.Linear(widths["response"], dim)
        self.out_dim = dim

    def fit_directly(self, *args, **kwargs):  # trained by gradient steps (the classifier's fusion contract)
        return None

    def embed(self, outputs: Mapping[str, EncoderOutput], side: str) -> torch.Tensor:
        x = torch.cat([outputs[k].pooled for k in self.sides[side]], dim=-1)
        if not len(self.proj):
            return F.normalize(x.float(), dim=-1)
        proj = self.proj["query" if self.shared else side]
        return F.normalize(proj(x.to(proj.weight.dtype)), dim=-1)


class PairHead(nn.Module):
    """The pair's logit ``scale * cos(q, r) + bias``: ``scale`` is the contrastive loss's inverse temperature
    (learned in log space, clamped at 100 as in CLIP), ``bias`` places the pair score's decision point (trained
    by the pairwise loss when the table has match labels)."""

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        self.bias = nn.Parameter(torch.tensor(0.0))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.scale * cosine + self.bias


class TwoTowerMatcher(nn.Module):
    """``forward(inputs, present, encoded) -> {"query": (B, d), "response": (B, d)}`` (unit vectors); ``embed``
    one side; ``pair_logit`` of aligned rows."""

    def __init__(self, encoders: Mapping[str, Encoder], towers: Towers, head: PairHead):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(sorted(encoders.items())))
        self.fusion = towers
        self.heads = nn.ModuleDict({"match": head})
        self.output_modality: Dict[str, str] = output_fields(self.encoders)

    def side_fields(self, side: str) -> List[str]:
        """The fields (columns) ``side`` reads, sorted."""
        return sorted({self.output_modality[k] for k in self.fusion.sides[side]})

    def side_encoders(self, side: str) -> List[str]:
        """The encoders whose outputs feed ``side``."""
        keys = set(self.fusion.sides[side])
        return [n for n in self.encoders if any(k == n or k.startswith(n + ".") for k in keys)]

    def encode(self, inputs: Mapping[str, Mapping[str, torch.Tensor]]) -> Dict[str, EncoderOutput]:
        return run_encoders(self.encoders, inputs)

    def embed(self, side: str, inputs=None, encoded: Optional[Dict[str, EncoderOutput]] = None) -> torch.Tensor:
        """(B, d) unit vectors of one side, from its encoders' inputs (only those encoders run) or their outputs."""
        if encoded is None:
            encoded = run_encoders({n: self.encoders[n] for n in self.side_encoders(side)}, inputs)
        return self.fusion.embed(encoded, side)

    def forward(self, inputs=None, present=None, encoded: Optional[Dict[str, EncoderOutput]] = None) -> Dict[str, torch.Tensor]:
        outputs = encoded if encoded is not None else self.encode(inputs)
        return {side: self.fusion.embed(outputs, side) for side in SIDES}

    def pair_logit(self, query: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """(B,) logit that row i's query and response belong together."""
        return self.heads["match"]((query * response).sum(-1))

    def train(self, mode: bool = True) -> "TwoTowerMatcher":
        super().train(mode)
        if mode:
            train_keeping_frozen(self.encoders)
        return self


def side_keys(encoders: Mapping[str, Encoder], column_of, query: str, response: str) -> Dict[str, List[str]]:
    """Output keys per side: those whose field is read from the query / response column (``column_of(field)``).
    Raises ValueError naming the side no encoder reads."""
    sides: Dict[str, List[str]] = {"query": [], "response": []}
    for key, field in output_fields(encoders).items():
        for side, want in (("query", query), ("response", response)):
            if column_of(field) == want:
                sides[side].append(key)
    for side, want in (("query", query), ("response", response)):
        if not sides[side]:
            raise ValueError(f"data.{side} column {want!r} is read by no encoder: add one to model.encoders that reads "
                             f"it (data.columns maps a modality to its column)")
    return sides


def build_matcher(cfg, bundle_dir: Optional[Path] = None) -> TwoTowerMatcher:
    """The matcher a config describes (encoders pretrained, or from a bundle's ``encoders/<name>`` folders)."""
    encoders = {name: build_encoder(spec, None if bundle_dir is None else bundle_dir / "encoders" / name)
                for name, spec in sorted(cfg.model.encoders.items())}
    if not encoders:
        raise ValueError("model.encoders is empty: configure an encoder for the query and the response columns")
    m, d = cfg.matching, cfg.data
    sides = side_keys(encoders, d.column, d.query, d.response)
    towers = Towers(sides, MultimodalClassifier.output_dims(encoders), m.dim, m.shared_projection, m.projection)
    return TwoTowerMatcher(encoders, towers, PairHead(m.temperature, m.learn_temperature))


__all__ = ["PairHead", "SIDES", "Towers", "TwoTowerMatcher", "build_matcher", "side_keys"]
