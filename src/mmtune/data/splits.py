"""Grouped folds: each group of ``data.group_column`` on one side — what every split mmtune makes uses when a group
column is set (the validation and test splits, stacking's out-of-fold predictions, cross-validation)."""
from __future__ import annotations

from typing import Optional

import numpy as np


def group_folds(labels: Optional[np.ndarray], groups: np.ndarray, n_splits: int, seed: int):
    """``(train_rows, held_rows)`` per fold with each group on one side: stratified by ``labels`` where every class
    spans enough groups (scikit-learn's StratifiedGroupKFold), else GroupKFold over shuffled groups."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"data.group_column has {n_groups} group(s), too few for {n_splits} folds: a held-out "
                         "side needs whole groups")
    rows = np.arange(len(groups))
    if labels is not None:
        counts = np.bincount(labels)
        if counts[counts > 0].min() >= n_splits:
            return list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(rows, labels, groups))
    uniq, inverse = np.unique(groups, return_inverse=True)
    shuffled = np.random.default_rng(seed).permutation(len(uniq))[inverse]  # GroupKFold is deterministic
    return list(GroupKFold(n_splits).split(rows, groups=shuffled))
