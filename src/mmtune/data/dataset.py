"""Lazily decoded samples: one sample = {modality: raw value}, a present-mask and the label."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from ..modalities import Decoded, modality_of
from .manifest import (CHUNK_ROWS, BadRow, BadRowsError, ManifestSpec, TableSource, column_label, column_values,
                       read_valid_rows, validate_rows)


def encode_labels(task, column: pd.Series) -> np.ndarray:
    """A task's column as numbers: class indices (int64, single-label), multi-hot rows (float32, (N, C)) or the
    targets (float64, regression). Each distinct cell of a single-label column is encoded once."""
    n = len(column)
    if task.regression:
        return np.fromiter((float(v) for v in column), dtype=np.float64, count=n)
    if task.multilabel:
        out = np.zeros((n, len(task.classes)), dtype=np.float32)
        for i, v in enumerate(column):
            out[i] = task.encode(v)
        return out
    try:
        codes, uniques = pd.factorize(column)
    except TypeError:  # unhashable cells
        return np.fromiter((task.encode(v) for v in column), dtype=np.int64, count=n)
    return np.asarray([task.encode(u) for u in uniques], dtype=np.int64)[codes] if n else np.zeros(0, np.int64)


def _cells_array(column: pd.Series):
    """The column's values without a copy, such that ``.take(rows).tolist()`` (extension arrays: Arrow strings) or
    ``[rows].tolist()`` (NumPy) gives plain Python values, as ``Series.tolist`` does."""
    return column.array if pd.api.types.is_extension_array_dtype(column.dtype) else column.to_numpy()


class MultimodalDataset(Dataset):
    """Rows of a validated manifest. ``__getitem__`` decodes a value (an image file) only when asked.

    Each item is ``{"values": {modality: raw or None}, "labels": {task: class index or multi-hot list},
    "index": i}``; ``labels`` is empty when ``with_labels`` is False.

    The cells stay in the table (pandas' compact Arrow strings): a batch takes its rows' cells when it is
    asked for (:meth:`__getitems__`), and whole-column passes go :data:`CHUNK_ROWS` rows at a time
    (:meth:`cells`), so no column is ever held as a list of Python objects. Labels and weights are arrays.

    ``unreadable``: the rows were validated without decoding their files (``validate_rows(decode=False)``:
    prediction decodes each file once, here). A file that fails to decode, or decodes to a value its modality
    refuses (a silent recording), calls ``unreadable(row number, column, problem)``, which raises (the predictor
    validates the whole table in full then, and names every bad row). The rows must be the validated table's
    rows, all of them, in order (row number = position + 1).

    ``reads``: per file modality, the keyword arguments its files are read with (images: ``side``, the side its
    processors resize it to, so that a large JPEG is decoded smaller; ``orient``: turned upright by its EXIF
    orientation), from :func:`~mmtune.data.collate.read_options`. A modality left out is read as stored, in full.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        spec: ManifestSpec,
        base_dir: Optional[Path],
        with_labels: bool = True,
        modalities: Optional[Sequence[str]] = None,
        unreadable: Optional[Callable[[int, str, str], None]] = None,
        reads: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ):
        self.df = df.reset_index(drop=True)
        self.unreadable = unreadable
        self.reads = {m: dict(v) for m, v in (reads or {}).items() if v}
        self.spec = spec
        self.base_dir = base_dir
        wanted = set(modalities) if modalities is not None else None
        self.columns = [(m, c) for m, c in spec.modality_columns if wanted is None or m in wanted]
        self._column = dict(self.columns)
        # a single column's cells as the table holds them (no copy): a batch takes its rows from it
        self._arrays = {m: _cells_array(self.df[c]) for m, c in self.columns if not isinstance(c, (list, tuple))}
        self._labels: Dict[str, np.ndarray] = {}
        self.weights: Optional[np.ndarray] = None
        if with_labels:
            for task in spec.tasks:
                self._labels[task.name] = encode_labels(task, self.df[task.column])
            if spec.weight_column:
                self.weights = np.asarray(self.df[spec.weight_column], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.df)

    @property
    def labels(self) -> Dict[str, np.ndarray]:
        """Per task: class indices (single-label), multi-hot rows (multi-label) or targets, in row order."""
        return self._labels

    def take(self, modality: str, rows) -> List[Any]:
        """The raw cells of ``modality`` at positions ``rows`` (a tabular modality: one dict per row)."""
        rows = np.asarray(rows, dtype=np.int64)
        if modality in self._arrays:
            cells = self._arrays[modality]
            return (cells[rows] if isinstance(cells, np.ndarray) else cells.take(rows)).tolist()
        return self.df[list(self._column[modality])].iloc[rows].to_dict("records")

    def cells(self, modality: str) -> Iterator[Any]:
        """Every raw cell of ``modality`` in row order, read :data:`CHUNK_ROWS` rows at a time."""
        for start in range(0, len(self.df), CHUNK_ROWS):
            yield from column_values(self.df.iloc[start:start + CHUNK_ROWS], self._column[modality])

    def shown(self, modality: str) -> List[Any]:
        """Each row's cell of ``modality`` as saved predictions and pages show it (an image's absolute path)."""
        entry = modality_of(modality)
        return [entry.display(v, self.base_dir) for v in self.cells(modality)]

    def _read(self, modality: str, entry, value: Any) -> Any:
        options = self.reads.get(modality)
        return entry.read(value, self.base_dir, **options) if options else entry.read(value, self.base_dir)

    def _read_checked(self, modality: str, entry, value: Any, row: int) -> Any:
        """A file cell decoded, its problems (which validation did not decode to find) sent to ``unreadable``."""
        try:
            out = self._read(modality, entry, value)
            problem = None if isinstance(value, Decoded) else entry.decoded_problem(out)
        except Exception as exc:  # the decoders raise many types for a bad file; each becomes the row's problem
            if type(exc).__name__ == "MissingExtraError":
                raise
            problem = f"{entry.name} file {str(value)!r} cannot be read ({type(exc).__name__}: {exc})"
        if problem is None:
            return out
        # the full check's own words (it decodes the file again: this happens once, on the way to an error)
        self.unreadable(row + 1, column_label(self._column[modality]), entry.check(value, self.base_dir) or problem)
        raise RuntimeError(f"unreadable({row + 1}, ...) returned instead of raising")

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        """The items of ``rows`` (what a DataLoader asks for a batch): each column's cells taken at once."""
        rows = [int(i) for i in rows]
        values = {}
        for modality, _ in self.columns:
            entry = modality_of(modality)
            cells = self.take(modality, rows)
            if self.unreadable is not None and entry.files:
                values[modality] = [None if entry.is_blank(v) else self._read_checked(modality, entry, v, i)
                                    for v, i in zip(cells, rows)]
            else:
                values[modality] = [None if entry.is_blank(v) else self._read(modality, entry, v) for v in cells]
        labels = {t: v[rows].tolist() for t, v in self._labels.items()}
        items = []
        for k, i in enumerate(rows):
            item = {"values": {m: vs[k] for m, vs in values.items()}, "labels": {t: v[k] for t, v in labels.items()},
                    "index": i}
            if self.weights is not None:
                item["weight"] = float(self.weights[i])
            items.append(item)
        return items


