"""The run bundle: everything needed to reload a fine-tuned model with no network.

``runs/<name>/`` holds config.yaml (fully resolved), model.safetensors, encoders/<name>/
(architecture config and processor per encoder), labels.json (tasks and classes), calibration.json
(temperatures and decision thresholds per task), metrics.json, logs/, checkpoints/, rejected_rows.csv
(when rows were skipped) and, written last, bundle.json — which lists every file of the bundle with its size
and SHA-256. A folder without bundle.json is an unfinished run, never mistaken for a complete one, and a
bundle whose files are missing or changed is refused with the file's name (a tokenizer that lost its
vocabulary would otherwise read every word as unknown, silently).

The bundle is the only contract between training and everything after it: :func:`read_bundle` returns
the typed config, tasks, calibration and (optionally) the model, for the Predictor, the report and
whatever comes later. Format 1 bundles (calibration inside labels.json, the config's earlier keys) and format 2
(files listed by name only) are read and upgraded; other formats are refused with their version. A format
is also recognised by the files it has, so an edited ``format`` is refused rather than read wrongly.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from .io import atomic_write_dir, atomic_write_json, atomic_write_text, atomic_write_with, fsync_dir, sha256_of

MARKER = "bundle.json"
FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
REGENERABLE = ("report.html",)
"""Bundle files listed without a hash: rebuilt by `mmtune report`, so they may change."""


class DamagedBundleError(ValueError):
    """A bundle (run or export) whose files are missing, changed or unreadable; the message names the file."""


def file_manifest(folder: Path, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for the files ``names`` (files, or folders: every file under them)."""
    folder = Path(folder)
    out: Dict[str, Dict[str, Any]] = {}
    for name in names:
        top = folder / name
        paths = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for p in paths:
            out[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
    return out


def verify_files(folder: Path, files: Any, what: str) -> None:
    """Check that every file of a manifest (:func:`file_manifest`) is there with its size and hash; a
    FileNotFoundError or DamagedBundleError names the first that is not. ``what`` names the bundle."""
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                              and isinstance(v.get("sha256"), str) for v in files.values()):
        raise DamagedBundleError(f"{what}: its list of files is damaged (expected {{path: {{bytes, sha256}}}}); "
                                 "copy the bundle again")
    folder = Path(folder)
    for rel, want in files.items():
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise DamagedBundleError(f"{what}: its list of files names {rel!r}, outside the bundle; copy the bundle again")
        if not path.is_file():
            raise FileNotFoundError(f"{what} lacks {rel!r}: copy the bundle again (or refit)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise DamagedBundleError(f"{what}: {rel!r} is damaged or was replaced ({size} bytes; the bundle wrote "
                                     f"{want['bytes']}); copy the bundle again (or refit)")
        if sha256_of(path) != want["sha256"]:
            raise DamagedBundleError(f"{what}: {rel!r} has changed since the bundle was written (its SHA-256 "
                                         "differs); copy the bundle again (or refit)")


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file of a bundle; DamagedBundleError naming it when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} lacks {Path(path).name!r}: copy the bundle again (or refit)") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DamagedBundleError(f"{str(path)!r} is damaged (not valid JSON: {str(exc).splitlines()[0][:120]}); copy "
                                 "the bundle again (or refit)") from None


def marker_json(folder: Path, names: Sequence[str], **fields: Any) -> Dict[str, Any]:
    """The content of a marker file (bundle.json, export.json): ``fields`` and the manifest of ``names``."""
    return {**fields, "files": file_manifest(folder, names)}


