"""Hugging Face encoders: any AutoModel text or image checkpoint (hub id or local folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .base import Encoder, EncoderOutput, pool_tokens
from ..registry import Registry
from .processors import HFImageProcessor, TextProcessor, load_hf_image_processor, load_processor

_ARCH_FILE = "mmtune_encoder.json"


def load_auto_model(source: str, weights: bool, tower: Optional[str] = None) -> nn.Module:
    """``AutoModel.from_pretrained(source)``, or the same architecture with no weights (``from_config``)
    when ``weights`` is False (a bundle supplies them). With ``tower`` ("vision" or "text"), a dual-encoder
    checkpoint (CLIP, SigLIP, …) gives only that tower (``CLIPVisionModel`` / ``CLIPTextModel``…)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source)
    if tower and hasattr(config, f"{tower}_config"):
        cls_name = type(config).__name__.replace("Config", f"{tower.capitalize()}Model")
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            raise ValueError(f"{source!r} is a dual encoder but transformers has no {cls_name} for its {tower} tower")
        if weights:
            return cls.from_pretrained(source)
        return cls(getattr(config, f"{tower}_config"))
    if weights:
        return AutoModel.from_pretrained(source)
    return AutoModel.from_config(config)


def _hidden_size(config) -> Optional[int]:
    for attr in ("hidden_size", "d_model", "dim", "embed_dim"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    return None


class HFTextEncoder(Encoder):
    """A transformers text model (BERT, MiniLM, RoBERTa, …); pools its last hidden states."""

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer, pooling: str = "auto", max_length: int = 128):
        super().__init__()
        self.model = model
        # Pool from the hidden states ourselves; the checkpoint's pooler (often untrained) goes unused.
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.pooling = "mean" if pooling == "auto" else pooling
        import inspect

        accepted = set(inspect.signature(model.forward).parameters)
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in accepted]
        self.processor = TextProcessor(tokenizer, max_length, keep)
        self._dim = _hidden_size(model.config)

    @property
    def out_dim(self) -> int:
        return int(self._dim)

    def forward(self, input_ids, attention_mask=None, **kw) -> EncoderOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        tokens = out.last_hidden_state
        mask = attention_mask.bool() if attention_mask is not None else None
        return EncoderOutput(pool_tokens(tokens, mask, self.pooling), tokens, mask)

    def save_parts(self, folder: Path) -> None:
        self.model.config.save_pretrained(str(folder))
        self.processor.save(folder / "processor")


class HFImageEncoder(Encoder):
    """A transformers vision model (ViT, ResNet, ConvNeXt, Swin, …).

    Convolutional feature maps (B, C, H, W) become tokens (B, H*W, C); pooling ``auto`` takes the
    model's own pooled output for convolutional models and the first (CLS) token for transformers.
    """

    modality = "image"

    def __init__(self, model: nn.Module, image_processor, pooling: str = "auto", image_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.processor = HFImageProcessor(image_processor, image_size)
        self._uses_transformer_tokens = self._probe_is_transformer()
        pooler = getattr(model, "pooler", None)
        if self._uses_transformer_tokens and pooler is not None and any(True for _ in pooler.parameters()):
            # a trained-from-scratch pooler head (ViT's dense + tanh) is not part of the checkpoint's
            # representation: drop it and pool the CLS token; parameter-free poolers (Swin's average) stay
            model.pooler = None
        self._dim = _hidden_size(model.config)

    def _probe_is_transformer(self) -> bool:
        cfg = self.model.config
        return getattr(cfg, "patch_size", None) is not None and getattr(cfg, "hidden_sizes", None) is None

    @property
    def out_dim(self) -> int:
        return int(self._dim)

    def forward(self, pixel_values, **kw) -> EncoderOutput:
        out = self.model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # (B, C, H, W) feature map
            tokens = hidden.flatten(2).transpose(1, 2)
            pooled_out = getattr(out, "pooler_output", None)
            if self.pooling == "auto" and pooled_out is not None:
                pooled = pooled_out.flatten(1)
            else:
                pooled = pool_tokens(tokens, None, "mean" if self.pooling == "auto" else self.pooling)
        else:
            tokens = hidden
            pooled_out = getattr(out, "pooler_output", None)
            if self.pooling == "auto" and pooled_out is not None:
                pooled = pooled_out  # the model's own pooled CLS (e.g. CLIP's post-layernorm); ViT's pooler was removed
            else:
                pooled = pool_tokens(tokens, None, "cls" if self.pooling == "auto" else self.pooling)
        return EncoderOutput(pooled, tokens, None)

    def save_parts(self, folder: Path) -> None:
        self.model.config.save_pretrained(str(folder))
        self.processor.save(folder / "processor")


HF_ENCODERS: Registry = Registry("Hugging Face encoder")
"""An encoder config's ``modality`` -> ``build(source, weights, pooling, max_length, image_size, processor_dir,
**settings)`` (settings: the encoder config's other keys a builder may use, such as ``max_seconds``)
for any transformers checkpoint of that modality (hub id, local folder, or a bundle's encoder folder)."""


@HF_ENCODERS.register("text")
def _text(source, weights, pooling, max_length, image_size, processor_dir=None, **_) -> Encoder:
    from transformers import AutoTokenizer

    model = load_auto_model(source, weights, tower="text")
    tok = load_processor(processor_dir).tokenizer if processor_dir else AutoTokenizer.from_pretrained(source)
    return HFTextEncoder(model, tok, pooling, max_length)


@HF_ENCODERS.register("image")
def _image(source, weights, pooling, max_length, image_size, processor_dir=None, **_) -> Encoder:
    model = load_auto_model(source, weights, tower="vision")
    if processor_dir:
        proc = load_processor(processor_dir)
        return HFImageEncoder(model, proc.image_processor, pooling, proc.image_size)
    return HFImageEncoder(model, load_hf_image_processor(source), pooling, image_size)


def build_hf(modality: str, source: str, weights: bool, pooling: str, max_length: int,
             image_size: Optional[int], processor_dir: Optional[Path] = None, **extra) -> Encoder:
    """Build the encoder :data:`HF_ENCODERS` has for ``modality`` from a hub id / local folder
    (``weights=True``) or from a bundle folder holding its config and processor (``weights=False``)."""
    if modality not in HF_ENCODERS:
        raise ValueError(f"no Hugging Face encoder reads modality {modality!r}; valid: {', '.join(HF_ENCODERS.names())}")
    return HF_ENCODERS.get(modality)(source, weights, pooling, max_length, image_size, processor_dir, **extra)
