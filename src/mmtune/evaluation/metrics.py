"""Final metrics, computed from saved predictions with scikit-learn."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd


def classification_metrics(y_true: Sequence[int], proba: np.ndarray, class_names: Optional[Sequence[Any]] = None,
                           threshold: Optional[float] = None, top_k: Sequence[int] = (2, 3, 5),
                           ece_bins: int = 15) -> Dict[str, Any]:
    """Single-label metrics from class indices and an (N, C) probability matrix.

    Predictions are the argmax, or for a binary task with ``threshold`` set, class 1 when its
    probability reaches the threshold. Returns ``n``, ``accuracy``, ``balanced_accuracy``,
    ``precision`` / ``recall`` / ``f1`` macro and weighted, ``per_class`` (precision, recall, f1,
    support per class), ``roc_auc`` (binary: the positive class's probability; multiclass: one-vs-rest
    macro), ``pr_auc`` (average precision; macro over classes for multiclass), ``log_loss``,
    ``top_k_accuracy`` (for each k < C), ``confusion_matrix`` (rows: true class) and ``ece`` (``ece_bins``
    equal-width bins, ``ece_bins`` recorded beside it). ROC-AUC
    and PR-AUC are None, with a note saying why, when the true labels hold fewer than all classes.
    """
    from sklearn import metrics as skm

    from .calibration import expected_calibration_error

    y = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    proba = proba / proba.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only within ~1e-7
    n_classes = proba.shape[1]
    pred = decide_single(proba, threshold)
    labels = list(range(n_classes))
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in labels]
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: Dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if len(y) else None,
        "f1_macro": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "precision_macro": float(skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall_macro": float(skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "f1_weighted": float(skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "precision_weighted": float(skm.precision_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "recall_weighted": float(skm.recall_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "log_loss": float(skm.log_loss(y, np.clip(proba, 1e-15, 1.0), labels=labels)),
        "per_class": [{"class": names[i], "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i in labels],
        "top_k_accuracy": {str(k): float(skm.top_k_accuracy_score(y, proba, k=k, labels=labels))
                           for k in top_k if k < n_classes},
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "ece": expected_calibration_error(y, proba, ece_bins),
        "ece_bins": int(ece_bins),
    }
    present = np.unique(y)
    if len(present) < n_classes:
        out["roc_auc"] = out["pr_auc"] = None
        out["roc_auc_note"] = f"only {len(present)} of {n_classes} classes occur in the true labels"
    elif n_classes == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y, proba[:, 1]))
        out["pr_auc"] = float(skm.average_precision_score(y, proba[:, 1]))
    else:
        out["roc_auc"] = float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels))
        onehot = np.eye(n_classes)[y]
        out["pr_auc"] = float(skm.average_precision_score(onehot, proba, average="macro"))
    return out


def decide_single(proba: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """Class indices: argmax, or for two classes with ``threshold``, 1 where p(class 1) >= threshold."""
    if threshold is not None and proba.shape[1] == 2:
        return (proba[:, 1] >= threshold).astype(int)
    return proba.argmax(1)


def multilabel_metrics(y_true: np.ndarray, proba: np.ndarray, thresholds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """Multi-label metrics from an (N, C) 0/1 matrix and (N, C) probabilities, labels decided by
    ``thresholds`` (per label; default 0.5): ``f1_micro``, ``f1_macro``, ``subset_accuracy``,
    ``hamming_loss`` and ``mean_average_precision`` (macro over labels that occur)."""
    from sklearn import metrics as skm

    y = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    th = np.asarray(thresholds if thresholds is not None else [0.5] * proba.shape[1])
    pred = (proba >= th).astype(int)
    occurring = y.sum(0) > 0
    return {
        "n": int(len(y)),
        "f1_micro": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
        "f1_macro": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "subset_accuracy": float(skm.accuracy_score(y, pred)),
        "hamming_loss": float(skm.hamming_loss(y, pred)),
        "mean_average_precision": float(skm.average_precision_score(y[:, occurring], proba[:, occurring], average="macro"))
        if occurring.any() else None,
    }


def tune_thresholds(y_true: np.ndarray, proba: np.ndarray) -> list:
    """Per label, a probability threshold that maximises that label's F1 on (y_true, proba): halfway
    between the lowest score the best cut accepts and the next lower score (0 if none), so that it
    does not sit exactly on one validation example. 0.5 for a label that never occurs."""
    from sklearn import metrics as skm

    y = np.asarray(y_true, dtype=int)
    out = []
    for j in range(proba.shape[1]):
        if y[:, j].sum() == 0:
            out.append(0.5)
            continue
        p, r, th = skm.precision_recall_curve(y[:, j], proba[:, j])
        f1 = np.where(p[:-1] + r[:-1] > 0, 2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12), 0)
        cut = float(th[int(np.argmax(f1))])
        below = proba[:, j][proba[:, j] < cut]
        out.append((cut + (float(below.max()) if below.size else 0.0)) / 2)
    return out


def regression_metrics(y_true, pred) -> Dict[str, Any]:
    """``n``, ``rmse``, ``mae``, ``r2`` (scikit-learn) of numeric predictions."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(pred, dtype=np.float64).reshape(-1)
    return {"n": int(len(y)), "rmse": float(np.sqrt(mean_squared_error(y, p))), "mae": float(mean_absolute_error(y, p)),
            "r2": float(r2_score(y, p)) if len(y) > 1 else None}


