"""The linear probe beside every run: scikit-learn's logistic regression on the frozen encoders' features,
its C chosen on validation, its metrics and the model's difference in metrics.json, the console and the report."""
import numpy as np
import torch
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

import mmtune
from conftest import base_config
from mmtune.cli import main as cli


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_vit, tiny_bert, colour_verdict):
    tmp = tmp_path_factory.mktemp("probe")
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp, enc, finetune={"type": "frozen"}, trainer={"max_epochs": 4},
                      evaluation={"report": True, "linear_probe": True})
    return mmtune.fit(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))


def test_the_probe_is_sklearn_on_the_frozen_features_with_c_from_validation(probed, colour_verdict):
    from mmtune.data.datamodule import TableDataModule
    from mmtune.evaluation.probe import C_GRID, probe_features
    from mmtune.finetune.fingerprints import cache_folder
    from mmtune.models import build_model

    cfg = probed.config
    data = TableDataModule(cfg, str(colour_verdict["train"]), None, str(colour_verdict["test"])).read()
    model = build_model(cfg.model, {t.name: t.outputs for t in data.tasks})  # the pretrained encoders again
    feats = probe_features(model, data, cache_folder(cfg), 32)
    scaler = StandardScaler().fit(feats["train"])
    y = {s: np.asarray([data.tasks[0].encode(v) for v in data.prepared.frames[s]["label"]]) for s in feats}
    losses = {c: log_loss(y["val"], LogisticRegression(C=c, max_iter=2000, random_state=0)
                          .fit(scaler.transform(feats["train"]), y["train"]).predict_proba(scaler.transform(feats["val"])),
                          labels=[0, 1, 2, 3]) for c in C_GRID}
    probe = probed.metrics["linear_probe"]["label"]
    assert probe["C"] == min(losses, key=losses.get)
    clf = LogisticRegression(C=probe["C"], max_iter=2000, random_state=0).fit(scaler.transform(feats["train"]), y["train"])
    assert probe["test"]["accuracy"] == pytest.approx(accuracy_score(y["test"], clf.predict(scaler.transform(feats["test"]))))
    diff = probed.metrics["model_minus_probe"]["label"]
    assert diff["split"] == "test"
    assert diff["accuracy"] == pytest.approx(probed.metrics["test"]["label"]["accuracy"] - probe["test"]["accuracy"])
    # a frozen run reads the probe's cache entries: one file per encoder and split, nothing computed twice
    assert len(list(cache_folder(cfg).glob("*.cache"))) == 2 * 3


def test_the_probe_is_in_the_report_and_the_console(probed, capsys, tmp_path, tiny_bert, colour_verdict):
    page = (probed.run_dir / "report.html").read_text()
    assert "Linear probe" in page and "what fine-tuning has to beat" in page
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}}, trainer={"max_epochs": 1},
                      evaluation={"report": False, "linear_probe": True})
    cfg["data"]["train"] = str(colour_verdict["train"])
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["fit", str(tmp_path / "c.yaml")]) == 0
    assert "linear probe (logistic regression on the frozen encoders' features), label, val: accuracy" in capsys.readouterr().out
    off = mmtune.fit(cfg, overrides=["evaluation.linear_probe=false", "name=off"])
    assert "linear_probe" not in off.metrics


def test_no_probe_without_a_pretrained_encoder(tmp_path):
    df = pd.DataFrame({"id": range(40), "x": np.arange(40.0), "label": ["a", "b"] * 20})
    cfg = base_config(tmp_path, {"t": {"modality": "tabular", "checkpoint": "tabular"}}, data={"columns": {"tabular": ["x"]}},
                      trainer={"max_epochs": 1}, evaluation={"report": False, "linear_probe": True})
    assert "linear_probe" not in mmtune.fit(cfg, train=df).metrics


