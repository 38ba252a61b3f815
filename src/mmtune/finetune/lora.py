"""LoRA and IA3 adapters in each encoder, through peft; merged into plain weights for export."""
from __future__ import annotations

from typing import Dict, List, Set

from torch import nn

# Attention projections by architecture family, most specific first.
_ATTENTION_TARGETS = [("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("qkv",), ("c_attn",), ("Wqkv",)]
_IA3_FEEDFORWARD = ["intermediate.dense", "fc1", "lin1", "mlp.fc1", "c_fc"]


def default_targets(module: nn.Module, kind: str = "lora") -> Dict[str, List[str]]:
    """Module names to adapt in ``module``: the query/value projections of a transformer, or the
    pointwise (1x1) convolutions of a CNN. Returns ``{"target_modules": [...], "feedforward_modules": [...]}``
    (the latter for IA3). Raises ValueError when nothing adaptable is found."""
    leaf = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))}
    for names in _ATTENTION_TARGETS:
        if all(n in leaf for n in names):
            targets = list(names)
            ff: List[str] = []
            if kind == "ia3":
                full = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
                ff = [f for f in _IA3_FEEDFORWARD if any(n.endswith(f) for n in full)][:1]
                targets += ff
            return {"target_modules": targets, "feedforward_modules": ff}
    convs = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1})
    if convs:
        return {"target_modules": convs, "feedforward_modules": []}
    if leaf:
        return {"target_modules": sorted(leaf), "feedforward_modules": []}
    raise ValueError(f"no linear or 1x1 convolution layers to adapt in {type(module).__name__}; "
                     "name them with finetune.target_modules")


def _host_attr(enc: nn.Module) -> str:
    for attr in ("model", "net"):
        if isinstance(getattr(enc, attr, None), nn.Module):
            return attr
    raise ValueError(f"{type(enc).__name__} exposes no inner model to adapt")


def add_adapters(model: nn.Module, ft) -> Dict[str, int]:
    """Wrap each encoder's inner network with peft (LoRA or IA3, per ``ft.type``).
    Returns each encoder's trainable-parameter count as peft reports it."""
    from ..extras import require

    peft = require("peft", "lora", f"finetune.type={ft.type}")

    counts = {}
    for name, enc in model.encoders.items():
        if getattr(enc, "from_scratch", False):  # trained whole (tabular): nothing pretrained to adapt
            continue
        attr = _host_attr(enc)
        host = getattr(enc, attr)
        chosen = default_targets(host, ft.type)
        if ft.target_modules and name in ft.target_modules:
            chosen = {"target_modules": list(ft.target_modules[name]),
                      "feedforward_modules": [m for m in chosen["feedforward_modules"] if m in ft.target_modules[name]]}
        if ft.type == "lora":
            cfg = peft.LoraConfig(r=ft.r, lora_alpha=ft.alpha, lora_dropout=ft.dropout,
                                  target_modules=chosen["target_modules"], bias="none")
        else:
            cfg = peft.IA3Config(target_modules=chosen["target_modules"],
                                 feedforward_modules=chosen["feedforward_modules"])
        wrapped = peft.get_peft_model(host, cfg)
        setattr(enc, attr, wrapped)
        counts[name] = int(wrapped.get_nb_trainable_parameters()[0])
    return counts


def adapter_parameter_names(enc: nn.Module) -> Set[str]:
    """Names (relative to ``enc``) of the adapter parameters peft inserted."""
    return {n for n, _ in enc.named_parameters() if "lora_" in n or "ia3_" in n}


def merge_adapters(model: nn.Module) -> bool:
    """Fold every encoder's adapters into its weights and remove peft's wrapper, so the model has its
    plain architecture again (what the bundle stores). Returns True when something was merged."""
    try:
        import peft
    except ImportError:  # no peft: no adapters to merge
        return False
    merged = False
    for enc in model.encoders.values():
        if getattr(enc, "from_scratch", False):
            continue
        attr = _host_attr(enc)
        host = getattr(enc, attr)
        if isinstance(host, peft.PeftModel):
            setattr(enc, attr, host.merge_and_unload())
            merged = True
    return merged