def task_metrics(task, y_true, proba: np.ndarray, ece_bins: int = 15, calibration=None) -> Dict[str, Any]:
    """Metrics of one task: single-label (with the calibration's decision threshold, if any; ECE over
    ``ece_bins`` bins) or multi-label (with its per-label thresholds). ``proba`` as the Predictor returns it
    (calibrated); for a regression target, its predictions (N, 1)."""
    if getattr(task, "regression", False):
        return regression_metrics(y_true, proba)
    if task.multilabel:
        return multilabel_metrics(np.asarray(y_true), proba, getattr(calibration, "thresholds", None))
    return classification_metrics(y_true, proba, task.classes, getattr(calibration, "threshold", None), ece_bins=ece_bins)


def main_metric(task) -> str:
    """The headline metric of a task: r2 (regression), f1_micro (multi-label), accuracy."""
    return "r2" if task.regression else "f1_micro" if task.multilabel else "accuracy"


def bootstrap_interval(task, y_true, proba: np.ndarray, calibration=None, n: int = 1000, seed: int = 0,
                       level: float = 0.95, groups=None) -> Dict[str, Any]:
    """A percentile bootstrap interval of the task's main metric: the rows resampled with replacement ``n`` times
    (seeded), the metric recomputed on each resample from the same decisions as :func:`task_metrics`. With
    ``groups`` (one value per row: ``data.group_column``), whole groups are resampled (a cluster bootstrap): rows of
    one source are right or wrong together, and resampling them one by one would make the interval too narrow."""
    from sklearn.metrics import f1_score, r2_score

    name = main_metric(task)
    y = np.asarray(y_true)
    m = len(y)
    if m < 2:
        return {"metric": name, "low": None, "high": None, "level": level, "resamples": 0}
    rng = np.random.default_rng(seed)
    unit = "rows"
    if groups is not None and len(pd.unique(np.asarray(groups, dtype=object))) >= 2:
        codes, members = _group_members(groups)
        draws = rng.integers(0, len(members), size=(n, len(members)))
        idx = [np.concatenate([members[g] for g in d]) for d in draws]
        unit = f"groups ({len(members)})"
    else:
        idx = rng.integers(0, m, size=(n, m))
    if task.regression:
        pred = np.asarray(proba, dtype=np.float64).reshape(-1)
        values = [r2_score(y[i], pred[i]) if np.ptp(y[i]) > 0 else np.nan for i in idx]
    elif task.multilabel:
        th = np.asarray(getattr(calibration, "thresholds", None) or [0.5] * proba.shape[1])
        pred = (proba >= th).astype(int)
        values = [f1_score(y[i], pred[i], average="micro", zero_division=0) for i in idx]
    else:
        correct = (decide_single(proba, getattr(calibration, "threshold", None)) == y).astype(np.float64)
        values = [correct[i].mean() for i in idx]
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    a = (1.0 - level) / 2
    return {"metric": name, "low": float(np.quantile(values, a)), "high": float(np.quantile(values, 1 - a)),
            "level": level, "resamples": int(len(values)), "resampled": unit}


def _group_members(groups):
    """Row indices of each group (groups in order of first appearance)."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups, dtype=object)))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    return codes, [order[bounds[g]:bounds[g + 1]] for g in range(len(uniques))]


def flattering_validation(metrics: Dict[str, Any], tasks) -> List[str]:
    """Warnings for tasks whose validation metric lies above the test metric's bootstrap interval: the validation
    rows probably share sources with the training rows (set data.group_column)."""
    out = []
    for t in tasks:
        val, test = (metrics.get("val") or {}).get(t.name), (metrics.get("test") or {}).get(t.name)
        if not val or not test or "bootstrap" not in test:
            continue
        name, high = test["bootstrap"]["metric"], test["bootstrap"]["high"]
        if val.get(name) is not None and high is not None and val[name] > high:
            out.append(f"task {t.name!r}: validation {name} {val[name]:.3f} is above the test's "
                       f"{100 * test['bootstrap']['level']:.0f} % interval ({test['bootstrap']['low']:.3f}-{high:.3f}): "
                       "validation may share sources with training; set data.group_column")
    return out


def _calibration(calibration):
    from .calibration import Calibration

    return calibration or Calibration()


def calibrate(task, proba: np.ndarray, calibration=None) -> np.ndarray:
    """The calibration's temperature applied (single-label); multi-label probabilities unchanged. Kept in
    float64: temperature scaling is monotone, and in float64 no two classes tie where the raw float32
    probabilities do not, so the argmax never changes (float32 could round two classes to one value)."""
    return _calibration(calibration).probabilities(task, proba)


def decide(task, proba: np.ndarray, calibration=None):
    """Labels from probabilities: per-label thresholds (multi-label), p(class 1) against the tuned threshold
    (binary with a threshold, tuned on calibrated probabilities), else the argmax."""
    if task.regression:
        return np.asarray(proba, dtype=np.float64)[:, 0]
    cal = _calibration(calibration)
    names = np.empty(len(task.classes), dtype=object)
    names[:] = task.classes
    if task.multilabel:
        th = np.asarray(cal.thresholds or [0.5] * len(task.classes))
        return [list(names[row >= th]) for row in proba]
    return names[decide_single(proba, cal.threshold)] if len(proba) else names[:0]