def test_the_probe_does_not_change_the_run(tmp_path, tiny_bert, colour_verdict):
    """Training draws the same random numbers with the probe on or off: the same trained model."""
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    runs = []
    for on in (True, False):
        cfg = base_config(tmp_path / str(on), enc, trainer={"max_epochs": 2}, evaluation={"report": False, "linear_probe": on})
        runs.append(mmtune.fit(cfg, train=str(colour_verdict["train"])))
    assert "linear_probe" in runs[0].metrics and "linear_probe" not in runs[1].metrics
    a, b = (dict(r.model.named_parameters()) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_long_training_split_is_probed_on_a_seeded_sample(probed, colour_verdict):
    """Past ``evaluation.linear_probe_rows`` the probe fits on a seeded sample of the training rows (its
    features stay small however long the table) and still scores every validation and test row."""
    from mmtune.data.datamodule import TableDataModule
    from mmtune.evaluation.probe import linear_probe, probe_frames
    from mmtune.finetune.fingerprints import cache_folder
    from mmtune.models import build_model

    cfg = probed.config
    data = TableDataModule(cfg, str(colour_verdict["train"]), None, str(colour_verdict["test"])).read()
    model = build_model(cfg.model, {t.name: t.outputs for t in data.tasks})
    a, b = probe_frames(data, 60, seed=3), probe_frames(data, 60, seed=3)
    ids = a["train"]["id"].tolist()
    assert ids == b["train"]["id"].tolist() and len(set(ids)) == 60
    assert set(ids) <= set(data.prepared.frames["train"]["id"]) and ids != probe_frames(data, 60, seed=4)["train"]["id"].tolist()
    assert a["val"] is data.prepared.frames["val"] and probe_frames(data, 10_000)["train"] is data.prepared.frames["train"]
    probe = linear_probe(model, data, cache_folder(cfg), 32, seed=3, max_train_rows=60)["label"]
    assert probe["train_rows"] == 60 and probe["test"]["n"] == len(data.prepared.frames["test"])
    assert probed.metrics["linear_probe"]["label"]["train_rows"] == len(data.prepared.frames["train"])


def test_few_shot_heads_fit_on_k_rows_a_class_and_the_logistic_one_is_scikit_learns():
    from sklearn.linear_model import LogisticRegression

    from mmtune.evaluation.probe import few_shot_heads

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 20))
    def split(n):  # noqa: E306
        y = np.repeat(np.arange(3), n)
        return centres[y] + rng.normal(0, 1, (len(y), 20)), y
    (Xtr, ytr), (Xte, yte) = split(30), split(20)
    out = few_shot_heads({"train": Xtr, "test": Xte}, {"train": ytr, "test": yte}, 3, k=5, seed=7, classes=["a", "b", "c"])
    assert out["k"] == 5 and out["rows"] == 15
    draw = np.random.default_rng(7)
    rows = [i for c in range(3) for i in draw.choice(np.flatnonzero(ytr == c), 5, replace=False)]
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=7).fit(Xtr[rows], ytr[rows])
    assert out["logistic"]["test"]["accuracy"] == pytest.approx((clf.predict(Xte) == yte).mean(), abs=1e-12)
    assert out["centroid"]["test"]["accuracy"] >= 0.9  # well-separated clusters: 5 rows a class suffice
    assert few_shot_heads({"train": Xtr[:40], "test": Xte}, {"train": ytr[:40], "test": yte}, 3, k=5) is None  # class c has none


def test_a_joint_encoders_zero_shot_stands_beside_the_model(tmp_path, tiny_clip, colour_verdict):
    """The zero-shot figures are CLIP's own: the most similar class-name prompt by its projections."""
    import torch
    from transformers import CLIPModel

    from mmtune.data.dataset import encode_labels
    from mmtune.encoders import build_encoder
    from mmtune.modalities import modality_of

    cfg = base_config(tmp_path, {"clip": {"modality": "image_text", "checkpoint": tiny_clip}},
                      data={"train": str(colour_verdict["train"]), "test": str(colour_verdict["test"])},
                      trainer={"max_epochs": 1}, evaluation={"report": False, "linear_probe": True, "few_shot": [3],
                                                             "zero_shot_template": "this {}"})
    res = mmtune.fit(cfg)
    probe = res.metrics["linear_probe"]["label"]
    assert set(probe["few_shot"]["3"]) >= {"logistic", "centroid"} and probe["few_shot"]["3"]["rows"] == 12
    zs = probe["zero_shot"]
    test = pd.read_csv(colour_verdict["test"])
    enc = build_encoder(res.config.model.encoders["clip"], res.run_dir / "encoders" / "clip")
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    task = res.tasks[0]
    images = [modality_of("image").read(str(colour_verdict["test"].parent / p), None) for p in test["image"]]
    with torch.no_grad():
        px = enc.processor({"image": images, "text": [""] * len(images)})["pixel_values"]
        img = clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output)
        t = enc.processor({"image": [None] * len(task.classes), "text": [f"this {c}" for c in task.classes]})
        txt = clip.text_projection(clip.text_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output)
    sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    y = encode_labels(task, test[task.column])
    assert zs["test"]["accuracy"] == pytest.approx(float((sims.argmax(1).numpy() == y).mean()), abs=1e-9)
