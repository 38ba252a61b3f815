"""Lazily decoded samples: one sample = {modality: raw value}, a present-mask and the label."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
from torch.utils.data import Dataset

from ..modalities import modality_of
from .manifest import ManifestSpec, column_values


class MultimodalDataset(Dataset):
    """Rows of a validated manifest. ``__getitem__`` decodes a value (an image file) only when asked.

    Each item is ``{"values": {modality: raw or None}, "labels": {task: class index or multi-hot list},
    "index": i}``; ``labels`` is empty when ``with_labels`` is False.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        spec: ManifestSpec,
        base_dir: Optional[Path],
        with_labels: bool = True,
        modalities: Optional[Sequence[str]] = None,
    ):
        self.df = df.reset_index(drop=True)
        self.spec = spec
        self.base_dir = base_dir
        wanted = set(modalities) if modalities is not None else None
        self.columns = [(m, c) for m, c in spec.modality_columns if wanted is None or m in wanted]
        # Plain Python lists: cheap to index, cheap to pickle into workers.
        self._values = {m: column_values(self.df, c) for m, c in self.columns}
        self._labels: Dict[str, List[Any]] = {}
        self.weights: Optional[List[float]] = None
        if with_labels:
            for task in spec.tasks:
                self._labels[task.name] = [task.encode(v) for v in self.df[task.column].tolist()]
            if spec.weight_column:
                self.weights = [float(v) for v in self.df[spec.weight_column].tolist()]

    def __len__(self) -> int:
        return len(self.df)

    @property
    def labels(self) -> Dict[str, List[Any]]:
        """Per task: class indices (single-label) or multi-hot lists (multi-label), in row order."""
        return self._labels

    def __getitem__(self, i: int) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        for modality, _ in self.columns:
            v, entry = self._values[modality][i], modality_of(modality)
            values[modality] = None if entry.is_blank(v) else entry.read(v, self.base_dir)
        item = {"values": values, "labels": {t: v[i] for t, v in self._labels.items()}, "index": i}
        if self.weights is not None:
            item["weight"] = self.weights[i]
        return item
