"""Ensembles (:mod:`mmtune.ensemble`): greedy selection as Caruana et al. describe it, checked against a brute-force
search; a search's ensemble of its trials and a cross-validation's fold ensemble reload as one predictor whose
probabilities are the weighted average of the members' calibrated ones, and predict, evaluate, serve and export
work on it."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

import mmtune
from conftest import base_config
from mmtune.cli import main as cli
from mmtune.ensemble import greedy_selection, mixture, read_ensemble, task_loss
from mmtune.serving.predictor import Predictor
from mmtune.tasks import Task


def _task(n_classes=3):
    t = Task(name="y", column="y")
    t.classes = list(range(n_classes))
    return t


def _candidates(rng, n, k, classes=3, noise=1.5):
    y = rng.integers(0, classes, n)
    out = []
    for _ in range(k):
        logits = rng.normal(0, noise, (n, classes))
        logits[np.arange(n), y] += 1.0
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        out.append({"y": p})
    return y, out


def test_the_loss_is_scikit_learns_log_loss_and_mse_over_variance():
    rng = np.random.default_rng(0)
    y, [c] = _candidates(rng, 50, 1)
    assert task_loss(_task(), y, c["y"]) == pytest.approx(log_loss(y, c["y"], labels=[0, 1, 2]), rel=1e-12)
    reg = Task(name="r", column="r", regression=True)
    t = rng.normal(size=40)
    pred = t + rng.normal(0, 0.5, 40)
    assert task_loss(reg, t, pred[:, None]) == pytest.approx(np.mean((pred - t) ** 2) / np.var(t))


def test_greedy_selection_keeps_its_best_prefix_and_its_weights_give_that_loss():
    rng = np.random.default_rng(1)
    y, cands = _candidates(rng, 200, 4)
    task = _task()
    counts, history = greedy_selection(cands, {"y": y}, [task], rounds=12)
    singles = [task_loss(task, y, c["y"]) for c in cands]
    assert history[0] == pytest.approx(min(singles))  # round 1 takes the best single model
    assert sum(counts) == int(np.argmin(history)) + 1  # the best prefix of rounds
    mixed = task_loss(task, y, mixture(cands, counts)["y"])
    assert mixed == pytest.approx(min(history)) and mixed < min(singles)  # independent errors: averaging helps
    # no mixture of at most sum(counts) picks does better than the greedy path's best by much (brute force)
    brute = min(task_loss(task, y, mixture(cands, np.bincount(c, minlength=4))["y"])
                for r in range(1, 5) for c in itertools.combinations_with_replacement(range(4), r))
    assert mixed <= brute + 0.01


def test_a_dominant_candidate_is_chosen_alone():
    rng = np.random.default_rng(2)
    y, cands = _candidates(rng, 100, 3)
    perfect = np.full((100, 3), 0.01)
    perfect[np.arange(100), y] = 0.98
    counts, _ = greedy_selection([*cands, {"y": perfect}], {"y": y}, [_task()])
    assert counts == [0, 0, 0, counts[3]] and counts[3] >= 1


def _text_cfg(tmp_path, tiny_bert, **extra):
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"columns": {"text": "text"}}, finetune={"type": "frozen"},
                      trainer={"max_epochs": 4, "monitor": "val_loss"}, evaluation={"report": True, "explain": 0})
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def _members_average(run, rows):
    """The ensemble's probabilities computed by hand: each member loaded alone, calibrated, weighted."""
    meta = read_ensemble(run)
    total = sum(m["weight"] for m in meta["members"])
    acc = 0.0
    for m in meta["members"]:
        p = Predictor.load(m["folder"], ensemble=False).predict_proba(rows).drop(columns="id").to_numpy()
        acc = acc + m["weight"] / total * p
    return acc, meta


