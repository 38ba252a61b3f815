"""``mmtune distill``: a smaller student trained on a teacher bundle's soft targets plus the labels.

The student is any config (smaller encoders, smaller images, fewer layers …) fitted by :func:`~mmtune.fit` on the
same rows; its training loss per single-label task is

    (1 - alpha) * cross-entropy(labels)  +  alpha * T^2 * KL(teacher_T || student_T)

where ``x_T`` is the softmax at temperature ``T`` (the teacher's uncalibrated probabilities, sharpened or
softened as ``softmax(log p / T)``). Unlabelled rows (``--unlabelled``) join the training split with the
teacher's soft targets alone. Validation and test rows are the student's usual splits, scored on their labels.
The result is a normal run bundle; ``metrics.json`` holds the teacher beside the student (accuracy, parameters,
size, single-row latency).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("mmtune")
UNLABELLED = "_mmtune_unlabelled"
"""Column marking the rows added without a label (their placeholder label is the teacher's prediction)."""


class DistillObjective(nn.Module):
    """The student's objective in training: the labels' loss (labelled rows only) mixed with the soft-target
    loss; in validation (no ``rows``) the plain objective."""

    def __init__(self, base, soft: Dict[str, torch.Tensor], labelled: torch.Tensor, temperature: float, alpha: float):
        super().__init__()
        self.base, self.temperature, self.alpha = base, temperature, alpha
        self.soft_tasks = list(soft)
        for name, s in soft.items():
            self.register_buffer(f"soft_{name}", s, persistent=False)
        self.register_buffer("labelled", labelled.float(), persistent=False)

    def forward(self, logits, labels, weights=None, mix=None, penalty=False, rows=None):
        if rows is None or mix is not None:
            return self.base(logits, labels, weights, mix, penalty)
        T, a = self.temperature, self.alpha
        known = self.labelled[rows]
        w = known if weights is None else known * weights
        total = 0.0
        for name, t in self.base.tasks.items():
            hard = self.base.row_losses(name, logits[name], labels[name])
            part = (hard * w).sum() / w.sum().clamp_min(1e-12)
            if name in self.soft_tasks:
                target = getattr(self, f"soft_{name}")[rows]
                kl = F.kl_div(F.log_softmax(logits[name].float() / T, dim=1), target, reduction="none").sum(1)
                sw = torch.ones_like(kl) if weights is None else weights
                part = (1 - a) * part + a * T * T * (kl * sw).sum() / sw.sum().clamp_min(1e-12)
            total = total + t.weight * part
        return total + self.base.l1_penalty() if penalty else total


class Distillation(L.Callback):
    """Before training: the teacher's probabilities for every training row, in the student's class order, put
    into the module's objective."""

    def __init__(self, teacher, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def on_fit_start(self, trainer, module):
        if module.mixup is not None:
            raise ValueError("distillation and augment.mixup_alpha cannot be combined: mixup mixes the rows whose "
                             "soft targets the loss looks up; set augment.mixup_alpha=0")
        data = trainer.datamodule
        if len(data.datasets["train"]) != len(data.prepared.frames["train"]):
            raise ValueError("distillation needs one training example per row: turn off synthesis.method")
        frame = data.prepared.frames["train"]
        soft = soft_targets(self.teacher, frame, data.tasks, self.temperature)
        labelled = torch.as_tensor(~frame[UNLABELLED].eq(True).to_numpy()) if UNLABELLED in frame \
            else torch.ones(len(frame), dtype=torch.bool)
        objective = DistillObjective(module.objective, soft, labelled, self.temperature, self.alpha)
        module.objective = objective.to(module.device)


def soft_targets(teacher, frame, tasks, temperature: float) -> Dict[str, torch.Tensor]:
    """``{task: (N, C)}``: the teacher's probabilities for ``frame`` at ``temperature``, columns in the
    student's class order (ValueError naming a student class or task the teacher does not have)."""
    probs = teacher.predict_proba(frame, calibrated=False)
    if not isinstance(probs, dict):
        probs = {teacher.tasks[0].name: probs}
    out = {}
    for t in tasks:
        if t.regression or t.multilabel:
            continue
        if t.name not in probs:
            raise ValueError(f"the teacher has no task {t.name!r} (its tasks: {', '.join(probs)})")
        p = probs[t.name]
        missing = [str(c) for c in t.classes if str(c) not in p.columns]
        if missing:
            raise ValueError(f"task {t.name!r}: the teacher never predicts class(es) {missing[:5]}; it knows "
                             f"{[c for c in p.columns if c != teacher.spec.id_column][:10]}")
        x = np.stack([p[str(c)].to_numpy(dtype=np.float64) for c in t.classes], axis=1)
        logp = np.log(np.clip(x, 1e-12, 1.0)) / temperature
        out[t.name] = torch.softmax(torch.as_tensor(logp), dim=1).float()
    if not out:
        raise ValueError("distillation needs a single-label task: the student has none")
    return out


def distill(teacher: str, student, train=None, val=None, test=None, *, unlabelled=None, temperature: float = 2.0,
            alpha: float = 0.5, overrides: Sequence[str] = (), overwrite: bool = False):
    """Fit ``student`` (a config) on the teacher bundle's soft targets and the labels; returns the student's
    :class:`~mmtune.recipe.fit.FitResult`, with ``metrics["distillation"]`` comparing the two."""
    import pandas as pd

    from .config import load_config
    from .data.datamodule import prepare_data
    from .data.manifest import absolute_paths, read_table
    from .serving.predictor import Predictor
    from .recipe.fit import fit

    if not temperature > 0:
        raise ValueError(f"--temperature must be positive (got {temperature})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1 (got {alpha})")
    cfg = load_config(student, overrides)
    from .serving.matching import classifier_only

    tpred = classifier_only(Predictor.load(teacher), "mmtune distill")
    # the student's splits, as fit would make them; paths made absolute so that the teacher reads the same files
    prepared = prepare_data(cfg.data, cfg.modalities, train, val, test)
    frames = {}
    for s, df in prepared.frames.items():
        frames[s] = df.copy()
        for c in (cfg, tpred.config):
            absolute_paths(frames[s], c, prepared.base_dirs[s])
    extra_rows = 0
    if unlabelled is not None:
        more, base = read_table(unlabelled)
        for c in (cfg, tpred.config):
            absolute_paths(more, c, base)
        guessed = tpred.predict(more, task=None)
        guessed = guessed if isinstance(guessed, dict) else {tpred.tasks[0].name: guessed}
        for t in prepared.tasks:
            if t.column not in more or more[t.column].isna().all():
                if t.name not in guessed:
                    raise ValueError(f"--unlabelled: task {t.name!r} has no label there and the teacher does not "
                                     "predict it")
                more[t.column] = list(guessed[t.name])  # a placeholder: these rows only learn from soft targets
        more[UNLABELLED] = True
        frames["train"] = pd.concat([frames["train"].assign(**{UNLABELLED: False}), more], ignore_index=True)
        extra_rows = len(more)
    hook = Distillation(tpred, temperature, alpha)

    def comparison() -> Dict[str, Any]:
        return {"teacher": str(teacher), "temperature": temperature, "alpha": alpha, "unlabelled_rows": extra_rows}

    res = fit(cfg, frames["train"], frames["val"], frames.get("test"), overwrite=overwrite, callbacks=[hook],
              extra=comparison)
    if not res.main:
        return res
    split = "test" if "test" in frames else "val"
    rows = _side_by_side(tpred, res, frames[split], split)
    res.metrics["distillation"] = {**comparison(), "split": split, "comparison": rows}
    _add_to_bundle(res.run_dir, res.metrics)
    return res


def _side_by_side(teacher, res, frame, split: str) -> List[Dict[str, Any]]:
    """Teacher and student on the same rows: main metric, parameters, model file size, single-row p50 latency."""
    from .serving.predictor import Predictor

    student = Predictor.load(res.run_dir, ensemble=False)
    out = []
    for who, pred, run in (("teacher", teacher, Path(teacher.run_dir)), ("student", student, Path(res.run_dir))):
        m = pred.evaluate(frame)
        task = pred.tasks[0].name
        entry = {"model": who, "split": split, "task": task,
                 "accuracy": m.get(task, {}).get("accuracy") if isinstance(m.get(task), dict) else None,
                 "parameters": int(sum(p.numel() for p in pred.model.parameters())),
                 "model_mb": round((run / "model.safetensors").stat().st_size / 2 ** 20, 2)
                 if (run / "model.safetensors").is_file() else None,
                 "p50_ms_one_row": _latency(pred, frame.head(1))}
        out.append(entry)
    return out


def _latency(pred, row, repeats: int = 15) -> float:
    pred.predict_proba(row)  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred.predict_proba(row)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000, 2)


def _add_to_bundle(run_dir: Path, metrics: Dict[str, Any]) -> None:
    """The comparison into the bundle's metrics.json (and the report rebuilt), after the student was written."""
    import json

    from .io import atomic_write_json

    path = Path(run_dir) / "metrics.json"
    stored = json.loads(path.read_text())
    stored["distillation"] = metrics["distillation"]
    atomic_write_json(path, stored)
    if (Path(run_dir) / "report.html").is_file():
        from .evaluation.report import build_report

        build_report(run_dir)
