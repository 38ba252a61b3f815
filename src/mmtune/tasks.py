"""Prediction tasks: which column holds the labels, single- or multi-label, and the label map (calibration
and decision thresholds are :class:`~mmtune.evaluation.calibration.Calibration`, stored beside them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .values import is_blank


def label_key(value: Any) -> str:
    """Labels are compared by their text so that 1, 1.0 and '1' from different files agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() if isinstance(value, str) else str(value)


def _natural(k: str):
    try:
        return (0, float(k), k)
    except ValueError:
        return (1, 0.0, k)


@dataclass
class Task:
    """One label column. Single-label: one class per row (softmax, cross-entropy). Multi-label: a
    list (JSON / Parquet) or a ``separator``-joined string of labels per row (sigmoid, BCE)."""

    name: str
    column: str
    multilabel: bool = False
    separator: str = "|"
    weight: float = 1.0
    classes: List[Any] = field(default_factory=list)

    # ---- parsing -------------------------------------------------------------------------
    def values(self, value: Any) -> Optional[List[Any]]:
        """The row's label(s) as a list of raw values; None when the label is missing."""
        if self.multilabel:
            if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, str)):
                items = list(value.tolist() if hasattr(value, "tolist") else value)
            elif is_blank(value):
                return None
            else:
                items = [p for p in str(value).split(self.separator)]
            items = [v.strip() if isinstance(v, str) else v for v in items if not is_blank(v)]
            return items
        return None if is_blank(value) else [value]

    def fit_classes(self, column_values: Sequence[Any]) -> None:
        """Set ``classes`` to the distinct labels seen (sorted naturally by their text)."""
        first: Dict[str, Any] = {}
        for v in column_values:
            for item in self.values(v) or []:
                k = label_key(item)
                if k not in first:
                    first[k] = int(item) if isinstance(item, float) and item.is_integer() else (
                        item.item() if hasattr(item, "item") else item)
        self.classes = [first[k] for k in sorted(first, key=_natural)]

    @property
    def index(self) -> Dict[str, int]:
        return {label_key(c): i for i, c in enumerate(self.classes)}

    def unknown(self, value: Any) -> List[Any]:
        """Labels of ``value`` that are not among ``classes``."""
        idx = self.index
        return [v for v in (self.values(value) or []) if label_key(v) not in idx]

    def encode(self, value: Any):
        """Class index (single-label) or a multi-hot list of floats (multi-label)."""
        idx = self.index
        vals = self.values(value)
        if self.multilabel:
            hot = [0.0] * len(self.classes)
            for v in vals or []:
                hot[idx[label_key(v)]] = 1.0
            return hot
        return idx[label_key(vals[0])]

    # ---- persistence ---------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "column": self.column, "multilabel": self.multilabel, "separator": self.separator,
                "weight": self.weight, "classes": list(self.classes)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Task":
        return cls(**{k: d[k] for k in ("name", "column", "multilabel", "separator", "weight", "classes") if k in d})


def tasks_from_config(data_cfg) -> List[Task]:
    """The tasks the config names: ``data.tasks`` when set, else one task on ``data.label_column``."""
    if data_cfg.tasks:
        return [Task(name, t.column, t.multilabel, t.separator, t.weight) for name, t in data_cfg.tasks.items()]
    return [Task(data_cfg.label_column, data_cfg.label_column)]
