"""Evaluation: metric parity with scikit-learn, calibration, thresholds, modality masking, the report."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

import mmtune
from conftest import base_config
from mmtune.evaluation.calibration import (apply_temperature, expected_calibration_error, fit_temperature,
                                           tune_binary_threshold)
from mmtune.evaluation.metrics import classification_metrics, multilabel_metrics
from mmtune.evaluation.report import OPTIONAL_SECTIONS, SECTIONS


def _random(n, c, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.where(rng.random(n) < 0.6, proba.argmax(1), rng.integers(0, c, n))
    return y, proba


@pytest.mark.parametrize("c", [2, 5])
def test_single_label_metrics_equal_sklearn(c):
    y, p = _random(300, c, c)
    m = classification_metrics(y, p)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-9)
    for avg in ("macro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, pred, average=avg), abs=1e-9)
        assert m[f"precision_{avg}"] == pytest.approx(skm.precision_score(y, pred, average=avg), abs=1e-9)
        assert m[f"recall_{avg}"] == pytest.approx(skm.recall_score(y, pred, average=avg), abs=1e-9)
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p), abs=1e-9)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    f1s = skm.f1_score(y, pred, average=None)
    assert [r["f1"] for r in m["per_class"]] == pytest.approx(list(f1s), abs=1e-9)
    if c == 2:
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-9)
        assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p[:, 1]), abs=1e-9)
    else:
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-9)
        assert m["pr_auc"] == pytest.approx(skm.average_precision_score(np.eye(c)[y], p, average="macro"), abs=1e-9)
        for k in (2, 3):
            assert m["top_k_accuracy"][str(k)] == pytest.approx(skm.top_k_accuracy_score(y, p, k=k), abs=1e-9)


def test_multilabel_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.4).astype(int)
    p = np.clip(y * 0.5 + rng.random((200, 4)) * 0.6, 0, 1)
    m = multilabel_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"), abs=1e-9)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-9)
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
    assert m["mean_average_precision"] == pytest.approx(skm.average_precision_score(y, p, average="macro"), abs=1e-9)


def test_ece_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    # bins of width 0.5: conf 0.6,0.7 -> bin (0.5, 0.6]... use 2 bins: (0,0.5], (0.5,1]: all in bin 2
    # accuracy 3/4 (the last is wrong), mean confidence (0.9+0.6+0.7+0.8)/4 = 0.75 -> ECE 0
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(
        (abs(1 - 0.9) + abs(1 - 0.6) + abs(1 - 0.7) + abs(0 - 0.8)) / 4)


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(1)
    n, c = 2000, 4
    true_logits = rng.normal(size=(n, c)) * 1.5
    true_p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in true_p])
    over = apply_temperature(true_p, 1 / 3.0)  # the same ranking, three times too confident
    t = fit_temperature(y[:1000], over[:1000])
    assert t == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(y[1000:], over[1000:])
    after = expected_calibration_error(y[1000:], apply_temperature(over[1000:], t))
    assert after < before / 2
    assert (apply_temperature(over, t).argmax(1) == over.argmax(1)).all()


def test_binary_threshold_goals():
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.3).astype(int)
    p = np.clip(0.35 * y + rng.random(500) * 0.65, 0, 1)
    best = tune_binary_threshold(y, p, "max_f1")
    grid = [skm.f1_score(y, (p >= t).astype(int)) for t in np.unique(p)]
    assert best["f1"] == pytest.approx(max(grid), abs=1e-9)
    # brute force over every candidate threshold: the tuner must pick the best one meeting the goal
    cand = np.unique(p)
    prec_at = np.array([skm.precision_score(y, (p >= t).astype(int), zero_division=0) for t in cand])
    rec_at = np.array([skm.recall_score(y, (p >= t).astype(int)) for t in cand])
    prec = tune_binary_threshold(y, p, "min_precision", 0.9)
    ok = prec_at >= 0.9
    assert prec["threshold"] == pytest.approx(cand[ok].min()) and prec["recall"] == pytest.approx(rec_at[ok].max())
    rec = tune_binary_threshold(y, p, "min_recall", 0.95)
    ok = rec_at >= 0.95
    assert rec["threshold"] == pytest.approx(cand[ok].max()) and rec["precision"] == pytest.approx(prec_at[ok].max())
    with pytest.raises(ValueError, match="precision 1.01"):
        tune_binary_threshold(y, p, "min_precision", 1.01)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_vit, tiny_bert, colour_verdict):
    tmp = tmp_path_factory.mktemp("eval")
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp, enc, trainer={"max_epochs": 10, "tensorboard": True},
                      evaluation={"report": True, "explain": 8, "linear_probe": True, "modality_contribution": True})
    return mmtune.fit(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))


def test_report_has_every_section_and_plot(evaluated):
    d = evaluated.run_dir
    page = (d / "report.html").read_text()
    for s in SECTIONS:
        assert (f"<h2>{s}</h2>" in page) == (s not in OPTIONAL_SECTIONS), s
    for png in ["training_curves.png", "confusion_matrix.png", "roc.png", "pr.png", "reliability.png",
                "modality_contribution.png"]:
        assert (d / "plots" / png).stat().st_size > 1000, png
    n_img = len(re.findall(r'src="data:image/png;base64,', page))
    m = evaluated.metrics["test"]["label"]
    wrong = round((1 - m["accuracy"]) * m["n"])
    assert n_img == 6 + min(wrong, 12)  # the plots, plus a thumbnail per worst misclassified example shown
    assert "http://" not in page and "https://" not in page  # opens offline
    assert list((d / "tensorboard").glob("events.out.tfevents*"))


def test_saved_predictions_reproduce_every_metric(evaluated):
    """Every number in metrics.json["test"] equals scikit-learn (or, for ECE, its formula) on the saved
    prediction CSV, to 1e-9."""
    d = evaluated.run_dir
    preds = pd.read_csv(d / "predictions" / "test.csv")
    classes = json.loads((d / "labels.json").read_text())["tasks"][0]["classes"]
    temperature = json.loads((d / "calibration.json").read_text())["label"]["temperature"]
    p = apply_temperature(preds[[f"label:p:{c}" for c in classes]].to_numpy(), temperature)
    p = p / p.sum(1, keepdims=True)
    y = preds["label:true"].to_numpy()
    pred = p.argmax(1)
    L = list(range(len(classes)))
    m = evaluated.metrics["test"]["label"]
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "log_loss": skm.log_loss(y, np.clip(p, 1e-15, 1), labels=L),
        "roc_auc": skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=L),
        "pr_auc": skm.average_precision_score(np.eye(len(classes))[y], p, average="macro"),
    }
    for avg in ("macro", "weighted"):
        expected[f"f1_{avg}"] = skm.f1_score(y, pred, labels=L, average=avg, zero_division=0)
        expected[f"precision_{avg}"] = skm.precision_score(y, pred, labels=L, average=avg, zero_division=0)
        expected[f"recall_{avg}"] = skm.recall_score(y, pred, labels=L, average=avg, zero_division=0)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
    for k, v in m["top_k_accuracy"].items():
        assert v == pytest.approx(skm.top_k_accuracy_score(y, p, k=int(k), labels=L), abs=1e-9), k
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=L).tolist()
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=L, zero_division=0)
    for i, row in enumerate(m["per_class"]):
        assert (row["class"], row["support"]) == (classes[i], sup[i])
        assert [row["precision"], row["recall"], row["f1"]] == pytest.approx([pr[i], rc[i], f1[i]], abs=1e-9)
    # ECE by its definition: equal-width confidence bins, |accuracy - confidence| weighted by bin size
    conf, bins = p.max(1), m["ece_bins"]
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = sum((idx == b).mean() * abs((pred == y)[idx == b].mean() - conf[idx == b].mean())
              for b in range(bins) if (idx == b).any())
    assert m["ece"] == pytest.approx(ece, abs=1e-9)
    assert m["ece"] == pytest.approx(evaluated.metrics["calibration"]["label"]["ece_test_after"], abs=1e-12)


def test_stored_temperature_changes_proba_not_labels(evaluated, colour_verdict):
    pred = mmtune.load(evaluated.run_dir)
    t = pred.calibration["label"].temperature
    assert t is not None and t > 0 and abs(t - 1.0) > 1e-3
    test = pd.read_csv(colour_verdict["test"])
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    a = pred.predict_proba(test).drop(columns="id").to_numpy()
    b = pred.predict_proba(test, calibrated=False).drop(columns="id").to_numpy()
    assert np.abs(a - b).max() > 1e-3
    assert (a.argmax(1) == b.argmax(1)).all()
    assert list(pred.predict(test)) == [pred.class_names[i] for i in a.argmax(1)]
    cal = evaluated.metrics["calibration"]["label"]
    assert cal["ece_val_after"] <= cal["ece_val_before"] + 1e-9  # fitted on val: never worse there


@pytest.mark.stochastic
def test_modality_contribution_is_recorded(evaluated):
    mc = evaluated.metrics["modality_contribution"]
    assert set(mc) == {"split", "all", "without image", "without text"}
    assert mc["all"]["metrics"]["label"]["accuracy"] == pytest.approx(evaluated.metrics["test"]["label"]["accuracy"])
    # the task needs both: hiding either modality costs accuracy
    assert mc["without image"]["change_vs_all"]["label"]["accuracy"] < -0.1
    assert mc["without text"]["change_vs_all"]["label"]["accuracy"] < -0.1


def test_masking_changes_only_what_the_fusion_sees(evaluated, colour_verdict):
    pred = mmtune.load(evaluated.run_dir)
    test = pd.read_csv(colour_verdict["test"]).head(8)
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    seen = []
    handle = pred.model.fusion.register_forward_hook(lambda mod, args, out: seen.append(args))
    from mmtune.evaluation.ablation import masked_batches

    ds = pred.dataset(test, with_labels=False)
    batches = list(pred.batches(ds, 8))
    from mmtune.inference import predict_proba_batches

    predict_proba_batches(pred.model, pred.tasks, batches)
    predict_proba_batches(pred.model, pred.tasks, masked_batches(batches, ["image"]))
    handle.remove()
    (outs_a, present_a), (outs_b, present_b) = seen
    for k in outs_a:  # the encoders' outputs are identical
        assert torch.equal(outs_a[k].pooled, outs_b[k].pooled)
    assert present_a["text"].all() and present_b["text"].all()
    assert present_a["image"].all() and not present_b["image"].any()


def test_cli_report_regenerates(evaluated, capsys):
    from mmtune.cli import main as cli

    (evaluated.run_dir / "report.html").unlink()
    assert cli(["report", "--run", str(evaluated.run_dir)]) == 0
    assert (evaluated.run_dir / "report.html").is_file()


@pytest.mark.stochastic
def test_binary_threshold_is_stored_and_used(tmp_path, tiny_bert, colour_verdict):
    df = pd.read_csv(colour_verdict["train"])
    df["verdict"] = df["label"].str.split("-").str[1]
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"label_column": "verdict"},
                      trainer={"max_epochs": 3}, evaluation={"threshold_goal": "min_recall", "threshold_value": 0.9,
                                                             "report": False})
    res = mmtune.fit(cfg, train=df)
    pred = mmtune.load(res.run_dir)
    th = pred.calibration["verdict"].threshold
    assert th is not None and res.metrics["calibration"]["verdict"]["decision_threshold"]["recall"] >= 0.9
    proba = pred.predict_proba(df.head(50))
    labels = pred.predict(df.head(50))
    expected = np.where(proba[str(pred.class_names[1])] >= th, pred.class_names[1], pred.class_names[0])
    assert list(labels) == list(expected)


@pytest.mark.stochastic
def test_baselines_report_the_fusion_gain(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, trainer={"max_epochs": 8}, evaluation={"baselines": True, "report": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))
    b = res.metrics["baselines"]
    assert set(b["models"]) == {"fused", "image only", "text only"}
    best = max(b["models"]["image only"]["accuracy"], b["models"]["text only"]["accuracy"])
    assert b["fusion_gain"] == pytest.approx(b["models"]["fused"]["accuracy"] - best)
    assert b["fusion_gain"] > 0.2
    assert (tmp_path / "runs" / "t-image-only" / "bundle.json").is_file()


def test_configured_epoch_metrics_are_logged_and_agree_with_sklearn(tmp_path, tiny_bert, colour_verdict):
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc,
                      trainer={"max_epochs": 3, "monitor": "val_balanced_accuracy",
                               "epoch_metrics": ["accuracy", "f1_macro", "balanced_accuracy", "auroc",
                                                 "precision_macro", "recall_macro"]},
                      evaluation={"report": False, "temperature_scaling": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]))
    logs = pd.read_csv(res.run_dir / "logs" / "metrics.csv")
    cols = ["val_acc", "val_f1_macro", "val_balanced_accuracy", "val_auroc", "val_precision_macro", "val_recall_macro"]
    assert all(logs[c].notna().sum() == 3 for c in cols)
    best = logs.loc[logs["val_balanced_accuracy"].idxmax()]
    m = res.metrics["val"]["label"]
    assert best["val_balanced_accuracy"] == pytest.approx(m["balanced_accuracy"], abs=1e-5)
    assert best["val_acc"] == pytest.approx(m["accuracy"], abs=1e-5)
    assert best["val_auroc"] == pytest.approx(m["roc_auc"], abs=1e-4)
    with pytest.raises(mmtune.ConfigError, match="trainer.monitor=val_auroc is not logged"):
        mmtune.load_config({"trainer": {"monitor": "val_auroc"}})


def test_the_per_class_table_shows_how_much_each_remedy_changed_each_class(evaluated, tmp_path, capsys):
    import shutil

    from mmtune.cli import main as cli
    from mmtune.evaluation.remedies import compare_runs, read_remedies
    from mmtune.evaluation.report import build_report

    base, other = tmp_path / "none", tmp_path / "weights"
    shutil.copytree(evaluated.run_dir, base)
    shutil.copytree(evaluated.run_dir, other)
    metrics = json.loads((other / "metrics.json").read_text())
    rows = metrics["test"]["label"]["per_class"]
    rows[0]["recall"] += 0.25  # a planted change of one class's recall and precision
    rows[0]["precision"] -= 0.125
    (other / "metrics.json").write_text(json.dumps(metrics))
    compare_runs(base, {"weights": other, "same": evaluated.run_dir})
    got = read_remedies(base)["tasks"]["label"]
    first, rest = str(rows[0]["class"]), [str(r["class"]) for r in rows[1:]]
    assert got["weights"][first]["recall_change"] == pytest.approx(0.25)
    assert got["weights"][first]["precision_change"] == pytest.approx(-0.125)
    assert all(got["weights"][c]["recall_change"] == 0 and got["same"][c]["recall_change"] == 0 for c in rest)
    page = build_report(base).read_text()
    assert "<th>recall: weights</th>" in page and "<th>precision: same</th>" in page
    assert "<td>+0.250</td>" in page and "<td>-0.125</td>" in page

    # from the command line: unchanged bundles (the CLI checks each one), and a one-line error for a bad pair
    again = tmp_path / "again"
    shutil.copytree(evaluated.run_dir, again)
    assert cli(["report", "--run", str(again), "--compare", f"again={evaluated.run_dir}"]) == 0
    assert "<th>recall: again</th>" in (again / "report.html").read_text()
    assert cli(["report", "--run", str(base), "--compare", "weights"]) == 2
    assert "--compare 'weights': expected NAME=RUN" in capsys.readouterr().err
    other_classes = json.loads((other / "metrics.json").read_text())
    other_classes["test"]["label"]["per_class"][0]["class"] = "elsewhere"
    (other / "metrics.json").write_text(json.dumps(other_classes))
    with pytest.raises(ValueError, match="remedy 'weights': its task 'label' has classes"):
        compare_runs(base, {"weights": other})
