"""Reading manifests and validating every row before anything trains.

A manifest is a table with one example per row: an image path (relative to the manifest's
folder), a text, a label, optionally an id. Every row is checked up front; all problems are
reported together with their row number, column and reason. Nothing is dropped silently.

Row numbers are 1-based positions among the data rows (row 1 is the first row after a CSV
header, the first line of a JSONL file, the first row of a DataFrame).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..modalities import modality_of, resolve_path
from ..tasks import Task, tasks_from_config
from ..values import is_missing

TableSource = Union[str, os.PathLike, pd.DataFrame]

_READERS = {
    ".csv": lambda p: pd.read_csv(p, keep_default_na=True),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=True),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".json": lambda p: pd.read_json(p, dtype=False),
    ".parquet": lambda p: pd.read_parquet(p),
    ".pq": lambda p: pd.read_parquet(p),
}


def read_table(source: TableSource) -> Tuple[pd.DataFrame, Optional[Path]]:
    """Read a manifest. Returns the table (index reset to 0..n-1) and the folder image paths are
    relative to (the file's folder; None for a DataFrame, whose paths resolve against the
    current directory). Raises FileNotFoundError or ValueError naming the file."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True).copy(), None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(
            f"manifest {str(path)!r}: unknown format {path.suffix!r}; valid: {', '.join(sorted(_READERS))}"
        )
    try:
        df = reader(path)
    except Exception as exc:  # pandas raises many types; name the file in one message
        raise ValueError(f"manifest {str(path)!r} could not be read: {exc}") from exc
    return df.reset_index(drop=True), path.resolve().parent


@dataclass(frozen=True)
class BadRow:
    split: str
    row: int
    column: str
    reason: str

    def __str__(self) -> str:
        return f"{self.split} row {self.row}, column {self.column!r}: {self.reason}"


class BadRowsError(ValueError):
    """Raised when rows fail validation and ``on_bad_rows`` is ``error``. ``.bad_rows`` lists them all."""

    TRAIN_ADVICE = ("Fix them, or set data.on_bad_rows=skip to train without them "
                    "(the skipped rows and reasons are written to rejected_rows.csv in the run bundle).")

    def __init__(self, bad_rows: Sequence[BadRow], limit: int = 50, advice: Optional[str] = None):
        self.bad_rows = list(bad_rows)
        shown = "\n".join(f"  - {b}" for b in self.bad_rows[:limit])
        more = len(self.bad_rows) - limit
        tail = f"\n  … and {more} more" if more > 0 else ""
        rows = {(b.split, b.row) for b in self.bad_rows}
        super().__init__(
            f"{len(rows)} bad row(s) found ({len(self.bad_rows)} problem(s)):\n{shown}{tail}\n"
            + (advice or self.TRAIN_ADVICE)
        )


@dataclass
class ManifestSpec:
    """Which columns hold what; the part of the config the data layer needs. ``columns`` maps each
    modality read (an entry of :data:`~mmtune.modalities.MODALITIES`) to its column."""

    columns: Dict[str, str] = field(default_factory=dict)
    tasks: Tuple[Task, ...] = field(default_factory=tuple)
    id_column: Optional[str] = None
    allow_missing: Tuple[str, ...] = field(default_factory=tuple)
    weight_column: Optional[str] = None

    @classmethod
    def simple(cls, columns: Optional[Dict[str, str]] = None, label_column=None, id_column=None, allow_missing=()):
        """A spec with one single-label task on ``label_column``."""
        tasks = (Task(label_column, label_column),) if label_column else ()
        return cls(dict(columns or {}), tasks, id_column, tuple(allow_missing))

    @property
    def modality_columns(self) -> List[Tuple[str, Any]]:
        """``(modality, column)`` pairs, modalities sorted; a column is a name, or a list of names for a
        modality of several columns (tabular)."""
        return sorted(self.columns.items())


def column_values(df: pd.DataFrame, column: Any) -> List[Any]:
    """The cells of one modality: a column's values, or for a list of columns one dict per row."""
    if isinstance(column, (list, tuple)):
        return df[list(column)].to_dict("records")
    return df[column].tolist()


def column_label(column: Any) -> str:
    return ",".join(column) if isinstance(column, (list, tuple)) else str(column)


def spec_from_config(data_cfg, modalities, tasks: Optional[List[Task]] = None,
                     weight_column: Optional[str] = None) -> ManifestSpec:
    """The spec for the config's ``data`` section and the modalities its encoders read."""
    return ManifestSpec(
        columns={m: data_cfg.column(m) for m in modalities},
        tasks=tuple(tasks if tasks is not None else tasks_from_config(data_cfg)),
        id_column=data_cfg.id_column,
        allow_missing=tuple(data_cfg.allow_missing),
        weight_column=weight_column,
    )


