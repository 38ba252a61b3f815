"""Synthetic minority rows for a cached training set: SMOTE, Borderline-SMOTE (imbalanced-learn) or the
conditional GAN. Rows are made from, and added to, the training split only."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch


def targets_for_ratio(y: np.ndarray, ratio: float) -> Dict[int, int]:
    """Class -> the row count to reach: every class smaller than ``ratio`` x the largest is raised to it."""
    counts = np.bincount(y)
    goal = int(round(counts.max() * ratio))
    return {c: max(int(n), goal) for c, n in enumerate(counts) if n > 0}


def synthesize_rows(X: np.ndarray, y: np.ndarray, cfg, seed: int = 0,
                    class_names=None) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """New rows (features, labels) so that the classes reach ``cfg.target_ratio`` of the largest, and a
    report: the method, rows added per class and, for the GAN, its loss history, why it stopped, and per
    class how close its rows are to the real ones (``fidelity``: mean distance and spread ratio, see
    :func:`~mmtune.synthesis.feature_gan.fidelity`), with a warning when they are far."""
    targets = targets_for_ratio(y, cfg.target_ratio)
    counts = np.bincount(y, minlength=max(targets) + 1)
    need = {c: t - int(counts[c]) for c, t in targets.items() if t > counts[c]}
    report: Dict[str, Any] = {"method": cfg.method, "added_per_class": {str(c): int(n) for c, n in need.items()}}
    if not need:
        return X[:0], y[:0], report
    import warnings

    space = None
    if cfg.subspace is not None:  # made in a whitened PCA subspace of the training rows, mapped back
        from .subspace import Subspace

        space = Subspace(X, cfg.subspace, y)
        report["subspace"] = {"components": space.dim, "variance_kept": round(space.kept, 4), "of": int(X.shape[1]),
                              "residuals": bool(cfg.residuals)}
    to = space.to if space is not None else (lambda a: a)
    rng = np.random.default_rng(seed)

    def back(Z, made_y):  # to the feature space, with the left-out part of a real row of the class
        if space is None:
            return Z
        out = space.back(Z)
        return space.restore(X, y, out, made_y, rng) if cfg.residuals else out
    if cfg.method in ("smote", "borderline_smote"):
        from imblearn.over_sampling import SMOTE, BorderlineSMOTE

        fewest = int(min(counts[c] for c in need))
        k = max(1, min(cfg.k_neighbors, fewest - 1))
        if k < cfg.k_neighbors:
            names = [str(class_names[c]) if class_names is not None else str(c) for c in need if counts[c] == fewest]
            msg = (f"synthesis.k_neighbors={cfg.k_neighbors}, but class {names[0]!r} has {fewest} training row(s): "
                   f"SMOTE interpolates between each row and its {k} nearest neighbour(s) instead")
            warnings.warn(msg)
            report["k_neighbors_note"] = msg
        report["k_neighbors"] = k
        cls = SMOTE if cfg.method == "smote" else BorderlineSMOTE
        sampler = cls(sampling_strategy=targets, k_neighbors=k, random_state=seed)
        Xr, yr = sampler.fit_resample(to(X), y)
        return back(Xr[len(X):], yr[len(X):]), yr[len(X):], report
    if cfg.method == "gan":
        from .feature_gan import ConditionalGAN, fidelity, fidelity_problems, is_finite

        g = cfg.gan
        Z = to(X)
        gan = ConditionalGAN(Z.shape[1], int(y.max()) + 1, g.noise_dim, g.hidden, g.lr, seed, r1=g.r1,
                             ema_decay=g.ema_decay)
        gan.fit(Z, y, g.epochs, g.batch_size, g.divergence_patience)
        ys = np.concatenate([np.full(n, c) for c, n in need.items()])
        Xn = back(gan.sample(ys), ys)
        # Fidelity on a fresh draw of the same size for every class (the minority classes' own rows
        # are few), in the full feature space: how far the generated class centres and spreads are from the
        # real ones, and the generated rows' precision and recall against the real class.
        probe_y = np.repeat(np.unique(y), 200)
        per_class = fidelity(X, y, back(gan.sample(probe_y), probe_y), probe_y)
        by_class = {c: fidelity_problems({c: f}, class_names) for c, f in per_class.items()}
        problems = [p for lines in by_class.values() for p in lines]
        far = {c: lines for c, lines in by_class.items() if lines and int(c) in need}  # classes that get rows
        # rows that are not like the class's real ones would teach the head something else; rows that are not
        # finite (a GAN whose loss stopped being finite) would end the fit, so they are left out in any case
        refused = far if g.refuse_far else {c: v for c, v in far.items() if not is_finite(per_class[c])}
        finite = np.isfinite(Xn).all(1)
        keep = finite & ~np.isin(ys, [int(c) for c in refused])
        Xn, ys = Xn[keep], ys[keep]
        if refused:
            report["refused"] = refused
            report["added_per_class"].update({c: 0 for c in refused})
            warnings.warn("synthetic rows left out, far from the real ones: " + "; ".join(sum(refused.values(), []))
                          + (" (synthesis.gan.refuse_far: false keeps them)" if g.refuse_far else ""))
        kept_far = [x for c, lines in by_class.items() if c not in refused for x in lines]
        if kept_far:
            warnings.warn("synthetic rows are far from the real ones: " + "; ".join(kept_far))
        report.update({"d_loss": gan.history["d_loss"], "g_loss": gan.history["g_loss"],
                       "epochs_run": len(gan.history["d_loss"]), "stopped": gan.stopped,
                       "fidelity": per_class, "fidelity_problems": problems})
        return Xn, ys, report
    raise ValueError(f"unknown synthesis method {cfg.method!r}; valid: smote, borderline_smote, gan")


def synthesize_cached(train, keys: List[str], cfg, task: str, seed: int = 0, class_names=None):
    """A new CachedDataset: ``train`` plus synthetic rows (pooled features only, every modality present,
    ``synthetic`` flag set). Returns it and the report."""
    from ..finetune.feature_cache import CachedDataset
    from ..finetune.shards import as_tensor

    pooled = {k: as_tensor(train.outputs[k]["pooled"]) for k in keys}
    dims = [pooled[k].shape[1] for k in keys]
    X = torch.cat([pooled[k] for k in keys], dim=1).numpy().astype(np.float64)
    y = train.labels[task].numpy()
    Xn, yn, report = synthesize_rows(X, y, cfg, seed, class_names)
    n_new = len(yn)
    outputs, start = {}, 0
    for k, d in zip(keys, dims):
        new = torch.as_tensor(Xn[:, start:start + d], dtype=pooled[k].dtype)
        outputs[k] = {"pooled": torch.cat([pooled[k], new])}
        start += d
    present = {m: torch.cat([v, torch.ones(n_new, dtype=torch.bool)]) for m, v in train.present.items()}
    labels = {task: torch.cat([train.labels[task], torch.as_tensor(yn, dtype=torch.long)]).tolist()}
    weights = None if train.weights is None else torch.cat([train.weights, torch.ones(n_new)])
    ds = CachedDataset(outputs, present, labels, weights)
    ds.synthetic = torch.cat([torch.zeros(len(y), dtype=torch.bool), torch.ones(n_new, dtype=torch.bool)])
    report["rows_before"], report["rows_after"] = int(len(y)), int(len(y) + n_new)
    return ds, report
