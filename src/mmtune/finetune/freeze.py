"""Fine-tuning strategy as a setting: which parameters train."""
from __future__ import annotations


from torch import nn

STRATEGIES = ("full", "frozen", "partial", "gradual", "lora", "ia3", "bitfit")


def apply_strategy(model: nn.Module, ft, epoch: int = 0) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` (a MultimodalClassifier) for the
    ``FinetuneConfig`` ``ft``. Fusion and heads always train.

    ``full``: all. ``frozen``: no encoder parameter. ``partial``: the deepest ``unfreeze_last`` groups
    of each encoder's ``layer_groups()``. ``gradual``: like partial, plus one group more every
    ``unfreeze_every`` epochs (``epoch`` counts from 0). ``bitfit``: encoder biases. ``lora`` / ``ia3``:
    only the adapter weights :func:`mmtune.finetune.lora.add_adapters` inserted.
    Raises ValueError for an unknown strategy or for lora / ia3 without adapters.
    """
    strategy = ft.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown fine-tuning strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    for p in model.parameters():
        p.requires_grad_(True)
    for enc in model.encoders.values():
        if strategy == "full":
            pass
        elif strategy in ("frozen", "partial", "gradual"):
            groups = enc.layer_groups()
            n = unfrozen_groups(ft, epoch, len(groups)) if strategy != "frozen" else 0
            for i, g in enumerate(groups):
                for p in g:
                    p.requires_grad_(i >= len(groups) - n)
        elif strategy == "bitfit":
            for name, p in enc.named_parameters():
                p.requires_grad_(name.endswith("bias"))
        elif strategy in ("lora", "ia3"):
            from .lora import adapter_parameter_names

            names = adapter_parameter_names(enc)
            if not names:
                raise ValueError(f"strategy {strategy!r}: encoder has no adapters; call add_adapters first")
            for name, p in enc.named_parameters():
                p.requires_grad_(name in names)
        for p in never_trained(enc):
            p.requires_grad_(False)
        if getattr(model.fusion, "uses_tokens", False):
            for p in enc.pooled_only_parameters():
                p.requires_grad_(False)


def unfrozen_groups(ft, epoch: int, n_groups: int) -> int:
    """How many of the deepest layer groups train at ``epoch`` (partial: fixed; gradual: growing)."""
    n = ft.unfreeze_last
    if ft.strategy == "gradual":
        n += epoch // ft.unfreeze_every
    return min(n, n_groups)


def never_trained(enc: nn.Module):
    """Parameters that take no part in classification (CLIP's contrastive temperature)."""
    host = getattr(enc, "model", None)
    scale = getattr(host, "logit_scale", None)
    return [scale] if isinstance(scale, nn.Parameter) else []


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
