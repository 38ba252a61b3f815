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
from typing import Any, List, Optional, Sequence, Tuple, Union

import pandas as pd

from ..tasks import Task
from .images import load_image
from ..values import is_blank, is_missing

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
    """Which columns hold what; the part of the config the data layer needs."""

    image_column: Optional[str] = None
    text_column: Optional[str] = None
    tasks: Tuple[Task, ...] = field(default_factory=tuple)
    id_column: Optional[str] = None
    allow_missing: Tuple[str, ...] = field(default_factory=tuple)
    weight_column: Optional[str] = None

    @classmethod
    def simple(cls, image_column=None, text_column=None, label_column=None, id_column=None, allow_missing=()):
        """A spec with one single-label task on ``label_column``."""
        tasks = (Task(label_column, label_column),) if label_column else ()
        return cls(image_column, text_column, tasks, id_column, tuple(allow_missing))

    @property
    def modality_columns(self) -> List[Tuple[str, str]]:
        out = []
        if self.image_column:
            out.append(("image", self.image_column))
        if self.text_column:
            out.append(("text", self.text_column))
        return out


def resolve_image_path(value: Any, base_dir: Optional[Path]) -> Path:
    p = Path(str(value))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _check_image(path: Path) -> Optional[str]:
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        load_image(path)  # a full decode: a truncated file fails here, not mid-epoch
    except Exception as exc:  # Pillow raises many types for a bad file; each becomes this row's reason
        return f"image file {str(path)!r} is not a readable image ({type(exc).__name__}: {exc})"
    return None


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
    manifest and its columns); image value missing, file absent or unreadable; text missing or
    empty (unless the modality is in ``spec.allow_missing``); label missing or NaN; with
    ``check_known``, a label outside its task's ``classes`` (the training labels)."""
    tasks = spec.tasks if require_label else ()
    needed = [c for _, c in spec.modality_columns]
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
            "Set data.image_column / data.text_column / data.label_column (or data.tasks) / data.id_column to match."
        )
    bad: List[BadRow] = []
    for i, row in enumerate(df.itertuples(index=False, name=None)):
        values = dict(zip(df.columns, row))
        rownum = i + 1
        for modality, col in spec.modality_columns:
            v = values[col]
            if is_blank(v):
                if modality in spec.allow_missing:
                    continue
                reason = "empty text" if modality == "text" else "missing image path"
                if not isinstance(v, str) and is_missing(v):
                    reason = f"missing {modality} (NaN or null)"
                bad.append(BadRow(split, rownum, col, reason))
                continue
            if modality == "image":
                problem = _check_image(resolve_image_path(v, base_dir))
                if problem:
                    bad.append(BadRow(split, rownum, col, problem))
            elif not isinstance(v, str):
                bad.append(BadRow(split, rownum, col, f"text must be a string, got {type(v).__name__} {v!r}"))
        for task in tasks:
            lab = values[task.column]
            parsed = task.values(lab)
            if parsed is None or (not task.multilabel and not parsed):
                bad.append(BadRow(split, rownum, task.column, "missing label (NaN, null or empty)"))
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
