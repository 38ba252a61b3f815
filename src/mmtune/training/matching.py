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
    ``pair_weight`` × the pairwise binary cross-entropy of every row's pair logit. With ``hard_negatives`` = k,
    each training query also meets the k most similar responses of other rows remembered from earlier steps
    (:meth:`mine`)."""

    def __init__(self, model, labelled: bool, pair_weight: float = 1.0, hard_negatives: int = 0,
                 duplicate_cosine: float = 0.999):
        super().__init__()
        object.__setattr__(self, "_model", model)  # a reference, not a submodule: the module owns the model
        self.labelled, self.pair_weight = labelled, pair_weight
        self.weighting = True
        self.hard_negatives, self.duplicate_cosine = hard_negatives, duplicate_cosine
        self.bank: Optional[torch.Tensor] = None
        """Hard negatives: the last response embedding seen of each training row (detached; rows not yet seen this
        epoch hold the previous epoch's), and which rows have one. Not a buffer: checkpoints do not hold it."""
        self.seen: Optional[torch.Tensor] = None

    def mine(self, q: torch.Tensor, r: torch.Tensor, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, k, d) the k remembered responses of other rows nearest each query — leaving out the row's own and
        any that are (nearly) the same response (cosine to its own above ``duplicate_cosine``: a duplicate of the
        partner is no negative) — then remember this batch's responses. None until the memory has k candidates."""
        rows = rows.to(torch.long).to(q.device)
        need = int(rows.max()) + 1
        if self.bank is None or self.bank.shape[0] < need or self.bank.device != q.device:
            bank = torch.zeros(max(need, 2 * (0 if self.bank is None else self.bank.shape[0])), r.shape[1],
                               device=q.device, dtype=r.dtype)
            seen = torch.zeros(bank.shape[0], dtype=torch.bool, device=q.device)
            if self.bank is not None:
                n = self.bank.shape[0]
                bank[:n], seen[:n] = self.bank.to(q.device, r.dtype), self.seen.to(q.device)
            self.bank, self.seen = bank, seen
        out = None
        k = self.hard_negatives
        if int(self.seen.sum()) > k:
            with torch.no_grad():
                cand = self.bank.to(q.dtype)
                sims = q.detach() @ cand.T
                dup = (r.detach() @ cand.T) > self.duplicate_cosine
                own = torch.zeros_like(dup)
                own[torch.arange(len(rows), device=q.device), rows] = True
                sims = sims.masked_fill(~self.seen[None, :] | dup | own, float("-inf"))
                top = sims.topk(k, dim=1)
            if bool(torch.isfinite(top.values).all()):
                out = cand[top.indices]
        self.bank[rows] = r.detach().to(self.bank.dtype)
        self.seen[rows] = True
        return out

    def forward(self, outputs: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor],
                weights: Optional[torch.Tensor] = None, mix=None, penalty: bool = False, rows=None) -> torch.Tensor:
        q, r = outputs["query"], outputs["response"]
        head = self._model.heads["match"]
        label = labels.get("match") if self.labelled else None
        positive = None if label is None else label.to(torch.bool)
        extra = self.mine(q, r, rows) if self.hard_negatives and rows is not None and self.training else None
        per_row = info_nce(q, r, head.scale, positive, extra)
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
