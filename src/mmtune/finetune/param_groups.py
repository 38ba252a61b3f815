"""Optimizer parameter groups: learning rate per part and per depth, no weight decay on biases and norms."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn


def _decayed_types():
    types = [nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d]
    try:  # GPT-2 style "Conv1D" (a linear layer with transposed weight)
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return tuple(types)


def decayed_parameter_ids(model: nn.Module) -> set:
    """ids of the parameters weight decay (and the L1 penalty) apply to: the ``weight`` of linear and
    convolution layers, and nothing else — never biases, norm weights, embeddings, class / mask tokens,
    position embeddings, modality embeddings or learned placeholders (parameters set directly on a module)."""
    types = _decayed_types()
    out = set()
    for module in model.modules():
        if isinstance(module, types):
            w = getattr(module, "weight", None)
            if isinstance(w, nn.Parameter):
                out.add(id(w))
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float, encoder_lr: Optional[float] = None,
                 fusion_lr: Optional[float] = None, head_lr: Optional[float] = None,
                 layer_decay: Optional[float] = None, include_frozen_encoders: bool = False) -> List[Dict[str, Any]]:
    """Groups for ``torch.optim``.

    Encoder parameters get ``encoder_lr`` (default ``lr``), times ``layer_decay ** d`` with ``layer_decay``
    set, where d counts layer groups up from the deepest (d = 0). Fusion parameters get ``fusion_lr``,
    heads ``head_lr`` (both default ``lr``). Weight decay applies only to the weights of linear and
    convolution layers (:func:`decayed_parameter_ids`). Only trainable parameters are included, unless
    ``include_frozen_encoders`` (gradual unfreezing: the optimizer must know parameters that start frozen).
    Each group has a ``name`` such as ``encoders.text/3/decay``."""
    decayed = decayed_parameter_ids(model)
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
        decay = id(p) in decayed
        buckets.setdefault((tag, rate, decay), []).append(p)
    return [
        {"params": params, "lr": rate, "weight_decay": weight_decay if decay else 0.0,
         "name": f"{tag}/{'decay' if decay else 'no_decay'}"}
        for (tag, rate, decay), params in buckets.items()
    ]