def test_a_searchs_ensemble_of_its_trials_reloads_and_predicts_their_weighted_average(tmp_path, tiny_bert,
                                                                                      colour_verdict):
    from mmtune.search import tune

    cfg = _text_cfg(tmp_path, tiny_bert)
    out = tune(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]), trials=4, ensemble=3,
               space={"only": True, "trainer.seed": {"choices": [1, 2, 3, 4, 5]}})
    run = tmp_path / "runs" / "t"
    kept = [p.name for p in (run / "tune" / "trials").glob("trial-*")] + \
        [p.name for p in (run / "ensemble").glob("trial-*")]
    assert len(kept) <= 3  # only the three best trials keep their bundles
    meta = read_ensemble(run)
    assert meta is not None, out.summary["ensemble"]  # same recipe, other seeds: averaging them lowers the NLL
    sel = meta["selection"]
    assert min(sel["history"]) <= min(sel["candidate_loss"].values()) + 1e-12
    assert abs(sum(m["weight"] for m in meta["members"]) - 1) < 1e-5 and len(meta["members"]) >= 2
    rows = pd.read_csv(colour_verdict["test"]).drop(columns=["image"])
    pred = mmtune.load(run)
    assert pred.members is not None
    expected, _ = _members_average(run, rows)
    # the ensemble's own calibration (a temperature fitted on the averaged validation probabilities) on top
    from mmtune.evaluation.calibration import apply_temperature

    temperature = meta["calibration"]["verdict"]["temperature"] if "verdict" in meta["calibration"] else \
        next(iter(meta["calibration"].values()))["temperature"]
    got = pred.predict_proba(rows).drop(columns="id").to_numpy()
    assert np.allclose(got, apply_temperature(expected, temperature), atol=1e-6)
    # the stored test metrics are what the reloaded ensemble measures
    task = pred.tasks[0].name
    live = pred.evaluate(str(colour_verdict["test"]))[task]
    assert live["accuracy"] == pytest.approx(meta["metrics"]["test"][task]["accuracy"], abs=1e-9)
    assert live["log_loss"] == pytest.approx(meta["metrics"]["test"][task]["log_loss"], abs=1e-6)
    single = Predictor.load(run, ensemble=False)
    assert single.members is None and single.model is not None
    assert "<h2>Ensemble</h2>" in (run / "report.html").read_text()


