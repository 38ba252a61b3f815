"""Explanations checked with planted signals: the one word that decides the label, the half of the picture that
decides it, a modality that carries nothing, and Integrated Gradients' completeness."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mmtune
from conftest import base_config
from mmtune.cli import main as cli

pytest.importorskip("captum")

FILLER = ["the", "chair", "lamp", "mug", "box", "bag", "arrived", "after", "day", "my", "kids", "small", "one", "is"]
KEYS = {"excellent": "good", "awful": "bad"}
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
OTHERS = {"green": (30, 200, 30), "yellow": (220, 220, 40), "grey": (128, 128, 128)}


def _planted(folder: Path, n: int, seed: int):
    """Text label: one key word among filler words (the picture is noise to it). Image label: the colour of the
    left half (red or blue); the right half is green, yellow or grey, and the text is noise to it."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(6)]
        key = rng.choice(sorted(KEYS))
        words.insert(rng.randrange(len(words) + 1), key)
        left = rng.choice(["red", "blue"])
        right = rng.choice(sorted(OTHERS))
        im = Image.new("RGB", (64, 64), OTHERS[right])
        im.paste(Image.new("RGB", (32, 64), COLOURS[left]), (0, 0))
        im.save(folder / "images" / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"images/{i}.png", "text": " ".join(words), "key": key,
                     "word_label": KEYS[key], "colour_label": left})
    df = pd.DataFrame(rows)
    df.iloc[: int(n * 0.75)].to_csv(folder / "train.csv", index=False)
    df.iloc[int(n * 0.75):].to_csv(folder / "test.csv", index=False)
    return folder / "train.csv", folder / "test.csv"


