"""End to end: a tiny fit that learns, a bundle that reloads to the same numbers, resume, CLI."""
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

import mmtune
from mmtune.cli import main as cli
from conftest import base_config


def _encoders(tiny_vit, tiny_bert, tmp_path):
    # Copies, so that deleting them proves the bundle no longer needs the original checkpoints.
    vit, bert = tmp_path / "ckpt-vit", tmp_path / "ckpt-bert"
    shutil.copytree(tiny_vit, vit)
    shutil.copytree(tiny_bert, bert)
    return {"image": {"modality": "image", "checkpoint": str(vit)},
            "text": {"modality": "text", "checkpoint": str(bert)}}, [vit, bert]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_vit, tiny_bert, colour_verdict):
    tmp = tmp_path_factory.mktemp("fit")
    encoders, ckpts = _encoders(tiny_vit, tiny_bert, tmp)
    cfg = base_config(tmp, encoders)
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))
    in_memory = res.in_memory()  # the model object fit trained, never written or read back
    return res, ckpts, in_memory


@pytest.mark.stochastic
def test_fit_learns_a_task_that_needs_both_modalities(fitted):
    res, _, _ = fitted
    # 4 balanced classes: chance is 0.25, one modality alone can reach 0.5.
    assert res.metrics["test"]["label"]["accuracy"] >= 0.8
    assert res.metrics["val"]["label"]["accuracy"] >= 0.8


def test_bundle_contents(fitted):
    res, _, _ = fitted
    d = res.run_dir
    for f in ["config.yaml", "model.safetensors", "labels.json", "metrics.json", "bundle.json",
              "encoders/image/config.json", "encoders/image/processor/preprocessor_config.json",
              "encoders/text/config.json", "encoders/text/processor/tokenizer_config.json", "logs/metrics.csv",
              "checkpoints/last.ckpt", "checkpoints/best.ckpt"]:
        assert (d / f).exists(), f
    tasks = json.loads((d / "labels.json").read_text())["tasks"]
    assert [t["name"] for t in tasks] == ["label"]
    assert tasks[0]["classes"] == ["cool-keep", "cool-return", "warm-keep", "warm-return"]
    logs = pd.read_csv(d / "logs" / "metrics.csv")
    assert {"train_loss_epoch", "val_loss", "val_acc", "val_f1_macro", "epoch"} <= set(logs.columns)
    assert logs["val_acc"].notna().sum() == 12  # one validation row per epoch
    assert not list(d.rglob("*.tmp")), "temporary files left behind"


def test_reloaded_bundle_matches_in_memory_model_without_original_checkpoints(fitted, colour_verdict):
    res, ckpts, in_memory = fitted
    test = pd.read_csv(colour_verdict["test"])
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    # The model as trained, the object fit returned, before anything is reloaded.
    assert in_memory.model is res.model
    expected = in_memory.predict_proba(test)
    for c in ckpts:
        shutil.rmtree(c)
    reloaded = mmtune.load(res.run_dir)
    got = reloaded.predict_proba(test)
    cols = [str(c) for c in reloaded.class_names]
    assert np.abs(got[cols].to_numpy() - expected[cols].to_numpy()).max() <= 1e-5
    assert list(got["id"]) == list(test["id"])
    labels = reloaded.predict(test)
    assert list(labels) == [reloaded.class_names[i] for i in got[cols].to_numpy().argmax(1)]


def test_in_memory_model_matches_bundle_metrics(fitted, colour_verdict):
    """metrics.json equals scikit-learn on the in-memory model's predictions (calibrated, as reported)."""
    res, _, in_memory = fitted
    test = pd.read_csv(colour_verdict["test"])
    base = Path(colour_verdict["test"]).parent
    test["image"] = [str(base / p) for p in test["image"]]
    proba = in_memory.predict_proba(test)
    cols = [str(c) for c in in_memory.class_names]
    y = [cols.index(v) for v in test["label"]]
    p = proba[cols].to_numpy().astype(np.float64)
    assert res.metrics["test"]["label"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)), abs=1e-9)
    assert res.metrics["test"]["label"]["f1_macro"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"), abs=1e-9)
    assert res.metrics["test"]["label"]["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr"), abs=1e-6)


