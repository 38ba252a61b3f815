"""The one model class: encoders -> fusion -> heads.

Architectures differ by their fusion module (or a builder returning this class), never by a
subclass. The model reads tensors only; files and tables stay in the data layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..encoders import Encoder, EncoderOutput, build_encoder
from ..fusion import build_fusion
from ..heads import ClassificationHead


class MultimodalClassifier(nn.Module):
    """``forward(inputs, present) -> {task: logits}``.

    ``inputs`` maps an encoder name to that encoder's input tensors (what its processor made);
    ``present`` maps a modality to a (B,) bool tensor. Output keys of the encoders are the encoder
    names, or ``name.modality`` for a joint encoder such as CLIP.
    """

    def __init__(self, encoders: Mapping[str, Encoder], fusion: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(sorted(encoders.items())))
        self.fusion = fusion
        self.heads = nn.ModuleDict(dict(heads))
        self.output_modality: Dict[str, str] = output_fields(self.encoders)

    @staticmethod
    def output_dims(encoders: Mapping[str, Encoder]) -> Dict[str, int]:
        return {_key(n, s): d for n, e in sorted(encoders.items()) for s, d in e.output_dims().items()}

    @staticmethod
    def token_dims(encoders: Mapping[str, Encoder]) -> Dict[str, int]:
        return {_key(n, s): d for n, e in sorted(encoders.items()) for s, d in e.token_dims().items()}

    def encode(self, inputs: Mapping[str, Mapping[str, torch.Tensor]]) -> Dict[str, EncoderOutput]:
        """Run every encoder; a fully frozen encoder runs without building a graph."""
        return run_encoders(self.encoders, inputs)

    def fuse(self, outputs: Dict[str, EncoderOutput], present: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ref = next(iter(outputs.values())).pooled
        masks = {}
        for key in outputs:
            mod = self.output_modality[key]
            m = present.get(mod) if present is not None else None
            masks[key] = m.to(ref.device) if m is not None else torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
        return self.fusion(outputs, masks)

    def forward(self, inputs: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
                present: Optional[Mapping[str, torch.Tensor]] = None,
                encoded: Optional[Dict[str, EncoderOutput]] = None) -> Dict[str, torch.Tensor]:
        """Logits per task. ``encoded`` (encoder outputs computed earlier, e.g. from the embedding
        cache) replaces running the encoders on ``inputs``."""
        outputs = encoded if encoded is not None else self.encode(inputs)
        features = self.fuse(outputs, present or {})
        return {task: head(features) for task, head in self.heads.items()}

    def train(self, mode: bool = True) -> "MultimodalClassifier":
        """Training mode, except where nothing trains: a fully frozen encoder stays in eval mode
        (deterministic features, no dropout), and frozen batch-norm layers keep their statistics."""
        super().train(mode)
        if mode:
            train_keeping_frozen(self.encoders)
        return self


def _key(name: str, sub: str) -> str:
    return f"{name}.{sub}" if sub else name


def output_fields(encoders: Mapping[str, Encoder]) -> Dict[str, str]:
    """Output key -> the field whose present-mask applies to it (``name``, or ``name.sub`` for an encoder of several
    outputs)."""
    return {_key(name, sub): field for name, enc in sorted(encoders.items())
            for sub, field in enc.output_modalities().items()}


def run_encoders(encoders: Mapping[str, Encoder], inputs: Mapping[str, Mapping[str, torch.Tensor]]) -> Dict[str, EncoderOutput]:
    """Each encoder on its inputs, outputs keyed ``name`` (or ``name.sub`` for an encoder of several outputs);
    a fully frozen encoder runs without building a graph."""
    outputs: Dict[str, EncoderOutput] = {}
    for name, enc in encoders.items():
        trainable = any(p.requires_grad for p in enc.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            out = enc(**inputs[name])
        if isinstance(out, EncoderOutput):
            outputs[name] = out
        else:
            for sub, o in out.items():
                outputs[_key(name, sub)] = o
    return outputs


def train_keeping_frozen(encoders: Mapping[str, Encoder]) -> None:
    """After ``train()``: a fully frozen encoder back in eval mode (deterministic features, no dropout), and
    frozen batch-norm layers keeping their statistics."""
    for enc in encoders.values():
        if not any(p.requires_grad for p in enc.parameters()):
            enc.eval()
            continue
        for m in enc.modules():
            if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


def build_model(model_cfg, num_classes: Mapping[str, int], bundle_dir: Optional[Path] = None,
                allow_missing: bool = False) -> MultimodalClassifier:
    """Build encoders (pretrained, or from a bundle's ``encoders/<name>`` folders), the configured
    fusion and one head per task (``num_classes``: task name -> number of classes)."""
    encoders = {
        name: build_encoder(spec, None if bundle_dir is None else bundle_dir / "encoders" / name)
        for name, spec in sorted(model_cfg.encoders.items())
    }
    if not encoders:
        raise ValueError("model.encoders is empty: configure at least one encoder")
    fusion = build_fusion(model_cfg.fusion, MultimodalClassifier.output_dims(encoders),
                          MultimodalClassifier.token_dims(encoders), allow_missing,
                          num_classes=next(iter(num_classes.values())))
    heads = {
        task: ClassificationHead(fusion.out_dim, n, model_cfg.head.hidden_dims, model_cfg.head.dropout)
        for task, n in num_classes.items()
    }
    return MultimodalClassifier(encoders, fusion, heads)
