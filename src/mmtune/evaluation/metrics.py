"""Final metrics, computed from saved predictions with scikit-learn."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true: Sequence[int], proba: np.ndarray) -> Dict[str, Any]:
    """Single-label metrics from class indices and an (N, C) probability matrix.

    Returns ``n``, ``accuracy``, ``f1_macro``, ``precision_macro``, ``recall_macro``, ``log_loss`` and
    ``roc_auc`` (binary: the positive class's probability; multiclass: one-vs-rest macro). ROC-AUC is
    None, with ``roc_auc_note`` saying why, when the true labels hold fewer than all classes.
    """
    y = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    proba = proba / proba.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only within ~1e-7
    n_classes = proba.shape[1]
    pred = proba.argmax(1)
    labels = list(range(n_classes))
    out: Dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "f1_macro": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "precision_macro": float(skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall_macro": float(skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(skm.log_loss(y, np.clip(proba, 1e-15, 1.0), labels=labels)),
    }
    present = np.unique(y)
    if len(present) < n_classes:
        out["roc_auc"] = None
        out["roc_auc_note"] = f"only {len(present)} of {n_classes} classes occur in the true labels"
    elif n_classes == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y, proba[:, 1]))
    else:
        out["roc_auc"] = float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels))
    return out
