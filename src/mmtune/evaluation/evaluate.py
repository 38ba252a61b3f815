"""After training: calibration, decision thresholds, metrics, saved predictions, modality contribution."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pandas as pd

from ..inference import predict_proba_batches
from .ablation import modality_contribution
from .calibration import (Calibration, adjust_for_prior, apply_temperature, fit_prior_tau, expected_calibration_error, fit_temperature,
                          tune_binary_threshold)
from .metrics import bootstrap_interval, flattering_validation, task_metrics, tune_thresholds

log = logging.getLogger("mmtune")


def _labels(ds, task) -> Any:
    v = ds.labels[task]
    return v.tolist() if hasattr(v, "tolist") else v


def fit_calibration(task, y_val, p_val, eval_cfg, class_counts=None) -> Tuple[Calibration, Dict[str, Any]]:
    """The task's calibration fitted on validation (raw probabilities ``p_val``): per-label thresholds
    (multi-label), else a temperature and, for a binary task with a goal, a decision threshold. Returns it
    and what the report shows of the tuning. A regression target has none."""
    if task.regression:
        return Calibration(), {}
    if task.multilabel:
        return Calibration(thresholds=tune_thresholds(np.asarray(y_val), p_val)), {}
    temperature = fit_temperature(y_val, p_val) if eval_cfg.temperature_scaling else None
    info: Dict[str, Any] = {}
    shown = apply_temperature(p_val, temperature)  # what the task will predict: the threshold is tuned on it
    tau = log_prior = None
    if eval_cfg.logit_adjustment and class_counts is not None:  # τ chosen on validation, after the temperature
        n = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
        prior = np.log(n / n.sum()).tolist()
        info["logit_adjustment"] = fit_prior_tau(y_val, shown, prior)
        if info["logit_adjustment"]["tau"]:
            tau, log_prior = info["logit_adjustment"]["tau"], prior
            shown = adjust_for_prior(shown, log_prior, tau)
    threshold = None
    if len(task.classes) == 2 and eval_cfg.threshold_goal != "none":
        tuned = tune_binary_threshold(y_val, shown[:, 1], eval_cfg.threshold_goal, eval_cfg.threshold_value)
        threshold, info["decision_threshold"] = tuned["threshold"], tuned
    return Calibration(temperature, threshold, None, tau, log_prior), info


def finalize(model, tasks, loaders: Dict[str, Any], frames: Dict[str, pd.DataFrame], eval_cfg, modalities,
             id_column: Optional[str] = None, shown: Optional[Dict[str, Dict[str, list]]] = None, device="cpu",
             group_column: Optional[str] = None, class_counts: Optional[Dict[str, Any]] = None):
    """Fit each task's calibration on validation and compute metrics; nothing is changed in place.

    Returns ``(calibration, metrics, predictions)``: ``calibration[task]`` (a :class:`Calibration`),
    ``metrics["val"|"test"][task]`` (on calibrated probabilities, with the tuned thresholds),
    ``metrics["calibration"][task]`` (temperature, ECE before and after), ``metrics["modality_contribution"]``;
    ``predictions[split]`` is a table of each row's true labels and raw (uncalibrated) probabilities, plus
    the id and each modality's value as ``shown[split][modality]`` gives it, for the report. Everything runs
    on ``device`` (the model's). With ``group_column`` (a column of the test frame) the test metrics' bootstrap
    intervals resample whole groups; ``class_counts`` (per task, the training rows of each class) is the prior of
    the post-hoc logit adjustment (``evaluation.logit_adjustment``)."""
    def proba_of(batches):
        return predict_proba_batches(model, tasks, batches, device)

    raw = {s: proba_of(loaders[s]) for s in ("val", "test") if s in loaders}
    labels = {s: {t.name: _labels(loaders[s].dataset, t.name) for t in tasks} for s in raw}
    calibration: Dict[str, Calibration] = {}
    report: Dict[str, Any] = {}
    for t in tasks:
        cal, info = fit_calibration(t, labels["val"][t.name], raw["val"][t.name], eval_cfg, (class_counts or {}).get(t.name))
        calibration[t.name] = cal
        if t.multilabel or t.regression:
            continue
        entry: Dict[str, Any] = {"temperature": cal.temperature}
        for s in raw:
            entry[f"ece_{s}_before"] = expected_calibration_error(labels[s][t.name], raw[s][t.name], eval_cfg.calibration_bins)
            entry[f"ece_{s}_after"] = expected_calibration_error(
                labels[s][t.name], cal.probabilities(t, raw[s][t.name]), eval_cfg.calibration_bins)
        report[t.name] = {**entry, **info}
    metrics: Dict[str, Any] = {}
    for s in raw:
        metrics[s] = {t.name: task_metrics(t, labels[s][t.name], calibration[t.name].probabilities(t, raw[s][t.name]),
                                          eval_cfg.calibration_bins, calibration[t.name]) for t in tasks}
    if "test" in raw:  # how far the test figures can be trusted, and whether validation flatters
        for t in tasks:
            cal_p = calibration[t.name].probabilities(t, raw["test"][t.name])
            groups = frames["test"][group_column].to_numpy() if group_column and group_column in frames.get("test", {}) \
                else None
            metrics["test"][t.name]["bootstrap"] = bootstrap_interval(t, labels["test"][t.name], cal_p, calibration[t.name],
                                                                      groups=groups)
        warned = flattering_validation(metrics, tasks) if eval_cfg.flatter_warning else []
        for w in warned:
            log.warning(w)
        if warned:
            metrics["warnings"] = warned
    metrics["calibration"] = report
    target = "test" if "test" in raw else "val"
    if eval_cfg.modality_contribution and len(modalities) > 1:
        metrics["modality_contribution"] = {"split": target, **modality_contribution(
            proba_of, tasks, calibration, loaders[target], labels[target], list(modalities))}
    predictions = {s: prediction_table(tasks, labels[s], raw[s], frames[s], id_column, (shown or {}).get(s))
                   for s in raw}
    return calibration, metrics, predictions


def prediction_table(tasks, labels, proba, frame: pd.DataFrame, id_column, shown: Optional[Dict[str, list]] = None) -> pd.DataFrame:
    """One row per example: ``row`` (1-based), id, each modality's value as shown (an image's absolute
    path, a text), and per task ``<task>:true`` (class index, or |-joined indices for multi-label) and
    ``<task>:p:<class>`` (raw)."""
    out = pd.DataFrame({"row": np.arange(1, len(frame) + 1)})
    if id_column and id_column in frame:
        out["id"] = frame[id_column].to_numpy()
    for modality, values in sorted((shown or {}).items()):
        out[modality] = values
    for t in tasks:
        y = labels[t.name]
        if t.regression:
            out[f"{t.name}:true"] = np.asarray(y, dtype=np.float64)
            out[f"{t.name}:pred"] = proba[t.name][:, 0].astype(np.float64)
            continue
        out[f"{t.name}:true"] = ["|".join(str(i) for i, v in enumerate(r) if v) for r in y] if t.multilabel else y
        for j, c in enumerate(t.classes):
            out[f"{t.name}:p:{c}"] = proba[t.name][:, j].astype(np.float64)  # float64: the CSV round-trips exactly
    return out
