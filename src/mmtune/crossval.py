"""K-fold cross-validation of a config: ``mmtune fit --cv K`` (``evaluation.cv``).

The training table is cut into K folds — each group on one side when ``data.group_column`` is set
(StratifiedGroupKFold), else stratified by the first single-label task — and each fold is a normal
:func:`~mmtune.fit` with that fold as its validation split and the others as its training rows, in
``RUN/cv/fold-<i>`` (no report, probe or explanations; frozen-encoder folds share the embedding cache, which is
keyed by file contents). Their validation metrics, with the mean and spread over the folds, go into the run's
``metrics.json["cv"]`` and the report. The run's own model is then fitted as usual (its own validation split for
early stopping and calibration), and — with ``evaluation.cv_ensemble`` (the default) — the K fold models are
shipped beside it as an equal-weight ensemble (:mod:`mmtune.ensemble`; every training row was seen by K-1 of them),
which :meth:`~mmtune.Predictor.load` serves; with a test table each fold predicts it too, and the ensemble's test
metrics are the folds' averaged calibrated probabilities, scored.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

FOLD_SETTINGS = {"evaluation.report": False, "evaluation.explain": 0, "evaluation.linear_probe": False,
                 "evaluation.baselines": False, "evaluation.modality_contribution": False,
                 "evaluation.worst_examples": 0, "evaluation.cv": 0, "evaluation.flatter_warning": False,
                 "trainer.progress_bar": False}


def fold_rows(df: pd.DataFrame, cfg, k: int) -> List[np.ndarray]:
    """The held-out rows of each of ``k`` folds of the training table ``df``."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from .data.datamodule import label_codes
    from .data.splits import group_folds

    task = next((t for t in cfg.tasks if not t.multilabel and not t.regression), None)
    labels = label_codes(df[task.column]) if task is not None else None
    seed = cfg.data.split_seed
    if cfg.data.group_column is not None:
        if cfg.data.group_column not in df.columns:
            raise ValueError(f"data.group_column {cfg.data.group_column!r} is not a column of the training table")
        return [b for _, b in group_folds(labels, label_codes(df[cfg.data.group_column]), k, seed)]
    rows = np.arange(len(df))
    if labels is not None and np.bincount(labels)[np.bincount(labels) > 0].min() >= k:
        return [b for _, b in StratifiedKFold(k, shuffle=True, random_state=seed).split(rows, labels)]
    return [b for _, b in KFold(k, shuffle=True, random_state=seed).split(rows)]


def cross_validate(cfg, train=None, test=None, log=print) -> Dict[str, Any]:
    """Fit ``cfg`` on each of ``cfg.evaluation.cv`` folds of its training table; returns
    ``{"k", "grouped", "folds": [{"fold", "rows", "val": {task: metrics}}], "mean", "std"}``."""
    from .config import load_config, set_raw_key
    from .data.manifest import absolute_paths, read_table
    from .recipe.fit import train_run

    k = cfg.evaluation.cv
    source = train if train is not None else cfg.data.train
    if source is None:
        raise ValueError("--cv needs the training table (data.train or a DataFrame)")
    df, base = read_table(source)
    df = df.copy()
    absolute_paths(df, cfg, base)  # the folds are DataFrames: file paths must not depend on the table's folder
    if len(df) < 2 * k:
        raise ValueError(f"--cv {k}: the training table has {len(df)} rows, too few for {k} folds")
    folds = fold_rows(df, cfg, k)
    out: Dict[str, Any] = {"k": k, "grouped": cfg.data.group_column, "folds": []}
    for i, held in enumerate(folds):
        raw = cfg.to_dict()
        raw.update(name=f"fold-{i}", output_dir=str(cfg.run_dir / "cv"), preset=None)
        for key, value in FOLD_SETTINGS.items():
            set_raw_key(raw, key, value)
        for key in ("train", "val") + (("test",) if test is not None else ()):
            set_raw_key(raw, f"data.{key}", None)
        keep = np.setdiff1d(np.arange(len(df)), held)
        res = train_run(load_config(raw), train=df.iloc[keep].reset_index(drop=True),
                        val=df.iloc[np.sort(held)].reset_index(drop=True), test=test, overwrite=True)
        out["folds"].append({"fold": i, "rows": int(len(held)), "val": res.metrics["val"]})
        log(f"cv fold {i + 1}/{k}: " + "; ".join(f"{t} {_headline(m)}" for t, m in res.metrics["val"].items()))
    out["mean"], out["std"] = _spread([f["val"] for f in out["folds"]])
    return out


def ship_folds(cfg, log=print) -> Optional[Dict[str, Any]]:
    """The fold models of ``RUN/cv`` as the run's equal-weight ensemble (``RUN/ensemble``)."""
    from .ensemble import build_ensemble

    run = cfg.run_dir
    folds = {p.name: p for p in sorted((run / "cv").glob("fold-*")) if (p / "bundle.json").is_file()}
    if len(folds) < 2:
        return None
    meta = build_ensemble(run, folds, weights={n: 1.0 for n in folds}, source="cv", log_fn=log)
    if meta is not None and (run / "report.html").is_file():
        from .evaluation.report import build_report

        build_report(run)
    return meta


def _headline(m: Dict[str, Any]) -> str:
    key = next((k for k in ("accuracy", "r2", "f1_micro") if k in m), None)
    return f"{key} {m[key]:.4f}" if key else ""


def _spread(per_fold: List[Dict[str, Dict[str, Any]]]):
    """Per task and numeric metric, the mean and the (sample) standard deviation over the folds."""
    mean: Dict[str, Dict[str, float]] = {}
    std: Dict[str, Dict[str, float]] = {}
    for task in per_fold[0]:
        keys = [k for k, v in per_fold[0][task].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for key in keys:
            values = np.array([f[task][key] for f in per_fold if f[task].get(key) is not None], dtype=np.float64)
            if len(values):
                mean.setdefault(task, {})[key] = float(values.mean())
                std.setdefault(task, {})[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return mean, std
