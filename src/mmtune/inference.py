"""Batched inference shared by training-time evaluation and the Predictor."""
from __future__ import annotations

from typing import Any, Dict, Iterable

import numpy as np
import torch


def move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    return batch


@torch.inference_mode()
def predict_proba_batches(model, task: str, batches: Iterable[Dict[str, Any]], device="cpu") -> np.ndarray:
    """Softmax probabilities (N, C) for ``task`` over collated batches, in order."""
    device = torch.device(device)
    was_training = model.training
    if was_training:  # switching modes walks every module: skip it when already in eval mode
        model.eval()
    out = []
    try:
        for batch in batches:
            logits = model(move(batch["inputs"], device), move(batch["present"], device))[task]
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    finally:
        if was_training:
            model.train()
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out, axis=0)
