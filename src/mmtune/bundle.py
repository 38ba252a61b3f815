"""The run bundle: everything needed to reload a fine-tuned model with no network.

``runs/<name>/`` holds config.yaml (fully resolved), model.safetensors, encoders/<name>/
(architecture config and processor per encoder), labels.json, metrics.json, logs/,
checkpoints/, rejected_rows.csv (when rows were skipped) and, written last, bundle.json. A
folder without bundle.json is an unfinished run, never mistaken for a complete one.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, Optional

import pandas as pd

from .io import atomic_write_dir, atomic_write_json, atomic_write_text, atomic_write_with

MARKER = "bundle.json"
FORMAT = 1


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
    meta = json.loads(marker.read_text())
    for f in meta.get("files", []):
        if f == "report.html":
            continue  # regenerable with `mmtune report`
        if not (run_dir / f).exists():
            raise FileNotFoundError(f"run bundle {str(run_dir)!r} lacks {f!r}")
    return meta
