"""How much each remedy changed each class: the per-class recall and precision of other runs of the same task
(class weights, a sampler, another loss, synthesis, …) against one run's, kept beside its metrics as
``remedies.json`` and shown as columns of its report's per-class table.

    mmtune report --run runs/plain --compare "balanced softmax=runs/bsm" --compare "post-hoc=runs/posthoc"

``bench/imbalance.py`` writes the same file (means over its seeds) into the run of its ``none`` method.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from ..io import atomic_write_text

REMEDIES_FILE = "remedies.json"

PerClass = Dict[str, Dict[str, Dict[str, float]]]
"""task -> class -> {"recall", "precision"}."""


def per_class(metrics: Mapping, split: str = "test") -> PerClass:
    """The per-class recall and precision of each classification task in a run's metrics (``metrics.json``)."""
    out: PerClass = {}
    for task, m in (metrics.get(split) or {}).items():
        if isinstance(m, Mapping) and m.get("per_class"):
            out[task] = {str(r["class"]): {"recall": float(r["recall"]), "precision": float(r["precision"])}
                         for r in m["per_class"]}
    return out


def run_per_class(run_dir: str | Path, split: str = "test") -> PerClass:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: {str(run_dir)!r} is not a finished run")
    got = per_class(json.loads(path.read_text()), split)
    if not got:
        raise ValueError(f"{str(run_dir)!r} has no per-class metrics on its {split} rows (a classification run "
                         f"evaluated on {split} rows has them)")
    return got


def mean_per_class(runs: Sequence[PerClass]) -> PerClass:
    """The mean over runs of the same task (seeds) of each class's recall and precision."""
    first = runs[0]
    return {task: {c: {k: sum(r[task][c][k] for r in runs) / len(runs) for k in ("recall", "precision")}
                   for c in classes} for task, classes in first.items()}


def changes(base: PerClass, others: Mapping[str, PerClass], split: str = "test") -> Dict:
    """Each remedy's recall and precision per class and their change from ``base``'s. A remedy whose tasks or
    classes differ from the base run's is a ValueError naming it."""
    tasks: Dict[str, Dict] = {task: {} for task in base}
    for name, other in others.items():
        for task, classes in base.items():
            if task not in other or set(other[task]) != set(classes):
                raise ValueError(f"remedy {name!r}: its task {task!r} has classes "
                                 f"{sorted(other.get(task, {}))}, the base run's are {sorted(classes)}")
            tasks[task][name] = {c: {"recall": other[task][c]["recall"], "precision": other[task][c]["precision"],
                                     "recall_change": other[task][c]["recall"] - v["recall"],
                                     "precision_change": other[task][c]["precision"] - v["precision"]}
                                 for c, v in classes.items()}
    return {"split": split, "base": base, "tasks": tasks}


def write_remedies(run_dir: str | Path, table: Mapping) -> Path:
    path = Path(run_dir) / REMEDIES_FILE
    atomic_write_text(path, json.dumps(table, indent=2))
    return path


def compare_runs(run_dir: str | Path, others: Mapping[str, str | Path], split: str = "test") -> Path:
    """Write ``run_dir/remedies.json``: each of ``others`` (remedy name -> run folder) against ``run_dir``."""
    base = run_per_class(run_dir, split)
    return write_remedies(run_dir, changes(base, {n: run_per_class(p, split) for n, p in others.items()}, split))


def read_remedies(run_dir: str | Path) -> Optional[Dict]:
    """The run's remedy comparison, or None when it has none (or an unreadable one: the report still builds)."""
    path = Path(run_dir) / REMEDIES_FILE
    try:
        table = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) and isinstance(table.get("tasks"), dict) else None
