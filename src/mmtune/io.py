"""Atomic file writes: a crash never leaves a half-written file under its final name.

Every writer goes through a temporary file in the same folder, fsynced, renamed onto the final name,
and the folder fsynced: after a crash (or power loss, on a file system that honours fsync) a reader
sees the old file or the complete new one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def check_output(path: str | os.PathLike, *, inputs: Optional[dict] = None, kind: str = "file",
                 example: str = "out.csv", replaces: str = "") -> Path:
    """The one check every command makes of where it writes, before any work: ``path`` is not one of the
    ``inputs`` (``{what they are: [paths]}``) nor a folder holding one (for a folder output), a file output is not a
    folder and a folder output not a file, and its parent folder exists. ``replaces``: a marker file whose
    presence makes an existing, non-empty output folder something the command may replace whole (an export bundle);
    without one, such a folder is refused. ValueError naming ``--out`` otherwise."""
    path = Path(path)
    target = path.resolve()
    for what, paths in (inputs or {}).items():
        for p in paths:
            if p is None or not Path(p).exists():
                continue
            src = Path(p).resolve()
            if target == src or (kind == "folder" and target in src.parents):
                holds = "is" if target == src else "holds"
                raise ValueError(f"--out {str(path)!r} {holds} the {what}: the output would replace it; write it "
                                 "somewhere else")
    if kind == "file" and path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder; give a file name such as {str(path / example)!r}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file; give a folder")
    if kind == "folder" and replaces and path.is_dir() and any(path.iterdir()) and not (path / replaces).is_file():
        raise ValueError(f"--out {str(path)!r} holds files and is not what this command writes ({replaces} missing): "
                         "it would be replaced whole; give a new or empty folder")
    if not path.parent.is_dir():
        raise ValueError(f"--out {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read a megabyte at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Returns the final path. The rename is atomic on POSIX file systems, so readers see
    either the old file or the complete new one.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write_with(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Let ``writer`` write a file at a temporary path, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_dir(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Let ``writer`` fill a temporary folder, then swap it in place of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        writer(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync_file(path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Make a rename in ``path`` durable (POSIX: fsync the folder)."""
    _fsync_file(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def file_digest(path: Path) -> bytes:
    """A fast content hash (BLAKE2b) of one file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()
