"""Joining tables recorded apart (a camera's, a chat log's, a call recorder's) into one manifest.

Each row of the first table is an example. Every other table contributes its columns to the rows of the
first whose key (``on``) is equal and whose time (``time``) is nearest within ``tolerance`` — pandas'
``merge_asof`` by key. A row of the first table that finds no partner in a table keeps empty cells there,
which the model treats as a missing modality when ``data.allow_missing`` names it. The report says how
many rows of each table matched, which did not and why, and how far apart the matched times were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .manifest import TableSource, read_table

Direction = Literal["nearest", "backward", "forward"]


@dataclass
class AlignReport:
    """Per joined table: ``matched`` rows of the first table that found a partner, ``unmatched`` the others
    with the reason, rows of this table that no row of the first used, and the time offsets (partner time
    minus first-table time) of the matches."""

    tables: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return self.tables

    def __str__(self) -> str:
        lines = []
        for name, r in self.tables.items():
            off = r["offsets"]
            spread = (f"; offsets min {off['min']}, median {off['median']}, max {off['max']}" if off["n"] else "")
            lines.append(f"{name}: {r['matched']} of {r['anchor_rows']} rows matched, {r['unused']} of its "
                         f"{r['rows']} rows unused{spread}")
            for reason, n in sorted(r["unmatched_reasons"].items()):
                lines.append(f"  {n} unmatched: {reason}")
        return "\n".join(lines)


def _parse_times(values: pd.Series, where: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return values.astype("float64")
    try:
        return pd.to_datetime(values, utc=True).astype("datetime64[ns, UTC]")  # one resolution for every table
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: time values are neither numbers nor dates ({exc})") from None


def _tolerance(tolerance: Union[str, float, int, pd.Timedelta, None], numeric: bool):
    if tolerance is None:
        return None
    if numeric:
        try:
            return float(tolerance)
        except (TypeError, ValueError):
            raise ValueError(f"tolerance {tolerance!r}: the time column holds numbers, so the tolerance must be a "
                             "number in the same unit") from None
    try:
        return pd.Timedelta(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance {tolerance!r} is not a duration (for example '2s', '500ms', '1min')") from None


def _seconds(delta: pd.Series, numeric: bool) -> np.ndarray:
    return delta.to_numpy(dtype=float) if numeric else delta.dt.total_seconds().to_numpy()


def align_tables(tables: Sequence[TableSource], on: Optional[str], time: Optional[str],
                 tolerance: Union[str, float, None] = None, direction: Direction = "nearest",
                 paths: Sequence[str] = (), names: Optional[Sequence[str]] = None) -> Tuple[pd.DataFrame, AlignReport]:
    """Join ``tables`` onto the first; returns the joined table and the report.

    ``on``: key column every table has (equal keys only); ``time``: time column (numbers, or anything
    ``pandas.to_datetime`` reads) matched nearest within ``tolerance`` (``'2s'``; a number for numeric
    times); ``direction``: ``nearest``, ``backward`` (a partner at or before the row's time) or ``forward``.
    Without ``time`` the join is on the key alone (a key must then be unique in the other tables).
    ``paths``: columns holding file paths, made absolute against their table's folder so that the joined
    table can live anywhere. Raises ValueError naming the table and column for a missing column, a column
    two tables share, or unreadable times."""
    if len(tables) < 2:
        raise ValueError("align needs at least two tables")
    if on is None and time is None:
        raise ValueError("align needs a key (on) and/or a time column (time) to join on")
    if direction not in ("nearest", "backward", "forward"):
        raise ValueError(f"direction {direction!r}; valid: nearest, backward, forward")
    names = list(names or [(str(t) if not isinstance(t, pd.DataFrame) else f"table {i + 1}") for i, t in enumerate(tables)])
    frames = []
    for name, src in zip(names, tables):
        df, base = read_table(src)
        for col in [c for c in (on, time) if c]:
            if col not in df.columns:
                raise ValueError(f"{name} has no column {col!r}; its columns are: {', '.join(map(str, df.columns))}")
        for col in paths:
            if col in df.columns and base is not None:
                df[col] = [v if not isinstance(v, str) or Path(v).is_absolute() else str((base / v).resolve()) for v in df[col]]
        frames.append(df)
    keys = [c for c in (on, time) if c]
    seen: Dict[str, str] = {c: names[0] for c in frames[0].columns}
    for name, df in zip(names[1:], frames[1:]):
        for c in df.columns:
            if c not in keys and c in seen:
                raise ValueError(f"column {c!r} is in both {seen[c]} and {name}; rename it in one of them")
            seen.setdefault(c, name)

    anchor = frames[0].reset_index(drop=True).copy()
    anchor["__row"] = np.arange(len(anchor))
    numeric = True
    if time:
        anchor["__t"] = _parse_times(anchor[time], names[0])
        numeric = pd.api.types.is_numeric_dtype(anchor["__t"])
    tol = _tolerance(tolerance, numeric) if time else None
    report = AlignReport()
    out = anchor
    for name, df in zip(names[1:], frames[1:]):
        other = df.reset_index(drop=True).copy()
        other["__other_row"] = np.arange(len(other))
        if time:
            other["__t"] = _parse_times(other[time], name)
            if pd.api.types.is_numeric_dtype(other["__t"]) != numeric:
                raise ValueError(f"{name}: its times are {'numbers' if not numeric else 'dates'} but those of "
                                 f"{names[0]} are not")
            other["__t_other"] = other["__t"]
            other = other.drop(columns=[time])
            left = out.sort_values("__t", kind="stable")
            right = other.sort_values("__t", kind="stable")
            usable_left = left["__t"].notna() & (left[on].notna() if on else True)
            usable_right = right["__t"].notna() & (right[on].notna() if on else True)
            joined = pd.merge_asof(left[usable_left], right[usable_right], on="__t", by=on, tolerance=tol,
                                   direction=direction)
            joined = pd.concat([joined, left[~usable_left]]).sort_values("__row")
        else:
            dup = other[on][other[on].duplicated(keep=False)]
            if len(dup):
                raise ValueError(f"{name}: key {dup.iloc[0]!r} occurs {int((other[on] == dup.iloc[0]).sum())} times; "
                                 "without a time column each key must be unique (give time= to pick the nearest)")
            joined = out.merge(other, on=on, how="left")
        matched = joined["__other_row"].notna().to_numpy()
        reasons: Dict[str, int] = {}
        key_set = set(other[on].dropna()) if on else set()
        for i in np.where(~matched)[0]:
            row = joined.iloc[i]
            if time and pd.isna(row["__t"]):
                why = f"no {time} in this row"
            elif on and row[on] not in key_set:
                why = f"no row with this {on} in {name}"
            elif time:
                why = f"no row of {name} within the tolerance ({tolerance}, direction {direction})"
            else:  # pragma: no cover - a key join either matches or lacks the key
                why = "no partner"
            reasons[why] = reasons.get(why, 0) + 1
        used = joined["__other_row"].dropna().astype(int)
        offsets = np.array([])
        if time:
            offsets = _seconds(joined.loc[matched, "__t_other"] - joined.loc[matched, "__t"], numeric)
            joined = joined.drop(columns=["__t_other"])
        report.tables[name] = {
            "rows": int(len(other)), "anchor_rows": int(len(joined)), "matched": int(matched.sum()),
            "unmatched": int((~matched).sum()), "unmatched_reasons": reasons,
            "unused": int(len(other) - used.nunique()), "reused": int(used.duplicated().sum()),
            "offsets": {"n": int(len(offsets)), "unit": "seconds" if not numeric else "time units",
                        **({"min": float(offsets.min()), "median": float(np.median(offsets)),
                            "max": float(offsets.max()), "mean_abs": float(np.abs(offsets).mean())}
                           if len(offsets) else {})},
        }
        out = joined.drop(columns=["__other_row"])
    out = out.sort_values("__row").drop(columns=[c for c in ("__row", "__t") if c in out.columns]).reset_index(drop=True)
    return out, report
