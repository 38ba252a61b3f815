"""The embedding cache: frozen encoders' outputs computed once per dataset and checkpoint.

With ``finetune.type: frozen`` nothing in an encoder changes during training, so its outputs
for a given row never change either. They are computed once (on the training device), stored under
``cache_dir`` in a folder whose name is a hash of everything they depend on — the encoder's config entry,
its weights, its architecture config and processor files, every file of a local checkpoint folder,
and every row's values (for images: the bytes of the file) — and every training epoch reads them
instead of decoding and encoding again. A changed image, checkpoint file or processor changes the
hash: the stale entry is simply never read again.

An entry is written in shards of :data:`SHARD_ROWS` rows (``.npy`` files; token sequences in float16 unless
``finetune.cache_dtype: float32``) while the encoder runs, and a batch reads only its own rows from them
(:class:`Stored`), so neither computing nor training holds the whole table's outputs in memory.

By job: the hashes an entry's folder is named by are :mod:`.fingerprints`, the shard storage is :mod:`.shards`;
this module computes entries and serves them as a dataset.
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
from .fingerprints import encoder_fingerprint, rows_fingerprint
from .shards import SHARD_ROWS, Stored, take


@torch.inference_mode()
def compute_outputs(enc, ds: MultimodalDataset, batch_size: int, with_tokens: bool, folder: Path,
                    device="cpu", token_dtype: str = "float16", shard_rows: int = SHARD_ROWS) -> Dict[str, Any]:
    """Run ``enc`` (eval mode, on ``device``) over every row of ``ds``, writing the outputs into ``folder`` as
    shards of ``shard_rows`` rows: ``{sub-key}__{pooled|tokens|mask}.{k}.npy``. Tokens (only when
    ``with_tokens``) are stored as ``token_dtype`` — float16 unless a value would not fit, then float32 — and
    ``mask`` marks the real ones. Returns the entry's index (also written as ``index.json``)."""
    import numpy as np

    collate = Collator({"e": enc.processor}, list(enc.processor.modalities))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    was_training = enc.training
    enc.eval()
    pending: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    files: Dict[str, List[str]] = {}
    rows = 0

    def flush(final: bool) -> None:
        for sub, d in pending.items():
            n = sum(len(t) for t in d["pooled"])
            if not n or (n < shard_rows and not final):
                continue
            fields = {"pooled": torch.cat(d["pooled"])}
            if d["tokens"]:
                longest = max(t.shape[1] for t in d["tokens"])
                tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in d["tokens"]])
                small = token_dtype == "float16" and bool(tokens.abs().max() < 6.0e4)
                fields["tokens"] = tokens.half() if small else tokens
                fields["mask"] = torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[1]), value=False)
                                            for m in d["mask"]])
            for field, t in fields.items():
                key = f"{sub}__{field}"
                name = f"{key}.{len(files.get(key, []))}.npy"
                np.save(folder / name, t.numpy())
                files.setdefault(key, []).append(name)
            pending[sub] = {"pooled": [], "tokens": [], "mask": []}

    try:
        for batch in loader:
            out = enc(**{k: v.to(device) for k, v in batch["inputs"]["e"].items()})
            outs = {"": out} if isinstance(out, EncoderOutput) else out
            for sub, o in outs.items():
                d = pending.setdefault(sub, {"pooled": [], "tokens": [], "mask": []})
                d["pooled"].append(o.pooled.float().cpu())
                if with_tokens and o.tokens is not None:
                    d["tokens"].append(o.tokens.float().cpu())
                    m = o.mask if o.mask is not None else torch.ones(o.tokens.shape[:2], dtype=torch.bool)
                    d["mask"].append(m.bool().cpu())
            rows += len(next(iter(outs.values())).pooled)
            flush(False)
        flush(True)
    finally:
        enc.train(was_training)
    index = {"rows": rows, "files": files}
    (folder / "index.json").write_text(json.dumps(index))
    return index


