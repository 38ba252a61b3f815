"""Numbers and categories: the ``tabular`` modality's processor and encoder (trained from scratch).

Each configured column becomes one token of width ``dim``: a number is standardised with the training
split's mean and standard deviation (a missing one is imputed with the mean and flagged by a learned
missing embedding), a category is looked up in an embedding table learned on the training split's
categories (a category never seen in training, or a missing one, gets the column's "unknown" embedding —
never an error at predict time); a learned column embedding is added to every token. The pooled vector
is the mean of the column tokens; token-reading fusions (single-stream, cross-attention) attend to the
columns one by one. The column types and statistics are fitted on the training rows (:meth:`fit_inputs`)
and saved with the encoder in the bundle."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .base import Encoder, EncoderOutput
from .offline import OFFLINE_ENCODERS, Preset
from .processors import register_kind

NUMERIC, CATEGORICAL = "numeric", "categorical"


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _category(v: Any) -> Optional[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    text = str(v).strip()
    return text or None


def infer_types(records: Iterable[Mapping[str, Any]], columns: Sequence[str],
                forced: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Per column: ``numeric`` when every non-missing training value is a number, else ``categorical``;
    ``forced`` overrides. One pass over ``records``."""
    free = [c for c in columns if not (forced and c in forced)]
    present, numeric = dict.fromkeys(free, False), dict.fromkeys(free, True)
    for r in records:
        for c in free:
            v = r.get(c)
            if _category(v) is not None:
                present[c] = True
                if numeric[c] and _number(v) is None:
                    numeric[c] = False
    return {c: forced[c] if forced and c in forced else (NUMERIC if present[c] and numeric[c] else CATEGORICAL)
            for c in columns}


class TabularProcessor:
    """Row dicts -> ``numbers`` (B, N) standardised, ``missing`` (B, N) flags, ``categories`` (B, K) ids
    (0: unknown or missing)."""

    modalities = ("tabular",)

    def __init__(self, columns: Sequence[str], types: Optional[Dict[str, str]] = None,
                 stats: Optional[Dict[str, List[float]]] = None, vocab: Optional[Dict[str, List[str]]] = None):
        self.columns = list(columns)
        self.types = dict(types or {})
        self.stats = dict(stats or {})
        self.vocab = {c: list(v) for c, v in (vocab or {}).items()}
        self._index = {c: {k: i + 1 for i, k in enumerate(v)} for c, v in self.vocab.items()}

    @property
    def numeric(self) -> List[str]:
        return [c for c in self.columns if self.types.get(c) == NUMERIC]

    @property
    def categorical(self) -> List[str]:
        return [c for c in self.columns if self.types.get(c) == CATEGORICAL]

    def fit(self, records: Iterable[Mapping[str, Any]], forced: Optional[Mapping[str, str]] = None) -> None:
        """Types, then each numeric column's mean and standard deviation and each categorical column's vocabulary,
        in three passes over ``records`` (anything that can be iterated again: a list, or rows read a chunk at a
        time), so that no column is ever held whole."""
        if iter(records) is records:  # a one-shot iterator cannot be read three times
            records = list(records)
        self.types = infer_types(records, self.columns, forced)
        numeric, categorical = self.numeric, self.categorical
        totals, counts = dict.fromkeys(numeric, 0), dict.fromkeys(numeric, 0)
        vocab: Dict[str, set] = {c: set() for c in categorical}
        for r in records:
            for c in numeric:
                x = _number(r.get(c))
                if x is not None:
                    totals[c] += x
                    counts[c] += 1
            for c in categorical:
                k = _category(r.get(c))
                if k is not None:
                    vocab[c].add(k)
        means = {c: totals[c] / counts[c] if counts[c] else 0.0 for c in numeric}
        squares = dict.fromkeys(numeric, 0)
        if numeric:
            for r in records:
                for c in numeric:
                    x = _number(r.get(c))
                    if x is not None:
                        squares[c] += (x - means[c]) ** 2
        for c in numeric:
            var = squares[c] / max(1, counts[c] - 1)
            self.stats[c] = [means[c], math.sqrt(var) if var > 0 else 1.0]
        for c in categorical:
            self.vocab[c] = sorted(vocab[c])
        self._index = {c: {k: i + 1 for i, k in enumerate(v)} for c, v in self.vocab.items()}

    def describe(self) -> str:
        return ", ".join(f"{c} {self.types[c]}" + (f" ({len(self.vocab[c])} categories)" if self.types[c] == CATEGORICAL else "")
                         for c in self.columns)

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        rows = [r or {} for r in columns["tabular"]]
        nums = torch.zeros(len(rows), len(self.numeric))
        miss = torch.zeros(len(rows), len(self.numeric))
        cats = torch.zeros(len(rows), len(self.categorical), dtype=torch.long)
        for i, r in enumerate(rows):
            for j, c in enumerate(self.numeric):
                x = _number(r.get(c))
                if x is None:
                    miss[i, j] = 1.0  # imputed with the training mean: 0 after standardising
                else:
                    mean, std = self.stats[c]
                    nums[i, j] = (x - mean) / std
            for j, c in enumerate(self.categorical):
                cats[i, j] = self._index[c].get(_category(r.get(c)), 0)
        return {"numbers": nums, "missing": miss, "categories": cats}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_processor.json").write_text(json.dumps(
            {"kind": "tabular", "columns": self.columns, "types": self.types, "stats": self.stats, "vocab": self.vocab},
            indent=2))

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "TabularProcessor":
        return cls(meta["columns"], meta["types"], meta["stats"], meta["vocab"])


