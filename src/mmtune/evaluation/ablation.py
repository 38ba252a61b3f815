"""Does fusion help? Metrics with modalities masked out through the present-mask (no retraining)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping


def masking_settings(modalities: List[str]) -> Dict[str, List[str]]:
    """Setting name -> modalities hidden. "without m" for each modality; "only m" too when there are
    more than two modalities (with two, "only image" is "without text")."""
    out: Dict[str, List[str]] = {"all": []}
    for m in modalities:
        out[f"without {m}"] = [m]
    if len(modalities) > 2:
        for m in modalities:
            out[f"only {m}"] = [o for o in modalities if o != m]
    return out


def masked_batches(batches: Iterable[Dict[str, Any]], hidden: List[str]):
    """The batches with the ``hidden`` modalities marked absent in their present-masks."""
    for b in batches:
        present = {k: (v & False if k in hidden else v) for k, v in b["present"].items()}
        yield {**b, "present": present}


def modality_contribution(proba_of, tasks, calibration: Mapping[str, Any], loader, labels: Mapping[str, Any],
                          modalities: List[str]) -> Dict[str, Any]:
    """For each masking setting, per task: accuracy and macro F1 (single-label) or micro / macro F1
    (multi-label), with the tasks' calibration (``{task: Calibration}``) applied. Also the drop from "all".
    ``proba_of(batches) -> {task: probabilities}`` runs the model (a Predictor's runner, or the trained model
    on its training device)."""
    from .metrics import task_metrics

    out: Dict[str, Any] = {}
    for name, hidden in masking_settings(modalities).items():
        proba = proba_of(masked_batches(loader, hidden))
        row = {}
        for t in tasks:
            cal = calibration[t.name]
            y = labels[t.name]
            m = task_metrics(t, y.tolist() if hasattr(y, "tolist") else y, cal.probabilities(t, proba[t.name]),
                             calibration=cal)
            keys = ("rmse", "r2") if t.regression else ("f1_micro", "f1_macro") if t.multilabel else ("accuracy", "f1_macro")
            row[t.name] = {k: m[k] for k in keys}
        out[name] = {"hidden": hidden, "metrics": row}
    base = out["all"]["metrics"]
    for name, entry in out.items():
        entry["change_vs_all"] = {t: {k: v - base[t][k] for k, v in m.items()} for t, m in entry["metrics"].items()}
    return out
