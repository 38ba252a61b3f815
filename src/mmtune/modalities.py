"""The modality table: how a column of each modality is read, validated, decided blank, fingerprinted,
shown and augmented. The manifest, dataset, collator, cache, report and config iterate over
:data:`MODALITIES`; adding a modality is one entry here plus an encoder that reads it.

A joint encoder reads several modalities at once (CLIP: image and text); :data:`JOINT` maps such an
encoder's ``modality`` name to the modalities it reads."""
from __future__ import annotations

from dataclasses import dataclass

import html
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from pydantic import Field

from .registry import Registry
from .schema import Section
from .values import is_blank, is_missing


class Modality:
    """Base of the modality entries. ``name`` is the key of the modality everywhere (config, present-masks,
    processors); ``Augment`` the config class of its training-time augmentation (``augment.<name>``)."""

    name: str = ""
    Augment: Optional[type] = None
    blank_reason: str = "missing value"
    files: bool = False
    """Cells are file paths (relative to the manifest's folder)."""
    free_text: bool = False
    """Cells are free text (the server takes them as strings, not as values of a table)."""
    counts_pixels: bool = False
    """A decoded file counts against the server's pixel budget (its size read from the header first)."""
    resized: bool = False
    """Read at its encoder's ``image_size``, which a preset may lower on a large table (each epoch runs the encoder)."""
    read_options: Tuple[str, ...] = ()
    """The keyword arguments :meth:`FileModality.read` takes for this modality beyond the value (an image:
    ``side``, the side it is resized to next, and ``orient``); see :func:`mmtune.data.collate.read_options`."""
    needs: Tuple[Tuple[str, str, str], ...] = ()
    """Optional packages a column of this modality needs, as ``(module, extra, feature)``."""

    def is_blank(self, value: Any) -> bool:
        return is_blank(value)

    def blank_problem(self, value: Any) -> str:
        """Why a blank cell is a bad row (when the modality is not allowed to be missing)."""
        return f"missing {self.name} (NaN or null)" if not isinstance(value, str) and is_missing(value) else self.blank_reason

    def check(self, value: Any, base_dir: Optional[Path]) -> Optional[str]:
        """The problem with a non-blank cell, or None when it can be used."""
        return None

    def quick_check(self, value: Any, base_dir: Optional[Path]) -> Optional[str]:
        """What :meth:`check` finds without decoding anything (prediction's validation, whose rows are decoded
        once, when they are read: a file that fails there is found then, see ``MultimodalDataset``)."""
        return self.check(value, base_dir)

    def read(self, value: Any, base_dir: Optional[Path]) -> Any:
        """The decoded value a processor takes (for example a PIL image)."""
        return value

    def digest(self, value: Any, base_dir: Optional[Path]) -> bytes:
        """Bytes that change whenever the decoded value can change (the embedding cache's key)."""
        return str(value).encode()

    def display(self, value: Any, base_dir: Optional[Path]) -> Any:
        """What the saved predictions show for a cell."""
        return value

    def render_html(self, shown: Any) -> str:
        """A cell of the report, from what :meth:`display` gave."""
        return html.escape("" if shown is None or (isinstance(shown, float) and shown != shown) else str(shown))

    def value_augment(self, cfg: Any, model: Any, seed: int) -> Optional[Callable[[Any], Any]]:
        """Training only: a function applied to each raw value in the collator (None: none)."""
        return None

    def batch_augments(self, cfg: Any, model: Any) -> List[Tuple[str, Callable[[Dict[str, Any]], Dict[str, Any]]]]:
        """Training only: ``(encoder name, function of that encoder's input tensors)`` pairs applied to
        each training batch."""
        return []


MODALITIES: Registry = Registry("modality")
"""Modality name -> Modality object."""
JOINT: Registry = Registry("joint encoder modality")
"""A joint encoder's ``modality`` name -> the modalities it reads."""


