"""Generated bad input, thrown at the manifest reader (hypothesis): random bytes as images and audio, random
unicode, random column sets, in every table format. Nothing may escape as a traceback; every problem names its row
and column. The server's counterpart is in test_deploy.py (beside the server it needs).

A few hundred examples run in the suite; ``MMTUNE_FUZZ_EXAMPLES=5000`` runs more."""
from __future__ import annotations

import base64
import io
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from mmtune.data.manifest import BadRowsError, ManifestSpec, read_valid_rows  # noqa: E402
from mmtune.tasks import Task  # noqa: E402

EXAMPLES = int(os.environ.get("MMTUNE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _png(size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _wav() -> bytes:
    sf = pytest.importorskip("soundfile")
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.linspace(0, 300, 4000))).astype(np.float32), 8000, format="WAV")
    return buf.getvalue()


# the contents a file column's file may have: a real file, nothing, random bytes, a real file cut short, text
file_bytes = st.one_of(st.just("png"), st.just("wav"), st.binary(max_size=64), st.just(b""),
                       st.integers(1, 60).map(lambda n: ("cut", n)), st.text(max_size=20).map(str.encode))
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=30))


def _file(folder: Path, content, suffix: str) -> str:
    if content == "png":
        data = _png()
    elif content == "wav":
        data = _wav()
    elif isinstance(content, tuple):
        data = _png()[: content[1]]
    else:
        data = content
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(data)
    return path.name


@st.composite
def tables(draw, folder: Path):
    """A manifest of 1-6 rows: each cell of the image and audio columns a file (good, empty, random, cut short,
    or no file at all), texts random unicode or other types, labels anything; sometimes a column missing or extra."""
    n = draw(st.integers(1, 6))
    cols = {}
    for name, suffix in (("image", ".png"), ("audio", ".wav")):
        cells = []
        for _ in range(n):
            kind = draw(st.sampled_from(["file", "file", "missing", "scalar"]))
            cells.append(_file(folder, draw(file_bytes), suffix) if kind == "file" else
                         f"no-such-{uuid.uuid4().hex}{suffix}" if kind == "missing" else draw(scalar))
        cols[name] = cells
    cols["text"] = [draw(st.one_of(st.text(max_size=40), scalar)) for _ in range(n)]
    cols["label"] = [draw(st.one_of(st.sampled_from(["a", "b"]), scalar)) for _ in range(n)]
    for name in draw(st.sets(st.sampled_from(list(cols)), max_size=2)):
        cols.pop(name)  # a column the spec asks for, missing
    if draw(st.booleans()):
        cols[draw(st.text(min_size=1, max_size=8))] = [draw(scalar) for _ in range(n)]
    return pd.DataFrame(cols)


def _write(df: pd.DataFrame, folder: Path, fmt: str) -> Path:
    path = folder / f"{uuid.uuid4().hex}.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.astype(str).to_parquet(path, index=False)  # Parquet columns need one type each
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("source", ["frame", "csv", "jsonl", "parquet"])
def test_the_manifest_reader_names_the_row_and_column_of_every_problem(folder, source):
    pytest.importorskip("soundfile")
    task = Task("label", "label")
    spec = ManifestSpec({"image": "image", "audio": "audio", "text": "text"}, (task,), None, ())

    @FUZZ
    @given(df=tables(folder))
    def check(df):
        data = df if source == "frame" else _write(df, folder, source)
        try:
            good, _, bad, rejected = read_valid_rows(data, spec, "train", require_label=True)
        except BadRowsError as exc:  # a table-level problem, or rows named one by one
            assert "row" in str(exc), str(exc)
            return
        except ValueError as exc:  # a column missing, a file that is not a table: the message names it
            said = str(exc)
            assert any(w in said for w in ("column", "row", "file", "manifest", "table")), said
            assert "Traceback" not in said
            return
        # every row the file holds is kept or named (a bare carriage return in a cell that pandas wrote unquoted
        # is a line break to any CSV reader: count the rows the file holds, not the frame's)
        n = len(df) if source != "csv" else len(pd.read_csv(data))
        assert len(good) + len({b.row for b in bad}) == n
        for b in bad:
            assert 1 <= b.row <= n and b.column in ("image", "audio", "text", "label") and b.reason, b

    check()
