"""Joining tables recorded apart: planted offsets, duplicates, keys that never meet, and a fit on the result."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mmtune
from conftest import base_config
from mmtune.cli import main as cli


def _tables():
    t0 = pd.Timestamp("2026-01-01 10:00:00")
    images = pd.DataFrame({"session": ["a", "a", "b", "c", "d"],
                           "ts": [t0 + pd.Timedelta(seconds=s) for s in (0, 60, 0, 0, 0)],
                           "image": ["a0.png", "a1.png", "b.png", "c.png", "d.png"]})
    texts = pd.DataFrame({"session": ["a", "a", "a", "b", "c", "z"],
                          # a@0 has two candidates (+0.5 s, +1.5 s): the nearer wins; a@60 gets +59.0 → too far
                          # for 2 s... except the row at +61.2 s; b is 5 s away (unmatched); z meets no image
                          "ts": [t0 + pd.Timedelta(seconds=s) for s in (0.5, 1.5, 61.2, 5.0, -0.8, 0)],
                          "text": ["a-near", "a-far", "a-late", "b-5s", "c-early", "z"]})
    return images, texts


def test_nearest_within_tolerance_by_key_with_the_offsets_reported():
    images, texts = _tables()
    joined, report = mmtune.align([images, texts], on="session", time="ts", tolerance="2s")
    assert list(joined["image"]) == list(images["image"])  # one row per row of the first table, in its order
    assert list(joined["text"].fillna("-")) == ["a-near", "a-late", "-", "c-early", "-"]
    r = report.tables["table 2"]
    assert (r["rows"], r["matched"], r["unmatched"]) == (6, 3, 2)
    assert r["unmatched_reasons"] == {"no row of table 2 within the tolerance (2s, direction nearest)": 1,
                                      "no row with this session in table 2": 1}
    assert r["unused"] == 3  # a-far (a nearer row won), b-5s (too far), z (no such session)
    assert r["offsets"]["n"] == 3
    assert r["offsets"]["min"] == pytest.approx(-0.8) and r["offsets"]["max"] == pytest.approx(1.2)
    assert r["offsets"]["median"] == pytest.approx(0.5)


def test_direction_and_numeric_times():
    a = pd.DataFrame({"k": [1, 1], "t": [10.0, 20.0], "x": ["p", "q"]})
    b = pd.DataFrame({"k": [1, 1], "t": [9.0, 10.5], "y": ["before", "after"]})
    back, _ = mmtune.align([a, b], on="k", time="t", tolerance=1.0, direction="backward")
    fwd, _ = mmtune.align([a, b], on="k", time="t", tolerance=1.0, direction="forward")
    assert list(back["y"].fillna("-")) == ["before", "-"]
    assert list(fwd["y"].fillna("-")) == ["after", "-"]
    with pytest.raises(ValueError, match="the time column holds numbers, so the tolerance must be a number"):
        mmtune.align([a, b], on="k", time="t", tolerance="2s")


def test_mistakes_are_named():
    images, texts = _tables()
    with pytest.raises(ValueError, match="table 2 has no column 'session'"):
        mmtune.align([images, texts.drop(columns="session")], on="session", time="ts", tolerance="2s")
    with pytest.raises(ValueError, match="column 'image' is in both table 1 and table 2"):
        mmtune.align([images, texts.assign(image="x")], on="session", time="ts", tolerance="2s")
    with pytest.raises(ValueError, match="key 'a' occurs 3 times; without a time column each key must be unique"):
        mmtune.align([images, texts.drop(columns="ts")], on="session")
    with pytest.raises(ValueError, match="tolerance 'soon' is not a duration"):
        mmtune.align([images, texts], on="session", time="ts", tolerance="soon")


def test_cli_writes_the_join_and_its_report_with_absolute_paths(tmp_path, capsys):
    images, texts = _tables()
    (tmp_path / "cam").mkdir()
    images.to_csv(tmp_path / "cam" / "images.csv", index=False)
    texts.to_csv(tmp_path / "texts.csv", index=False)
    out = tmp_path / "joined.csv"
    assert cli(["align", str(tmp_path / "cam" / "images.csv"), str(tmp_path / "texts.csv"), "--on", "session",
                "--time", "ts", "--tolerance", "2s", "--paths", "image", "--out", str(out)]) == 0
    joined = pd.read_csv(out)
    assert list(joined["image"]) == [str(tmp_path / "cam" / p) for p in images["image"]]
    report = json.loads((tmp_path / "joined.csv.alignment.json").read_text())
    assert report[str(tmp_path / "texts.csv")]["matched"] == 3
    assert "3 of 5 rows matched" in capsys.readouterr().out
    assert cli(["align", str(out), str(tmp_path / "texts.csv"), "--on", "session", "--out", str(out)]) == 2


def test_fit_on_an_aligned_table_with_missing_text(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    """A camera table and a chat log, 0.3-1.5 s apart; every fifth chat row is lost, so those examples
    keep their image and miss their text (allowed)."""
    train = pd.read_csv(colour_verdict["train"]).head(160)
    folder = Path(colour_verdict["train"]).parent
    t0 = pd.Timestamp("2026-03-01")
    rng = np.random.default_rng(0)
    cam = pd.DataFrame({"id": train["id"], "session": train["id"], "ts": [t0 + pd.Timedelta(minutes=i) for i in range(len(train))],
                        "image": train["image"], "label": train["label"]})
    chat = pd.DataFrame({"session": train["id"], "ts": cam["ts"] + pd.to_timedelta(rng.uniform(0.3, 1.5, len(train)), "s"),
                         "text": train["text"]}).iloc[[i for i in range(len(train)) if i % 5]]
    cam.to_csv(folder / "cam.csv", index=False)
    chat.to_csv(tmp_path / "chat.csv", index=False)
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"align": {"tables": [str(folder / "cam.csv"), str(tmp_path / "chat.csv")],
                                                     "on": "session", "time": "ts", "tolerance": "2s"},
                                           "allow_missing": ["text"]},
                      trainer={"max_epochs": 2}, evaluation={"report": False})
    res = mmtune.fit(cfg)
    a = res.metrics["alignment"][str(tmp_path / "chat.csv")]
    assert a["matched"] == 128 and a["unmatched"] == 32 and 0.3 <= a["offsets"]["min"] <= a["offsets"]["max"] <= 1.5
    assert res.metrics["val"]["label"]["n"] + len(pd.read_csv(res.run_dir / "predictions" / "val.csv")) == 64
