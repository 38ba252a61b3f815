"""Baselines: each modality alone, trained with the same settings, against the fused model."""
from __future__ import annotations

from typing import Any, Dict


def fit_baselines(cfg, fused_metrics: Dict[str, Any], train, val, test) -> Dict[str, Any]:
    """Train each modality alone with the same settings (encoders reading only it) and report the
    fused model's gain over the best of them, on the test split (validation when there is none)."""
    from .fit import train_run

    split = "test" if "test" in fused_metrics else "val"
    task = cfg.tasks[0].name
    keys, headline = (("r2", "rmse"), "r2") if cfg.tasks[0].regression else (("accuracy", "f1_macro"), "accuracy")
    models = {"fused": {k: fused_metrics[split][task].get(k) for k in keys}}
    for modality in cfg.modalities:
        if not any(e.modality == modality for e in cfg.model.encoders.values()):
            continue  # a joint encoder (CLIP) has no single-modality counterpart here
        sub = cfg.only_modality(modality, f"{cfg.name}-{modality}-only")
        sub.evaluation.baselines = False
        sub.evaluation.report = False
        sub.evaluation.modality_contribution = False
        res = train_run(sub, train, val, test, overwrite=True)
        models[f"{modality} only"] = {k: res.metrics[split][task].get(k) for k in keys}
    best_single = max(v[headline] for k, v in models.items() if k != "fused")
    return {"split": split, "task": task, "models": models, "metric": headline,
            "fusion_gain": models["fused"][headline] - best_single}
