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
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.collate import Collator
from ..data.dataset import MultimodalDataset
from ..modalities import modality_of, once_per_file
from ..encoders.base import EncoderOutput
from ..io import file_digest


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
    (image files by their contents)."""
    h = hashlib.sha256()
    for modality, _ in ds.columns:
        if modalities is not None and modality not in modalities:
            continue
        h.update(modality.encode())
        entry, digests = modality_of(modality), {}
        for v in ds.cells(modality):
            h.update(b"\x00missing" if entry.is_blank(v) else
                     once_per_file(digests, entry, v, lambda: entry.digest(v, ds.base_dir)))
            h.update(b"\x1f")
    return h.hexdigest()


SHARD_ROWS = 8192
"""Rows per shard file of a cache entry."""


class _Files:
    """Read-only file descriptors by path, about :attr:`LIMIT` open at most (the least recently used closed
    first), so that a cache of many shards never runs out of descriptors."""

    LIMIT = 256

    def __init__(self):
        from collections import OrderedDict

        self.open: "OrderedDict[str, int]" = OrderedDict()
        self.pid = os.getpid()

    def hold(self, paths: List[str]) -> Dict[str, int]:
        """Descriptors for ``paths``, all open until the next call (only others are closed to make room)."""
        if self.pid != os.getpid():  # a forked process opens its own
            self.open.clear()
            self.pid = os.getpid()
        out = {}
        for key in paths:
            if key in self.open:
                self.open.move_to_end(key)
            else:
                self.open[key] = os.open(key, os.O_RDONLY)
            out[key] = self.open[key]
        while len(self.open) > max(self.LIMIT, len(out)):
            key, fd = next(iter(self.open.items()))
            if key in out:
                break
            del self.open[key]
            os.close(fd)
        return out


_FILES = _Files()


def _npy_layout(path: Path):
    """``(data offset, shape, dtype)`` of a C-ordered ``.npy`` file of numbers (ValueError naming it otherwise)."""
    import numpy as np

    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype.hasobject:
            raise ValueError(f"cache shard {str(path)!r} is not a C-ordered array of numbers")
        return fh.tell(), tuple(shape), dtype


class Stored:
    """One cached field (``pooled``, ``tokens`` or ``mask``) of every row, in ``.npy`` shard files. A batch reads
    only its own rows, with positioned reads (``preadv``, one per run of consecutive rows) straight into the
    batch's array: nothing of the files is held or mapped in the process, so resident memory stays flat as rows
    grow, and the OS file cache keeps the shards for the next epoch. Token shards are padded to their own longest
    sequence; :meth:`take` pads a batch to its longest."""

    def __init__(self, paths: List[Path]):
        import numpy as np

        self.paths = [Path(p) for p in paths]
        self.keys = [str(p) for p in self.paths]
        self.layouts = [_npy_layout(p) for p in self.paths]
        self.offsets = np.cumsum([0] + [shape[0] for _, shape, _ in self.layouts])
        self.padded = len({shape[1:] for _, shape, _ in self.layouts}) > 1  # token shards of different lengths
        first = self.layouts[0][1]
        rest = ((max(shape[1] for _, shape, _ in self.layouts),) + tuple(first[2:])) if len(first) > 1 else ()
        self.shape = (int(self.offsets[-1]),) + rest
        self.stored_dtype = self.layouts[0][2]
        self.row_bytes = [int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize for _, shape, dtype in self.layouts]

    def __getstate__(self):  # a copy in another process reads the same files
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as a tensor (float32, or bool for masks), in the order asked; token rows padded to the
        longest among the shards they come from."""
        import numpy as np

        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        ascending = idx[order]
        which = np.searchsorted(self.offsets, ascending, side="right") - 1
        touched = np.unique(which)
        dtypes = {self.layouts[s][2] for s in touched} or {self.stored_dtype}
        dtype = np.result_type(*dtypes)
        row_shape = self.shape[1:]
        if self.padded and len(touched):
            row_shape = (max(self.layouts[s][1][1] for s in touched),) + self.shape[2:]
        rows = np.zeros((len(idx),) + row_shape, dtype=dtype)
        if len(dtypes) == 1:
            self._read_into(rows, ascending - self.offsets[which], which)
        else:  # shards stored in different precisions (float16 and float32 tokens): each read, then cast
            for s in touched:
                sel = np.nonzero(which == s)[0]
                part = np.zeros((len(sel),) + row_shape, dtype=self.layouts[s][2])
                self._read_into(part, ascending[sel] - self.offsets[s], which[sel])
                rows[sel] = part
        out = np.empty_like(rows)
        out[order] = rows
        t = torch.from_numpy(out)
        return t if t.dtype == torch.bool else t.float()

    def _read_into(self, rows, local, which) -> None:
        """Fill ``rows`` (row-major, each at least as wide as its stored row) from the shard rows ``local`` of shards
        ``which`` (both ascending together): one positioned read per run of consecutive rows of one shard."""
        import numpy as np

        n = len(rows)
        if not n:
            return
        flat = memoryview(rows.reshape(-1).view(np.uint8))
        width = flat.nbytes // n  # bytes of one (padded) row of ``rows``
        cuts = np.nonzero((np.diff(local) != 1) | (np.diff(which) != 0))[0] + 1
        fds = _FILES.hold([self.keys[s] for s in np.unique(which).tolist()])
        for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [n]]).tolist()):
            shard = int(which[a])
            row_bytes = self.row_bytes[shard]
            if row_bytes == 0:
                continue
            fd, at = fds[self.keys[shard]], self.layouts[shard][0] + int(local[a]) * row_bytes
            if row_bytes == width:  # whole rows: one buffer for the run
                parts = [([flat[a * width:b * width]], (b - a) * row_bytes)]
            else:  # narrower stored rows: each into the start of its (padded) row, at most IOV_MAX per call
                parts = [([flat[i * width:i * width + row_bytes] for i in range(k, min(k + 1024, b))],
                          (min(k + 1024, b) - k) * row_bytes) for k in range(a, b, 1024)]
            for buffers, want in parts:
                if os.preadv(fd, buffers, at) != want:
                    raise ValueError(f"cache shard {str(self.paths[shard])!r} is shorter than its header says")
                at += want

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


def batch_encoded(batch: Dict[str, Any]) -> Optional[Dict[str, EncoderOutput]]:
    """A batch's cached encoder outputs (a batch of the embedding cache), or None for a batch of raw inputs that
    the encoders must run on."""
    encoded = batch.get("encoded")
    return as_encoder_outputs(encoded) if encoded is not None else None
