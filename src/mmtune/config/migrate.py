"""Earlier config formats: the keys that were renamed (a config using one is refused with the new name) and the
upgrade of a format-1 bundle's resolved config; and the differences between two raw configs."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Sequence


# Keys an earlier config format had, and what they are now (a config using one is refused with this advice;
# bundles of format 1 are upgraded by :func:`upgrade_format1`).
RENAMED = {
    "data.image_column": "data.columns.image", "data.text_column": "data.columns.text",
    "finetune.strategy": "finetune.type", "finetune.lora_r": "finetune.r", "finetune.lora_alpha": "finetune.alpha",
    "finetune.lora_dropout": "finetune.dropout", "model.fusion.late_weights": "model.fusion.weights",
    "model.fusion.stacking_folds": "model.fusion.folds", "regularization.label_smoothing": "loss.label_smoothing",
    "imbalance.focal_gamma": "loss.gamma (with loss.type=focal)",
    "imbalance.focal_alpha": "loss.alpha (with loss.type=focal)",
}


def _renamed(raw: Mapping[str, Any]) -> List[str]:
    out = []
    for old, new in RENAMED.items():
        node: Any = raw
        for part in old.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, Mapping) else _ABSENT
        if node is not _ABSENT:
            out.append(f"config key '{old}' is now '{new}'")
    return out


_ABSENT = object()


STORED_BEFORE = {"data.jpeg_draft": False, "data.exif_orientation": False}
"""Settings added after bundles were first written, and what a bundle whose config lacks one did before it: such a
bundle keeps doing that (its images decoded in full, as stored), however the default reads today."""


def stored_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A bundle's stored (fully resolved) config with :data:`STORED_BEFORE`'s settings it lacks filled in."""
    raw = copy.deepcopy(raw) if isinstance(raw, dict) else raw
    for dotted, value in STORED_BEFORE.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return raw


def upgrade_format1(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A resolved config as bundles of format 1 stored it, in today's keys: modality columns under
    ``data.columns``, the fusion's and strategy's settings of other types dropped, the loss settings in
    ``loss``."""
    from ..finetune.strategies import STRATEGIES
    from ..fusion import FUSIONS

    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    columns = data.setdefault("columns", {})
    for m in ("image", "text"):
        col = data.pop(f"{m}_column", None)
        if col:
            columns[m] = col
    fusion = raw.setdefault("model", {}).setdefault("fusion", {})
    fusion["weights"] = fusion.pop("late_weights", "learned")
    fusion["folds"] = fusion.pop("stacking_folds", 5)
    keep = FUSIONS.get(fusion.get("type", "concat")).Config.model_fields
    raw["model"]["fusion"] = {k: v for k, v in fusion.items() if k in keep}
    ft = raw.setdefault("finetune", {})
    ft["type"] = ft.pop("strategy", "full")
    for k in ("r", "alpha", "dropout"):
        if f"lora_{k}" in ft:
            ft[k] = ft.pop(f"lora_{k}")
    keep = STRATEGIES.get(ft["type"]).Config.model_fields
    raw["finetune"] = {k: v for k, v in ft.items() if k in keep}
    smoothing = (raw.get("regularization") or {}).pop("label_smoothing", 0.0)
    gamma = (raw.get("imbalance") or {}).pop("focal_gamma", None)
    alpha = (raw.get("imbalance") or {}).pop("focal_alpha", None)
    raw["loss"] = ({"type": "focal", "gamma": gamma, "alpha": alpha} if gamma is not None
                   else {"type": "cross_entropy", "label_smoothing": smoothing})
    return raw


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any],
                       ignore: Sequence[str] = ()) -> List[tuple]:
    """``(dotted key, old value, new value)`` for every leaf that differs, outside the ``ignore`` prefixes."""
    out: List[tuple] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if any(key == p or key.startswith(p + ".") for p in ignore):
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append((key, a, b))

    walk(before, after, "")
    return out
