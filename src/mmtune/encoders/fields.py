"""Several columns of one modality (a title and a body; a front and a back photo).

Each column is a *field*: ``text`` is the column named by ``data.columns.text``, ``text.body`` another one.
An encoder reads one field (:func:`for_field` re-keys a built encoder: its processor reads that field and
its output answers to that field's present-mask), or several fields with shared weights
(:class:`SharedFieldsEncoder`: the same encoder run on each, plus a learned embedding per field, each field
its own input to the fusion)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..modalities import kind
from .base import Encoder, EncoderOutput


class FieldProcessor:
    """A processor of one modality that reads the column of ``field``; everything else is the inner one's."""

    def __init__(self, inner, field: str):
        self.inner, self.field = inner, field
        self.modalities = (field,)

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        return self.inner({kind(self.field): columns[self.field]})

    def lengths(self, columns: Mapping[str, List[Any]]):
        """The inner processor's padded positions of this field's column (None when it does not pad)."""
        inner = getattr(self.inner, "lengths", None)
        return inner({kind(self.field): columns[self.field]}) if callable(inner) else None

    def tokens(self, columns: Mapping[str, List[Any]]):
        """The inner processor's kept tokens of this field's column (None when it keeps none); its ``pad`` batches
        them, as its call makes this processor's tensors."""
        inner = getattr(self.inner, "tokens", None)
        return inner({kind(self.field): columns[self.field]}) if callable(inner) else None

    def prepare(self, columns: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
        """The inner processor's per-value work on this field's column (none when it has none)."""
        inner = getattr(self.inner, "prepare", None)
        if not callable(inner):
            return {}
        return {self.field: v for v in inner({kind(self.field): columns[self.field]}).values()}

    def sides(self) -> Dict[str, int]:
        """The inner processor's resize side, for this field."""
        inner = getattr(self.inner, "sides", None)
        side = inner().get(kind(self.field)) if callable(inner) else None
        return {self.field: side} if side else {}

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)


def reading(processor, field: str, fields: Sequence[str] = ()):
    """``processor`` (of ``field``'s modality) set to read what its encoder reads: each of ``fields`` (shared
    weights), else ``field`` when it is a named field (``text.body``), else its modality's column as it is."""
    if fields:
        return SharedProcessor(processor, fields)
    return FieldProcessor(processor, field) if field != kind(field) else processor


def for_field(enc: Encoder, field: str) -> Encoder:
    """``enc`` (of ``field``'s modality) reading ``field``."""
    if field != kind(field):
        enc.field = field
        enc.processor = reading(enc.processor, field)
    return enc


class SharedProcessor:
    """The inner processor once per field; tensors keyed ``<field>::<name>``."""

    def __init__(self, inner, fields: Sequence[str]):
        self.inner, self.fields = inner, list(fields)
        self.modalities = tuple(self.fields)

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        out = {}
        for f in self.fields:
            out.update({f"{f}::{k}": v for k, v in self.inner({kind(f): columns[f]}).items()})
        return out

    def lengths(self, columns: Mapping[str, List[Any]]):
        """The padded positions of every field, added up (each is its own padded input); None when the inner
        processor does not pad."""
        inner = getattr(self.inner, "lengths", None)
        if not callable(inner):
            return None
        counts = [inner({kind(f): columns[f]}) for f in self.fields]
        return None if any(c is None for c in counts) else sum(counts)

    def tokens(self, columns: Mapping[str, List[Any]]):
        """The inner processor's kept tokens of each field's column, a
        :class:`~mmtune.encoders.processors.TokenParts` by field (None when it keeps none), for :meth:`pad`."""
        from .processors import TokenParts

        inner = getattr(self.inner, "tokens", None)
        if not callable(inner):
            return None
        kept = {f: inner({kind(f): columns[f]}) for f in self.fields}
        return None if any(v is None for v in kept.values()) else TokenParts(kept)

    def pad(self, tokens, rows: Sequence[int], columns: Optional[Mapping[str, List[Any]]] = None
            ) -> Dict[str, torch.Tensor]:
        """The batch :meth:`__call__` makes of ``rows``, each field's kept tokens padded by the inner processor."""
        return {f"{f}::{k}": v for f in self.fields for k, v in self.inner.pad(tokens.parts[f], rows).items()}

    def prepare(self, columns: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
        """The inner processor's per-value work on each field's column."""
        inner = getattr(self.inner, "prepare", None)
        if not callable(inner):
            return {}
        return {f: v for f in self.fields for v in inner({kind(f): columns[f]}).values()}

    def sides(self) -> Dict[str, int]:
        """The inner processor's resize side, for each field."""
        inner = getattr(self.inner, "sides", None)
        side = inner().get(kind(self.fields[0])) if callable(inner) and self.fields else None
        return {f: side for f in self.fields} if side else {}

    def save(self, folder: Path) -> None:
        self.inner.save(folder)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)


class SharedFieldsEncoder(Encoder):
    """One encoder (``model``) run on each field, a learned embedding per field added to its pooled vector
    and tokens; outputs keyed by field."""

    def __init__(self, inner: Encoder, fields: Sequence[str]):
        super().__init__()
        self.model = inner
        self.fields = list(fields)
        self.modality = inner.modality
        self.processor = reading(inner.processor, inner.modality, self.fields)
        self.field_embedding = nn.Parameter(torch.zeros(len(self.fields), inner.out_dim))
        self._token_dim = inner.token_dims()[""]

    @property
    def out_dim(self) -> int:
        return self.model.out_dim

    def output_dims(self) -> Dict[str, int]:
        return {f: self.model.out_dim for f in self.fields}

    def token_dims(self) -> Dict[str, int]:
        return {f: self._token_dim for f in self.fields}

    def output_modalities(self) -> Dict[str, str]:
        return {f: f for f in self.fields}

    def forward(self, **inputs) -> Dict[str, EncoderOutput]:
        out = {}
        for i, f in enumerate(self.fields):
            own = {k.split("::", 1)[1]: v for k, v in inputs.items() if k.startswith(f + "::")}
            o = self.model(**own)
            e = self.field_embedding[i]
            tokens = o.tokens + e if o.tokens is not None and o.tokens.shape[-1] == e.shape[0] else o.tokens
            out[f] = EncoderOutput(o.pooled + e, tokens, o.mask)
        return out

    def layer_groups(self) -> List[List[nn.Parameter]]:
        groups = [list(g) for g in self.model.layer_groups()]
        groups[-1].append(self.field_embedding)
        return groups

    def pooled_only_parameters(self) -> List[nn.Parameter]:
        return self.model.pooled_only_parameters()

    def save_parts(self, folder: Path) -> None:
        self.model.save_parts(folder)
