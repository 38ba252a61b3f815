"""The embedding cache: frozen encoders' outputs computed once per dataset and checkpoint.

With ``finetune.type: frozen`` nothing in an encoder changes during training, so its outputs
for a given row never change either. They are computed once (on the training device), stored under
``cache_dir`` in a folder whose name is a hash of everything they depend on — the encoder's config entry,
its weights, its architecture config and processor files, every file of a local checkpoint folder,
and every row's values (for images: the bytes of the file) — and every training epoch reads them
instead of decoding and encoding again. A changed image, checkpoint file or processor changes the
hash: the stale entry is simply never read again.

An entry is written in shards of :data:`SHARD_ROWS` rows (``.npy`` files; token sequences in float16 unless
``finetune.cache_dtype: float32``) while the encoder runs, and read memory-mapped: a batch reads only its
rows, so neither computing nor training holds the whole table's outputs in memory.
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
        entry, digests = modality_of(modality), {}
        for v in ds.cells(modality):
            if entry.is_blank(v):
                h.update(b"\x00missing")
            elif entry.files and isinstance(v, str):  # a file named by several rows is read once
                if v not in digests:
                    if len(digests) > 100_000:
                        digests.clear()
                    digests[v] = entry.digest(v, ds.base_dir)
                h.update(digests[v])
            else:
                h.update(entry.digest(v, ds.base_dir))
            h.update(b"\x1f")
    return h.hexdigest()


SHARD_ROWS = 8192
"""Rows per shard file of a cache entry."""


def _map_npy(path: Path):
    """A ``.npy`` file memory-mapped read-only: ``(array, mmap)``."""
    import mmap

    import numpy as np

    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    count = int(np.prod(shape)) if shape else 1
    array = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    return array, mm


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


class Stored:
    """One cached field (``pooled``, ``tokens`` or ``mask``) of every row: ``.npy`` shard files read
    memory-mapped, so only the rows a batch asks for are read. The mapped pages read are handed back every
    :attr:`RELEASE_BYTES` read (``madvise(MADV_DONTNEED)``; the OS keeps them in its file cache for the next
    epoch), so resident memory stays flat as rows grow. Token shards are padded to their own longest sequence;
    :meth:`take` pads a batch to its longest."""

    def __init__(self, paths: List[Path]):
        import numpy as np

        self.paths = [Path(p) for p in paths]
        self.arrays, self.maps = [list(x) for x in zip(*(_map_npy(p) for p in self.paths))]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        widths = {a.shape[1:] for a in self.arrays}
        self.padded = len(widths) > 1  # token shards of different lengths
        first = self.arrays[0]
        rest = ((max(a.shape[1] for a in self.arrays),) + tuple(first.shape[2:])) if first.ndim > 1 else ()
        self.shape = (int(self.offsets[-1]),) + rest
        self.stored_dtype = first.dtype
        self._touched, self._read = set(), 0

    def __getstate__(self):  # a copy in another process maps the same files
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    RELEASE_BYTES = 32 << 20
    """Mapped pages are handed back each time about this many bytes were mapped in (rows read, each at least a
    page): less often costs less time."""

    def _release(self, shards, nbytes: int) -> None:
        import mmap

        self._touched.update(int(s) for s in shards)
        self._read += nbytes
        if self._read >= self.RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            for s in self._touched:
                self.maps[s].madvise(mmap.MADV_DONTNEED)
            self._touched, self._read = set(), 0

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as a tensor (float32, or bool for masks), in the order asked."""
        import numpy as np

        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        parts, order = [], []
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            parts.append(np.asarray(self.arrays[s][np.sort(idx[sel] - self.offsets[s])]))
            order.append(sel[np.argsort(idx[sel], kind="stable")])
        if len(parts) > 1 and self.padded:
            longest = max(p.shape[1] for p in parts)
            parts = [np.pad(p, [(0, 0), (0, longest - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts]
        out = np.empty((len(idx),) + parts[0].shape[1:], dtype=parts[0].dtype)
        out[np.concatenate(order)] = np.concatenate(parts)
        row_bytes = out.nbytes // max(1, len(idx))
        self._release(np.unique(which), len(idx) * max(row_bytes, mmap_page()))
        t = torch.from_numpy(out)
        return t if t.dtype == torch.bool else t.float()

    def full(self) -> torch.Tensor:
        return self.take(torch.arange(len(self)))


def as_tensor(x) -> torch.Tensor:
    """A cached field as one in-memory tensor (what the probe, stacking and synthesis read)."""
    return x.full() if isinstance(x, Stored) else x


def take(x, idx: torch.Tensor) -> torch.Tensor:
    return x.take(idx) if isinstance(x, Stored) else x.index_select(0, idx)


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


def as_encoder_outputs(encoded: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, EncoderOutput]:
    return {k: EncoderOutput(d["pooled"], d.get("tokens"), d.get("mask")) for k, d in encoded.items()}
