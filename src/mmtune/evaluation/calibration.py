"""Calibration: expected calibration error, reliability curves, temperature scaling, decision thresholds."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """What a task's predictions need after the softmax, fitted on validation and stored in the bundle:
    ``temperature`` (single-label; None: none), ``threshold`` (binary: the decision threshold on p(class 1);
    None: argmax), ``thresholds`` (multi-label: per label; None: 0.5), and the post-hoc logit adjustment
    (``evaluation.logit_adjustment``; Menon et al., 2021): ``prior_tau`` τ and ``log_prior`` (each class's log share
    of the training rows), which turn the probabilities into p_c π_c^-τ / Σ_k p_k π_k^-τ — at τ = 1 the posterior
    under equal class priors."""

    temperature: Optional[float] = None
    threshold: Optional[float] = None
    thresholds: Optional[List[float]] = None
    prior_tau: Optional[float] = None
    log_prior: Optional[List[float]] = None

    def probabilities(self, task, proba: np.ndarray) -> np.ndarray:
        """The temperature, then the prior adjustment, applied (single-label, float64); multi-label probabilities
        unchanged."""
        if task.multilabel or getattr(task, "regression", False):
            return proba
        return adjust_for_prior(apply_temperature(proba, self.temperature), self.log_prior, self.prior_tau)

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        if self.prior_tau is None:  # bundles without the adjustment keep the keys earlier versions wrote
            out.pop("prior_tau"), out.pop("log_prior")
        return out

    @classmethod
    def from_json(cls, d: Optional[Dict[str, Any]]) -> "Calibration":
        d = d or {}
        return cls(d.get("temperature"), d.get("threshold"), d.get("thresholds"), d.get("prior_tau"), d.get("log_prior"))


def adjust_for_prior(proba: np.ndarray, log_prior: Optional[List[float]], tau: Optional[float]) -> np.ndarray:
    """softmax(log p - τ log π): the probabilities with the training prior divided out τ times (τ 0 or None: as
    they are)."""
    if not tau or log_prior is None:
        return proba
    return _softmax(_log(proba) - tau * np.asarray(log_prior, np.float64))


TAU_GRID = tuple(np.round(np.arange(0.0, 2.01, 0.25), 2).tolist())
"""The τ values post-hoc logit adjustment chooses from on validation."""


def fit_prior_tau(y_val, proba: np.ndarray, log_prior) -> Dict[str, Any]:
    """The τ of :data:`TAU_GRID` whose adjusted argmax has the highest balanced accuracy on validation (the smallest
    such τ on ties), with each τ's score."""
    from sklearn.metrics import balanced_accuracy_score

    y = np.asarray(y_val, dtype=int)
    scores = {tau: float(balanced_accuracy_score(y, adjust_for_prior(proba, log_prior, tau).argmax(1)))
              for tau in TAU_GRID}
    best = max(TAU_GRID, key=lambda t: (scores[t], -t))
    return {"tau": best, "balanced_accuracy_by_tau": scores}


def reliability_curve(y_true, proba: np.ndarray, n_bins: int = 15) -> Dict[str, list]:
    """Per confidence bin (equal width on [0, 1]): mean confidence (max probability), accuracy, count."""
    y = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    conf = proba.max(1)
    correct = (proba.argmax(1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out = {"confidence": [], "accuracy": [], "count": [], "lower": edges[:-1].tolist(), "upper": edges[1:].tolist()}
    for b in range(n_bins):
        m = idx == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else None)
        out["accuracy"].append(float(correct[m].mean()) if m.any() else None)
    return out


def expected_calibration_error(y_true, proba: np.ndarray, n_bins: int = 15) -> float:
    """sum over bins of (bin size / n) * |accuracy - mean confidence| (top-label ECE)."""
    curve = reliability_curve(y_true, proba, n_bins)
    n = max(1, sum(curve["count"]))
    return float(sum(c / n * abs(a - f) for c, a, f in zip(curve["count"], curve["accuracy"], curve["confidence"]) if c))


def _log(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def apply_temperature(proba: np.ndarray, temperature: Optional[float]) -> np.ndarray:
    """Rescale probabilities as softmax(log p / T) (the same as dividing the logits by T)."""
    if temperature is None or temperature == 1.0:
        return proba
    return _softmax(_log(proba) / temperature)


def fit_temperature(y_true, proba: np.ndarray) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(log p / T) on
    (y_true, proba) — temperature scaling (Guo et al., 2017), fitted by a bounded 1-D search on log T."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_true, dtype=int)
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        return float((lse - z[np.arange(len(y)), y]).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def tune_binary_threshold(y_true, p_positive: np.ndarray, goal: str = "max_f1", value: Optional[float] = None) -> Dict[str, Any]:
    """A decision threshold on p(class 1) for a binary task.

    ``max_f1``: the threshold with the best F1. ``min_precision``: the lowest threshold whose precision
    is at least ``value`` (most recall at that precision). ``min_recall``: the highest threshold whose
    recall is at least ``value`` (most precision at that recall). Returns the threshold and the
    precision, recall and F1 it gives on (y_true, p_positive); raises ValueError when the goal cannot
    be met."""
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(y_true, dtype=int)
    p, r, th = precision_recall_curve(y, p_positive)
    p, r = p[:-1], r[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    if goal == "max_f1":
        i = int(np.argmax(f1))
    elif goal == "min_precision":
        ok = np.where(p >= value)[0]
        if not len(ok):
            raise ValueError(f"no threshold reaches precision {value} on the validation set")
        i = int(ok[0])
    elif goal == "min_recall":
        ok = np.where(r >= value)[0]
        if not len(ok):
            raise ValueError(f"no threshold reaches recall {value} on the validation set")
        i = int(ok[-1])
    else:
        raise ValueError(f"unknown threshold goal {goal!r}; valid: max_f1, min_precision, min_recall")
    return {"threshold": float(th[i]), "precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
            "goal": goal, "value": value}
