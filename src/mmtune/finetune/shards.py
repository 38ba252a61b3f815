"""How an embedding-cache entry is stored: shards of :data:`SHARD_ROWS` rows as ``.npy`` files, written while the
encoder runs and read back a batch's rows at a time (:class:`Stored`), so neither computing nor training holds a
whole table's outputs in memory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import torch


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