def read_once_dataset(data: TableSource, spec: ManifestSpec, split: str, advice: str, with_labels: bool = False,
                      modalities: Optional[Sequence[str]] = None,
                      reads: Optional[Mapping[str, Mapping[str, Any]]] = None) -> MultimodalDataset:
    """Rows to predict on, validated into a dataset that decodes each file once: validation checks that the files
    exist (``decode=False``), and the dataset decodes them when it reads them. A file that fails there stops the
    work with the error a validation that decoded everything gives: the whole table is validated in full at that
    moment and :class:`BadRowsError` names every bad row (with ``advice``). Any other bad row is refused at once."""
    df, base_dir, bad, _ = read_valid_rows(data, spec, split, check_known=with_labels, require_label=with_labels,
                                           decode=False)
    if bad:
        raise BadRowsError(bad, advice=advice)

    import threading

    lock, found = threading.Lock(), []

    def unreadable(row: int, column: str, problem: str) -> None:
        # once, however many decoding threads meet a bad file: the others wait for it and raise the same report
        with lock:
            if not found:
                found.append(validate_rows(df, spec, base_dir, split, require_label=False)
                             or [BadRow(split, row, column, problem)])
        raise BadRowsError(found[0], advice=advice)

    return MultimodalDataset(df, spec, base_dir, with_labels, modalities, unreadable=unreadable, reads=reads)