def resolve_path(value: Any, base_dir: Optional[Path]) -> Path:
    """A file cell as a path: relative paths are relative to the manifest's folder."""
    p = Path(str(value))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def once_per_file(memo: Dict[Any, Any], entry: Modality, value: Any, work: Callable[[], Any], key: Any = None) -> Any:
    """``work()`` for a cell; for a path of a file modality, done once per path while ``memo`` holds it (at most
    100,000 paths), so that a file named by several rows is read once (validated, digested)."""
    if not (entry.files and isinstance(value, str)):
        return work()
    key = value if key is None else key
    if key not in memo:
        if len(memo) >= 100_000:
            memo.clear()
        memo[key] = work()
    return memo[key]


# ---- image -----------------------------------------------------------------------------------


class ImageAugmentConfig(Section):
    """Batch-level image augmentation with kornia, on training batches only."""

    enabled: bool = False
    crop_scale: List[float] = Field(default_factory=lambda: [0.7, 1.0])
    """Random resized crop: the range of the crop's area share (back to the input size)."""
    rotation: float = Field(15.0, ge=0.0, le=180.0)
    """Random rotation up to this many degrees."""
    flip: bool = True
    """Random horizontal flip."""
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    """Brightness, contrast and saturation jitter strength (0: off)."""
    randaugment: bool = False
    """Add a RandAugment policy (kornia.augmentation.auto.RandAugment)."""
    randaugment_n: int = Field(2, ge=1)
    randaugment_m: int = Field(9, ge=0, le=30)

    light: ClassVar[Dict[str, Any]] = {"enabled": True, "crop_scale": [0.8, 1.0], "rotation": 10.0, "flip": True,
                                       "color_jitter": 0.2}
    """What the ``balanced`` preset sets."""
    off: ClassVar[Dict[str, Any]] = {"enabled": False}
    """What turns it off (a trial on cached encoder outputs, which cannot be augmented)."""

    @staticmethod
    def at_strength(s: float) -> Dict[str, Any]:
        """The settings of the search's ``augment.strength`` s in [0, 1]."""
        return {"enabled": s > 0.05, "crop_scale": [round(1 - 0.4 * s, 3), 1.0], "rotation": round(20 * s, 2),
                "color_jitter": round(0.4 * s, 3)}

    @property
    def active(self) -> bool:
        return self.enabled

    def needs(self):
        return [("kornia", "augment", "image augmentation (augment.image.enabled)")] if self.enabled else []


@dataclass(frozen=True, eq=False)
class Decoded:
    """A file modality's value decoded already (an image sent to the server): used as it is, never read
    from disk. ``name`` is what predictions show for it."""

    value: Any
    name: str = "<request>"


class FileModality(Modality):
    """A modality whose cells are file paths (or :class:`Decoded` values): the cache digests the file's
    bytes, predictions show the absolute path. Subclasses implement ``check_file`` (the problem with a
    file, or None), ``read_file`` (a path or a binary file object -> the decoded value) and
    ``decoded_problem`` (the problem with a decoded value, or None)."""

    files = True

    def check(self, value, base_dir):
        return None if isinstance(value, Decoded) else self.check_file(resolve_path(value, base_dir))

    def quick_check(self, value, base_dir):
        if isinstance(value, Decoded):
            return None
        path = resolve_path(value, base_dir)
        return None if path.is_file() else f"{self.name} file {str(path)!r} does not exist"

    def read(self, value, base_dir, **options):
        """The decoded value; ``options``: those of :attr:`read_options` the reader gives (how training read it)."""
        if isinstance(value, Decoded):
            return value.value
        return self.read_file(resolve_path(value, base_dir), **options)

    def decode(self, data: bytes, name: str = "<request>", **options) -> Decoded:
        """Bytes of a file (an upload) decoded as this modality (``options`` as in :meth:`read`); ValueError saying
        why they cannot be."""
        import io

        try:
            value = self.read_file(io.BytesIO(data), **options)
        except Exception as exc:  # the decoders raise many types for bad bytes; each becomes the reason
            if type(exc).__name__ == "MissingExtraError":
                raise
            raise ValueError(f"not a readable {self.name} file ({type(exc).__name__}: {exc})") from None
        problem = self.decoded_problem(value)
        if problem:
            raise ValueError(problem)
        return Decoded(value, name)

    def check_file(self, path: Path) -> Optional[str]:
        raise NotImplementedError

    def read_file(self, source) -> Any:
        raise NotImplementedError

    def decoded_problem(self, value: Any) -> Optional[str]:
        return None

    def digest(self, value, base_dir):
        from .io import file_digest

        if isinstance(value, Decoded):
            return f"decoded:{id(value)}".encode()
        return file_digest(resolve_path(value, base_dir))

    def display(self, value, base_dir):
        if isinstance(value, Decoded):
            return value.name
        return None if is_blank(value) else str(resolve_path(value, base_dir).resolve())


