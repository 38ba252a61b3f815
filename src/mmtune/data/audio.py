"""Decoding audio files: one function for validation, training, prediction. soundfile decodes (wav, flac,
ogg, and mp3 where the installed libsndfile reads it), channels are mixed to mono, and resampling uses
soxr (a real band-limited resampler, not decimation)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

MAX_FILE_SECONDS = 600.0
"""A longer recording is a bad row (crop it, or split it into rows, first)."""


def _require(module: str):
    from ..extras import require

    return require(module, "audio", "audio columns")


def load_audio(path) -> Tuple[np.ndarray, int]:
    """The recording (a path, or a binary file object) as float32 mono in [-1, 1] and its sample rate."""
    sf = _require("soundfile")
    data, sr = sf.read(str(path) if isinstance(path, (str, Path)) else path, dtype="float32", always_2d=True)
    return data.mean(axis=1).astype(np.float32), int(sr)


def audio_problem(path: Path) -> str | None:
    """Why the file cannot be used (None when it can): absent, unreadable, empty, silent, too long."""
    if not path.is_file():
        return f"audio file {str(path)!r} does not exist"
    try:
        x, sr = load_audio(path)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError… for a bad file
        if type(exc).__name__ == "MissingExtraError":
            raise
        return f"audio file {str(path)!r} is not a readable recording ({type(exc).__name__}: {exc})"
    return clip_problem(x, sr, f"audio file {str(path)!r}")


def clip_problem(x: np.ndarray, sr: int, what: str) -> str | None:
    """Why a decoded recording cannot be used (None when it can): empty, too long, not finite, silent."""
    if len(x) == 0:
        return f"{what} is empty (0 samples)"
    if len(x) / sr > MAX_FILE_SECONDS:
        return f"{what} lasts {len(x) / sr:.0f} s, more than {MAX_FILE_SECONDS:.0f} s"
    if not np.isfinite(x).all():
        return f"{what} holds samples that are not finite numbers"
    if float(np.abs(x).max()) == 0.0:
        return f"{what} is silent (every sample is 0)"
    return None


def resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return x
    return _require("soxr").resample(x, sr, target).astype(np.float32)


def fit_length(x: np.ndarray, n: int, start: int | None = None) -> np.ndarray:
    """Exactly ``n`` samples: a window from ``start`` (default: the centre) of a longer recording, or the
    recording followed by zeros."""
    if len(x) > n:
        s = (len(x) - n) // 2 if start is None else min(max(0, start), len(x) - n)
        return x[s:s + n]
    return np.pad(x, (0, n - len(x))) if len(x) < n else x
