"""Fine-tuning strategy as a setting: which encoder parameters train."""
from __future__ import annotations

from torch import nn


def apply_strategy(model: nn.Module, strategy: str, unfreeze_last: int = 1) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` (a MultimodalClassifier).

    ``full``: all train. ``frozen``: encoders fixed; fusion and heads train. ``partial``: the
    deepest ``unfreeze_last`` groups of each encoder's ``layer_groups()`` train as well.
    Raises ValueError for an unknown strategy.
    """
    if strategy not in ("full", "frozen", "partial"):
        raise ValueError(f"unknown fine-tuning strategy {strategy!r}; valid: full, frozen, partial")
    for p in model.parameters():
        p.requires_grad_(True)
    if strategy == "full":
        _keep_frozen(model)
        return
    for enc in model.encoders.values():
        groups = enc.layer_groups()
        for g in groups:
            for p in g:
                p.requires_grad_(False)
        if strategy == "partial" and unfreeze_last > 0:
            for g in groups[-unfreeze_last:]:
                for p in g:
                    p.requires_grad_(True)
    _keep_frozen(model)


def _keep_frozen(model: nn.Module) -> None:
    """Parameters an encoder marks as never trained (for example CLIP's logit scale) stay frozen."""
    for enc in model.encoders.values():
        for p in getattr(enc, "never_trained", lambda: [])():
            p.requires_grad_(False)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