def validate_rows(
    df: pd.DataFrame,
    spec: ManifestSpec,
    base_dir: Optional[Path],
    split: str,
    check_known: bool = False,
    require_label: bool = True,
    source_name: Optional[str] = None,
) -> List[BadRow]:
    """Check every row; return every problem found (an empty list when all rows are good).

    Checks: required columns exist (a missing column raises ValueError at once, naming the
    manifest and its columns); each modality's cell blank (unless the modality is in
    ``spec.allow_missing``) or not usable (its table entry's ``check``: an image file absent or
    unreadable, a text that is not a string); label missing or NaN; with
    ``check_known``, a label outside its task's ``classes`` (the training labels)."""
    tasks = spec.tasks if require_label else ()
    needed = [c for _, col in spec.modality_columns for c in (col if isinstance(col, (list, tuple)) else [col])]
    needed += [t.column for t in tasks]
    if require_label and spec.weight_column:
        needed.append(spec.weight_column)
    if spec.id_column:
        needed.append(spec.id_column)
    absent = [c for c in needed if c not in df.columns]
    if absent:
        where = source_name or f"{split} manifest"
        raise ValueError(
            f"{where} has no column(s) {', '.join(repr(c) for c in absent)}; "
            f"its columns are: {', '.join(repr(str(c)) for c in df.columns)}. "
            "Set data.columns / data.label_column (or data.tasks) / data.id_column to match."
        )
    bad: List[BadRow] = []
    cells = {name: column_values(df, col) for name, col in spec.modality_columns}
    for i, row in enumerate(df.itertuples(index=False, name=None)):
        values = dict(zip(df.columns, row))
        rownum = i + 1
        for name, col in spec.modality_columns:
            v, modality = cells[name][i], modality_of(name)
            if modality.is_blank(v):
                if name not in spec.allow_missing:
                    bad.append(BadRow(split, rownum, column_label(col), modality.blank_problem(v)))
                continue
            problem = modality.check(v, base_dir)
            if problem:
                bad.append(BadRow(split, rownum, column_label(col), problem))
        for task in tasks:
            lab = values[task.column]
            parsed = task.values(lab)
            if parsed is None or (not task.multilabel and not parsed):
                bad.append(BadRow(split, rownum, task.column, "missing label (NaN, null or empty)"))
            elif task.regression and task.number(lab) is None:
                bad.append(BadRow(split, rownum, task.column, f"target must be a finite number, got {lab!r}"))
            elif check_known:
                unknown = task.unknown(lab)
                if unknown:
                    shown = [str(c) for c in task.classes[:20]]
                    bad.append(BadRow(split, rownum, task.column,
                                      f"label {unknown[0]!r} never occurs in the training set (known: {shown})"))
        if require_label and spec.weight_column:
            w = values[spec.weight_column]
            try:
                ok = not is_missing(w) and float(w) >= 0 and math.isfinite(float(w))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                bad.append(BadRow(split, rownum, spec.weight_column, f"sample weight must be a number >= 0, got {w!r}"))
        if spec.id_column and is_missing(values[spec.id_column]):
            bad.append(BadRow(split, rownum, spec.id_column, "missing id (NaN or null)"))
    return bad


def rejected_rows_frame(df_by_split: dict, bad: Sequence[BadRow]) -> pd.DataFrame:
    """One row per problem, with the split, row number, column, reason and the row's values."""
    records = []
    for b in bad:
        df = df_by_split.get(b.split)
        original = df.iloc[b.row - 1].to_dict() if df is not None and 0 < b.row <= len(df) else {}
        records.append({"split": b.split, "row": b.row, "column": b.column, "reason": b.reason,
                        **{f"value.{k}": v for k, v in original.items()}})
    return pd.DataFrame.from_records(records)


def resolve_image_path(value: Any, base_dir: Optional[Path]) -> Path:
    """A file cell as a path (relative to the manifest's folder)."""
    return resolve_path(value, base_dir)


def absolute_paths(df, cfg, base) -> None:
    """File columns of ``df`` (in place) made absolute against ``base``, so that the rows read the same from anywhere."""
    if base is None:
        return
    for m in cfg.modalities:
        if modality_of(m).files:
            col = cfg.data.column(m)
            if col in df.columns:
                df[col] = [v if v is None or (isinstance(v, float) and np.isnan(v)) else str(resolve_path(v, base))
                           for v in df[col]]
