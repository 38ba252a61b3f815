"""Prediction tasks: which column holds the labels, single- or multi-label, and the label map (calibration
and decision thresholds are :class:`~mmtune.evaluation.calibration.Calibration`, stored beside them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .values import is_blank

MATCH = "match"
"""The name of a matcher's task of 1/0 pair labels (``data.match_label``)."""


def classifies_single_label(tasks: Sequence[Any]) -> bool:
    """Whether some of ``tasks`` (task configs or tasks) is a single-label classification; none configured means the
    default one, a classification of the label column, which is. (``val_calibrated_loss`` is logged for them.)"""
    return not tasks or any(not t.regression and not getattr(t, "multilabel", False) for t in tasks)


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
    regression: bool = False
    """A numeric target (one output; ``classes`` stays empty)."""
    regression_loss: str = "mse"
    huber_delta: float = 1.0
    mean: Optional[float] = None
    """Regression: the training split's mean and standard deviation of the target; the model predicts the
    standardised target and :meth:`destandardize` turns it back into the target's units."""
    std: Optional[float] = None

    # ---- parsing -------------------------------------------------------------------------
    @property
    def outputs(self) -> int:
        """Width of the task's head: one per class, or 1 for a regression target."""
        return 1 if self.regression else len(self.classes)

    def number(self, value: Any) -> Optional[float]:
        """A regression target as a finite float, or None when it is not one."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    def destandardize(self, z):
        return z * (self.std or 1.0) + (self.mean or 0.0)

    def values(self, value: Any) -> Optional[List[Any]]:
        """The row's label(s) as a list of raw values; None when the label is missing."""
        if self.regression:
            return None if is_blank(value) else [value]
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
        """Set ``classes`` to the distinct labels seen (sorted naturally by their text); for a regression
        target, ``mean`` and ``std`` of its numbers instead."""
        if self.regression:
            nums = [x for x in (self.number(v) for v in column_values if not is_blank(v)) if x is not None]
            self.mean = float(sum(nums) / len(nums)) if nums else 0.0
            var = sum((x - self.mean) ** 2 for x in nums) / max(1, len(nums) - 1)
            self.std = float(math.sqrt(var)) if var > 0 else 1.0
            return
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
        if self.regression:
            return []
        idx = self.index
        return [v for v in (self.values(value) or []) if label_key(v) not in idx]

    def encode(self, value: Any):
        """Class index (single-label), a multi-hot list of floats (multi-label), or the number (regression)."""
        if self.regression:
            return float(value)
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
                "weight": self.weight, "classes": list(self.classes),
                **({"regression": True, "regression_loss": self.regression_loss, "huber_delta": self.huber_delta,
                    "mean": self.mean, "std": self.std} if self.regression else {})}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Task":
        keys = ("name", "column", "multilabel", "separator", "weight", "classes", "regression", "regression_loss",
                "huber_delta", "mean", "std")
        return cls(**{k: d[k] for k in keys if k in d})


def tasks_from_config(data_cfg) -> List[Task]:
    """The tasks the config names: ``data.tasks`` when set, else one task on ``data.label_column``; a matcher
    (``data.query``) has one 1/0 task ``match`` on ``data.match_label``, or none."""
    if getattr(data_cfg, "query", None):
        return [Task(MATCH, data_cfg.match_label)] if data_cfg.match_label else []
    if data_cfg.tasks:
        return [Task(name, t.column, t.multilabel, t.separator, t.weight, regression=t.regression,
                     regression_loss=t.regression_loss, huber_delta=t.huber_delta) for name, t in data_cfg.tasks.items()]
    return [Task(data_cfg.label_column, data_cfg.label_column)]