class TabularEncoder(Encoder):
    """See the module docstring. Built empty; :meth:`fit_inputs` (or a bundle's saved processor) sizes it."""

    modality = "tabular"
    from_scratch = True

    def __init__(self, columns: Sequence[str], dim: int = 32, forced: Optional[Dict[str, str]] = None,
                 processor: Optional[TabularProcessor] = None):
        super().__init__()
        self.dim = dim
        self.forced = dict(forced or {})
        self.processor = processor or TabularProcessor(columns)
        self.norm = nn.LayerNorm(dim)
        if processor is not None:
            self._build()

    def _build(self) -> None:
        p, d = self.processor, self.dim
        self.num_weight = nn.Parameter(torch.randn(len(p.numeric), d) * 0.1)
        self.num_bias = nn.Parameter(torch.zeros(len(p.numeric), d))
        self.num_missing = nn.Parameter(torch.zeros(len(p.numeric), d))
        self.cat_embeddings = nn.ModuleList([nn.Embedding(len(p.vocab[c]) + 1, d) for c in p.categorical])
        for e in self.cat_embeddings:
            nn.init.normal_(e.weight, std=0.1)
        self.column_embedding = nn.Parameter(torch.zeros(len(p.columns), d))

    def fit_inputs(self, values: Iterable[Mapping[str, Any]]) -> str:
        """Fit the column types, statistics and category vocabularies on the training rows, then build the
        parameters. Returns a description of the columns (their inferred or forced types)."""
        self.processor.fit(values, self.forced)
        self._build()
        return self.processor.describe()

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, numbers, missing, categories, **kw) -> EncoderOutput:
        tokens = []
        if numbers.shape[1]:
            x = numbers.unsqueeze(-1) * self.num_weight + self.num_bias + missing.unsqueeze(-1) * self.num_missing
            tokens.append(x)
        if categories.shape[1]:
            tokens.append(torch.stack([emb(categories[:, j]) for j, emb in enumerate(self.cat_embeddings)], 1))
        order = self.processor.numeric + self.processor.categorical
        position = [self.processor.columns.index(c) for c in order]
        t = torch.cat(tokens, 1) + self.column_embedding[position]
        t = self.norm(t)
        return EncoderOutput(t.mean(1), t, None)

    def layer_groups(self) -> List[List[nn.Parameter]]:
        return [list(self.parameters())]

    def save_parts(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_encoder.json").write_text(json.dumps({"arch": "tabular", "dim": self.dim}))
        self.processor.save(folder / "processor")


def _build(spec, weights: bool, bundle_dir: Optional[Path]) -> Encoder:
    if bundle_dir is not None:
        meta = json.loads((bundle_dir / "processor" / "mmtune_processor.json").read_text())
        dim = json.loads((bundle_dir / "mmtune_encoder.json").read_text())["dim"]
        return TabularEncoder(meta["columns"], dim, processor=TabularProcessor.load(bundle_dir / "processor", meta))
    if not spec.columns:
        raise ValueError("the tabular encoder needs its columns: set model.encoders.<name>.columns (or data.columns.tabular)")
    return TabularEncoder(spec.columns, spec.dim or 32, spec.types)


OFFLINE_ENCODERS.register("tabular", Preset("tabular", _build, from_scratch=True))
register_kind("tabular", TabularProcessor)
