"""A table and the name of its label column are enough: kind inference, what is left out and why, and a fit
with no config."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import mmtune
from mmtune.autoconfig import auto_config, duplicated_rows, infer_columns, label_kind
from mmtune.cli import main as cli
from mmtune.config import load_config


def _every_kind(tmp_path, n=60):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "snd").mkdir()
    sf = pytest.importorskip("soundfile")
    labels = rng.choice(["cat", "dog", "owl"], n)
    for i in range(n):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        sf.write(tmp_path / "snd" / f"{i}.wav", (0.2 * np.sin(np.arange(800) * (i + 1) / 50)).astype(np.float32), 8000)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return pd.DataFrame({
        "photo": [f"img/{i}.png" for i in range(n)],
        "clip": [f"snd/{i}.wav" for i in range(n)],
        "raw_png": [buf.getvalue()] * (n - 1) + [b"x"],
        "review": [f"the {w} was {v} and I would buy it again" for w, v in zip(rng.choice(["box", "lamp", "mug"], n),
                                                                          rng.choice(["fine", "bad", "great"], n))],
        "price": [f"{x:.2f}" for x in rng.normal(10, 2, n)],  # numbers written as text
        "weight": rng.normal(3, 1, n),
        "stars": rng.integers(1, 6, n),
        "colour": rng.choice(["red", "green", "blue", "black"], n),
        "sold_at": pd.date_range("2024-03-01", periods=n, freq="D").strftime("%Y-%m-%d"),
        "sku": [f"SKU-{i:05d}" for i in range(n)],
        "row": np.arange(n),
        "label_id": pd.Series(labels).map({"cat": 0, "dog": 1, "owl": 2}),
        "family": pd.Series(labels).map({"cat": "mammal", "dog": "mammal", "owl": "bird"}),
        "label_copy": labels,
        "shop": ["main"] * n,
        "unused": [None] * n,
        "label": labels,
    })


def test_each_column_gets_its_kind_and_misleading_ones_are_left_out_with_the_reason(tmp_path):
    df = _every_kind(tmp_path)
    got = {k.column: k for k in infer_columns(df, "label", tmp_path)}
    want = {"photo": ("image", True), "clip": ("audio", True), "raw_png": ("ignore", False),
            "review": ("text", True), "price": ("number", True), "weight": ("number", True),
            "stars": ("category", True), "colour": ("category", True), "sold_at": ("datetime", False),
            "sku": ("identifier", False), "row": ("identifier", False), "label_id": ("category", False),
            "family": ("category", False), "label_copy": ("category", False), "shop": ("ignore", False),
            "unused": ("ignore", False)}
    assert {c: (k.kind, k.used) for c, k in got.items()} == want
    assert "100 % of sampled values are paths to readable image files (PNG)" == got["photo"].why
    assert "audio files (WAV)" in got["clip"].why
    assert "written as text" in got["price"].why and "written as text" not in got["weight"].why
    assert "relabelling of the label" in got["label_id"].why and "(leakage)" in got["label_id"].why
    assert "determined by the label" in got["family"].why
    assert "equal to the label" in got["label_copy"].why
    assert "constant" in got["shop"].why and "empty" in got["unused"].why and "file bytes" in got["raw_png"].why
    # overrides win, and a bad one is one line naming it
    forced = {k.column: k for k in infer_columns(df, "label", tmp_path, {"stars": "number", "colour": "ignore"})}
    assert (forced["stars"].kind, forced["stars"].used, forced["colour"].used) == ("number", True, False)
    with pytest.raises(ValueError, match="--column kind 'picture' is not a kind; valid: image, audio"):
        infer_columns(df, "label", tmp_path, {"photo": "picture"})
    with pytest.raises(ValueError, match="label column 'y' is not in the table"):
        infer_columns(df, "y", tmp_path)


def test_the_config_reads_each_kind_with_its_encoder(tmp_path):
    df = _every_kind(tmp_path)
    df["review_2"] = df["review"].str.upper() + " " + df["colour"]
    path = tmp_path / "t.csv"
    df.drop(columns=["raw_png"]).to_csv(path, index=False)
    said = []
    raw = auto_config(path, "label", log=said.append)
    assert "label 'label': classification" in said[0] and "sku" in said[0]
    cfg = load_config(raw)
    assert cfg.data.columns == {"image": "photo", "audio": "clip", "text": "review", "text.review_2": "review_2",
                                "tabular": ["price", "weight", "stars", "colour"]}
    assert cfg.data.id_column == "sku" and cfg.preset == "balanced" and cfg.name == "t"
    enc = cfg.model.encoders
    assert (enc["image"].checkpoint, enc["audio"].checkpoint, enc["tabular"].checkpoint) == (
        "efficientnet-lite0", "efficientnet-lite0-audio", "tabular")
    assert enc["text"].fields == ["text", "text.review_2"]
    assert enc["tabular"].types == {"price": "numeric", "weight": "numeric", "stars": "categorical", "colour": "categorical"}
    assert label_kind(pd.Series(np.random.default_rng(0).normal(size=100))) == "regression"
    assert label_kind(pd.Series([1, 2, 3, 1, 2] * 20)) == "classification"


def test_test_rows_duplicated_from_training_are_counted():
    a = pd.DataFrame({"text": ["x", "y", "z"], "n": [1, 2, 3], "other": [0, 0, 0]})
    b = pd.DataFrame({"text": ["x", "q", "z"], "n": [1, 2, 4], "other": [9, 9, 9]})
    assert duplicated_rows(a, b, ["text", "n"]) == 1  # only ("x", 1); "other" is not read
    assert duplicated_rows(a, b, ["text"]) == 2


def _sentiment_table(n, seed):
    rng = np.random.default_rng(seed)
    good = ["wonderful", "excellent", "lovely", "perfect", "great"]
    bad = ["terrible", "awful", "broken", "horrible", "useless"]
    y = rng.choice(["pos", "neg"], n)
    text = [f"this {rng.choice(['lamp', 'chair', 'kettle'])} is {rng.choice(good if v == 'pos' else bad)}" for v in y]
    return pd.DataFrame({"order": [f"o{seed}-{i}" for i in range(n)], "note": text,
                         "shop": rng.choice(["a", "b", "c"], n), "y": y})


@pytest.mark.stochastic
def test_a_label_only_fit_learns_and_its_bundle_refits(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _sentiment_table(160, 0).to_csv("train.csv", index=False)
    _sentiment_table(60, 1).to_csv("test.csv", index=False)
    assert cli(["fit", "train.csv", "--label", "y", "--test", "test.csv", "--preset", "fast",
                "--set", "trainer.max_epochs=15", "--set", "evaluation.report=false"]) == 0
    out = capsys.readouterr().out
    assert "note" in out and "free text" in out and "order" in out and "identifier" in out
    metrics = json.loads((tmp_path / "runs" / "train" / "metrics.json").read_text())
    assert metrics["test"]["y"]["accuracy"] >= 0.9  # the words decide; MiniLM's frozen embeddings separate them
    pred = mmtune.load(tmp_path / "runs" / "train").predict_table("test.csv")
    assert list(pred["order"]) == list(pd.read_csv("test.csv")["order"])  # the identifier is the id column
    cfg = load_config(tmp_path / "runs" / "train" / "config.yaml")  # the bundle's config refits the same model
    assert cfg.data.train == str(tmp_path / "train.csv") and cfg.data.columns == {"text": "note", "tabular": ["shop"]}
    assert cli(["fit", "train.csv", "--label", "nope"]) == 2
    assert "label column 'nope' is not in the table; its columns: order, note, shop, y" in capsys.readouterr().err
    assert cli(["fit", "train.csv", "--label", "y", "--column", "note"]) == 2
    assert "--column 'note': expected NAME=KIND" in capsys.readouterr().err


def test_fit_takes_a_dataframe_and_a_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = mmtune.fit(_sentiment_table(80, 2), label="y", preset="fast",
                     overrides=["trainer.max_epochs=2", "evaluation.report=false", "evaluation.linear_probe=false"])
    assert res.config.data.columns == {"text": "note", "tabular": ["shop"]} and res.config.data.train is None
    assert (res.run_dir / "bundle.json").is_file() and res.run_dir.name == "auto"