def write_bundle(run_dir: Path, config, model, tasks, calibration: Dict[str, Any], metrics: Dict[str, Any],
                 rejected: Optional[pd.DataFrame] = None, predictions: Optional[Dict[str, pd.DataFrame]] = None,
                 before_marker=None, reference: Optional[Dict[str, Any]] = None) -> Path:
    """Write every bundle file atomically, then run ``before_marker`` (the report), then bundle.json
    last. ``calibration`` maps a task name to its :class:`~mmtune.evaluation.calibration.Calibration`.
    Returns ``run_dir``."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    (run_dir / MARKER).unlink(missing_ok=True)  # the folder is incomplete until rewritten
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    for name, enc in model.encoders.items():
        atomic_write_dir(run_dir / "encoders" / name, enc.save_parts)
    atomic_write_with(run_dir / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
    atomic_write_json(run_dir / "labels.json", {"tasks": [t.to_json() for t in tasks]})
    atomic_write_json(run_dir / "calibration.json", {t.name: calibration[t.name].to_json() for t in tasks})
    atomic_write_json(run_dir / "metrics.json", metrics)
    files = ["config.yaml", "model.safetensors", "labels.json", "calibration.json", "metrics.json", "encoders"]
    if reference:  # the training rows' average encoder outputs: the explanations' baseline
        from safetensors.torch import save_file

        atomic_write_with(run_dir / "reference.safetensors",
                          lambda tmp: save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp)))
        files.append("reference.safetensors")
    for split, table in (predictions or {}).items():
        atomic_write_with(run_dir / "predictions" / f"{split}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
        files.append(f"predictions/{split}.csv")
    if rejected is not None and len(rejected):
        atomic_write_with(run_dir / "rejected_rows.csv", lambda tmp: rejected.to_csv(tmp, index=False))
        files.append("rejected_rows.csv")
    regenerable = []
    if before_marker is not None:
        before_marker()
        regenerable.append("report.html")
    from .version import __version__

    fsync_dir(run_dir)
    atomic_write_json(run_dir / MARKER, {
        **marker_json(run_dir, files, format=FORMAT, mmtune_version=__version__,
                      created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        "regenerable": regenerable})
    return run_dir


def check_bundle(run_dir: Path) -> Dict[str, Any]:
    """Return bundle.json's content, after checking every file it lists (sizes and hashes, format 3; names,
    formats 1-2). Raises FileNotFoundError naming what is missing, DamagedBundleError naming what changed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    marker = run_dir / MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a complete run bundle ({MARKER} missing): the run did not finish. "
            "Resume it with `mmtune fit CONFIG --resume`."
        )
    meta = read_json_file(marker, f"run bundle {str(run_dir)!r}")
    if not isinstance(meta, dict):
        raise DamagedBundleError(f"{str(marker)!r} is damaged (not a JSON object); copy the bundle again")
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"run bundle {str(run_dir)!r} has format version {meta.get('format')!r}; this mmtune reads "
                         f"format {', '.join(map(str, READABLE_FORMATS))}. Use the mmtune version that wrote it "
                         f"({meta.get('mmtune_version', 'unknown')}).")
    found = format_by_files(run_dir, meta.get("files"))
    if found != meta["format"]:
        raise DamagedBundleError(f"{str(marker)!r} says format {meta['format']}, but the bundle's files are those of "
                                 f"format {found}: bundle.json was edited or damaged; copy the bundle again")
    what = f"run bundle {str(run_dir)!r}"
    if meta["format"] >= 3:
        verify_files(run_dir, meta["files"], what)
    else:
        for f in meta["files"]:
            if f not in REGENERABLE and not (run_dir / f).exists():
                raise FileNotFoundError(f"{what} lacks {f!r}")
    return meta


def format_by_files(run_dir: Path, files: Any) -> int:
    """The format a bundle's files show: 3 lists them with hashes; 2 by name, with calibration.json; 1 by name,
    its calibration inside labels.json."""
    if isinstance(files, dict):
        return 3
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise DamagedBundleError(f"{str(Path(run_dir) / MARKER)!r} is damaged: 'files' is {type(files).__name__}, not "
                                 "the list of the bundle's files; copy the bundle again")
    return 2 if "calibration.json" in files or (Path(run_dir) / "calibration.json").is_file() else 1


@dataclass
class Bundle:
    """A run bundle as typed objects: what everything after training reads."""

    run_dir: Path
    config: Any
    """The resolved :class:`~mmtune.config.Config` it was trained with."""
    tasks: List[Any]
    """Its :class:`~mmtune.tasks.Task` list (label columns and classes)."""
    calibration: Dict[str, Any]
    """Task name -> :class:`~mmtune.evaluation.calibration.Calibration`."""
    metrics: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    model: Any = None
    """The MultimodalClassifier with the bundle's weights (when read with ``model=True``)."""
    reference: Dict[str, Any] = field(default_factory=dict)
    """The training rows' average encoder outputs (``reference.safetensors``; empty in bundles without one)."""


