"""A table and the name of its label column are enough: each column's kind is inferred, the offline encoder of
each kind chosen, and the columns that would mislead are left out with the reason.

Kinds: ``image`` and ``audio`` (paths to files that decode), ``text`` (free text), ``category``, ``number``,
``datetime``, ``identifier``; and the ones left out: a constant, an identifier (unique per row — it becomes
the id column carried to the predictions), a column equal to or determined by the label (leakage), an empty
column, a datetime (not read by any encoder yet: derive numbers from it) and file bytes in cells. The result is
an ordinary config (:func:`config_for_table`), written to the run bundle like any other, so the run refits from
its own ``config.yaml``. ``data.columns`` / ``--column name=kind`` override the inference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

KINDS = ("image", "audio", "text", "category", "number", "datetime", "identifier", "ignore")
"""What ``--column name=kind`` accepts (``ignore``: leave the column out)."""
ENCODERS = {"image": "efficientnet-lite0", "text": "minilm-l6", "audio": "efficientnet-lite0-audio",
            "tabular": "tabular"}
"""The offline encoder each kind is read with (numbers and categories: one tabular encoder)."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au"}
SAMPLE = 200
"""Values of a column looked at for the file kinds (each is opened)."""
FILE_SHARE = 0.8
"""Share of a column's sampled values that must be readable files of one kind for the column to be that kind."""


@dataclass
class ColumnKind:
    column: str
    kind: str
    why: str
    used: bool = True
    """False: left out of the model (``why`` says why)."""


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _readable(path: Path, kind: str) -> bool:
    """Whether ``path`` decodes as ``kind`` (the header only for images; a few frames for audio)."""
    try:
        if kind == "image":
            import warnings

            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    im.size  # noqa: B018  (the header parsed)
            return True
        import soundfile as sf

        with sf.SoundFile(str(path)) as f:
            return f.frames > 0
    except Exception:  # any decoder error: not a file of this kind
        return False


def _file_kind(values: Sequence[str], base_dir: Optional[Path]) -> Optional[Tuple[str, str]]:
    """``(kind, why)`` when most values are paths to readable image or audio files."""
    paths = []
    for v in values:
        p = Path(v).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        paths.append(p)
    existing = [p for p in paths if p.is_file()]
    if len(existing) < FILE_SHARE * len(paths):
        return None
    for kind, suffixes in (("image", IMAGE_SUFFIXES), ("audio", AUDIO_SUFFIXES)):
        candidates = [p for p in existing if p.suffix.lower() in suffixes] or (existing if kind == "image" else [])
        readable = [p for p in candidates if _readable(p, kind)]
        if len(readable) >= FILE_SHARE * len(paths):
            formats = sorted({p.suffix.lower().lstrip(".").upper() or "files" for p in readable})
            share = 100 * len(readable) / len(paths)
            return kind, f"{share:.0f} % of sampled values are paths to readable {kind} files ({', '.join(formats)})"
    return None


_DATE = re.compile(r"^\s*\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([ T]\d{1,2}:\d{2}(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:?\d{2})?)?\s*$")


