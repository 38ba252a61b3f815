"""Losses (one table, :data:`LOSSES`, chosen by ``loss.type``: cross_entropy, focal, logit_adjusted,
balanced_softmax) and class weights for imbalanced data.

A loss gives the per-row loss of one task; the training objective (``mmtune.training.objective``) sums
tasks by their weights, applies sample weights and the L1 penalty. Multi-label tasks use binary
cross-entropy per label unless a loss overrides :meth:`Loss.multi_label`."""
from __future__ import annotations

from typing import Dict, List, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import Registry
from ..schema import PartConfig


def class_weights(counts: Sequence[int], scheme: Union[str, Dict[str, float]], beta: float = 0.999,
                  class_names: Optional[Sequence] = None) -> Optional[torch.Tensor]:
    """Per-class loss weights.

    ``inverse``: N / (C * n_c) (scikit-learn's "balanced"). ``effective``: (1 - beta) / (1 - beta^n_c)
    (Cui et al., 2019), scaled so the weights sum to C. A mapping gives each class's weight by name
    (classes not named get 1). ``none``: None. Raises ValueError for an unknown class name."""
    n = np.asarray(counts, dtype=np.float64)
    c = len(n)
    if isinstance(scheme, dict):
        names = [str(x) for x in (class_names or range(c))]
        unknown = set(scheme) - set(names)
        if unknown:
            raise ValueError(f"imbalance.class_weights names unknown class(es) {sorted(unknown)}; classes: {names}")
        return torch.tensor([float(scheme.get(nm, 1.0)) for nm in names], dtype=torch.float32)
    if scheme == "none":
        return None
    if scheme == "inverse":
        w = n.sum() / (c * np.maximum(n, 1))
    elif scheme == "effective":
        w = (1.0 - beta) / (1.0 - np.power(beta, np.maximum(n, 1)))
        w = w * c / w.sum()
    else:
        raise ValueError(f"unknown class-weight scheme {scheme!r}; valid: none, inverse, effective, or {{class: weight}}")
    return torch.tensor(w, dtype=torch.float32)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: Optional[float] = None,
               weight: Optional[torch.Tensor] = None, reduction: str = "none") -> torch.Tensor:
    """Multiclass focal loss (Lin et al., 2017): -alpha_t (1 - p_t)^gamma log p_t, optionally times a
    class weight. With gamma 0 and no alpha it equals cross-entropy. ``alpha`` (binary): class 1 gets
    alpha, class 0 gets 1 - alpha."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    p_t = logp_t.exp()
    loss = -((1 - p_t) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * torch.where(target == 1, torch.full_like(loss, alpha), torch.full_like(loss, 1 - alpha))
    if weight is not None:
        loss = loss * weight.to(loss.device)[target]
    return loss.mean() if reduction == "mean" else loss


class LossConfig(PartConfig):
    """Base of every loss's settings (the ``loss`` section of the config)."""


class Loss:
    """Base of the losses. ``single_label`` returns the (B,) per-row loss of a single-label task, with
    optional per-class weights; ``multi_label`` that of a multi-label task (targets multi-hot)."""

    Config: type = LossConfig

    def __init__(self, cfg):
        self.cfg = cfg

    def check_tasks(self, tasks: List) -> None:
        """Raise ValueError when the loss is not defined for a task found in the data."""

    uses_prior: bool = False
    """True for a loss that reads the training prior: the objective then passes ``log_prior`` — (C,) log of each
    class's share of the training rows — to :meth:`single_label` as a keyword."""

    def single_label(self, logits: torch.Tensor, target: torch.Tensor,
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def multi_label(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean(1)


LOSSES: Registry = Registry("loss")
"""Loss name (``loss.type``) -> Loss class."""


@LOSSES.register("cross_entropy")
class CrossEntropy(Loss):
    """Cross-entropy, with class weights and label smoothing."""

    class Config(LossConfig):
        type: Literal["cross_entropy"] = "cross_entropy"
        label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
        """Single-label tasks: label smoothing of the targets."""

    def single_label(self, logits, target, weight=None):
        return F.cross_entropy(logits.float(), target, weight=weight, reduction="none",
                               label_smoothing=self.cfg.label_smoothing)


@LOSSES.register("focal")
class Focal(Loss):
    """Focal loss (:func:`focal_loss`), with class weights."""

    class Config(LossConfig):
        type: Literal["focal"] = "focal"
        gamma: float = Field(2.0, ge=0.0)
        """Focusing parameter (0 equals cross-entropy)."""
        alpha: Optional[float] = Field(None, gt=0.0, lt=1.0)
        """Binary tasks only: class 1 weighted by alpha and class 0 by 1 - alpha (a task with more classes
        is refused; use ``imbalance.class_weights`` there)."""

    def check_tasks(self, tasks):
        if self.cfg.alpha is not None:
            wide = [t for t in tasks if not t.multilabel and not t.regression and len(t.classes) != 2]
            if wide:
                raise ValueError(f"loss.alpha (focal) is defined for binary tasks; task {wide[0].name!r} has "
                                 f"{len(wide[0].classes)} classes: use imbalance.class_weights to weight classes there")

    def single_label(self, logits, target, weight=None):
        return focal_loss(logits, target, self.cfg.gamma, self.cfg.alpha, weight)


def _needs_prior(log_prior):
    if log_prior is None:
        raise ValueError("this loss needs the training split's class shares (log_prior=); the training objective "
                         "passes them")
    return log_prior


@LOSSES.register("logit_adjusted")
class LogitAdjusted(Loss):
    """Logit-adjusted cross-entropy (Menon et al., 2021): cross-entropy of ``logits + tau * log prior``, the prior
    being each class's share of the training rows. Training against the prior-shifted logits leaves the raw logits
    to model the balanced posterior, so a rare class is not out-voted by its prior. ``tau`` 0 is plain
    cross-entropy."""

    uses_prior = True

    class Config(LossConfig):
        type: Literal["logit_adjusted"] = "logit_adjusted"
        tau: float = Field(1.0, ge=0.0)
        """How strongly the prior shifts the logits in training (1: the balanced posterior; 0: cross-entropy)."""

    def single_label(self, logits, target, weight=None, log_prior=None):
        z = logits.float()
        if self.cfg.tau:
            z = z + self.cfg.tau * _needs_prior(log_prior).to(z.device, z.dtype)
        return F.cross_entropy(z, target, weight=weight, reduction="none")


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(Loss):
    """Balanced softmax (Ren et al., 2020): cross-entropy of softmax over ``logits + log n_j`` (n_j the training
    rows of class j) — the same softmax as logit adjustment with tau 1, since log n_j and log prior differ by a
    constant. Its gradient in logit j is ``n_j e^{z_j} / sum_k n_k e^{z_k} - y_j``."""

    uses_prior = True

    class Config(LossConfig):
        type: Literal["balanced_softmax"] = "balanced_softmax"

    def single_label(self, logits, target, weight=None, log_prior=None):
        z = logits.float() + _needs_prior(log_prior).to(logits.device, torch.float32)
        return F.cross_entropy(z, target, weight=weight, reduction="none")


def build_loss(cfg) -> Loss:
    """The Loss object for a ``loss`` config section."""
    return LOSSES.get(cfg.type)(cfg)
