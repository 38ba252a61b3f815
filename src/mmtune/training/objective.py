"""What the LightningModule is given: the training objective and the epoch metrics."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from ..finetune.param_groups import decayed_parameter_ids


class Objective(nn.Module):
    """The loss of a batch: per task the configured :class:`~mmtune.losses.Loss` (with that task's class
    weights), the sample-weighted mean over rows, the weighted sum over tasks, plus — in training — the L1
    penalty on trainable weight matrices (the weights weight decay applies to)."""

    def __init__(self, loss, tasks, class_weights: Optional[Dict[str, torch.Tensor]] = None, l1: float = 0.0,
                 model: Optional[nn.Module] = None, class_counts: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.loss = loss
        self.tasks = {t.name: t for t in tasks}
        for name, w in (class_weights or {}).items():
            self.register_buffer(f"class_weight_{name}", w, persistent=False)
        self._weighted = set(class_weights or {})
        self.weighting = True
        """Whether the class weights apply now (deferred re-weighting turns them on in the last epochs)."""
        for name, n in (class_counts or {}).items():  # log of each class's share of the training rows (>= 1 row)
            n = torch.as_tensor(n, dtype=torch.float32).clamp_min(1.0)
            self.register_buffer(f"log_prior_{name}", (n / n.sum()).log(), persistent=False)
        self._priors = set(class_counts or {})
        self.l1 = l1
        ids = decayed_parameter_ids(model) if model is not None and l1 > 0 else set()
        self._l1_params: List[nn.Parameter] = [p for p in model.parameters() if id(p) in ids] if ids else []

    def row_losses(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) loss of one task."""
        t = self.tasks[name]
        if t.regression:  # on the standardised target
            z = (target.to(logits.dtype) - (t.mean or 0.0)) / (t.std or 1.0)
            if t.regression_loss == "huber":
                return F.huber_loss(logits[:, 0], z, reduction="none", delta=t.huber_delta)
            return (logits[:, 0] - z) ** 2
        if t.multilabel:
            return self.loss.multi_label(logits, target)
        weight = getattr(self, f"class_weight_{name}") if name in self._weighted and self.weighting else None
        if getattr(self.loss, "uses_prior", False):
            return self.loss.single_label(logits, target, weight,
                                          log_prior=getattr(self, f"log_prior_{name}") if name in self._priors else None)
        return self.loss.single_label(logits, target, weight)

    def forward(self, logits: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor],
                weights: Optional[torch.Tensor] = None, mix: Optional[tuple] = None, penalty: bool = False,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With ``mix`` = (lam, perm) the targets are mixed as the features were; ``penalty`` adds L1. ``rows``
        (the training rows' positions in the split) is for objectives with per-row targets (distillation)."""
        total = 0.0
        for name, t in self.tasks.items():
            rows = self.row_losses(name, logits[name], labels[name])
            if mix is not None:
                lam, perm = mix
                rows = lam * rows + (1 - lam) * self.row_losses(name, logits[name], labels[name][perm])
            part = rows.mean() if weights is None else (rows * weights).sum() / weights.sum().clamp_min(1e-12)
            total = total + t.weight * part
        return total + self.l1_penalty() if penalty else total

    def l1_penalty(self):
        """``regularization.l1`` times the L1 norm of the trainable weight matrices (0 when off)."""
        if self.l1 <= 0:
            return 0.0
        return self.l1 * sum(p.abs().sum() for p in self._l1_params if p.requires_grad)


class EpochMetrics(nn.Module):
    """torchmetrics per task, accumulated over an epoch. :meth:`compute` returns the logged values:
    ``val_acc`` / ``val_<metric>`` as means over tasks, and ``<key>/<task>`` with several tasks."""

    def __init__(self, tasks, names, prefix: str, calibrated: bool = False):
        super().__init__()
        self.tasks = {t.name: t for t in tasks}
        self.prefix = prefix
        self.metrics = nn.ModuleDict({t.name: nn.ModuleDict(
            {"rmse": torchmetrics.MeanSquaredError(squared=False)} if t.regression else
            {**{m: _metric(m, t) for m in names if _metric(m, t) is not None},
             **({"calibrated_loss": CalibratedLoss()} if calibrated and not t.multilabel else {})}) for t in tasks})

    def update(self, logits: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor]) -> None:
        for name, t in self.tasks.items():
            y = labels[name].int() if t.multilabel else labels[name]
            out = t.destandardize(logits[name].detach()[:, 0].float()) if t.regression else logits[name].detach()
            for metric in self.metrics[name].values():
                metric.update(out, y.float() if t.regression else y)

    def compute(self) -> Dict[str, torch.Tensor]:
        values: Dict[str, list] = {}
        out: Dict[str, torch.Tensor] = {}
        for name, metrics in self.metrics.items():
            for mname, metric in metrics.items():
                v = metric.compute()
                metric.reset()
                key = f"{self.prefix}_acc" if mname == "accuracy" else f"{self.prefix}_{mname}"
                values.setdefault(key, []).append(v)
                if len(self.tasks) > 1:
                    out[f"{key}/{name}"] = v
        out.update({key: torch.stack(vs).mean() for key, vs in values.items()})
        return out


