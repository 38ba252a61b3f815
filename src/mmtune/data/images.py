"""Decoding image files to RGB: one function for validation, training, prediction and the report.

A file is decoded to its last byte (``Image.load``), so a truncated or corrupt file fails here, at validation,
with its row number — never mid-epoch; a large JPEG may be decoded at a reduced scale (``draft``).
High-bit-depth greyscale images (16-bit, 12-bit stored in 16 bits, 32-bit integer, float) are scaled to 8 bits
instead of clipped: ``convert("RGB")`` would clip every value above 255 to white.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional

import numpy as np

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(im):
    """An RGB PIL image from any mode. Integer greyscale is divided by the smallest full scale that holds
    its maximum — 255 (mode ``I`` only), 4095 (12-bit data in 16 bits), 65535 — then scaled to 0-255;
    float images by 1 when they lie in [0, 1], else by their maximum."""
    from PIL import Image

    if im.mode not in _HIGH_BIT_MODES:
        return im.convert("RGB")
    a = np.asarray(im, dtype=np.float64)
    top = float(a.max()) if a.size else 1.0
    if im.mode == "F":
        scale = 1.0 if top <= 1.0 else top
    else:
        scales = ([255.0] if im.mode == "I" else []) + [4095.0, 65535.0]
        scale = next((s for s in scales if top <= s), top)
    a = np.clip(a / max(scale, 1e-12), 0.0, 1.0) * 255.0
    return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")


# EXIF orientation -> the transpose that turns the stored pixels upright (as Pillow's ``ImageOps.exif_transpose``)
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
            7: "TRANSVERSE", 8: "ROTATE_90"}


def orientation(im) -> int:
    """The image's EXIF orientation (1-8; 1, upright, when it has none or its EXIF does not parse)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block says nothing about the pixels: they are read as stored
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def load_image(path, draft: Optional[int] = None, orient: bool = False):
    """Decode an image file (a path or a binary file object) completely to RGB. Raises OSError / ValueError for an
    unreadable, truncated or corrupt file (Pillow's own messages), and Pillow's DecompressionBombError for an
    oversized one.

    ``draft``: a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 of its size (libjpeg's DCT scaling) whose
    sides are both still at least ``draft`` pixels. Every byte of the file is still decoded, so a truncated or
    corrupt file fails as it does in full; other formats are decoded in full.

    ``orient``: the picture turned upright as its EXIF orientation says (a phone photograph taken upright is often
    stored sideways with a tag saying so), as viewers show it."""
    from PIL import Image

    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            im.draft(None, (int(draft), int(draft)))
        im.load()
        turn = _UPRIGHT.get(orientation(im)) if orient else None
        rgb = to_rgb(im)
    return rgb.transpose(getattr(Image.Transpose, turn)) if turn else rgb


def inline_png(png: bytes, alt: str) -> str:
    """An ``<img>`` tag holding a PNG inline (base64): pages that open offline."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def thumbnail(path: Optional[str], side: int = 96) -> str:
    """An image file as an inlined PNG thumbnail (or a note when it is gone or unreadable)."""
    if not isinstance(path, str) or not Path(path).is_file():
        return "<em>no image</em>"
    try:
        im = load_image(Path(path), draft=2 * side, orient=True)  # shown upright, as a viewer shows it
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return inline_png(buf.getvalue(), Path(path).name)
    except (OSError, ValueError):  # a file changed since training shows as unreadable; the report still builds
        return "<em>unreadable image</em>"
