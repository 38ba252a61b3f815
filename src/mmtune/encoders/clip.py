"""CLIP (or any dual-tower model with ``vision_model`` / ``text_model`` and projections) as one
joint encoder reading both the image and the text."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Dict, List, Optional

from torch import nn

from .base import Encoder, EncoderOutput, depth_groups
from .processors import HFImageProcessor, JointProcessor, TextProcessor, load_hf_image_processor, load_processor


class CLIPEncoder(Encoder):
    """Outputs ``{"image": EncoderOutput, "text": EncoderOutput}``: pooled features are the
    projected embeddings of the shared space; tokens are each tower's last hidden states."""

    modality = "image_text"

    def __init__(self, model: nn.Module, tokenizer, image_processor, max_length: int = 77,
                 image_size: Optional[int] = None):
        super().__init__()
        for attr in ("vision_model", "text_model", "visual_projection", "text_projection"):
            if not hasattr(model, attr):
                raise ValueError(
                    f"{type(model).__name__} has no {attr!r}; modality 'image_text' needs a CLIP-style dual encoder"
                )
        self.model = model
        # The contrastive temperature takes no part in classification; keep it out of training.
        if isinstance(getattr(model, "logit_scale", None), nn.Parameter):
            model.logit_scale.requires_grad_(False)
        max_pos = getattr(model.config.text_config, "max_position_embeddings", max_length)
        self.processor = JointProcessor({
            "image": HFImageProcessor(image_processor, image_size),
            "text": TextProcessor(tokenizer, min(max_length, max_pos), ("input_ids", "attention_mask")),
        })
        self._dim = int(model.config.projection_dim)

    @property
    def out_dim(self) -> int:
        return self._dim

    def output_dims(self) -> Dict[str, int]:
        return {"image": self._dim, "text": self._dim}

    def token_dims(self) -> Dict[str, int]:
        return {"image": int(self.model.config.vision_config.hidden_size),
                "text": int(self.model.config.text_config.hidden_size)}

    def output_modalities(self) -> Dict[str, str]:
        return {"image": "image", "text": "text"}

    def forward(self, pixel_values, input_ids, attention_mask=None, **kw) -> Dict[str, EncoderOutput]:
        v = self.model.vision_model(pixel_values=pixel_values)
        t = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        mask = attention_mask.bool() if attention_mask is not None else None
        return {
            "image": EncoderOutput(self.model.visual_projection(v.pooler_output), v.last_hidden_state, None),
            "text": EncoderOutput(self.model.text_projection(t.pooler_output), t.last_hidden_state, mask),
        }

    def pooled_only_parameters(self) -> List[nn.Parameter]:
        m = self.model
        out = list(m.visual_projection.parameters()) + list(m.text_projection.parameters())
        post = getattr(m.vision_model, "post_layernorm", None)
        return out + (list(post.parameters()) if post is not None else [])

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """The two towers' groups aligned from the deepest end (so "last N" means the last N of each);
        the projections (and the logit scale) join the deepest group."""
        vg = depth_groups(self.model.vision_model)
        tg = depth_groups(self.model.text_model)
        merged = [
            [p for g in pair if g for p in g]
            for pair in itertools.zip_longest(reversed(vg), reversed(tg))
        ][::-1]
        seen = {id(p) for g in merged for p in g}
        rest = [p for p in self.model.parameters() if id(p) not in seen]
        merged[-1].extend(rest)
        return merged

    def save_parts(self, folder: Path) -> None:
        self.model.config.save_pretrained(str(folder))
        self.processor.save(folder / "processor")


def build_clip(source: str, weights: bool, max_length: int, image_size: Optional[int],
               processor_dir: Optional[Path] = None) -> CLIPEncoder:
    from transformers import AutoTokenizer

    from .hf import load_auto_model

    model = load_auto_model(source, weights)
    if processor_dir:
        proc = load_processor(processor_dir)
        return CLIPEncoder(model, proc.parts["text"].tokenizer, proc.parts["image"].image_processor,
                           proc.parts["text"].max_length, proc.parts["image"].image_size)
    return CLIPEncoder(model, AutoTokenizer.from_pretrained(source), load_hf_image_processor(source),
                       max_length, image_size)


def _register() -> None:
    from .hf import HF_ENCODERS

    HF_ENCODERS.register("image_text", lambda source, weights, pooling, max_length, image_size, processor_dir=None, **_:
                         build_clip(source, weights, max_length, image_size, processor_dir))


_register()