def test_cli_predict_and_evaluate(fitted, colour_verdict, tmp_path, capsys):
    res, _, _ = fitted
    out = tmp_path / "preds.csv"
    assert cli(["predict", "--run", str(res.run_dir), "--data", str(colour_verdict["test"]), "--out", str(out)]) == 0
    preds = pd.read_csv(out)
    test = pd.read_csv(colour_verdict["test"])
    assert list(preds["id"]) == list(test["id"])
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    assert len(prob_cols) == 4 and np.allclose(preds[prob_cols].sum(1), 1.0, atol=1e-5)
    assert (preds["prediction"] == test["label"]).mean() == pytest.approx(res.metrics["test"]["label"]["accuracy"])

    assert cli(["evaluate", "--run", str(res.run_dir), "--data", str(colour_verdict["test"])]) == 0
    written = json.loads((res.run_dir / "evaluations" / "test.json").read_text())
    assert written["label"]["accuracy"] == pytest.approx(res.metrics["test"]["label"]["accuracy"], abs=1e-9)
    assert "roc_auc" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys, colour_verdict):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  encoders: {t: {modality: text, checkpoint: minilm-l6}}\ntrainer: {epochs: 2}\n")
    assert cli(["fit", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'trainer.epochs'" in err and "Traceback" not in err
    assert cli(["predict", "--run", str(tmp_path / "nope"), "--data", "x.csv", "--out", "y.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_rejects_bad_rows_instead_of_dropping(fitted, colour_verdict):
    _, _, pred = fitted
    test = pd.read_csv(colour_verdict["test"]).head(5)
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    test.loc[2, "text"] = ""
    with pytest.raises(mmtune.data.BadRowsError, match="input row 3, column 'text': empty text"):
        pred.predict(test)


class _Killed(RuntimeError):
    pass


class _KillAtEpochStart(L.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise _Killed("simulated crash")


class _RecordStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.start = (trainer.current_epoch, trainer.global_step)


def test_resume_continues_from_checkpoint_epoch_and_step(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    encoders = {"image": {"modality": "image", "checkpoint": tiny_vit},
                "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, encoders, trainer={"max_epochs": 4})
    train = str(colour_verdict["train"])
    with pytest.raises(_Killed):
        mmtune.fit(cfg, train=train, callbacks=[_KillAtEpochStart(2)])
    run = Path(cfg["output_dir"]) / cfg["name"]
    assert not (run / "bundle.json").exists()
    with pytest.raises(FileNotFoundError, match="not a complete run bundle"):
        mmtune.load(run)
    with pytest.raises(FileExistsError, match="--resume"):
        mmtune.fit(cfg, train=train)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1
    steps_per_epoch = ckpt["global_step"] // 2
    rec = _RecordStart()
    res = mmtune.fit(cfg, train=train, resume=True, callbacks=[rec])
    assert rec.start == (2, ckpt["global_step"])
    assert res.metrics["epochs_trained"] == 4
    logs = pd.read_csv(run / "logs" / "metrics.csv")
    assert sorted(logs["epoch"].dropna().unique().astype(int)) == [0, 1, 2, 3]
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 4 * steps_per_epoch
    mmtune.load(run)


def test_skip_bad_rows_writes_them_into_the_bundle(tmp_path, tiny_bert, colour_verdict):
    df = pd.read_csv(colour_verdict["train"])
    df.loc[5, "text"] = "  "
    df.loc[9, "label"] = None
    df["image"] = [str(Path(colour_verdict["train"]).parent / p) for p in df["image"]]
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}},
                      data={"on_bad_rows": "skip"}, trainer={"max_epochs": 1})
    with pytest.warns(UserWarning, match="skipping 2 bad row"):
        res = mmtune.fit(cfg, train=df)
    rejected = pd.read_csv(res.run_dir / "rejected_rows.csv")
    assert list(rejected["row"]) == [6, 10]
    assert list(rejected["reason"]) == ["empty text", "missing label (NaN, null or empty)"]


def test_last_checkpoint_is_the_last_epoch_even_without_improvement(tmp_path, tiny_bert, colour_verdict):
    """A learning rate too small to change anything: the monitored metric never improves after epoch 0, yet
    last.ckpt (what --resume continues from) holds the last epoch; best.ckpt stays at epoch 0."""
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}}, optim={"lr": 1e-12},
                      trainer={"max_epochs": 3}, evaluation={"report": False, "linear_probe": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]))
    last = torch.load(res.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(res.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == 0


def test_embeddings_are_what_the_heads_read(fitted, colour_verdict, tmp_path, capsys):
    from mmtune.cli import main as cli

    res, _, pred = fitted
    test = pd.read_csv(colour_verdict["test"]).head(12)
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    test.index = range(100, 112)
    fused = pred.embed(test)
    assert list(fused.index) == list(test.index) and list(fused["id"]) == list(test["id"])
    vectors = torch.tensor(fused.drop(columns="id").to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        logits = pred.model.heads["label"](vectors)
    raw = pred.predict_proba(test, calibrated=False).drop(columns="id").to_numpy()
    assert np.abs(torch.softmax(logits, -1).numpy() - raw).max() <= 1e-5  # the heads on the embedding = the model
    assert pred.embedding_kinds == ["fused", "image", "text"]
    text = pred.embed(test, kind="text")
    assert text.shape == (12, 1 + pred.model.encoders["text"].out_dim)
    with pytest.raises(ValueError, match="unknown embedding kind 'audio'; valid: fused, image, text"):
        pred.embed(test, kind="audio")
    test.to_csv(tmp_path / "rows.csv", index=False)
    assert cli(["embed", "--run", str(res.run_dir), "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "e.parquet"),
                "--kind", "image"]) == 0
    written = pd.read_parquet(tmp_path / "e.parquet")
    assert np.allclose(written.drop(columns="id").to_numpy(), pred.embed(test, kind="image").drop(columns="id").to_numpy(), atol=1e-6)
    assert cli(["embed", "--run", str(res.run_dir), "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "e.parquet"),
                "--kind", "nope"]) == 2
    assert "--kind 'nope'; valid: fused, image, text" in capsys.readouterr().err


def test_the_bundle_predicts_what_fit_reported(tmp_path, tiny_resnet, tiny_bert, colour_verdict):
    """Nothing after the evaluation changes the model (a forward pass in training mode would move the batch-norm
    statistics of the ResNet): the reloaded bundle reproduces the saved test predictions and the reported accuracy."""
    enc = {"image": {"modality": "image", "checkpoint": tiny_resnet}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    res = mmtune.fit(base_config(tmp_path, enc, trainer={"max_epochs": 2}, evaluation={"report": False}),
                     train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))
    saved = pd.read_csv(res.run_dir / "predictions" / "test.csv")
    test = pd.read_csv(colour_verdict["test"])
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    raw = mmtune.load(res.run_dir).predict_proba(test, calibrated=False)
    cols = [c for c in saved.columns if c.startswith("label:p:")]
    assert np.abs(saved[cols].to_numpy() - raw[[c.split(":p:")[1] for c in cols]].to_numpy()).max() <= 1e-5
    assert mmtune.load(res.run_dir).evaluate(test)["label"]["accuracy"] == res.metrics["test"]["label"]["accuracy"]
