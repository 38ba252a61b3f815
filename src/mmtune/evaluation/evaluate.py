"""After training: calibration, decision thresholds, metrics, saved predictions, modality contribution."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from ..inference import predict_proba_batches
from .ablation import modality_contribution
from .calibration import apply_temperature, expected_calibration_error, fit_temperature, tune_binary_threshold
from .metrics import task_metrics, tune_thresholds


def _labels(ds, task) -> Any:
    v = ds.labels[task]
    return v.tolist() if hasattr(v, "tolist") else v


def finalize(model, tasks, loaders: Dict[str, Any], frames: Dict[str, pd.DataFrame], eval_cfg, modalities,
             id_column: Optional[str] = None, image_paths: Optional[Dict[str, List[Optional[str]]]] = None,
             text_column: Optional[str] = None):
    """Fit calibration on validation, set the tasks' temperature / thresholds, and compute metrics.

    Returns ``(metrics, predictions)``: ``metrics["val"|"test"][task]`` (on calibrated probabilities,
    with the tuned thresholds), ``metrics["calibration"][task]`` (temperature, ECE before and after),
    ``metrics["modality_contribution"]``; ``predictions[split]`` is a table of each row's true labels
    and raw (uncalibrated) probabilities, plus id, image path and text for the report."""
    raw = {s: predict_proba_batches(model, tasks, loaders[s]) for s in ("val", "test") if s in loaders}
    labels = {s: {t.name: _labels(loaders[s].dataset, t.name) for t in tasks} for s in raw}
    calibration: Dict[str, Any] = {}
    for t in tasks:
        yv, pv = labels["val"][t.name], raw["val"][t.name]
        if t.multilabel:
            t.thresholds = tune_thresholds(np.asarray(yv), pv)
            continue
        t.temperature = fit_temperature(yv, pv) if eval_cfg.temperature_scaling else None
        entry: Dict[str, Any] = {"temperature": t.temperature}
        for s in raw:
            entry[f"ece_{s}_before"] = expected_calibration_error(labels[s][t.name], raw[s][t.name], eval_cfg.calibration_bins)
            entry[f"ece_{s}_after"] = expected_calibration_error(
                labels[s][t.name], apply_temperature(raw[s][t.name], t.temperature), eval_cfg.calibration_bins)
        if len(t.classes) == 2 and eval_cfg.threshold_goal != "none":
            tuned = tune_binary_threshold(yv, apply_temperature(pv, t.temperature)[:, 1], eval_cfg.threshold_goal,
                                          eval_cfg.threshold_value)
            t.threshold = tuned["threshold"]
            entry["decision_threshold"] = tuned
        calibration[t.name] = entry
    metrics: Dict[str, Any] = {}
    for s in raw:
        metrics[s] = {t.name: task_metrics(t, labels[s][t.name], calibrated(t, raw[s][t.name]),
                                          eval_cfg.calibration_bins) for t in tasks}
    metrics["calibration"] = calibration
    target = "test" if "test" in raw else "val"
    if eval_cfg.modality_contribution and len(modalities) > 1:
        metrics["modality_contribution"] = {"split": target, **modality_contribution(
            model, tasks, loaders[target], labels[target], list(modalities))}
    predictions = {s: prediction_table(tasks, labels[s], raw[s], frames[s], id_column, text_column,
                                       (image_paths or {}).get(s)) for s in raw}
    return metrics, predictions


def calibrated(task, proba: np.ndarray) -> np.ndarray:
    return proba if task.multilabel else apply_temperature(proba, task.temperature)


def prediction_table(tasks, labels, proba, frame: pd.DataFrame, id_column, text_column, image_paths) -> pd.DataFrame:
    """One row per example: ``row`` (1-based), id, image (absolute path), text, and per task
    ``<task>:true`` (class index, or |-joined indices for multi-label) and ``<task>:p:<class>`` (raw)."""
    out = pd.DataFrame({"row": np.arange(1, len(frame) + 1)})
    if id_column and id_column in frame:
        out["id"] = frame[id_column].to_numpy()
    if image_paths is not None:
        out["image"] = image_paths
    if text_column and text_column in frame:
        out["text"] = frame[text_column].to_numpy()
    for t in tasks:
        y = labels[t.name]
        out[f"{t.name}:true"] = ["|".join(str(i) for i, v in enumerate(r) if v) for r in y] if t.multilabel else y
        for j, c in enumerate(t.classes):
            out[f"{t.name}:p:{c}"] = proba[t.name][:, j].astype(np.float64)  # float64: the CSV round-trips exactly
    return out
