"""Losses and class weights for imbalanced data."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F


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
