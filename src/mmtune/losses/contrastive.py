"""Losses of a matcher over a batch of aligned pairs (row i's query belongs with row i's response).

:func:`info_nce` is the symmetric contrastive loss of CLIP (Radford et al. 2021): each query's partner is to
be picked among the batch's responses (the other rows are its negatives) and each response's among the
queries. :func:`pair_bce` scores each row's own pair against its match label."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, response: torch.Tensor, scale: torch.Tensor,
             positive: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) symmetric InfoNCE of unit vectors ``query`` and ``response`` (B, d) at inverse temperature ``scale``.

    ``positive`` (B,) bool: rows whose pair belongs together (a row labelled 0 anchors no term, but its
    response and query stay negatives for the others); its loss is 0. ``extra`` (B, k, d): k more responses per
    query — its hard negatives — added to that query's candidates only."""
    b = query.shape[0]
    logits = scale * query @ response.T
    target = torch.arange(b, device=query.device)
    q2r = logits if extra is None else torch.cat([logits, scale * torch.einsum("bd,bkd->bk", query, extra)], dim=1)
    if positive is not None:  # a negative pair is no partner: its query's column in the logits of others stays
        keep = positive.to(torch.bool)
    else:
        keep = torch.ones(b, dtype=torch.bool, device=query.device)
    loss = 0.5 * (F.cross_entropy(q2r, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))
    return torch.where(keep, loss, torch.zeros_like(loss))


def pair_bce(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B,) binary cross-entropy of each row's pair logit against its 1/0 match label."""
    return F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype), reduction="none")


__all__ = ["info_nce", "pair_bce"]
