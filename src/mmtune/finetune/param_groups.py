"""Optimizer parameter groups: learning rate per part and per depth, no weight decay on biases and norms."""
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


def param_groups(model: nn.Module, lr: float, weight_decay: float, encoder_lr: Optional[float] = None,
                 fusion_lr: Optional[float] = None, head_lr: Optional[float] = None,
                 layer_decay: Optional[float] = None, include_frozen_encoders: bool = False) -> List[Dict[str, Any]]:
    """Groups for ``torch.optim``.

    Encoder parameters get ``encoder_lr`` (default ``lr``), times ``layer_decay ** d`` with ``layer_decay``
    set, where d counts layer groups up from the deepest (d = 0). Fusion parameters get ``fusion_lr``,
    heads ``head_lr`` (both default ``lr``). Weight decay applies to weight matrices only — never to
    biases, norm weights or embeddings. Only trainable parameters are included, unless
    ``include_frozen_encoders`` (gradual unfreezing: the optimizer must know parameters that start frozen).
    Each group has a ``name`` such as ``encoders.text/3/decay``."""
    no_decay = _no_decay_ids(model)
    rate_and_name: Dict[int, tuple] = {}
    for ename, enc in model.encoders.items():
        groups = enc.layer_groups()
        n = len(groups)
        for i, g in enumerate(groups):
            mult = layer_decay ** (n - 1 - i) if layer_decay else 1.0
            tag = f"encoders.{ename}/{i}" if layer_decay else "encoders"
            for p in g:
                rate_and_name[id(p)] = ((encoder_lr or lr) * mult, tag)
        for p in enc.parameters():  # anything outside the groups (none for the built-in encoders)
            rate_and_name.setdefault(id(p), (encoder_lr or lr, "encoders"))
    for p in model.fusion.parameters():
        rate_and_name[id(p)] = (fusion_lr or lr, "fusion")
    for p in model.heads.parameters():
        rate_and_name[id(p)] = (head_lr or lr, "heads")
    enc_ids = {id(p) for p in model.encoders.parameters()}
    buckets: Dict[tuple, List[nn.Parameter]] = {}
    for p in model.parameters():
        if not (p.requires_grad or (include_frozen_encoders and id(p) in enc_ids)):
            continue
        rate, tag = rate_and_name[id(p)]
        decay = id(p) not in no_decay
        buckets.setdefault((tag, rate, decay), []).append(p)
    return [
        {"params": params, "lr": rate, "weight_decay": weight_decay if decay else 0.0,
         "name": f"{tag}/{'decay' if decay else 'no_decay'}"}
        for (tag, rate, decay), params in buckets.items()
    ]