def test_cv_ships_its_folds_as_an_equal_weight_ensemble_that_serves_and_exports(tmp_path, tiny_bert, colour_verdict,
                                                                                capsys):
    import yaml

    cfg = _text_cfg(tmp_path, tiny_bert, data={"train": str(colour_verdict["train"]), "test": str(colour_verdict["test"])},
                    evaluation={"cv": 3, "report": False})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["fit", str(path)]) == 0
    run = tmp_path / "runs" / "t"
    rows = pd.read_csv(colour_verdict["test"]).drop(columns=["image"])
    expected, meta = _members_average(run, rows)
    assert [m["path"] for m in meta["members"]] == ["cv/fold-0", "cv/fold-1", "cv/fold-2"]
    assert all(m["weight"] == pytest.approx(1 / 3, abs=1e-6) for m in meta["members"])
    pred = mmtune.load(run)
    assert np.allclose(pred.predict_proba(rows).drop(columns="id").to_numpy(), expected, atol=1e-6)
    task = pred.tasks[0].name
    assert pred.evaluate(str(colour_verdict["test"]))[task]["accuracy"] == pytest.approx(
        meta["metrics"]["test"][task]["accuracy"], abs=1e-9)
    # the CLI predicts with the ensemble by default, with the run's own model under --single
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert cli(["predict", "--run", str(run), "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "e.csv")]) == 0
    assert cli(["predict", "--run", str(run), "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "s.csv"),
                "--single"]) == 0
    e, s = pd.read_csv(tmp_path / "e.csv"), pd.read_csv(tmp_path / "s.csv")
    probs = [c for c in e.columns if c.startswith("prob_")]
    assert np.allclose(e[probs].to_numpy(), expected, atol=1e-6)
    single = Predictor.load(run, ensemble=False).predict_proba(rows).drop(columns="id").to_numpy()
    assert np.allclose(s[probs].to_numpy(), single, atol=1e-6) and not np.allclose(single, expected, atol=1e-4)
    # the server answers with the ensemble
    from fastapi.testclient import TestClient

    from mmtune.serving.server import create_app

    client = TestClient(create_app(pred))
    assert len(client.get("/metadata").json()["ensemble"]) == 3
    r = client.post("/predict/batch", json={"rows": rows.head(4).drop(columns="label").to_dict(orient="records")})
    assert r.status_code == 200, r.text
    served = np.array([[row["probabilities"][c[len("prob_"):]] for c in probs] for row in r.json()["predictions"]])
    assert np.allclose(served, expected[:4], atol=1e-5)
    # the export holds every member; its ONNX backend loads the ensemble and matches the torch one
    pytest.importorskip("onnxruntime")
    assert cli(["export", "--run", str(run), "--data", str(colour_verdict["test"])]) == 0
    onnx = Predictor.load(run / "export")
    assert onnx.members is not None and onnx.backend == "onnx"
    assert np.allclose(onnx.predict_proba(rows).drop(columns="id").to_numpy(), expected, atol=1e-4)
    # a planted ensemble file cannot point outside the run
    planted = json.loads((run / "ensemble" / "ensemble.json").read_text())
    planted["members"][0]["path"] = "../../elsewhere"
    (run / "ensemble" / "ensemble.json").write_text(json.dumps(planted))
    with pytest.raises(ValueError, match="outside the run folder"):
        mmtune.load(run)
    assert Predictor.load(run, ensemble=False).members is None  # the run's own model still loads


def test_cv_folds_that_fitted_their_own_table_statistics_each_read_the_rows_their_own_way(tmp_path):
    """Each cross-validation fold fits its tabular encoder's statistics and categories on its own training rows; a
    category in one row only is missing from the fold that holds that row out, which numbers the other categories
    differently. The ensemble must give each member its own inputs: its probabilities are the members' own
    (each loaded alone), also on the ONNX backend."""
    from mmtune.ensemble import processors_differ

    rng = np.random.default_rng(0)

    def table(n, rare):
        shop = rng.choice(["s-b", "s-c", "s-d"], n).astype(object)
        shop[:rare] = "s-a"  # sorts first: without it, a fold numbers s-b, s-c and s-d one lower
        amount = rng.uniform(0, 10, n)
        return pd.DataFrame({"id": [f"r{rare}-{i}" for i in range(n)], "amount": amount.round(3), "shop": shop,
                             "label": np.where((shop == "s-c") | (amount > 8), "yes", "no")})

    enc = {"table": {"modality": "tabular", "checkpoint": "tabular"}}
    cfg = base_config(tmp_path, enc, data={"columns": {"tabular": ["amount", "shop"]}}, name="t",
                      trainer={"max_epochs": 3}, optim={"lr": 1e-2}, evaluation={"cv": 3})
    res = mmtune.fit(cfg, train=table(60, 1), test=table(30, 0))
    run = res.run_dir
    folds = [run / "cv" / f"fold-{i}" for i in range(3)]
    assert any(processors_differ(folds[0], f, ["table"]) == ["table"] for f in folds[1:])
    cats = [json.loads((f / "encoders" / "table" / "processor" / "mmtune_processor.json").read_text())["vocab"]["shop"]
            for f in folds]
    assert sorted(map(len, cats)) == [3, 4, 4]  # one fold never saw s-a
    rows = table(40, 3).drop(columns="label")
    expected, meta = _members_average(run, rows)
    pred = mmtune.load(run)
    assert pred.members is not None
    assert np.allclose(pred.predict_proba(rows).drop(columns="id").to_numpy(), expected, atol=1e-6)
    pytest.importorskip("onnxruntime")
    check = table(30, 1)
    check.to_csv(tmp_path / "check.csv", index=False)
    assert cli(["export", "--run", str(run), "--data", str(tmp_path / "check.csv")]) == 0
    onnx = Predictor.load(run / "export")
    assert np.allclose(onnx.predict_proba(rows).drop(columns="id").to_numpy(), expected, atol=1e-4)
