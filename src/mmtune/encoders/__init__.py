"""Encoders: each turns one modality (or, for CLIP, two) into an EncoderOutput."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from . import audio, speaker, tabular  # noqa: F401  (register the audio, speaker and tabular encoders)
from .base import Encoder, EncoderOutput, depth_groups, pool_tokens

__all__ = ["Encoder", "EncoderOutput", "build_encoder", "depth_groups", "pool_tokens", "saved_processor",
           "saved_processors"]


def build_encoder(spec, bundle_dir: Optional[Path] = None) -> Encoder:
    """The encoder an ``EncoderConfig`` describes, reading its field (``text.body``) or, with ``fields``,
    several columns of its modality with shared weights (see :mod:`mmtune.encoders.fields`)."""
    from .fields import SharedFieldsEncoder, for_field

    field = spec.modality
    enc = _build_encoder(spec.model_copy(update={"modality": field.split(".", 1)[0]}), bundle_dir)
    return SharedFieldsEncoder(enc, spec.fields) if spec.fields else for_field(enc, field)


def saved_processor(spec, bundle_dir: Path):
    """The processor of the encoder :func:`build_encoder` builds from ``bundle_dir`` (a run bundle's encoder folder),
    read from the folder without building the encoder: what a model exported to ONNX needs of it (building even a
    weightless encoder imports its model code)."""
    from .fields import reading
    from .processors import load_processor

    return reading(load_processor(Path(bundle_dir) / "processor"), spec.modality, spec.fields)


def _build_encoder(spec, bundle_dir: Optional[Path] = None) -> Encoder:
    """Build the encoder an ``EncoderConfig`` describes.

    With ``bundle_dir`` None the pretrained weights load from the checkpoint (hub id, local folder
    or offline preset). With ``bundle_dir`` the architecture and processor come from that folder of
    a run bundle and the weights are left for the bundle's safetensors file: no network, no
    original checkpoint needed. Raises ValueError for a modality the checkpoint cannot serve.
    """
    from . import clip  # noqa: F401  (registers the joint image_text encoder)
    from .hf import build_hf
    from .offline import build_preset, preset_name

    weights = bundle_dir is None
    preset = preset_name(spec.checkpoint)
    if preset is not None:
        return build_preset(preset, spec, weights, bundle_dir)
    source = str(bundle_dir) if bundle_dir is not None else spec.checkpoint
    proc_dir = bundle_dir / "processor" if bundle_dir is not None else None
    if weights and _looks_like_path(source) and not Path(source).is_dir():
        raise ValueError(f"encoder checkpoint {source!r} is not a folder (a local checkpoint is a folder saved with "
                         "save_pretrained; a hub id looks like 'org/name')")
    try:
        return build_hf(spec.modality, source, weights, spec.pooling, spec.max_length, spec.image_size, proc_dir,
                        max_seconds=spec.max_seconds)
    except Exception as exc:
        # transformers, tokenizers, safetensors: a file missing, truncated or damaged, a pickle refused, a model
        # not in the cache (they raise many types, tokenizers a bare Exception); mmtune's own errors pass through
        if _raised_by_mmtune(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if Path(source).is_dir():
            where = "the run bundle's encoder folder" if bundle_dir is not None else "the local checkpoint folder"
            raise ValueError(f"encoder checkpoint {source!r} could not be loaded: a file of {where} is damaged, "
                             "incomplete or not a plain tensor file (weights are read as safetensors, or as a "
                             f"PyTorch file that holds tensors only). Details: {reason}") from None
        raise ValueError(f"encoder checkpoint {source!r} could not be loaded: it is neither a local folder with the "
                         f"model's files nor a model in the local Hugging Face cache (downloads need the network). "
                         f"Details: {reason}") from None


def _raised_by_mmtune(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is mmtune's own code (a message already meant for users)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parents[1])


def _looks_like_path(source: str) -> bool:
    """A local path rather than a hub id: absolute, starting with '.' or '~', or more than one '/'."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def saved_processors(specs: Mapping[str, Any], bundle_dir: Path, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """:func:`saved_processor` of each encoder in ``names`` (default: every one of ``specs``, the config's
    ``model.encoders``), read from ``bundle_dir/encoders/<name>`` of a run or export bundle."""
    return {name: saved_processor(specs[name], Path(bundle_dir) / "encoders" / name)
            for name in (sorted(specs) if names is None else names)}
