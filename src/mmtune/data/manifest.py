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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..modalities import modality_of, once_per_file, resolve_path
from ..tasks import Task, tasks_from_config
from ..values import is_missing

TableSource = Union[str, os.PathLike, pd.DataFrame]

CHUNK_ROWS = 65536
"""Rows per chunk when a manifest is read and validated: only one chunk's cells are ever Python objects."""


def _parquet_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        if f.metadata.num_rows == 0:  # no batches, but the columns
            yield f.schema_arrow.empty_table().to_pandas()
        for batch in f.iter_batches(batch_size=rows):
            yield batch.to_pandas()


def _arrow_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    """An Arrow IPC (Feather v2) file, memory-mapped: its record batches are read in place, not copied."""
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # the streaming format has no footer
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        empty = True
        for batch in batches:
            for start in range(0, batch.num_rows, rows):
                yield batch.slice(start, rows).to_pandas()
                empty = False
        if empty:  # no rows, but the columns
            yield reader.schema.empty_table().to_pandas()


_READERS: Dict[str, Callable[[Path, int], Iterator[pd.DataFrame]]] = {
    ".csv": lambda p, n: iter(pd.read_csv(p, keep_default_na=True, chunksize=n)),
    ".tsv": lambda p, n: iter(pd.read_csv(p, sep="\t", keep_default_na=True, chunksize=n)),
    ".jsonl": lambda p, n: iter(pd.read_json(p, lines=True, dtype=False, chunksize=n)),
    ".json": lambda p, n: iter([pd.read_json(p, dtype=False)]),
    ".parquet": _parquet_chunks,
    ".pq": _parquet_chunks,
    ".arrow": _arrow_chunks,
    ".feather": _arrow_chunks,
    ".ipc": _arrow_chunks,
}


def table_chunks(source: TableSource, rows: int = CHUNK_ROWS) -> Tuple[Iterator[pd.DataFrame], Optional[Path]]:
    """A manifest as an iterator of DataFrames of up to ``rows`` rows each (CSV / TSV / JSONL read in chunks,
    Parquet by record batches, Arrow IPC memory-mapped; a JSON array whole), and the folder image paths are
    relative to (None for a DataFrame). Raises FileNotFoundError or ValueError naming the file, also when
    a later chunk cannot be read."""
    if isinstance(source, pd.DataFrame):
        df = source.reset_index(drop=True)
        return (df.iloc[i:i + rows] for i in range(0, max(len(df), 1), rows)), None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(
            f"manifest {str(path)!r}: unknown format {path.suffix!r}; valid: {', '.join(sorted(_READERS))}"
        )

    def chunks() -> Iterator[pd.DataFrame]:
        try:
            yield from reader(path, rows)
        except Exception as exc:  # pandas and pyarrow raise many types; name the file in one message
            raise ValueError(f"manifest {str(path)!r} could not be read: {exc}") from exc

    return chunks(), path.resolve().parent


def count_rows(source: TableSource) -> int:
    """Rows of a manifest, read a chunk at a time (a Parquet file's from its footer)."""
    if isinstance(source, pd.DataFrame):
        return len(source)
    if Path(source).suffix.lower() in (".parquet", ".pq") and Path(source).is_file():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(source).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a bad file; name the file in one message
            raise ValueError(f"manifest {str(source)!r} could not be read: {exc}") from exc
    return sum(len(c) for c in table_chunks(source)[0])


def join_chunks(chunks: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The chunks as one table, index 0..n-1."""
    chunks = [c for c in chunks if len(c.columns)] or [pd.DataFrame()]
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0].reset_index(drop=True)


def read_table(source: TableSource) -> Tuple[pd.DataFrame, Optional[Path]]:
    """Read a manifest whole (see :func:`table_chunks`). Returns the table (index reset to 0..n-1) and the
    folder image paths are relative to (the file's folder; None for a DataFrame, whose paths resolve against
    the current directory). Raises FileNotFoundError or ValueError naming the file."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True).copy(), None
    chunks, base = table_chunks(source)
    return join_chunks(list(chunks)), base


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


def row_index(data: TableSource, n: int) -> pd.Index:
    """What results for ``data``'s rows are indexed by: an input DataFrame's own index (so they line up with it), or
    0..n-1 for a file."""
    return data.index if isinstance(data, pd.DataFrame) else pd.RangeIndex(n)


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
    first_row: int = 1,
    checked: Optional[Dict[Any, Optional[str]]] = None,
    decode: bool = True,
) -> List[BadRow]:
    """Check every row; return every problem found (an empty list when all rows are good).

    Checks: required columns exist (a missing column raises ValueError at once, naming the
    manifest and its columns); each modality's cell blank (unless the modality is in
    ``spec.allow_missing``) or not usable (its table entry's ``check``: an image file absent or
    unreadable, a text that is not a string); label missing or NaN; with
    ``check_known``, a label outside its task's ``classes`` (the training labels).

    ``first_row`` is the row number of ``df``'s first row (a chunk of a longer manifest). The rows are
    checked :data:`CHUNK_ROWS` at a time, so only one chunk's cells are Python objects at once; a file
    named by several rows is checked once (``checked`` remembers files across calls). ``decode=False`` checks
    only what needs no decoding (a file's existence: each modality's ``quick_check``), for rows that are decoded
    once, when they are read (prediction)."""
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
    checked = {} if checked is None else checked
    bad: List[BadRow] = []
    for start in range(0, len(df), CHUNK_ROWS):
        bad += _validate_chunk(df.iloc[start:start + CHUNK_ROWS], spec, base_dir, split, check_known, tasks,
                               require_label, first_row + start, checked, decode)
    return bad


