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


def probabilities(task, logits: torch.Tensor) -> torch.Tensor:
    """Softmax for a single-label task, sigmoid per label for a multi-label one; for a regression target the
    prediction in the target's units, (B, 1)."""
    logits = logits.float()
    if getattr(task, "regression", False):
        return task.destandardize(logits[:, :1])
    return torch.sigmoid(logits) if task.multilabel else torch.softmax(logits, dim=-1)


@torch.inference_mode()
def predict_proba_batches(model, tasks, batches: Iterable[Dict[str, Any]], device="cpu") -> Dict[str, np.ndarray]:
    """Probabilities per task, (N, C) each, over collated batches (raw ``inputs`` or cached ``encoded``), in order."""
    device = torch.device(device)
    was_training = model.training
    if was_training:  # switching modes walks every module: skip it when already in eval mode
        model.eval()
    out: Dict[str, list] = {t.name: [] for t in tasks}
    try:
        for batch in batches:
            inputs, encoded = batch_outputs(batch, device)
            logits = model(inputs, move(batch["present"], device), encoded=encoded)
            for t in tasks:
                out[t.name].append(probabilities(t, logits[t.name]).cpu().numpy())
    finally:
        if was_training:
            model.train()
    return {t.name: (np.concatenate(out[t.name]) if out[t.name] else np.zeros((0, t.outputs), np.float32))
            for t in tasks}


def batch_outputs(batch: Dict[str, Any], device: torch.device):
    """A batch's ``(inputs, encoded)`` on ``device``: raw encoder inputs, or the cached encoder outputs
    (``encoded``, as :class:`~mmtune.encoders.EncoderOutput`) when the batch came from the embedding cache."""
    from .encoders.base import batch_encoded

    return move(batch.get("inputs"), device), batch_encoded(move({"encoded": batch.get("encoded")}, device))


@torch.inference_mode()
def pair_embeddings(model, batches: Iterable[Dict[str, Any]], device="cpu") -> Dict[str, np.ndarray]:
    """A matcher's ``query`` and ``response`` unit vectors (N, d), the pair ``logit`` (N,) and, where the batches
    carry match labels, ``label`` (N,), over collated batches in order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: Dict[str, list] = {"query": [], "response": [], "logit": [], "label": []}
    try:
        for batch in batches:
            inputs, encoded = batch_outputs(batch, device)
            emb = model(inputs, move(batch["present"], device), encoded=encoded)
            out["query"].append(emb["query"].float().cpu().numpy())
            out["response"].append(emb["response"].float().cpu().numpy())
            out["logit"].append(model.pair_logit(emb["query"], emb["response"]).float().cpu().numpy())
            if "match" in batch.get("labels", {}):
                out["label"].append(batch["labels"]["match"].cpu().numpy())
    finally:
        model.train(was_training)
    result = {k: np.concatenate(v) for k, v in out.items() if v}
    return result


@torch.inference_mode()
def side_embeddings(model, side: str, batches: Iterable[Dict[str, Any]], device="cpu") -> np.ndarray:
    """(N, d) unit vectors of one side of a matcher; only that side's encoders run."""
    device = torch.device(device)
    parts = [model.embed(side, move(b["inputs"], device)).float().cpu().numpy() for b in batches]
    return np.concatenate(parts) if parts else np.zeros((0, model.fusion.out_dim), np.float32)
