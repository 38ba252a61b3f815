"""Processors turn raw values (PIL images, strings) into an encoder's input tensors.

Each processor names the modalities it reads, fills absent values with a blank input (the
model masks them out), and can save itself to a folder and be loaded back with no network.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

_META = "mmtune_processor.json"


class TextProcessor:
    modalities = ("text",)

    def __init__(self, tokenizer, max_length: int = 128, keep: Optional[Sequence[str]] = None):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.keep = tuple(keep) if keep else ("input_ids", "attention_mask", "token_type_ids")

    def _encode(self, columns: Mapping[str, List[Any]], **outputs):
        """The tokenizer on the texts of ``columns`` (an absent text: the empty one), padded and truncated the same
        way on every call: a fast tokenizer keeps those settings between calls, and a call asking for others would
        change them under a batch being tokenised on another thread."""
        texts = [t if isinstance(t, str) else "" for t in columns["text"]]
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, **outputs)

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        enc = self._encode(columns, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in self.keep}

    def lengths(self, columns: Mapping[str, List[Any]]) -> np.ndarray:
        """Per row, the positions its text fills in a batch before padding: its token count, special tokens
        included, truncated as :meth:`__call__` truncates (an absent text: the empty text's)."""
        # the masks as lists, summed per row: no padded arrays built, and no token types (half the time of tensors)
        masks = self._encode(columns, return_attention_mask=True, return_token_type_ids=False)["attention_mask"]
        return np.fromiter(map(sum, masks), dtype=np.int64, count=len(masks))

    def tokens(self, columns: Mapping[str, List[Any]]) -> Optional["Tokens"]:
        """Each row's tokens, unpadded (:class:`Tokens`; its ``lengths`` are :meth:`lengths`), for :meth:`pad` to
        batch without tokenising again; None where this tokenizer's outputs are not only ids, token types and the
        attention mask, or it pads with nothing."""
        enc = self._encode(columns, return_tensors="np", return_attention_mask=True)
        names = [k for k in enc.keys() if k in self.keep]
        if "attention_mask" not in enc or not set(enc.keys()) <= {"input_ids", "token_type_ids", "attention_mask"} \
                or self.tokenizer.pad_token_id is None:
            return None
        mask = np.asarray(enc["attention_mask"]).astype(bool)
        # a row's unpadded tokens are the positions its mask keeps, in order, whichever side the padding is on
        flat = {k: np.asarray(enc[k], dtype=np.int64)[mask] for k in names if k != "attention_mask"}
        return Tokens(flat, mask.sum(axis=1).astype(np.int64), names)

    def pad(self, tokens: "Tokens", rows: Sequence[int], columns: Optional[Mapping[str, List[Any]]] = None
            ) -> Dict[str, torch.Tensor]:
        """The batch :meth:`__call__` makes of the texts at ``rows`` of ``tokens`` (from :meth:`tokens`), padded
        to the longest as the tokenizer pads (its side and pad ids), to the same numbers. ``columns`` (the batch's
        values, which a processor of several parts needs for the others) is not read."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = tokens.lengths[rows]
        width = int(counts.max()) if len(rows) else 0
        # each row's first token at its padding's end (left) or at position 0 (right); where its tokens lie in flat
        first = (width - counts) if getattr(self.tokenizer, "padding_side", "right") == "left" else np.zeros_like(counts)
        position = np.arange(width) - first[:, None]
        mask = (position >= 0) & (position < counts[:, None])
        source = (tokens.starts[rows][:, None] + position)[mask]
        fill = {"input_ids": self.tokenizer.pad_token_id,
                "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0) or 0}
        out = {}
        for name in tokens.names:
            if name == "attention_mask":
                out[name] = torch.from_numpy(mask.astype(np.int64))
                continue
            arr = np.full((len(rows), width), fill[name], dtype=np.int64)
            arr[mask] = tokens.flat[name][source]
            out[name] = torch.from_numpy(arr)
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # A fast tokenizer remembers the padding / truncation of its last call and would write it into
        # tokenizer.json; clear it so that the saved files depend on the tokenizer alone.
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "no_truncation"):
            backend.no_truncation()
            backend.no_padding()
        self.tokenizer.save_pretrained(str(folder))
        _write_meta(folder, "text", max_length=self.max_length, keep=list(self.keep))

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "TextProcessor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        return cls(tok, meta["max_length"], meta.get("keep"))


class Tokens:
    """A column's texts tokenised once, unpadded: per output (``input_ids``, ``token_type_ids``) every row's tokens
    end to end in ``flat``, row ``i``'s ``lengths[i]`` of them from ``starts[i]``; ``names``: the outputs a batch
    holds, the attention mask included. What prediction keeps from counting the tokens to sort rows by, so that
    collating does not tokenise the texts again (:meth:`TextProcessor.pad`)."""

    def __init__(self, flat: Dict[str, np.ndarray], lengths: np.ndarray, names: Sequence[str]):
        self.flat, self.lengths, self.names = dict(flat), np.asarray(lengths, dtype=np.int64), list(names)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    @classmethod
    def concat(cls, parts: Sequence["Tokens"]) -> "Tokens":
        """One :class:`Tokens` of ``parts``' rows, in order."""
        return cls({k: np.concatenate([p.flat[k] for p in parts]) for k in parts[0].flat},
                   np.concatenate([p.lengths for p in parts]), parts[0].names)


class TokenParts:
    """Kept tokens (:class:`Tokens`) of several parts of one processor, by name (a shared-weights encoder's fields,
    a joint encoder's text part); ``lengths``: a row's positions over them all, as the processor counts them."""

    def __init__(self, parts: Mapping[str, Any]):
        self.parts = dict(parts)
        self.lengths = sum(t.lengths for t in self.parts.values())

    @classmethod
    def concat(cls, chunks: Sequence["TokenParts"]) -> "TokenParts":
        """One :class:`TokenParts` of ``chunks``' rows, in order."""
        return cls({n: type(t).concat([c.parts[n] for c in chunks]) for n, t in chunks[0].parts.items()})


class HFImageProcessor:
    """Wraps a transformers image processor, always on its PIL backend: the same pixels whether or not
    torchvision happens to be installed. The backend is recorded when saved and used again when loaded."""

    modalities = ("image",)
    backend = "pil"

    def __init__(self, image_processor, image_size: Optional[int] = None):
        self.image_processor = image_processor
        if image_size:
            image_processor.size = {"height": image_size, "width": image_size}
            if hasattr(image_processor, "do_center_crop"):
                image_processor.do_center_crop = False
        self.image_size = image_size
        self._blank_side = image_size or 32

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        from PIL import Image

        imgs = [im if im is not None else Image.new("RGB", (self._blank_side, self._blank_side)) for im in columns["image"]]
        out = self.image_processor(images=imgs, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def _size(self, key: str) -> Optional[int]:
        """An entry of the processor's ``size`` (a dict, or transformers' ``SizeDict``); None when it resizes nothing
        or has no such entry."""
        ip = self.image_processor
        if not getattr(ip, "do_resize", True):
            return None
        size = getattr(ip, "size", None) or {}
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if value else None

    def _height_width(self) -> Optional[tuple]:
        """``(width, height)`` when the processor resizes every image to that size, else None (a shortest-edge
        resize, or none)."""
        width, height = self._size("width"), self._size("height")
        return (width, height) if width and height else None

    def _edge_target(self):
        """A function from an image's ``(width, height)`` to the one the processor's resize gives it, where the
        processor resizes the shortest edge with transformers' own PIL resize (CLIP's, BiT's); None otherwise: a
        processor with its own resize or pipeline (ConvNeXt's crop_pct), or an edge with a longest-edge bound."""
        edge = self._size("shortest_edge")
        if not edge or self._size("longest_edge"):
            return None
        try:
            from transformers.image_processing_backends import PilBackend
            from transformers.image_transforms import get_resize_output_image_size
        except ImportError:  # a transformers release without the PIL backend class
            return None
        kind = type(self.image_processor)
        if getattr(kind, "resize", None) is not PilBackend.resize or \
                getattr(kind, "_preprocess", None) is not PilBackend._preprocess:
            return None

        def target(size):  # the processor's own arithmetic, on a (channels, height, width) view of nothing
            height, width = get_resize_output_image_size(np.broadcast_to(np.uint8(0), (3, size[1], size[0])), edge,
                                                         default_to_square=False, input_data_format="channels_first")
            return int(width), int(height)

        return target

    def prepare(self, columns: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
        """Each image resized as :meth:`__call__` would resize it, where the processor resizes to a height and width
        or, with transformers' own resize, its shortest edge to a side (its resize then has the size it computes
        already, and returns the same pixels; ``tests/test_speed_options.py``): what decoding threads do ahead of
        it. Other resizes (ConvNeXt's) are left to the processor."""
        images = list(columns["image"])
        both = self._height_width()
        target = (lambda size: both) if both else self._edge_target()
        if target is None:
            return {"image": images}
        resample = getattr(self.image_processor, "resample", 2)  # PIL's bilinear, the processors' default
        out = []
        for im in images:
            size = None if im is None else target(im.size)
            out.append(im if size is None or im.size == size else im.resize(size, resample))
        return {"image": out}

    def sides(self) -> Dict[str, int]:
        """``{"image": side}``: the largest side the processor resizes an image to (``image_size``, else its own
        ``size`` — height and width, or the shortest edge before a ``crop_pct`` crop); empty when it does not say."""
        if self.image_size:
            return {"image": int(self.image_size)}
        both, edge = self._height_width(), self._size("shortest_edge")
        if both:
            return {"image": max(both)}
        if edge:
            pct = getattr(self.image_processor, "crop_pct", None)
            return {"image": int(round(edge / pct)) if pct else edge}
        return {}

    def normalization(self):
        """(mean, std) per channel in [0, 1] units that turn this processor's output back into pixels."""
        ip = self.image_processor
        if not getattr(ip, "do_normalize", True):
            return [0.0] * 3, [1.0] * 3
        mean = list(getattr(ip, "image_mean", None) or [0.0] * 3)
        std = list(getattr(ip, "image_std", None) or [1.0] * 3)
        return mean, std

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(str(folder))
        _write_meta(folder, "hf_image", image_size=self.image_size, backend=self.backend)

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "HFImageProcessor":
        backend = meta.get("backend", "pil")  # bundles written before the key existed used PIL too
        if backend != "pil":
            raise ValueError(f"processor in {str(folder)!r} uses image backend {backend!r}; this mmtune reads 'pil'")
        return cls(load_hf_image_processor(str(folder)), meta.get("image_size"))


def load_hf_image_processor(path: str):
    """AutoImageProcessor on its PIL backend (transformers >= 5: ``backend="pil"``; older releases: the
    slow processor, which is PIL-based)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except TypeError:  # a release without the ``backend`` argument
        return AutoImageProcessor.from_pretrained(path, use_fast=False)


class ResizeNormalizeProcessor:
    """Resize to a square side, scale to [0, 255], subtract ``mean`` and divide by ``std`` per channel.
    EfficientNet-Lite expects mean 127 and std 128 (inputs in about [-1, 1])."""

    modalities = ("image",)

    def __init__(self, image_size: int = 224, mean: Sequence[float] = (127.0,) * 3, std: Sequence[float] = (128.0,) * 3):
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def prepare(self, columns: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
        """The per-image part of :meth:`__call__`, each image resized to the square side: what decoding threads do
        ahead of it (a prepared image is used as it is, so the batch is the same either way)."""
        from PIL import Image

        s = self.image_size
        return {"image": [im if im is None or im.size == (s, s) else im.resize((s, s), Image.BILINEAR)
                          for im in columns["image"]]}

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        images = self.prepare(columns)["image"]
        s = self.image_size
        arr = np.zeros((len(images), 3, s, s), dtype=np.float32)
        blank = np.zeros(len(arr), dtype=bool)
        for i, im in enumerate(images):
            if im is None:
                blank[i] = True  # masked out by the model
                continue
            arr[i] = np.asarray(im).transpose(2, 0, 1)  # cast to float32 as it is copied
        # the whole batch in place (the same numbers as per image, several times faster at 224 px)
        arr -= self.mean
        arr /= self.std
        arr[blank] = 0.0
        return {"pixel_values": torch.from_numpy(arr)}

    def sides(self) -> Dict[str, int]:
        """``{"image": side}``: the side every image is resized to."""
        return {"image": self.image_size}

    def normalization(self):
        return (self.mean.ravel() / 255.0).tolist(), (self.std.ravel() / 255.0).tolist()

    def save(self, folder: Path) -> None:
        _write_meta(folder, "resize_normalize", image_size=self.image_size,
                    mean=self.mean.ravel().tolist(), std=self.std.ravel().tolist())

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "ResizeNormalizeProcessor":
        return cls(meta["image_size"], meta["mean"], meta["std"])


class JointProcessor:
    """Several processors side by side for a joint encoder (CLIP: image + text)."""

    def __init__(self, parts: Mapping[str, Any]):
        self.parts = dict(sorted(parts.items()))
        self.modalities = tuple(m for p in self.parts.values() for m in p.modalities)

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for part in self.parts.values():
            out.update(part({m: columns[m] for m in part.modalities}))
        return out

    def sides(self) -> Dict[str, int]:
        """The sides the parts resize their modalities to (see :meth:`ResizeNormalizeProcessor.sides`)."""
        out: Dict[str, int] = {}
        for part in self.parts.values():
            if callable(getattr(part, "sides", None)):
                out.update(part.sides())
        return out

    def prepare(self, columns: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
        """The per-value work of the parts that have some (see :meth:`ResizeNormalizeProcessor.prepare`)."""
        out = {}
        for part in self.parts.values():
            if callable(getattr(part, "prepare", None)):
                out.update(part.prepare({m: columns[m] for m in part.modalities}))
        return out

    def lengths(self, columns: Mapping[str, List[Any]]) -> Optional[np.ndarray]:
        """The padded positions of the parts that pad (see :meth:`TextProcessor.lengths`), added up."""
        counts = [part.lengths({m: columns[m] for m in part.modalities})
                  for part in self.parts.values() if callable(getattr(part, "lengths", None))]
        counts = [c for c in counts if c is not None]
        return sum(counts) if counts else None

    def tokens(self, columns: Mapping[str, List[Any]]) -> Optional[TokenParts]:
        """The kept tokens of the parts that count (see :meth:`TextProcessor.tokens`); None unless each keeps them."""
        counting = {n: p for n, p in self.parts.items() if callable(getattr(p, "lengths", None))}
        if not counting or not all(callable(getattr(p, "tokens", None)) for p in counting.values()):
            return None
        kept = {n: p.tokens({m: columns[m] for m in p.modalities}) for n, p in counting.items()}
        return None if any(t is None for t in kept.values()) else TokenParts(kept)

    def pad(self, tokens: TokenParts, rows: Sequence[int], columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        """The batch :meth:`__call__` makes of ``columns`` (the values at ``rows``): the parts with kept tokens pad
        them, the others process their columns."""
        out: Dict[str, torch.Tensor] = {}
        for name, part in self.parts.items():
            if name in tokens.parts:
                out.update(part.pad(tokens.parts[name], rows))
            else:
                out.update(part({m: columns[m] for m in part.modalities}))
        return out

    def save(self, folder: Path) -> None:
        for name, part in self.parts.items():
            part.save(folder / name)
        _write_meta(folder, "joint", parts=list(self.parts))

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "JointProcessor":
        return cls({name: load_processor(folder / name) for name in meta["parts"]})


_KINDS = {
    "text": TextProcessor,
    "hf_image": HFImageProcessor,
    "resize_normalize": ResizeNormalizeProcessor,
    "joint": JointProcessor,
}


def _write_meta(folder: Path, kind: str, **fields: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _META).write_text(json.dumps({"kind": kind, **fields}, indent=2))


def load_processor(folder: Path):
    """Load a processor saved with ``.save(folder)``. Raises FileNotFoundError naming the folder."""
    meta_path = Path(folder) / _META
    if not meta_path.is_file():
        raise FileNotFoundError(f"no saved processor in {str(folder)!r} ({_META} missing)")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] not in _KINDS:
        raise ValueError(f"processor in {str(folder)!r} is of kind {meta['kind']!r}; this mmtune reads "
                         f"{', '.join(_KINDS)}")
    return _KINDS[meta["kind"]].load(Path(folder), meta)


def register_kind(kind: str, cls) -> None:
    """Make ``load_processor`` read processors saved with ``kind`` (modules of other modalities register theirs)."""
    _KINDS[kind] = cls
