"""The embedding cache: frozen encoders' outputs computed once per dataset and checkpoint.

With ``finetune.type: frozen`` nothing in an encoder changes during training, so its outputs
for a given row never change either. They are computed once, stored under ``cache_dir`` in a
safetensors file whose name is a hash of everything they depend on — the encoder's config entry,
its weights, its architecture config and processor files, every file of a local checkpoint folder,
and every row's values (for images: the bytes of the file) — and every training epoch reads them
instead of decoding and encoding again. A changed image, checkpoint file or processor changes the
hash: the stale entry is simply never read again.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.collate import Collator
from ..data.dataset import MultimodalDataset
from ..modalities import modality_of
from ..encoders.base import EncoderOutput
from ..io import atomic_write_with


def cache_folder(cfg) -> Path:
    """Where a config's embedding cache lives: ``finetune.cache_dir``, else ``<output_dir>/.cache``."""
    return Path(cfg.finetune.cache_dir or Path(cfg.output_dir) / ".cache")


def file_digest(path: Path) -> bytes:
    """A fast content hash (BLAKE2b) of one file, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


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
    (image files by their contents)."""
    h = hashlib.sha256()
    for modality, _ in ds.columns:
        if modalities is not None and modality not in modalities:
            continue
        h.update(modality.encode())
        for v in ds._values[modality]:
            entry = modality_of(modality)
            h.update(b"\x00missing" if entry.is_blank(v) else entry.digest(v, ds.base_dir))
            h.update(b"\x1f")
    return h.hexdigest()


@torch.inference_mode()
def compute_outputs(enc, ds: MultimodalDataset, batch_size: int, with_tokens: bool, device="cpu") -> Dict[str, Dict[str, torch.Tensor]]:
    """Run ``enc`` (eval mode) over every row of ``ds``. Returns ``{sub-key: {"pooled", "tokens", "mask"}}``;
    tokens are padded to the longest sequence with ``mask`` False (only when ``with_tokens``)."""
    collate = Collator({"e": enc.processor}, list(enc.processor.modalities))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    was_training = enc.training
    enc.eval()
    parts: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    try:
        for batch in loader:
            out = enc(**{k: v.to(device) for k, v in batch["inputs"]["e"].items()})
            outs = {"": out} if isinstance(out, EncoderOutput) else out
            for sub, o in outs.items():
                d = parts.setdefault(sub, {"pooled": [], "tokens": [], "mask": []})
                d["pooled"].append(o.pooled.float().cpu())
                if with_tokens and o.tokens is not None:
                    d["tokens"].append(o.tokens.float().cpu())
                    m = o.mask if o.mask is not None else torch.ones(o.tokens.shape[:2], dtype=torch.bool)
                    d["mask"].append(m.bool().cpu())
    finally:
        enc.train(was_training)
    result = {}
    for sub, d in parts.items():
        entry = {"pooled": torch.cat(d["pooled"])}
        if d["tokens"]:
            t_max = max(t.shape[1] for t in d["tokens"])
            entry["tokens"] = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, t_max - t.shape[1])) for t in d["tokens"]])
            entry["mask"] = torch.cat([torch.nn.functional.pad(m, (0, t_max - m.shape[1]), value=False) for m in d["mask"]])
        result[sub] = entry
    return result


def cached_outputs(name: str, enc, spec_json: Dict[str, Any], ds: MultimodalDataset, cache_dir: Path,
                   batch_size: int, with_tokens: bool, fingerprint: Optional[str] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """The encoder's outputs for ``ds``, from ``cache_dir`` when an entry with the same hash exists,
    else computed and stored (atomically) first."""
    from safetensors.torch import load_file, save_file

    fp = fingerprint or encoder_fingerprint(enc, spec_json)
    rows = rows_fingerprint(ds, enc.processor.modalities)
    key = hashlib.sha256(f"{fp}|{rows}|tokens={with_tokens}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}-{key}.safetensors"
    if path.is_file():
        flat = load_file(str(path))
    else:
        outs = compute_outputs(enc, ds, batch_size, with_tokens)
        flat = {f"{sub}::{k}": v.contiguous() for sub, d in outs.items() for k, v in d.items()}
        atomic_write_with(path, lambda tmp: save_file(flat, str(tmp)))
    result: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        sub, field = k.split("::")
        result.setdefault(sub, {})[field] = v
    return result


class CachedDataset(Dataset):
    """Rows as cached encoder outputs plus present-masks and labels. ``__getitems__`` builds a whole
    batch by indexing the stored tensors (no per-row stacking)."""

    def __init__(self, outputs: Dict[str, Dict[str, torch.Tensor]], present: Dict[str, torch.Tensor],
                 labels: Dict[str, List[Any]], weights: Optional[torch.Tensor] = None):
        self.outputs = outputs
        self.present = present
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.synthetic = None  # set when synthetic rows were appended
        self.labels = {t: torch.tensor(v, dtype=torch.float32 if v and isinstance(v[0], (list, float)) else torch.long)
                       for t, v in labels.items()}
        self.n = len(next(iter(present.values()))) if present else len(next(iter(outputs.values()))["pooled"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: List[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {
            "encoded": {k: {f: v.index_select(0, idx) for f, v in d.items()} for k, d in self.outputs.items()},
            "present": {m: v.index_select(0, idx) for m, v in self.present.items()},
            "labels": {t: v.index_select(0, idx) for t, v in self.labels.items()},
            "index": idx,
        }
        if self.weights is not None:
            batch["weights"] = self.weights.index_select(0, idx)
        return batch


def first(batch):
    """collate_fn for CachedDataset: the batch is already built."""
    return batch


def present_masks(ds: MultimodalDataset, modalities) -> Dict[str, torch.Tensor]:
    out = {}
    for m in sorted(modalities):
        vals = ds._values.get(m)
        out[m] = torch.tensor([not modality_of(m).is_blank(v) for v in vals], dtype=torch.bool)
    return out


def build_cached_dataset(model, encoder_specs: Dict[str, Dict[str, Any]], ds: MultimodalDataset, modalities,
                         cache_dir: Path, batch_size: int, fingerprints: Optional[Dict[str, str]] = None) -> CachedDataset:
    """A :class:`CachedDataset` for ``ds`` with every encoder of ``model`` (keys as the model names its outputs)."""
    with_tokens = bool(getattr(model.fusion, "reads_tokens", False))
    outputs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, enc in model.encoders.items():
        per_sub = cached_outputs(name, enc, encoder_specs[name], ds, cache_dir, batch_size, with_tokens,
                                 (fingerprints or {}).get(name))
        for sub, d in per_sub.items():
            outputs[f"{name}.{sub}" if sub else name] = d
    return CachedDataset(outputs, present_masks(ds, modalities), ds.labels, ds.weights)


def as_encoder_outputs(encoded: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, EncoderOutput]:
    return {k: EncoderOutput(d["pooled"], d.get("tokens"), d.get("mask")) for k, d in encoded.items()}
