"""Re-sampling training rows to balance classes."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def balanced_sampler(labels: Sequence[int], sample_weights: Optional[Sequence[float]] = None, seed: int = 0,
                     num_samples: Optional[int] = None) -> WeightedRandomSampler:
    """A sampler drawing rows with replacement with probability proportional to 1 / (count of the row's
    class) — each class equally likely per draw — times the row's own weight when given."""
    y = np.asarray(labels, dtype=int)
    counts = np.bincount(y)
    w = 1.0 / counts[y]
    if sample_weights is not None:
        w = w * np.asarray(sample_weights, dtype=np.float64)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples or len(y), replacement=True,
                                 generator=gen)
