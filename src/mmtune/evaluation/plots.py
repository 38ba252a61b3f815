"""Plots for the report, each returned as PNG bytes (matplotlib, no display needed)."""
from __future__ import annotations

import io
from typing import Any, Dict, Optional, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def training_curves(logs) -> bytes:
    """Loss and accuracy / macro F1 per epoch, train and validation, from Lightning's metrics.csv."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    by_epoch = logs.groupby("epoch").last() if "epoch" in logs else logs
    for ax, cols, title in ((axes[0], ["train_loss_epoch", "val_loss"], "loss"),
                            (axes[1], ["train_acc", "val_acc", "val_f1_macro", "train_r1", "val_r1"],
                             "recall@1 in batch" if "val_r1" in by_epoch else "accuracy / macro F1")):
        for c in cols:
            if c in by_epoch and by_epoch[c].notna().any():
                s = by_epoch[c].dropna()
                ax.plot(s.index + 1, s.values, marker="o", label=c)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[Any]) -> bytes:
    plt = _plt()
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("confusion matrix (test)")
    return _png(fig)


def _curves(y: np.ndarray, proba: np.ndarray, classes: Sequence[Any], kind: str) -> bytes:
    from sklearn import metrics as skm

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    onehot = np.eye(proba.shape[1])[y] if y.ndim == 1 else y
    indices = [1] if proba.shape[1] == 2 and y.ndim == 1 else range(proba.shape[1])
    for j in indices:
        if onehot[:, j].min() == onehot[:, j].max():
            continue
        if kind == "roc":
            fpr, tpr, _ = skm.roc_curve(onehot[:, j], proba[:, j])
            ax.plot(fpr, tpr, label=f"{classes[j]} (AUC {skm.auc(fpr, tpr):.3f})")
        else:
            p, r, _ = skm.precision_recall_curve(onehot[:, j], proba[:, j])
            ax.plot(r, p, label=f"{classes[j]} (AP {skm.average_precision_score(onehot[:, j], proba[:, j]):.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC (test, one-vs-rest)")
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("precision-recall (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def roc_curves(y, proba, classes) -> bytes:
    return _curves(np.asarray(y), np.asarray(proba), classes, "roc")


def pr_curves(y, proba, classes) -> bytes:
    return _curves(np.asarray(y), np.asarray(proba), classes, "pr")


def reliability(y, before: np.ndarray, after: Optional[np.ndarray], bins: int = 15) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    from .calibration import expected_calibration_error, reliability_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for name, p in (("before", before), ("after temperature scaling", after)):
        if p is None:
            continue
        c = reliability_curve(y, p, bins)
        xs = [x for x, n in zip(c["confidence"], c["count"]) if n]
        ys = [a for a, n in zip(c["accuracy"], c["count"]) if n]
        ns = np.array([n for n in c["count"] if n], dtype=float)
        line, = ax.plot(xs, ys, alpha=0.6, label=f"{name} (ECE {expected_calibration_error(y, p, bins):.3f})")
        ax.scatter(xs, ys, s=15 + 250 * ns / ns.max(), color=line.get_color(), alpha=0.8)  # area ~ rows in the bin
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (test; marker area = rows per bin)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def regression(y: np.ndarray, pred: np.ndarray, name: str) -> bytes:
    """Predicted against actual (with the identity line), and residuals against the prediction."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.scatter(y, pred, s=8, alpha=0.6)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    a.plot([lo, hi], [lo, hi], color="grey", lw=1)
    a.set(xlabel=f"actual {name}", ylabel="predicted", title="predicted vs actual")
    b.scatter(pred, y - pred, s=8, alpha=0.6)
    b.axhline(0, color="grey", lw=1)
    b.set(xlabel="predicted", ylabel="actual - predicted", title="residuals")
    return _png(fig)


def contribution(entries: Dict[str, Any], task: str, metric: str) -> bytes:
    plt = _plt()
    names = [n for n in entries if n != "split"]
    vals = [entries[n]["metrics"][task][metric] for n in names]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 3.4))
    ax.bar(names, vals, color=["#3b75af"] + ["#c44e52"] * (len(names) - 1))
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"modality contribution ({task})")
    return _png(fig)


def search_trials(trials: Sequence[Dict[str, Any]], monitor: str, direction: str) -> bytes:
    """A search's trials: each trial's monitored metric per epoch (pruned trials dashed), and each trial's best
    value in trial order with the best so far."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for t in trials:
        v = t.get("epoch_values") or []
        if v:
            axes[0].plot(range(1, len(v) + 1), v, marker=".", linestyle="--" if t["state"] == "pruned" else "-",
                         alpha=0.8, label=f"trial {t['trial']} ({t['state']})")
    axes[0].set_xlabel("epoch")
    axes[0].set_title(f"{monitor} per epoch")
    axes[0].grid(alpha=0.3)
    if len(trials) <= 12:
        axes[0].legend(fontsize=7)
    done = [(t["trial"], t["value"]) for t in trials if t["state"] == "complete" and t.get("value") is not None]
    pruned = [(t["trial"], t["value"]) for t in trials if t["state"] == "pruned" and t.get("value") is not None]
    if done:
        axes[1].scatter(*zip(*done), label="complete")
        pick = min if direction == "min" else max
        best, run = [], None
        for n, v in sorted(done):
            run = v if run is None else pick(run, v)
            best.append((n, run))
        axes[1].step(*zip(*best), where="post", color="k", label="best so far")
    if pruned:
        axes[1].scatter(*zip(*pruned), marker="x", color="grey", label="pruned (last value)")
    axes[1].set_xlabel("trial")
    axes[1].set_title(f"{monitor} by trial ({direction}imise)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return _png(fig)


def recall_at_k(curves: Dict[str, Dict[Any, float]]) -> bytes:
    """A matcher's recall@k for k = 1..20, one line per split."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for split, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[str(k)] if str(k) in curve else curve[k] for k in ks], marker="o", label=split)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
