"""The run bundle: everything needed to reload a fine-tuned model with no network.

``runs/<name>/`` holds config.yaml (fully resolved), model.safetensors, encoders/<name>/
(architecture config and processor per encoder), labels.json, metrics.json, logs/,
checkpoints/, rejected_rows.csv (when rows were skipped) and, written last, bundle.json. A
folder without bundle.json is an unfinished run, never mistaken for a complete one.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import pandas as pd

from .io import atomic_write_dir, atomic_write_json, atomic_write_text, atomic_write_with, fsync_dir

MARKER = "bundle.json"
FORMAT = 1
READABLE_FORMATS = (1,)


def write_bundle(run_dir: Path, config, model, tasks, metrics: Dict[str, Any],
                 rejected: Optional[pd.DataFrame] = None, predictions: Optional[Dict[str, pd.DataFrame]] = None,
                 before_marker=None) -> Path:
    """Write every bundle file atomically, then run ``before_marker`` (the report), then bundle.json
    last. Returns ``run_dir``."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    (run_dir / MARKER).unlink(missing_ok=True)  # the folder is incomplete until rewritten
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    for name, enc in model.encoders.items():
        atomic_write_dir(run_dir / "encoders" / name, enc.save_parts)
    atomic_write_with(run_dir / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
    atomic_write_json(run_dir / "labels.json", {"tasks": [t.to_json() for t in tasks]})
    atomic_write_json(run_dir / "metrics.json", metrics)
    files = ["config.yaml", "model.safetensors", "labels.json", "metrics.json", "encoders"]
    for split, table in (predictions or {}).items():
        atomic_write_with(run_dir / "predictions" / f"{split}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
        files.append(f"predictions/{split}.csv")
    if rejected is not None and len(rejected):
        atomic_write_with(run_dir / "rejected_rows.csv", lambda tmp: rejected.to_csv(tmp, index=False))
        files.append("rejected_rows.csv")
    if before_marker is not None:
        before_marker()
        files.append("report.html")
    from . import __version__

    fsync_dir(run_dir)
    atomic_write_json(run_dir / MARKER, {
        "format": FORMAT,
        "mmtune_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    })
    return run_dir


def check_bundle(run_dir: Path) -> Dict[str, Any]:
    """Return bundle.json's content; raise FileNotFoundError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    marker = run_dir / MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a complete run bundle ({MARKER} missing): the run did not finish. "
            "Resume it with `mmtune fit CONFIG --resume`."
        )
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        raise ValueError(f"{str(marker)!r} is not valid JSON: the bundle is damaged") from None
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"run bundle {str(run_dir)!r} has format version {meta.get('format')!r}; this mmtune reads "
                         f"format {', '.join(map(str, READABLE_FORMATS))}. Use the mmtune version that wrote it "
                         f"({meta.get('mmtune_version', 'unknown')}).")
    for f in meta.get("files", []):
        if f == "report.html":
            continue  # regenerable with `mmtune report`
        if not (run_dir / f).exists():
            raise FileNotFoundError(f"run bundle {str(run_dir)!r} lacks {f!r}")
    return meta


# ---------------------------------------------------------------------------------------------
# the run folder: claimed before any work, replaced only when the new run is complete


class RunInUseError(FileExistsError):
    """Another process holds the run folder (a FileExistsError: the name is taken, for now)."""


class RunClaim:
    """Exclusive use of ``output_dir/name`` for one fit, from before any work until the bundle is written.

    A lock (``fcntl.flock`` on ``output_dir/.<name>.lock``, released by the OS if the process dies) keeps a
    second fit of the same name out with a one-line error. ``work_dir`` is where the run is written: the run
    folder itself for a new or resumed run, or — with ``overwrite`` — a staging folder beside it
    (``.<name>.overwrite``) that replaces the old run only at :meth:`commit`, once it is complete; a failed or
    killed overwrite leaves the old run as it was.
    """

    def __init__(self, run_dir: Path, resume: bool = False, overwrite: bool = False):
        self.run_dir = Path(run_dir)
        self.resume, self.overwrite = resume, overwrite
        self.work_dir = self.run_dir
        self._fd: Optional[int] = None
        self._staging: Optional[Path] = None

    def __enter__(self) -> "RunClaim":
        parent = self.run_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._lock(parent / f".{self.run_dir.name}.lock")
        try:
            self._decide()
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self, path: Path) -> None:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(f"run folder {str(self.run_dir)!r} is in use by another mmtune process (pid {holder}); "
                                "wait for it to finish, or choose another name (--set name=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def _decide(self) -> None:
        run_dir = self.run_dir
        last = run_dir / "checkpoints" / "last.ckpt"
        taken = run_dir.exists() and any(run_dir.iterdir())
        if taken and self.overwrite:
            self._staging = run_dir.parent / f".{run_dir.name}.overwrite"
            shutil.rmtree(self._staging, ignore_errors=True)  # left by a killed overwrite; we hold the lock
            self._staging.mkdir()
            self.work_dir = self._staging
            self.resume = False
        elif taken and self.resume:
            if not last.is_file():
                raise FileNotFoundError(f"cannot resume: {str(last)!r} does not exist")
        elif taken:
            state = "a finished run" if (run_dir / MARKER).is_file() else "an unfinished run"
            raise FileExistsError(
                f"{str(run_dir)!r} already holds {state}: pass --resume to continue it, --overwrite to replace it, "
                "or choose another name (--set name=...).")
        elif self.resume:
            raise FileNotFoundError(f"cannot resume: {str(run_dir)!r} holds no run")
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def commit(self) -> Path:
        """With ``overwrite``: swap the complete new run in place of the old one (then delete the old).
        Returns the run folder."""
        if self._staging is not None:
            old = self.run_dir.parent / f".{self.run_dir.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.run_dir, old)
            os.replace(self._staging, self.run_dir)
            fsync_dir(self.run_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
            self._staging = None
        return self.run_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._staging is not None:  # an overwrite that did not finish: the old run stays
                shutil.rmtree(self._staging, ignore_errors=True)
        finally:
            self._unlock()
