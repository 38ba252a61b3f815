"""Optimizer parameter groups: learning rate per part, no weight decay on biases and norms."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _no_decay_ids(model: nn.Module) -> set:
    norm_types = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, nn.Embedding)
    out = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("bias") or isinstance(module, norm_types) or p.ndim <= 1:
                out.add(id(p))
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float, encoder_lr: Optional[float] = None) -> List[Dict[str, Any]]:
    """Groups for ``torch.optim``: encoder parameters at ``encoder_lr`` (default ``lr``), fusion and
    heads at ``lr``; weight decay only on weight matrices (never biases, norm weights or embeddings).
    Only trainable parameters are included; empty groups are dropped."""
    no_decay = _no_decay_ids(model)
    enc_ids = {id(p) for p in model.encoders.parameters()}
    buckets: Dict[tuple, List[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part = "encoders" if id(p) in enc_ids else "fusion_heads"
        decay = id(p) not in no_decay
        buckets.setdefault((part, decay), []).append(p)
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "lr": (encoder_lr or lr) if part == "encoders" else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
        })
    return groups