def cached_outputs(name: str, enc, spec_json: Dict[str, Any], ds: MultimodalDataset, cache_dir: Path,
                   batch_size: int, with_tokens: bool, fingerprint: Optional[str] = None, device="cpu",
                   token_dtype: str = "float16") -> Dict[str, Dict[str, Stored]]:
    """The encoder's outputs for ``ds`` (``{sub-key: {field: Stored}}``), from ``cache_dir`` when an entry with
    the same hash exists, else computed on ``device`` and stored first (into a temporary folder renamed into
    place once complete, so a killed run never leaves a partial entry)."""
    import os
    import shutil

    fp = fingerprint or encoder_fingerprint(enc, spec_json)
    rows = rows_fingerprint(ds, enc.processor.modalities)
    kind = f"tokens={token_dtype}" if with_tokens else "pooled"
    key = hashlib.sha256(f"{fp}|{rows}|{kind}".encode()).hexdigest()[:24]
    folder = Path(cache_dir) / f"{name}-{key}.cache"
    if not (folder / "index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            moved = torch.device(device).type != "cpu" and next(enc.parameters(), torch.empty(0)).device.type == "cpu"
            if moved:
                enc.to(device)
            try:
                compute_outputs(enc, ds, batch_size, with_tokens, tmp, device, token_dtype)
            finally:
                if moved:
                    enc.to("cpu")
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same entry first: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    index = json.loads((folder / "index.json").read_text())
    result: Dict[str, Dict[str, Stored]] = {}
    for k, names in index["files"].items():
        sub, field = k.split("__")
        result.setdefault(sub, {})[field] = Stored([folder / n for n in names])
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
        self.labels = {t: _label_tensor(v) for t, v in labels.items()}
        self.n = len(next(iter(present.values()))) if present else len(next(iter(outputs.values()))["pooled"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: List[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {
            "encoded": {k: {f: take(v, idx) for f, v in d.items()} for k, d in self.outputs.items()},
            "present": {m: v.index_select(0, idx) for m, v in self.present.items()},
            "labels": {t: v.index_select(0, idx) for t, v in self.labels.items()},
            "index": idx,
        }
        if self.weights is not None:
            batch["weights"] = self.weights.index_select(0, idx)
        return batch


def _label_tensor(v) -> torch.Tensor:
    """Labels as a tensor: long class indices, or float32 multi-hot rows / regression targets."""
    if isinstance(v, torch.Tensor):
        return v
    import numpy as np

    a = np.asarray(v)
    return torch.as_tensor(a, dtype=torch.float32 if a.dtype.kind == "f" else torch.long)


def first(batch):
    """collate_fn for CachedDataset: the batch is already built."""
    return batch


def present_masks(ds: MultimodalDataset, modalities) -> Dict[str, torch.Tensor]:
    import numpy as np

    out = {}
    for m in sorted(modalities):
        entry = modality_of(m)
        out[m] = torch.from_numpy(np.fromiter((not entry.is_blank(v) for v in ds.cells(m)), dtype=bool, count=len(ds)))
    return out


def build_cached_dataset(model, encoder_specs: Dict[str, Dict[str, Any]], ds: MultimodalDataset, modalities,
                         cache_dir: Path, batch_size: int, fingerprints: Optional[Dict[str, str]] = None,
                         device="cpu", token_dtype: str = "float16") -> CachedDataset:
    """A :class:`CachedDataset` for ``ds`` with every encoder of ``model`` (keys as the model names its outputs),
    the encoders run on ``device`` when an entry is computed."""
    with_tokens = bool(getattr(model.fusion, "reads_tokens", False))
    outputs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, enc in model.encoders.items():
        per_sub = cached_outputs(name, enc, encoder_specs[name], ds, cache_dir, batch_size, with_tokens,
                                 (fingerprints or {}).get(name), device, token_dtype)
        for sub, d in per_sub.items():
            outputs[f"{name}.{sub}" if sub else name] = d
    return CachedDataset(outputs, present_masks(ds, modalities), ds.labels, ds.weights)