class CalibratedLoss(torchmetrics.Metric):
    """Cross-entropy of an epoch's logits at the temperature that minimises it (``val_calibrated_loss``).

    The plain validation loss rises as soon as a model grows over-confident, even while it ranks and classifies the
    rows better — and temperature scaling removes exactly that over-confidence after training. Monitoring the loss
    after the best temperature selects the epoch whose predictions are best once calibrated; on a validation split
    of a few dozen rows it is also far less noisy than accuracy. NLL(beta * logits) is convex in beta = 1/T, so a
    golden-section search over beta finds the minimum. Logits and targets are gathered across processes."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.target.append(target.long())

    def compute(self) -> torch.Tensor:
        if isinstance(self.target, list) and not self.target:
            return torch.tensor(float("nan"))  # no validation rows this epoch
        z = torch.cat(self.logits) if isinstance(self.logits, list) else self.logits
        y = torch.cat(self.target) if isinstance(self.target, list) else self.target
        return best_temperature_loss(z, y)[1]


def best_temperature_loss(logits: torch.Tensor, target: torch.Tensor, low: float = 1e-3, high: float = 20.0,
                          steps: int = 40):
    """(beta, mean cross-entropy of ``beta * logits``) at the beta in [low, high] that minimises it."""
    nll = lambda b: float(F.cross_entropy(logits * b, target))  # noqa: E731
    g = (5 ** 0.5 - 1) / 2
    a, b = low, high
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    beta = (a + b) / 2
    return beta, torch.tensor(min(nll(beta), nll(1.0)) if low <= 1.0 <= high else nll(beta))


def _metric(name: str, task):
    """A torchmetrics metric for ``task`` (None when it has no meaning there, e.g. balanced accuracy of a
    multi-label task)."""
    n = len(task.classes)
    if task.multilabel:
        kw = {"task": "multilabel", "num_labels": n}
        if name == "accuracy":
            return torchmetrics.classification.MultilabelExactMatch(num_labels=n)
        if name == "balanced_accuracy":
            return None
    else:
        kw = {"task": "multiclass", "num_classes": n}
        if name == "accuracy":
            return torchmetrics.Accuracy(**kw)
        if name == "balanced_accuracy":
            return torchmetrics.Accuracy(**kw, average="macro")
    if name == "f1_macro":
        return torchmetrics.F1Score(**kw, average="macro")
    if name == "auroc":
        return torchmetrics.AUROC(**kw, average="macro")
    if name == "precision_macro":
        return torchmetrics.Precision(**kw, average="macro")
    if name == "recall_macro":
        return torchmetrics.Recall(**kw, average="macro")
    raise ValueError(f"unknown epoch metric {name!r}")