DRAFT_MARGIN = 2
"""A JPEG is decoded at a reduced scale only down to this many times the side it is resized to: after the resize,
its pixels are a full decode's to within a rounding (into 224 px, 0.16/255 on average and at most 4/255 on
12-megapixel photographs, 0.17/255 and at most 9/255 on 3-megapixel ones: bench/decode.py)."""


class Image(FileModality):
    """A path to an image file (relative to the manifest's folder), decoded to RGB. A JPEG at least
    :data:`DRAFT_MARGIN` times larger than the side it is resized to (``side``) is decoded at a reduced scale that
    keeps that margin (``data.jpeg_draft``), and a picture is turned upright as its EXIF orientation says
    (``orient``: ``data.exif_orientation``); see :func:`mmtune.data.images.load_image`."""

    name = "image"
    Augment = ImageAugmentConfig
    blank_reason = "missing image path"
    counts_pixels = True
    resized = True
    read_options = ("side", "orient")

    def check_file(self, path):
        from .data.images import load_image

        if not path.is_file():
            return f"image file {str(path)!r} does not exist"
        try:
            # every byte decoded, so a truncated file fails here, not mid-epoch; a JPEG at its smallest scale (the
            # same verdicts as in full, in about a third of the time on photographs: docs/guides/configs.md)
            load_image(path, draft=1)
        except Exception as exc:  # Pillow raises many types for a bad file; each becomes this row's reason
            return f"image file {str(path)!r} is not a readable image ({type(exc).__name__}: {exc})"
        return None

    def read_file(self, source, side: Optional[int] = None, orient: bool = False):
        from .data.images import load_image

        return load_image(source, draft=DRAFT_MARGIN * side if side else None, orient=orient)

    def render_html(self, shown):
        from .data.images import thumbnail

        return thumbnail(shown)

    def batch_augments(self, cfg, model):
        if cfg is None or not cfg.enabled:
            return []
        from .data.transforms import ImageAugment

        augment = ImageAugment(cfg)
        out = []
        for name, enc in model.encoders.items():
            proc = getattr(enc.processor, "parts", {}).get("image", enc.processor)
            if any(kind(m) == "image" for m in getattr(enc.processor, "modalities", ())) and hasattr(proc, "normalization"):
                mean, std = proc.normalization()
                out.append((name, _pixels(augment, mean, std)))
        return out


def _pixels(augment, mean, std):
    def apply(inputs):
        return {**inputs, "pixel_values": augment(inputs["pixel_values"], mean, std)} if "pixel_values" in inputs else inputs

    return apply


# ---- text ------------------------------------------------------------------------------------