def _numbers(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce")


def infer_kind(series: pd.Series, base_dir: Optional[Path] = None) -> ColumnKind:
    """The kind of one column, and why (the label column is not passed here)."""
    name = str(series.name)
    n = len(series)
    filled = series[[not _blank(v) for v in series]]
    if filled.empty:
        return ColumnKind(name, "ignore", "every value is empty", used=False)
    unique = filled.nunique(dropna=True)
    if unique == 1:
        return ColumnKind(name, "ignore", f"constant (every value is {filled.iloc[0]!r})", used=False)
    sample = filled.sample(min(SAMPLE, len(filled)), random_state=0) if len(filled) > SAMPLE else filled
    if any(isinstance(v, (bytes, bytearray, memoryview)) for v in sample):
        return ColumnKind(name, "ignore", "cells hold file bytes, which mmtune does not read yet: write the files and "
                          "give their paths", used=False)
    strings = [v for v in sample if isinstance(v, str)]
    if len(strings) == len(sample):
        found = _file_kind(strings, base_dir)
        if found is not None:
            return ColumnKind(name, *found)
    numbers = _numbers(filled)
    numeric_share = float(numbers.notna().mean())
    if numeric_share >= 0.95:
        ints = bool(np.all(np.isclose(numbers.dropna() % 1, 0)))
        if ints and unique == len(filled) == n and unique > 20 and _consecutive_or_sorted(numbers):
            return ColumnKind(name, "identifier", "a distinct whole number in every row, in order (an index or "
                              "id)", used=False)
        if ints and unique <= 10:
            return ColumnKind(name, "category", f"whole numbers with {unique} distinct values")
        as_strings = "" if pd.api.types.is_numeric_dtype(series) else ", written as text"
        return ColumnKind(name, "number", f"{100 * numeric_share:.0f} % of values are numbers{as_strings}")
    texts = filled.astype(str)
    if float(texts.map(lambda v: bool(_DATE.match(v))).mean()) >= 0.95:
        return ColumnKind(name, "datetime", "dates or times; no encoder reads them yet (derive numbers from them — "
                          "day of week, hour — as their own columns)", used=False)
    words = float(texts.map(lambda v: len(v.split())).mean())
    if unique == len(filled) == n and words < 3:
        return ColumnKind(name, "identifier", "a distinct short value in every row (an id)", used=False)
    if words >= 3 or (unique > max(50, 0.5 * len(filled)) and words > 1):
        return ColumnKind(name, "text", f"free text ({words:.1f} words on average, {unique} distinct values)")
    if unique <= max(50, 0.2 * len(filled)):
        return ColumnKind(name, "category", f"{unique} distinct values")
    return ColumnKind(name, "text", f"short text with many distinct values ({unique} of {len(filled)})")


def _consecutive_or_sorted(numbers: pd.Series) -> bool:
    v = numbers.to_numpy()
    return bool(np.all(np.diff(v) > 0) or np.all(np.diff(v) < 0))


def leaks(series: pd.Series, label: pd.Series) -> Optional[str]:
    """Why ``series`` would leak the label into the model (equal to it, or determined by it), or None."""
    a = series.astype("string").fillna("<empty>")
    b = label.astype("string").fillna("<empty>")
    if a.nunique() < 2:
        return None
    if bool((a == b).all()):
        return "equal to the label (leakage)"
    if int(pd.DataFrame({"a": a, "b": b}).groupby("b")["a"].nunique().max()) == 1:
        forward = int(pd.DataFrame({"a": a, "b": b}).groupby("a")["b"].nunique().max()) == 1
        return ("a relabelling of the label: each value stands for one class and each class for one value (leakage)"
                if forward else "determined by the label: every class has one value of it (leakage)")
    return None


def label_kind(label: pd.Series) -> str:
    """``regression`` for a numeric label with many distinct values, else ``classification``."""
    numbers = _numbers(label.dropna())
    if len(numbers) and float(numbers.notna().mean()) >= 0.99:
        unique = numbers.nunique()
        if not bool(np.all(np.isclose(numbers.dropna() % 1, 0))) or unique > max(20, 0.05 * len(numbers)):
            return "regression"
    return "classification"


def looks_like_group(series: pd.Series, label: pd.Series) -> Optional[str]:
    """Why a column may group rows by source (many rows per value, each value seen with several labels), or None."""
    a = series.astype("string")
    if a.isna().any():
        return None
    unique = a.nunique()
    if unique < 5 or unique > len(a) / 2:
        return None
    spans = pd.DataFrame({"a": a, "b": label.astype("string")}).groupby("a")["b"].nunique()
    if float((spans >= 2).mean()) < 0.5:
        return None
    return (f"{unique} values, {len(a) / unique:.1f} rows each on average, most with several labels: if rows sharing "
            "a value share a source (a person, a product, a site), pass it as the group column")


def infer_columns(df: pd.DataFrame, label: str, base_dir: Optional[Path] = None,
                  forced: Optional[Mapping[str, str]] = None, group: Optional[str] = None) -> List[ColumnKind]:
    """Every column but the label, with its kind and whether the model reads it. ``forced``: column -> kind;
    ``group``: the group column (kept out of the features)."""
    forced = dict(forced or {})
    if group is not None and group not in df.columns:
        raise ValueError(f"group column {group!r} is not in the table; its columns: {', '.join(map(str, df.columns))}")
    if group is not None and group == label:
        raise ValueError(f"group column {group!r} is the label column")
    if label not in df.columns:
        raise ValueError(f"label column {label!r} is not in the table; its columns: "
                         f"{', '.join(map(str, df.columns))}")
    unknown = sorted(set(forced) - set(map(str, df.columns)))
    if unknown:
        raise ValueError(f"--column {unknown[0]!r}: no such column; the table has {', '.join(map(str, df.columns))}")
    bad = sorted(k for k in forced.values() if k not in KINDS)
    if bad:
        raise ValueError(f"--column kind {bad[0]!r} is not a kind; valid: {', '.join(KINDS)}")
    out = []
    for col in df.columns:
        if col == label:
            continue
        name = str(col)
        if name == group:
            out.append(ColumnKind(name, "group", "the group column: each group stays on one side of every split; "
                                  "never a feature", used=False))
            continue
        if name in forced:
            kind = forced[name]
            out.append(ColumnKind(name, kind, "set by you", used=kind not in ("ignore", "identifier", "datetime")))
            continue
        found = infer_kind(df[col], base_dir)
        if found.used:
            why = leaks(df[col], df[label])
            if why is not None:
                found = ColumnKind(name, found.kind, why, used=False)
        out.append(found)
    return out


def kinds_table(kinds: Sequence[ColumnKind], label: str, task: str) -> str:
    """The printed table: column, kind, used, why."""
    rows = [("column", "kind", "read", "why"), (label, "label", "-", task)]
    rows += [(k.column, k.kind, "yes" if k.used else "no", k.why) for k in kinds]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def _field_name(kind: str, column: str, taken: set) -> str:
    base = re.sub(r"\W+", "_", column).strip("_") or "column"
    if base[0].isdigit():
        base = "c_" + base
    name, i = f"{kind}.{base}", 2
    while name in taken:
        name, i = f"{kind}.{base}_{i}", i + 1
    return name


def config_for_table(kinds: Sequence[ColumnKind], label: str, task: str, *, train: Optional[str] = None,
                     test: Optional[str] = None, name: str = "auto", output_dir: str = "runs",
                     preset: Optional[str] = "balanced") -> Dict[str, Any]:
    """A config dict reading the used columns with the offline encoder of their kind."""
    columns: Dict[str, Any] = {}
    encoders: Dict[str, Any] = {}
    for kind in ("image", "text", "audio"):
        cols = [k.column for k in kinds if k.used and k.kind == kind]
        if not cols:
            continue
        fields = [kind]
        columns[kind] = cols[0]
        for c in cols[1:]:
            field = _field_name(kind, c, set(columns))
            columns[field] = c
            fields.append(field)
        enc: Dict[str, Any] = {"modality": kind, "checkpoint": ENCODERS[kind]}
        if len(fields) > 1:
            enc["fields"] = fields
        encoders[kind] = enc
    tab = [k for k in kinds if k.used and k.kind in ("number", "category")]
    if tab:
        columns["tabular"] = [k.column for k in tab]
        encoders["tabular"] = {"modality": "tabular", "checkpoint": ENCODERS["tabular"],
                               "types": {k.column: "numeric" if k.kind == "number" else "categorical" for k in tab}}
    if not encoders:
        raise ValueError("no column of the table can be read by a model: " + "; ".join(
            f"{k.column}: {k.why}" for k in kinds) + ". Set a column's kind with --column NAME=KIND")
    ids = [k.column for k in kinds if k.kind == "identifier"]
    data: Dict[str, Any] = {"columns": columns, "label_column": label}
    if task == "regression":
        data["tasks"] = {label: {"column": label, "regression": True}}
    if ids:
        data["id_column"] = ids[0]
    if train is not None:
        data["train"] = train
    if test is not None:
        data["test"] = test
    raw: Dict[str, Any] = {"name": name, "output_dir": output_dir, "data": data, "model": {"encoders": encoders}}
    if preset:
        raw["preset"] = preset
    if task == "regression":
        raw["trainer"] = {"monitor": "val_loss"}
    return raw


def duplicated_rows(train: pd.DataFrame, test: pd.DataFrame, columns: Sequence[str]) -> int:
    """Test rows whose read columns equal a training row's (a test score that measures memory)."""
    cols = [c for c in columns if c in train.columns and c in test.columns]
    if not cols:
        return 0
    key = lambda df: pd.util.hash_pandas_object(df[cols].astype("string").fillna(""), index=False)  # noqa: E731
    return int(key(test).isin(set(key(train))).sum())


def auto_config(train, label: str, *, test=None, columns: Optional[Mapping[str, str]] = None,
                preset: Optional[str] = "balanced", name: Optional[str] = None, output_dir: str = "runs",
                group: Optional[str] = None, log=print) -> Dict[str, Any]:
    """The config for a table (a path or a DataFrame) and its label column; prints the inferred kinds (``log``),
    suggests a group column when one looks like it, and warns of test rows duplicated from training."""
    from .data.manifest import read_table

    df, base = read_table(train)
    kinds = infer_columns(df, label, base, columns, group)
    task = label_kind(df[label])
    log(f"columns of {'the table' if isinstance(train, pd.DataFrame) else str(train)} ({len(df)} rows; "
        f"label {label!r}: {task}):\n" + kinds_table(kinds, label, task))
    path = lambda src: None if src is None or isinstance(src, pd.DataFrame) else str(Path(src).resolve())  # noqa: E731
    if name is None:
        name = "auto" if isinstance(train, pd.DataFrame) else re.sub(r"[^\w.-]+", "-", Path(train).stem) or "auto"
    raw = config_for_table(kinds, label, task, train=path(train), test=path(test), name=name, output_dir=output_dir,
                           preset=preset)
    if group is not None:
        raw["data"]["group_column"] = group
    else:
        for k in kinds:
            why = looks_like_group(df[k.column], df[label]) if k.kind in ("category", "text") else None
            if why:
                log(f"note: column {k.column!r} may be a group: {why} (--group {k.column})")
    if test is not None:
        tdf, _ = read_table(test)
        read = [k.column for k in kinds if k.used]
        dup = duplicated_rows(df, tdf, read)
        if dup:
            log(f"warning: {dup} of {len(tdf)} test rows equal a training row in every column the model reads; the "
                "test score partly measures memory, not generalisation")
    return raw
