"""What the LightningModule is given to train a matcher: its objective (symmetric InfoNCE over the batch, plus
the pairwise loss with match labels) and its epoch metric (in-batch recall@1). The module itself is the
classifier's (:class:`~mmtune.training.module.ClassifierModule`): it only runs the steps."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torchmetrics
from torch import nn

from ..losses.contrastive import info_nce, pair_bce


class MatchObjective(nn.Module):
    """InfoNCE of the batch's pairs (rows labelled 0 anchor nothing), sample-weighted; with match labels plus
    ``pair_weight`` × the pairwise binary cross-entropy of every row's pair logit."""

    def __init__(self, model, labelled: bool, pair_weight: float = 1.0):
        super().__init__()
        object.__setattr__(self, "_model", model)  # a reference, not a submodule: the module owns the model
        self.labelled, self.pair_weight = labelled, pair_weight
        self.weighting = True

    def forward(self, outputs: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor],
                weights: Optional[torch.Tensor] = None, mix=None, penalty: bool = False, rows=None) -> torch.Tensor:
        q, r = outputs["query"], outputs["response"]
        head = self._model.heads["match"]
        label = labels.get("match") if self.labelled else None
        positive = None if label is None else label.to(torch.bool)
        per_row = info_nce(q, r, head.scale, positive)
        w = torch.ones_like(per_row) if weights is None else weights.to(per_row.dtype)
        anchors = w if positive is None else w * positive.to(w.dtype)
        loss = (per_row * w).sum() / anchors.sum().clamp_min(1e-12)
        if label is not None and self.pair_weight > 0:
            loss = loss + self.pair_weight * (pair_bce(self._model.pair_logit(q, r), label) * w).sum() / w.sum()
        return loss


class InBatchRecall(nn.Module):
    """``<prefix>_r1``: the share of the epoch's (positive) rows whose partner is the best-scored response
    of their batch — a torchmetrics mean, so a distributed run gathers it over processes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.hits = torchmetrics.MeanMetric()

    def update(self, outputs: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor]) -> None:
        q, r = outputs["query"].detach(), outputs["response"].detach()
        hit = ((q @ r.T).argmax(1) == torch.arange(len(q), device=q.device)).float()
        if "match" in labels:
            hit = hit[labels["match"].to(torch.bool)]
        if len(hit):
            self.hits.update(hit)

    def compute(self) -> Dict[str, torch.Tensor]:
        value = self.hits.compute() if self.hits.update_count else torch.tensor(0.0)
        self.hits.reset()
        return {f"{self.prefix}_r1": value}


__all__ = ["InBatchRecall", "MatchObjective"]