class TextAugmentConfig(Section):
    """Text augmentation, on training batches only (each a per-word or per-token probability)."""

    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Delete a word."""
    word_mask: float = Field(0.0, ge=0.0, lt=1.0)
    """Replace a word by the tokenizer's mask (or unknown) token."""
    word_swap: float = Field(0.0, ge=0.0, lt=1.0)
    """Swap a word with its right neighbour."""
    token_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Token level, after tokenisation: hide a token from attention (its attention-mask entry set to 0)."""
    token_mask: float = Field(0.0, ge=0.0, lt=1.0)
    """Token level: replace a token id by the tokenizer's mask (or unknown) token id."""

    light: ClassVar[Dict[str, Any]] = {"word_dropout": 0.1}
    off: ClassVar[Dict[str, Any]] = {"word_dropout": 0.0, "word_mask": 0.0, "word_swap": 0.0, "token_dropout": 0.0,
                                     "token_mask": 0.0}

    @staticmethod
    def at_strength(s: float) -> Dict[str, Any]:
        return {"word_dropout": round(0.2 * s, 3)}

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self.model_dump().values())


def _tokenizer(enc):
    proc = getattr(enc.processor, "parts", {}).get("text", enc.processor)
    return getattr(proc, "tokenizer", None)


class Text(Modality):
    """A string."""

    name = "text"
    Augment = TextAugmentConfig
    blank_reason = "empty text"
    free_text = True

    def check(self, value, base_dir):
        return None if isinstance(value, str) else f"text must be a string, got {type(value).__name__} {value!r}"

    def read(self, value, base_dir):
        return str(value)

    def value_augment(self, cfg, model, seed):
        if cfg is None or not (cfg.word_dropout > 0 or cfg.word_mask > 0 or cfg.word_swap > 0):
            return None
        from .data.transforms import TextAugment

        tok = next((_tokenizer(e) for e in model.encoders.values() if _tokenizer(e) is not None), None)
        return TextAugment(cfg, getattr(tok, "mask_token", None) or getattr(tok, "unk_token", None), seed)

    def batch_augments(self, cfg, model):
        if cfg is None or not (cfg.token_mask > 0 or cfg.token_dropout > 0):
            return []
        from .data.transforms import augment_tokens

        out = []
        for name, enc in model.encoders.items():
            tok = _tokenizer(enc)
            if tok is None:
                continue
            mask_id = tok.mask_token_id if getattr(tok, "mask_token_id", None) is not None else tok.unk_token_id
            special = [i for i in tok.all_special_ids if i is not None]

            def apply(inputs, mask_id=mask_id, special=special):
                if "input_ids" not in inputs:
                    return inputs
                ids, att = augment_tokens(inputs["input_ids"], inputs.get("attention_mask"), cfg, mask_id, special)
                return {**inputs, "input_ids": ids, **({"attention_mask": att} if att is not None else {})}

            out.append((name, apply))
        return out


class Tabular(Modality):
    """Several columns of numbers and categories, read together as one row dict. A cell may be missing
    (imputed, flagged); the modality is absent only when every one of its cells is."""

    name = "tabular"
    blank_reason = "every tabular column is empty"

    def is_blank(self, value):
        return not isinstance(value, dict) or all(is_blank(v) for v in value.values())

    def check(self, value, base_dir):
        for col, v in value.items():
            if not is_blank(v) and not isinstance(v, (str, int, float, bool)) and not hasattr(v, "item"):
                return f"column {col!r}: a number or a category is expected, got {type(v).__name__} {v!r}"
        return None

    def read(self, value, base_dir):
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in value.items()}

    def digest(self, value, base_dir):
        import json

        return json.dumps({k: (None if is_blank(v) else str(v)) for k, v in sorted(value.items())}).encode()

    def display(self, value, base_dir):
        import json

        return json.dumps({k: (None if is_blank(v) else (v.item() if hasattr(v, "item") else v)) for k, v in value.items()})


