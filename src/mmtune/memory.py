"""The C allocator told to keep freed memory for reuse (glibc on Linux), so that training and prediction at
realistic input sizes do not spend a third of their CPU time in the kernel.

Why: glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and returns
it with ``munmap`` when freed, and trims the top of its heap whenever 128 kB lie free there. A training step of
EfficientNet-Lite0 at 224 px allocates and frees activation and gradient buffers of tens of megabytes many times
over, so each step maps, zero-fills (one page fault per 4 kB page) and unmaps gigabytes: 5 million minor faults
and 14 s of system time in 4 steps of batch 32, against 23 s of user time (``bench/cpu.py``). Raising the
threshold cannot help, since these buffers are larger than its maximum. What does: no mmap for ordinary
allocations (``M_MMAP_MAX = 0``) and a trim threshold of 1 GiB (``M_TRIM_THRESHOLD``): freed buffers stay in the
heap and the next step reuses them, already mapped. Allocations that a secondary arena's heap cannot hold still
fall back to mmap inside glibc, so nothing fails for want of it. The numbers computed are the same to the bit
(only where memory comes from changes); the cost is a higher resident peak (about +20 % in that measurement),
since the heap keeps what it was given.

Applied once per process by the commands and entry points that run a model (the CLI, :func:`mmtune.fit`,
:func:`mmtune.tune`, :meth:`Predictor.load`). Other C libraries (musl, macOS, Windows) are left as they are.
``MMTUNE_KEEP_FREED_MEMORY=0`` turns it off."""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_BYTES = 1 << 30

_applied = None


def keep_freed_memory() -> bool:
    """Apply the settings above where glibc is the allocator (once; later calls return the first answer). Returns
    whether they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MMTUNE_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has mallopt but other semantics)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    return _applied