def read_bundle(run_dir, *, model: bool = True, complete: bool = True) -> Bundle:
    """Read a run bundle: config, tasks, calibration, metrics and — with ``model`` — the model, rebuilt from
    the bundle's encoder folders and safetensors weights (no network, no original checkpoint). ``complete``
    False reads a bundle being written (the report is built before bundle.json). Raises FileNotFoundError
    (not a complete bundle, a file missing) or ValueError (unknown format, damaged weights)."""
    from .config import load_config, upgrade_format1
    from .config.migrate import stored_config
    from .evaluation.calibration import Calibration
    from .tasks import Task

    import yaml

    run_dir = Path(run_dir)
    meta = check_bundle(run_dir) if complete else {"format": FORMAT}
    for f in ("config.yaml", "labels.json"):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"run bundle {str(run_dir)!r} lacks {f!r}")
    what = f"run bundle {str(run_dir)!r}"
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        raise DamagedBundleError(f"{str(run_dir / 'config.yaml')!r} is damaged (not readable YAML); copy the bundle "
                                 "again (or refit)") from None
    labels_json = read_json_file(run_dir / "labels.json", what)
    try:
        labels = labels_json["tasks"]
        if meta.get("format") == 1:
            raw = upgrade_format1(raw)
            calibration = {t["name"]: Calibration.from_json(t) for t in labels}
        else:
            stored = read_json_file(run_dir / "calibration.json", what) if (run_dir / "calibration.json").is_file() else {}
            calibration = {t["name"]: Calibration.from_json(stored.get(t["name"])) for t in labels}
        tasks = [Task.from_json(t) for t in labels]
    except (KeyError, TypeError, AttributeError) as exc:
        raise DamagedBundleError(f"{what}: labels.json or calibration.json is damaged ({type(exc).__name__}: {exc}); "
                                 "copy the bundle again (or refit)") from None
    cfg = load_config(stored_config(raw))
    metrics_path = run_dir / "metrics.json"
    metrics = read_json_file(metrics_path, what) if metrics_path.is_file() else {}
    out = Bundle(run_dir, cfg, tasks, calibration, metrics, meta)
    if (run_dir / "reference.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            out.reference = load_file(str(run_dir / "reference.safetensors"))
        except Exception:  # a damaged optional file: explanations fall back to zeros
            out.reference = {}
    if model:
        out.model = _load_model(run_dir, cfg, tasks)
    return out


def _load_model(run_dir: Path, cfg, tasks):
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .models import model_for

    model = model_for(cfg, tasks, bundle_dir=run_dir)
    from .models.pruning import apply_pruning

    apply_pruning(model, run_dir)  # a pruned bundle: the attention heads its layers keep
    weights = run_dir / "model.safetensors"
    try:
        load_model(model, str(weights), strict=True, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated header or data, wrong keys
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{str(weights)!r} cannot be read as this bundle's weights ({reason}): the file is "
                         "damaged or from another run; copy the bundle again or refit") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the run folder: claimed before any work, replaced only when the new run is complete


class RunInUseError(FileExistsError):
    """Another process holds the run folder (a FileExistsError: the name is taken, for now)."""


def hold_lock(path: Path, busy: str) -> int:
    """An exclusive ``flock`` on ``path`` (created; it holds the holder's pid), released when the returned file
    descriptor is closed or the process dies. RunInUseError with ``busy`` (``{pid}``: the holder's) when taken."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunInUseError(busy.replace("{pid}", holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def check_run_folder(run_dir: Path) -> None:
    """ValueError when ``run_dir`` cannot be a run folder: it is a file, or a file stands where one of its parent
    folders would be (``output_dir`` below a file)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} is a file; choose another name (--set name=...) or output_dir")
    for up in run_dir.parents:
        if up.exists():
            if not up.is_dir():
                raise ValueError(f"output_dir {str(run_dir.parent)!r} is below {str(up)!r}, which is a file; give a "
                                 "folder for output_dir")
            break


