"""What an embedding-cache entry depends on, as hashes: the encoder (its config entry, weights, architecture and
processor files, a local checkpoint's every file) and the rows (every value; for files, their bytes). A change to
any of them changes the entry's folder name, so a stale entry is never read."""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from ..data.dataset import MultimodalDataset
from ..io import file_digest
from ..modalities import modality_of, once_per_file


def cache_folder(cfg) -> Path:
    """Where a config's embedding cache lives: ``finetune.cache_dir``, else ``<output_dir>/.cache``."""
    return Path(cfg.finetune.cache_dir or Path(cfg.output_dir) / ".cache")


def _hash_file_tree(folder: Path, h) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(file_digest(p))


def encoder_fingerprint(enc, spec_json: Dict[str, Any]) -> str:
    """Hash of an encoder's config entry, weights, saved parts (its architecture ``config.json`` and
    processor files) and, when the checkpoint is a local folder, every file in it."""
    h = hashlib.sha256()
    h.update(json.dumps(spec_json, sort_keys=True).encode())
    for k, v in sorted(enc.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    with tempfile.TemporaryDirectory() as tmp:
        enc.save_parts(Path(tmp))
        _hash_file_tree(Path(tmp), h)
    checkpoint = Path(str(spec_json.get("checkpoint", "")))
    if checkpoint.is_dir():
        _hash_file_tree(checkpoint, h)
    return h.hexdigest()


def rows_fingerprint(ds: MultimodalDataset, modalities=None) -> str:
    """Hash of the rows' input values (of ``modalities``, default all), each as its modality digests it
    (image files by their contents), and how the dataset reads each modality's files (``reads``: a JPEG decoded
    smaller, or turned upright, gives other pixels)."""
    h = hashlib.sha256()
    reads = getattr(ds, "reads", None) or {}
    for modality, _ in ds.columns:
        if modalities is not None and modality not in modalities:
            continue
        h.update(modality.encode())
        if reads.get(modality):
            h.update(("\x00" + repr(sorted(reads[modality].items()))).encode())
        entry, digests = modality_of(modality), {}
        for v in ds.cells(modality):
            h.update(b"\x00missing" if entry.is_blank(v) else
                     once_per_file(digests, entry, v, lambda: entry.digest(v, ds.base_dir)))
            h.update(b"\x1f")
    return h.hexdigest()
