"""The reference the attributions start from: mean encoder outputs over a sample of the training rows (computed
once by ``fit`` and stored in the bundle)."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict

import torch


@torch.no_grad()
def reference_outputs(model, batches, rows: int = 256) -> Dict[str, torch.Tensor]:
    """The average encoder outputs over (up to ``rows`` of) the training rows — Integrated Gradients' baseline:
    ``<key>::pooled`` (D,) and ``<key>::tokens`` (D,), the mean over rows and real tokens. A modality whose
    variation carries nothing then gets no attribution, however far its typical vector is from zero."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # in training mode, batch-norm layers would update their statistics: the model must not change
    try:
        return _reference(model, batches, rows, device)
    finally:
        model.train(was_training)


def _reference(model, batches, rows: int, device) -> Dict[str, torch.Tensor]:
    from ..encoders.base import batch_encoded
    from ..inference import move

    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, float] = defaultdict(float)
    seen = 0
    for batch in batches:
        outputs = batch_encoded(move(batch, device))
        outputs = model.encode(move(batch["inputs"], device)) if outputs is None else outputs
        present = batch["present"]
        for k, o in outputs.items():
            keep = present.get(model.output_modality[k], torch.ones(len(o.pooled), dtype=torch.bool)).to(device)
            if not bool(keep.any()):
                continue
            sums[f"{k}::pooled"] = sums.get(f"{k}::pooled", 0) + o.pooled[keep].float().sum(0)
            counts[f"{k}::pooled"] += float(keep.sum())
            if o.tokens is not None:
                m = (o.mask if o.mask is not None else torch.ones(o.tokens.shape[:2], dtype=torch.bool, device=device))[keep]
                t = o.tokens[keep].float()
                sums[f"{k}::tokens"] = sums.get(f"{k}::tokens", 0) + (t * m[..., None]).sum((0, 1))
                counts[f"{k}::tokens"] += float(m.sum())
        seen += len(next(iter(present.values())))
        if seen >= rows:
            break
    return {k: (v / max(counts[k], 1.0)).cpu() for k, v in sums.items()}
