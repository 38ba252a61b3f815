"""The encoder interface every part agrees on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


@dataclass
class EncoderOutput:
    """What an encoder hands to the fusion: ``pooled`` (B, D), ``tokens`` (B, T, D_tok) or None,
    ``mask`` (B, T) bool (True = real token) or None."""

    pooled: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


class Encoder(nn.Module):
    """Base of every encoder.

    Subclasses set ``modality`` (``image``, ``text`` or ``image_text`` for a joint encoder),
    ``processor`` (turns raw values into this encoder's inputs) and implement ``forward`` and
    ``save_parts``. ``forward`` returns an :class:`EncoderOutput`, or for a joint encoder a
    mapping ``{sub-key: EncoderOutput}`` whose keys are modalities (``image``, ``text``).
    """

    modality: str = ""
    processor = None

    def output_dims(self) -> Dict[str, int]:
        """Pooled width per output key ('' for a single-output encoder)."""
        return {"": self.out_dim}

    def token_dims(self) -> Dict[str, int]:
        """Token width per output key (the pooled width unless an encoder says otherwise)."""
        return self.output_dims()

    def output_modalities(self) -> Dict[str, str]:
        """The field (modality, or another column of one) whose present-mask applies to each output key."""
        return {"": getattr(self, "field", None) or self.modality}

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """Parameters grouped by depth, shallow to deep; drives partial unfreezing and
        layer-wise learning rates alike. Every parameter lies in exactly one group."""
        return depth_groups(self)

    def pooled_only_parameters(self) -> List[nn.Parameter]:
        """Parameters that shape only ``pooled`` (not ``tokens``): a fusion that reads tokens alone leaves
        them untouched, so they are not trained then."""
        return []

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute activations in the backward pass (``trainer.gradient_checkpointing``); False when this
        encoder cannot. Hugging Face models that support it use their own switch (non-reentrant)."""
        host = getattr(self, "model", None)
        if host is not None and getattr(host, "supports_gradient_checkpointing", False):
            host.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return True
        return False

    def save_parts(self, folder: Path) -> None:
        """Write what is needed to rebuild this encoder (architecture config, processor) without
        its original checkpoint; the weights travel in the bundle's safetensors file."""
        raise NotImplementedError


def depth_groups(module: nn.Module) -> List[List[nn.Parameter]]:
    """Group ``module``'s parameters by depth: everything defined before its main stack of layers
    (the ``nn.ModuleList`` holding the most parameters), then each layer of that stack; what
    follows the stack (final norm, head convolution) joins the last layer, so that "the last
    group" is always a real layer. Works for BERT/ViT/CLIP towers, ResNet/ConvNeXt stages,
    EfficientNet blocks."""
    best: Optional[Tuple[str, nn.ModuleList, int]] = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 1:
            n = sum(p.numel() for p in sub.parameters())
            if best is None or n > best[2]:
                best = (name, sub, n)
    params = list(module.named_parameters())
    if best is None:
        return [[p for _, p in params]] if params else []
    prefix = best[0] + "."
    layers: List[List[nn.Parameter]] = [[] for _ in best[1]]
    stem: List[nn.Parameter] = []
    head: List[nn.Parameter] = []
    seen_layer = False
    for name, p in params:
        if name.startswith(prefix):
            layers[int(name[len(prefix):].split(".")[0])].append(p)
            seen_layer = True
        else:
            (head if seen_layer else stem).append(p)
    layers[-1].extend(head)
    return [g for g in [stem, *layers] if g]


def pool_tokens(tokens: torch.Tensor, mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """Pool (B, T, D) tokens into (B, D): ``cls`` (first token), ``mean`` or ``max`` over real tokens."""
    if how == "cls":
        return tokens[:, 0]
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    m = mask.unsqueeze(-1).to(tokens.dtype)
    if how == "mean":
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "max":
        return tokens.masked_fill(~mask.unsqueeze(-1), torch.finfo(tokens.dtype).min).amax(1)
    raise ValueError(f"unknown pooling {how!r}; valid: cls, mean, max")


def as_encoder_outputs(encoded: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, EncoderOutput]:
    return {k: EncoderOutput(d["pooled"], d.get("tokens"), d.get("mask")) for k, d in encoded.items()}


def batch_encoded(batch: Dict[str, Any]) -> Optional[Dict[str, EncoderOutput]]:
    """A batch's cached encoder outputs (a batch of the embedding cache), or None for a batch of raw inputs that
    the encoders must run on."""
    encoded = batch.get("encoded")
    return as_encoder_outputs(encoded) if encoded is not None else None
