"""Lazily decoded samples: one sample = {modality: raw value}, a present-mask and the label."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
from torch.utils.data import Dataset

from .manifest import ManifestSpec, _is_missing, label_key, resolve_image_path


def load_image(path: Path):
    """Decode an image file to RGB (PIL)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class MultimodalDataset(Dataset):
    """Rows of a validated manifest. ``__getitem__`` decodes the image file only when asked.

    Each item is ``{"values": {modality: raw or None}, "label": int (-1 when unlabeled), "index": i}``.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        spec: ManifestSpec,
        base_dir: Optional[Path],
        class_index: Optional[Dict[str, int]] = None,
        modalities: Optional[Sequence[str]] = None,
    ):
        self.df = df.reset_index(drop=True)
        self.spec = spec
        self.base_dir = base_dir
        self.class_index = class_index
        wanted = set(modalities) if modalities is not None else None
        self.columns = [(m, c) for m, c in spec.modality_columns if wanted is None or m in wanted]
        # Plain Python lists: cheap to index, cheap to pickle into workers.
        self._values = {m: self.df[c].tolist() for m, c in self.columns}
        self._labels: Optional[List[int]] = None
        if class_index is not None and spec.label_column and spec.label_column in self.df.columns:
            self._labels = [class_index[label_key(v)] for v in self.df[spec.label_column].tolist()]

    def __len__(self) -> int:
        return len(self.df)

    @property
    def labels(self) -> Optional[List[int]]:
        return self._labels

    def __getitem__(self, i: int) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        for modality, _ in self.columns:
            v = self._values[modality][i]
            if _is_missing(v) or (isinstance(v, str) and not v.strip()):
                values[modality] = None
            elif modality == "image":
                values[modality] = load_image(resolve_image_path(v, self.base_dir))
            else:
                values[modality] = str(v)
        label = self._labels[i] if self._labels is not None else -1
        return {"values": values, "label": label, "index": i}