@pytest.fixture(scope="module")
def resnet64(tmp_path_factory):
    """A tiny random ResNet reading 64 px pictures: an 8×8 last feature map."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    folder = tmp_path_factory.mktemp("resnet64")
    torch.manual_seed(2)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).save_pretrained(str(folder))
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_vit, resnet64, tiny_bert):
    folder = tmp_path_factory.mktemp("planted")
    train, test = _planted(folder, 320, seed=0)
    runs = {}
    # the word task over a ViT, the picture task over a CNN (Grad-CAM on its last feature map)
    for label, image in (("word_label", tiny_vit), ("colour_label", resnet64)):
        enc = {"image": {"modality": "image", "checkpoint": image}, "text": {"modality": "text", "checkpoint": tiny_bert}}
        cfg = base_config(folder / label, enc, data={"label_column": label}, finetune={"type": "full"},
                          optim={"lr": 2e-3}, trainer={"max_epochs": 12}, evaluation={"explain": 4, "report": True})
        runs[label] = mmtune.fit(cfg, train=str(train), test=str(test))
    return runs, test


def _test_rows(test):
    df = pd.read_csv(test)
    df["image"] = [str(Path(test).parent / p) for p in df["image"]]
    return df


@pytest.mark.stochastic
def test_the_deciding_word_gets_the_largest_attribution(planted):
    runs, test = planted
    res = runs["word_label"]
    assert res.metrics["test"]["word_label"]["accuracy"] >= 0.95
    df = _test_rows(test)
    expl = res.load().explain(df)
    # attributions toward the predicted class: the deciding word has the largest
    hits = [max(r["words"]["text"], key=lambda w: w["attribution"])["word"] == key for r, key in zip(expl.rows, df["key"])]
    assert np.mean(hits) >= 0.9
    top = {c: [w["word"] for w in ws[:1]] for c, ws in expl.table["top_words"].items()}
    assert top == {"good": ["excellent"], "bad": ["awful"]}


@pytest.mark.stochastic
def test_a_modality_that_carries_nothing_contributes_nothing(planted):
    runs, test = planted
    expl = runs["word_label"].load().explain(_test_rows(test), activation_rows=0)
    share = expl.table["mean_attribution_share"]
    masking = expl.table["mean_contribution_masking"]
    # The picture is noise here. Attribution share (seeds 0-2: image 0.10, 0.004, 0.04) is the noise the model
    # fitted on 240 rows; masking (image 0.078-0.088, text 0.31-0.46) also moves the image's features to zeros,
    # off what the model saw in training, which costs a little probability even for a modality it does not use.
    assert share["image"] <= 0.2 and share["text"] >= 0.8
    assert abs(masking["image"]) <= 0.12 and masking["text"] >= 0.2 and masking["text"] >= 2.5 * abs(masking["image"])


@pytest.mark.stochastic
def test_the_heatmap_falls_on_the_half_of_the_picture_that_decides(planted):
    runs, test = planted
    res = runs["colour_label"]
    assert res.metrics["test"]["colour_label"]["accuracy"] >= 0.95
    expl = res.load().explain(_test_rows(test), activation_rows=0)
    left = [cam[:, : cam.shape[1] // 2].sum() for cam in (c["image"] for c in expl.cams)]
    assert all(abs(c["image"].sum() - 1) < 1e-5 for c in expl.cams)
    assert np.mean(left) >= 0.7


def test_integrated_gradients_is_complete(planted):
    runs, test = planted
    expl = runs["word_label"].load().explain(_test_rows(test).head(16), steps=32, activation_rows=0)
    for r in expl.rows:
        c = r["completeness"]
        assert abs(c["sum"] - c["logit_difference"]) <= 0.05 * abs(c["logit_difference"]) + 1e-6
        t = r["text_completeness"]["text"]
        assert abs(t["delta"]) <= 0.05 * abs(t["sum"] - t["delta"]) + 1e-6


def test_explain_page_cli_and_the_fit_report_link(planted, tmp_path):
    runs, test = planted
    res = runs["colour_label"]
    out = tmp_path / "expl"
    assert cli(["explain", "--run", str(res.run_dir), "--data", str(test), "--out", str(out), "--rows", "5"]) == 0
    page = (out / "explanations.html").read_text()
    assert "data:image/png;base64," in page and "id='row5'" in page and "Words most attributed" in page
    lines = [json.loads(x) for x in (out / "attributions.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and {"prediction", "contribution_masking", "attribution_share", "words", "cam"} <= set(lines[0])
    assert len(list((out / "plots").glob("row*-image.png"))) == 5
    said = res.metrics["explanations"]
    report = (res.run_dir / "report.html").read_text()
    if said.get("rows"):
        assert (res.run_dir / said["page"]).is_file() and said["page"] in report
    onnx = tmp_path / "x.csv"
    _test_rows(test).head(2).to_csv(onnx, index=False)
    from mmtune.serving.export import export_onnx

    export_onnx(res.run_dir, tmp_path / "export", data=str(onnx), log=lambda *_: None)
    with pytest.raises(ValueError, match="explanations need the PyTorch model"):
        mmtune.load(tmp_path / "export").explain(_test_rows(test).head(2))


def test_cross_attention_maps_are_drawn_on_the_picture(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    from mmtune.explain.page import attention_on

    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, model={"fusion": {"type": "cross_attention", "width": 32, "heads": 2, "hidden_dims": [32]}},
                      trainer={"max_epochs": 1}, evaluation={"explain": 0, "report": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]))
    df = _test_rows(colour_verdict["test"]).head(3)
    expl = res.in_memory().explain(df, activation_rows=0)
    entry = expl.attention[0]["text"]
    w = np.asarray(entry["weights"])
    assert w.shape[1] == 1 + 17 and np.allclose(w.sum(1), 1, atol=1e-5)  # the null key + the ViT's 1 + 4x4 tokens
    amap = attention_on(entry, "image")
    assert amap.shape == (4, 4) and abs(amap.sum() - 1) < 1e-5
    written = expl.write(tmp_path / "page")
    assert len(list((tmp_path / "page" / "plots").glob("row*-attention-text-on-image.png"))) == 3
    assert "text attention on image" in Path(written["html"]).read_text()


def test_activation_statistics_count_dead_constant_and_saturated_units(planted):
    import torch

    runs, test = planted
    pred = runs["word_label"].load()
    blocks = [b for b in pred.model.encoders["text"].modules() if isinstance(b, torch.nn.ModuleList)]
    stack = max(blocks, key=lambda m: sum(p.numel() for p in m.parameters()))
    last = stack[-1]
    # plant: the last text block's output forced to 0 on its first 8 units and to 6 on the next 4
    def hook(module, args, out):
        t = out[0] if isinstance(out, tuple) else out
        t = t.clone()
        t[..., :8] = 0.0
        t[..., 8:12] = 6.0
        return (t, *out[1:]) if isinstance(out, tuple) else t
    handle = last.register_forward_hook(hook)
    try:
        acts = pred.explain(_test_rows(test).head(6), activation_rows=6).activations
    finally:
        handle.remove()
    s = acts["layers"][f"text/{len(stack) - 1}"]
    assert s["units"] == 32 and acts["rows"] == 6
    assert s["constant_fraction"] == 12 / 32          # 8 at zero, 4 at six
    assert s["dead_fraction"] >= 8 / 32               # the zeros never turn positive
    assert s["saturated_fraction"] == 4 / 32          # the sixes sit at the block's largest value
    assert sum(s["histogram"]) > 0 and sum(s["histogram"]) % (6 * 32) == 0  # every value of 6 rows x tokens x 32 units
