"""A whitened PCA subspace of the training features: where the GAN and SMOTE make minority rows when
``synthesis.subspace`` is set. High-dimensional frozen features (1,664-d for MiniLM + EfficientNet) with ten rows
of a class give a generator far more directions to get wrong than the data pin down; in the few components that
hold most of the variance it has a problem it can learn, and the rows are mapped back to the full space."""
from __future__ import annotations

import numpy as np


class Subspace:
    """``to``: (X - mean) projected on the kept components, each scaled to unit variance; ``back``: the inverse (the
    discarded directions set to the mean). The components are the leading principal components of the rows — with
    labels ``y``, of the rows less their class's mean, so that what is kept is the variation inside the classes,
    plus the directions between the class centres those miss. ``variance`` is the share of that variance the
    principal components hold (at most one component fewer than the rows)."""

    def __init__(self, X: np.ndarray, variance: float, y=None):
        X = np.asarray(X, dtype=np.float64)
        self.mean = X.mean(0)
        centred = X - self.mean
        if y is not None:  # the within-class variation decides the components (the classes' spreads are what a
            # generator must reproduce); the directions between the class centres are added to them
            y = np.asarray(y)
            means = np.stack([X[y == c].mean(0) for c in np.unique(y)])
            centred = X - means[np.searchsorted(np.unique(y), y)]
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        var = s ** 2 / max(len(X) - 1, 1)
        share = np.cumsum(var) / max(var.sum(), 1e-300)
        k = int(np.searchsorted(share, min(variance, 1.0) - 1e-12) + 1)
        k = max(1, min(k, len(X) - 1, len(s)))
        basis = vt[:k]
        if y is not None:
            between = means - self.mean
            between = between - (between @ basis.T) @ basis  # what the within-class components miss
            extra = np.linalg.svd(between, full_matrices=False)[2] if len(between) else np.zeros((0, X.shape[1]))
            norms = np.linalg.svd(between, compute_uv=False) if len(between) else np.zeros(0)
            basis = np.vstack([basis, extra[norms > 1e-9 * max(1.0, norms.max(initial=0.0))]])
        self.components = basis
        proj = (X - self.mean) @ basis.T
        self.scale = np.maximum(proj.std(0, ddof=1), 1e-6)
        self.kept = float(share[k - 1])
        self.dim = len(basis)

    def to(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean) @ self.components.T / self.scale

    def back(self, Z: np.ndarray) -> np.ndarray:
        return (np.asarray(Z, dtype=np.float64) * self.scale) @ self.components + self.mean

    def outside(self, X: np.ndarray) -> np.ndarray:
        """The part of each row that the subspace leaves out (``X`` less its mapping there and back)."""
        return np.asarray(X, dtype=np.float64) - self.back(self.to(X))

    def restore(self, X: np.ndarray, y: np.ndarray, made: np.ndarray, made_y: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
        """``made`` (rows mapped back from the subspace, labels ``made_y``) plus, for each, the part outside the
        subspace of a random real row of its class. Mapped back alone, a made row is flat in every left-out
        direction, so its class is less spread than the real one by what the subspace drops: on the demo's 1,664-d
        features with 10 rows of a class (``bench/imbalance.py``, 3 seeds) the subspace GAN's minority spread ratio
        was 0.49 mapped back alone (90 % of the variance), 0.79 with the residuals restored (80 %)."""
        made = np.array(made, dtype=np.float64, copy=True)
        rest = self.outside(X)
        y, made_y = np.asarray(y), np.asarray(made_y)
        for c in np.unique(made_y):
            rows, slots = np.flatnonzero(y == c), np.flatnonzero(made_y == c)
            if len(rows):
                made[slots] += rest[rng.choice(rows, len(slots))]
        return made