def _validate_chunk(df, spec, base_dir, split, check_known, tasks, require_label, first_row, checked,
                    decode=True) -> List[BadRow]:
    bad: List[BadRow] = []
    cells = {name: column_values(df, col) for name, col in spec.modality_columns}
    others = {c: df[c].tolist() for c in {t.column for t in tasks}
              | ({spec.weight_column} if require_label and spec.weight_column else set())
              | ({spec.id_column} if spec.id_column else set())}
    for i in range(len(df)):
        rownum = first_row + i
        for name, col in spec.modality_columns:
            v, modality = cells[name][i], modality_of(name)
            if modality.is_blank(v):
                if name not in spec.allow_missing:
                    bad.append(BadRow(split, rownum, column_label(col), modality.blank_problem(v)))
                continue
            check = modality.check if decode else modality.quick_check
            problem = once_per_file(checked, modality, v, lambda: check(v, base_dir), key=(name, v))
            if problem:
                bad.append(BadRow(split, rownum, column_label(col), problem))
        for task in tasks:
            lab = others[task.column][i]
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
            w = others[spec.weight_column][i]
            try:
                ok = not is_missing(w) and float(w) >= 0 and math.isfinite(float(w))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                bad.append(BadRow(split, rownum, spec.weight_column, f"sample weight must be a number >= 0, got {w!r}"))
        if spec.id_column and is_missing(others[spec.id_column][i]):
            bad.append(BadRow(split, rownum, spec.id_column, "missing id (NaN or null)"))
    return bad


def rejected_rows_frame(df: pd.DataFrame, bad: Sequence[BadRow], first_row: int = 1) -> pd.DataFrame:
    """One row per problem of ``df`` (whose first row is row ``first_row``), with the split, row number,
    column, reason and the row's values."""
    records = []
    for b in bad:
        i = b.row - first_row
        original = df.iloc[i].to_dict() if 0 <= i < len(df) else {}
        records.append({"split": b.split, "row": b.row, "column": b.column, "reason": b.reason,
                        **{f"value.{k}": v for k, v in original.items()}})
    return pd.DataFrame.from_records(records)


def read_valid_rows(source: TableSource, spec: ManifestSpec, split: str, check_known: bool = False,
                    require_label: bool = True, source_name: Optional[str] = None,
                    rows: int = CHUNK_ROWS, decode: bool = True,
                    ) -> Tuple[pd.DataFrame, Optional[Path], List[BadRow], pd.DataFrame]:
    """Read a manifest chunk by chunk, validating each chunk as it arrives (:func:`validate_rows`) and keeping
    its good rows: returns the good rows as one table, the folder paths resolve against, every problem found
    and the rejected rows (:func:`rejected_rows_frame`). Only one chunk's cells are ever Python objects; the
    table keeps pandas' compact (Arrow) string columns. ``decode``: as :func:`validate_rows`."""
    chunks, base = table_chunks(source, rows)
    if source_name is None and not isinstance(source, pd.DataFrame):
        source_name = str(source)
    kept, bad, rejected, start, checked = [], [], [], 1, {}
    for chunk in chunks:
        chunk, n = chunk.reset_index(drop=True), len(chunk)
        problems = validate_rows(chunk, spec, base, split, check_known, require_label, source_name, start, checked,
                                 decode)
        if problems:
            bad += problems
            rejected.append(rejected_rows_frame(chunk, problems, start))
            chunk = chunk.drop(index=sorted({b.row - start for b in problems})).reset_index(drop=True)
        kept.append(chunk)
        start += n
    frame = pd.concat(rejected, ignore_index=True) if rejected else pd.DataFrame()
    table = join_chunks(kept)
    del kept
    release_arrow_memory()
    return table, base, bad, frame


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps from freed buffers (read chunks, copies) back to the system."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


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