class RunClaim:
    """Exclusive use of ``output_dir/name`` for one fit, from before any work until the bundle is written.

    A lock (``fcntl.flock`` on ``output_dir/.<name>.lock``, released by the OS if the process dies) keeps a
    second fit of the same name out with a one-line error. ``work_dir`` is where the run is written: the run
    folder itself for a new or resumed run, or — with ``overwrite`` — a staging folder beside it
    (``.<name>.overwrite``) that replaces the old run only at :meth:`commit`, once it is complete; a failed or
    killed overwrite leaves the old run as it was.
    """

    def __init__(self, run_dir: Path, resume: bool = False, overwrite: bool = False, follower: bool = False,
                 keep: Sequence[str] = ()):
        self.run_dir = Path(run_dir)
        self.keep = tuple(keep)
        """Sub-folders of the old run that an overwrite carries into the new one (a search's study)."""
        self.resume, self.overwrite = resume, overwrite
        self.work_dir = self.run_dir
        self.follower = follower
        """Another process of a distributed run: it writes nothing and holds no lock; the main process claims."""
        self._fd: Optional[int] = None
        self._staging: Optional[Path] = None

    def __enter__(self) -> "RunClaim":
        if self.follower:
            staging = self.run_dir.parent / f".{self.run_dir.name}.overwrite"
            self.work_dir = staging if self.overwrite and staging.is_dir() else self.run_dir
            return self
        parent = self.run_dir.parent
        check_run_folder(self.run_dir)
        parent.mkdir(parents=True, exist_ok=True)
        self._lock(parent / f".{self.run_dir.name}.lock")
        try:
            self._decide()
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self, path: Path) -> None:
        self._fd = hold_lock(path, f"run folder {str(self.run_dir)!r} is in use by another mmtune process (pid {{pid}}); "
                                   "wait for it to finish, or choose another name (--set name=...)")

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
        if self.follower:
            return self.run_dir
        if self._staging is not None:
            old = self.run_dir.parent / f".{self.run_dir.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.run_dir, old)
            os.replace(self._staging, self.run_dir)
            for name in self.keep:
                if (old / name).exists() and not (self.run_dir / name).exists():
                    os.replace(old / name, self.run_dir / name)
            fsync_dir(self.run_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
            self._staging = None
        return self.run_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.follower:
            return
        try:
            if self._staging is not None:  # an overwrite that did not finish: the old run stays
                shutil.rmtree(self._staging, ignore_errors=True)
        finally:
            self._unlock()


# Keys a resumed run may change: they do not change the model, the data or how it is optimised.
RESUMABLE_KEYS = ("name", "output_dir", "evaluation", "trainer.max_epochs", "trainer.early_stopping_patience",
                  "trainer.progress_bar", "trainer.tensorboard", "trainer.eval_batch_size", "data.num_workers",
                  "trainer.max_time", "trainer.max_steps",
                  "finetune.cache_dir", "trainer.accelerator", "trainer.devices")


def read_resume_state(run_dir: Path, cfg) -> Dict[str, Any]:
    """The epoch ``run_dir/checkpoints/last.ckpt`` holds, after checking it was written for this config
    (``weights_only``: a planted pickle is refused, never run). Raises ValueError naming the keys that differ."""
    import torch

    from .config import config_differences

    last_ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    try:
        ckpt = torch.load(last_ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError… for a bad file
        raise ValueError(f"cannot resume: {str(last_ckpt)!r} is not a readable mmtune checkpoint "
                         f"({type(exc).__name__}); start again with --overwrite") from None
    before = ckpt.get("mmtune_config")
    if before is not None:
        changed = config_differences(before, cfg.to_dict(), RESUMABLE_KEYS)
        if changed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise ValueError(f"cannot resume {str(cfg.run_dir)!r}: the config differs from the one it was trained "
                             f"with at {shown}{more}. Resume with the original settings, or start a new run "
                             "(--overwrite or another name).")
    return {"epoch": int(ckpt.get("epoch", 0))}