class AudioAugmentConfig(Section):
    """Audio augmentation, on training batches only (a random crop of long recordings always happens in
    training; evaluation takes the centre)."""

    enabled: bool = False
    gain_db: float = Field(6.0, ge=0.0)
    """Random gain, uniform in ±gain_db decibels (waveform encoders)."""
    noise_snr_db: Optional[float] = Field(30.0, gt=0.0)
    """Add white noise at this signal-to-noise ratio in dB (None: off; waveform encoders)."""
    shift: float = Field(0.1, ge=0.0, lt=1.0)
    """Circular time shift by up to this share of the clip (waveform encoders)."""
    time_masks: int = Field(2, ge=0)
    """SpecAugment: time masks per clip, each up to ``time_mask_width`` of the frames (spectrogram encoders)."""
    time_mask_width: float = Field(0.1, ge=0.0, lt=1.0)
    freq_masks: int = Field(2, ge=0)
    """SpecAugment: frequency masks per clip, each up to ``freq_mask_bins`` mel bins."""
    freq_mask_bins: int = Field(8, ge=0)

    light: ClassVar[Optional[Dict[str, Any]]] = None
    """Not set by the presets nor searched (not measured against them yet)."""
    off: ClassVar[Dict[str, Any]] = {"enabled": False}
    at_strength: ClassVar[Optional[Callable[[float], Dict[str, Any]]]] = None

    @property
    def active(self) -> bool:
        return self.enabled


class Audio(FileModality):
    """A path to a recording (wav, flac, ogg; mp3 where libsndfile reads it), decoded to mono. Each encoder's
    processor resamples it to the encoder's rate and takes ``max_seconds`` of it."""

    name = "audio"
    Augment = AudioAugmentConfig
    blank_reason = "missing audio path"
    needs = (("soundfile", "audio", "audio columns"), ("soxr", "audio", "audio columns"))

    def check_file(self, path):
        from .data.audio import audio_problem

        return audio_problem(path)

    def read_file(self, source):
        from .data.audio import load_audio

        return load_audio(source)

    def decoded_problem(self, value):
        from .data.audio import clip_problem

        return clip_problem(*value, "the recording")

    def value_augment(self, cfg, model, seed):
        """A random window of each long recording (as long as the longest any audio encoder takes)."""
        import numpy as np

        seconds = [e.processor.max_seconds for e in model.encoders.values()
                   if any(kind(m) == "audio" for m in getattr(e.processor, "modalities", ()))
                   and hasattr(e.processor, "max_seconds")]
        if not seconds:
            return None
        longest, rng = max(seconds), np.random.default_rng(seed)

        def crop(clip):
            x, sr = clip
            n = int(round(longest * sr))
            if len(x) <= n:
                return clip
            start = int(rng.integers(0, len(x) - n + 1))
            return x[start:start + n], sr

        return crop

    def batch_augments(self, cfg, model):
        if cfg is None or not cfg.enabled:
            return []
        from .data.transforms import augment_spectrogram, augment_waveform

        out = []
        for name, enc in model.encoders.items():
            kind = getattr(enc.processor, "kind", None)
            if kind == "waveform":
                out.append((name, lambda inputs: augment_waveform(inputs, cfg)))
            elif kind == "spectrogram":
                out.append((name, lambda inputs: augment_spectrogram(inputs, cfg)))
        return out


MODALITIES.register("image", Image())
MODALITIES.register("text", Text())
MODALITIES.register("tabular", Tabular())
MODALITIES.register("audio", Audio())
JOINT.register("image_text", ("image", "text"))


def kind(field: str) -> str:
    """The modality of a field: ``text`` for ``text`` and for a second text column ``text.body``."""
    return field.split(".", 1)[0]


def modality_of(field: str) -> Modality:
    """The table entry of a field (``image.back`` is an ``image``)."""
    return MODALITIES.get(kind(field))


def is_field(name: str) -> bool:
    """A modality name, or ``<modality>.<suffix>`` naming another column of that modality."""
    base, _, suffix = name.partition(".")
    return base in MODALITIES and (not _ or (suffix.isidentifier()))


def encoder_reads(modality: str) -> Tuple[str, ...]:
    """The fields an encoder whose config says ``modality`` reads."""
    return tuple(JOINT.get(modality)) if modality in JOINT else (modality,)


def encoder_modality_names() -> List[str]:
    """What an encoder's ``modality`` may say: a modality, or a joint encoder's name."""
    return MODALITIES.names() + JOINT.names()
