"""Cascade / stacking: unimodal classifiers, then a meta-classifier on their out-of-fold outputs."""
from __future__ import annotations

from typing import Dict, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..encoders.base import EncoderOutput
from .base import Fusion, FusionConfig
from ..finetune.shards import as_tensor
from .common import safe


class StackingFusion(Fusion):
    """One linear classifier per output key (a unimodal model on that encoder's pooled features);
    the output is the concatenation of their class probabilities (uniform for an absent modality),
    on which the head — the meta-classifier — decides. The branches and the meta-classifier are
    fitted by :func:`fit_stacking` (the meta-classifier on out-of-fold
    probabilities, so it learns how far to trust each modality on data that modality did not see)."""

    class Config(FusionConfig):
        type: Literal["stacking"] = "stacking"
        folds: int = Field(5, ge=2)
        """Folds of the out-of-fold predictions the meta-classifier learns from."""

    needs_cache = True
    linear_head = True
    single_task = True

    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, inputs.num_classes, cfg.folds)

    def fit_directly(self, model, train, tasks, seed, groups=None):
        fit_stacking(model, train, tasks[0], self.folds, seed, groups)
        return {}

    def __init__(self, in_dims: Dict[str, int], num_classes: int, folds: int = 5):
        super().__init__()
        self.folds = folds
        self.keys = sorted(in_dims)
        self.num_classes = num_classes
        self.branches = nn.ModuleDict({safe(k): nn.Linear(in_dims[k], num_classes) for k in self.keys})
        self.out_dim = num_classes * len(self.keys)

    def branch_proba(self, key: str, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.branches[safe(key)](pooled), dim=-1)
        keep = present.to(p.dtype).unsqueeze(-1)
        return p * keep + (1.0 / self.num_classes) * (1 - keep)

    def forward(self, outputs: Dict[str, EncoderOutput], present: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.branch_proba(k, outputs[k].pooled, present[k]) for k in self.keys], dim=-1)


# ---- fitting: unimodal classifiers, then a meta-classifier on their out-of-fold outputs ----------------------
def _logistic_into_linear(linear: torch.nn.Linear, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int):
    """Fit a standardised multinomial logistic regression and write it into ``linear`` (the scaler folded
    into the weights), so the torch layer computes the same logits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    lr = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(X), y)
    coef = np.zeros((n_classes, X.shape[1]))
    bias = np.zeros(n_classes)
    if len(lr.classes_) == 2 and lr.coef_.shape[0] == 1:  # binary: softmax(-z/2, z/2) == sigmoid(z)
        rows = [lr.classes_[0], lr.classes_[1]]
        c = lr.coef_[0] / 2
        coef[rows[0]], coef[rows[1]] = -c, c
        bias[rows[0]], bias[rows[1]] = -lr.intercept_[0] / 2, lr.intercept_[0] / 2
    else:
        for i, cls in enumerate(lr.classes_):
            coef[cls], bias[cls] = lr.coef_[i], lr.intercept_[i]
        missing = [c for c in range(n_classes) if c not in set(lr.classes_)]
        bias[missing] = -1e4  # a class never seen here is never predicted by this branch
    scale = scaler.scale_
    w = coef / scale
    b = bias - (coef * (scaler.mean_ / scale)).sum(1)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(w, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(b, dtype=linear.bias.dtype))
    return scaler, lr


def fit_stacking(model, train, task, folds: int, seed: int, groups=None) -> None:
    """Fit ``model.fusion`` (a StackingFusion) and its head on a CachedDataset ``train``.

    1. For each encoder output, a logistic regression on its pooled features; out-of-fold class
       probabilities from ``folds``-fold stratified cross-validation (rows lacking that modality get
       uniform probabilities) — each group of ``groups`` (one value per training row) on one side of every fold,
       when given — then a fit on all rows that becomes the branch.
    2. The meta-classifier — the head — is a logistic regression on the concatenated out-of-fold
       probabilities, so it weighs each modality by how well it does on rows it was not fitted on.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fusion = model.fusion
    n_classes = fusion.num_classes
    y = train.labels[task.name].numpy()
    oof_parts = []
    for key in fusion.keys:
        X = as_tensor(train.outputs[key]["pooled"]).numpy().astype(np.float64)
        present = train.present[model.output_modality[key]].numpy()
        oof = np.full((len(y), n_classes), 1.0 / n_classes)
        Xp, yp = X[present], y[present]
        counts = np.bincount(yp, minlength=n_classes)
        if counts.min() < 2:
            c = int(counts.argmin())
            raise ValueError(
                f"fusion 'stacking': class {task.classes[c]!r} has {int(counts[c])} training row(s) with "
                f"{key!r} present; out-of-fold stacking needs at least 2 per class. Add rows of that class "
                "or choose another fusion (concat, late, gated).")
        k = min(folds, int(counts.min()))
        est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        if groups is not None:
            from ..data.splits import group_folds

            cv = group_folds(yp, np.asarray(groups)[present], min(folds, len(np.unique(np.asarray(groups)[present]))), seed)
        else:
            cv = StratifiedKFold(k, shuffle=True, random_state=seed)
        oof[present] = cross_val_predict(est, Xp, yp, cv=cv, method="predict_proba")
        _logistic_into_linear(fusion.branches[safe(key)], Xp, yp, n_classes, seed)
        oof_parts.append(oof)
    meta_X = np.concatenate(oof_parts, axis=1)
    head_linear = [m for m in model.heads[task.name].modules() if isinstance(m, torch.nn.Linear)][-1]
    _logistic_into_linear(head_linear, meta_X, y, n_classes, seed)
