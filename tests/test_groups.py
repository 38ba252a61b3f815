"""Honest validation when rows share a source: grouped splits, and a warning when validation flatters."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mmtune
from mmtune.data.datamodule import _split
from mmtune.data.splits import group_folds
from mmtune.evaluation.metrics import bootstrap_interval, flattering_validation
from mmtune.tasks import Task


def test_grouped_splits_never_share_a_group_and_keep_class_proportions():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(3, 12, 60))
    labels = rng.choice(3, len(groups), p=[0.5, 0.3, 0.2])
    df = pd.DataFrame({"g": groups, "y": labels, "x": np.arange(len(groups))})
    for seed in range(3):
        train, val = _split(df.copy(), "y", 0.2, seed, group="g")
        assert not set(train["g"]) & set(val["g"]) and len(train) + len(val) == len(df)
        assert sorted(pd.concat([train, val])["x"]) == list(range(len(df)))
        assert 0.12 < len(val) / len(df) < 0.28
        share = val["y"].value_counts(normalize=True).reindex([0, 1, 2]).to_numpy()
        assert np.abs(share - np.array([0.5, 0.3, 0.2])).max() < 0.1  # stratified as far as whole groups allow
    for a, b in group_folds(labels, groups, 5, 0):
        assert not set(groups[a]) & set(groups[b])
    with pytest.raises(ValueError, match="has 3 group.s., too few for 5 folds"):
        group_folds(None, np.array([0, 0, 1, 1, 2, 2]), 5, 0)


def test_the_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    task = Task("y", "y")
    task.fit_classes([0, 1])
    rng = np.random.default_rng(1)
    covered, repeats = 0, 200
    for r in range(repeats):
        y = rng.integers(0, 2, 150)
        right = rng.random(150) < 0.8  # a classifier that is right 80 % of the time
        pred = np.where(right, y, 1 - y)
        proba = np.eye(2)[pred] * 0.9 + 0.05
        b = bootstrap_interval(task, y, proba, n=400, seed=r)
        covered += b["low"] <= 0.8 <= b["high"]
    assert 0.89 <= covered / repeats <= 0.99


def test_with_groups_the_bootstrap_resamples_whole_groups_and_still_covers_about_95_percent():
    """Rows of one group are right or wrong together (each group its own accuracy, mean 0.8): resampling rows one by
    one gives intervals too narrow for new groups; resampling groups covers the mean about 95 % of the time."""
    task = Task("y", "y")
    task.fit_classes([0, 1])
    rng = np.random.default_rng(0)
    by_groups = by_rows = 0
    repeats = 200
    for r in range(repeats):
        accuracy = rng.beta(4, 1, 40)  # 40 groups of 8 rows
        groups = np.repeat(np.arange(40), 8)
        y = rng.integers(0, 2, 320)
        pred = np.where(rng.random(320) < accuracy[groups], y, 1 - y)
        proba = np.eye(2)[pred] * 0.9 + 0.05
        g = bootstrap_interval(task, y, proba, n=300, seed=r, groups=groups)
        w = bootstrap_interval(task, y, proba, n=300, seed=r)
        by_groups += g["low"] <= 0.8 <= g["high"]
        by_rows += w["low"] <= 0.8 <= w["high"]
    assert g["resampled"] == "groups (40)" and w["resampled"] == "rows"
    assert 0.87 <= by_groups / repeats <= 0.98
    assert by_rows / repeats <= by_groups / repeats - 0.05


def _planted(n_groups, rows, seed, offset=0):
    """Each group has its own token (a category value) and, inside the group, one label: a shortcut that works
    for every row of a known group and for no row of a new one."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(offset, offset + n_groups):
        y = "a" if rng.random() < 0.5 else "b"
        for _ in range(rows):
            out.append({"speaker": f"s{g}", "token": f"t{g}", "noise": float(rng.normal()), "y": y})
    return pd.DataFrame(out)


def _fit(tmp_path, name, train, test, group=None):
    cfg = {"name": name, "output_dir": str(tmp_path / "runs"),
           "data": {"columns": {"tabular": ["token", "noise"]}, "label_column": "y", "group_column": group},
           "model": {"encoders": {"t": {"modality": "tabular", "checkpoint": "tabular", "dim": 16}},
                     "fusion": {"hidden_dims": [32], "dropout": 0.0}},
           "finetune": {"type": "full"}, "optim": {"lr": 1e-2, "weight_decay": 0.0},
           "trainer": {"max_epochs": 25, "batch_size": 32, "progress_bar": False, "early_stopping_patience": None},
           "evaluation": {"report": False, "linear_probe": False}}
    return mmtune.fit(cfg, train=train, test=test).metrics


@pytest.mark.stochastic
def test_a_group_column_keeps_validation_honest_and_the_warning_fires_when_it_is_not(tmp_path, caplog):
    train, test = _planted(40, 8, 0), _planted(15, 8, 1, offset=100)  # the test groups are unseen
    random = _fit(tmp_path, "random", train, test)
    grouped = _fit(tmp_path, "grouped", train, test, group="speaker")
    assert random["val"]["y"]["accuracy"] >= 0.9  # validation shares the training groups: the shortcut works
    assert random["test"]["y"]["accuracy"] <= 0.75  # ...and does not transfer
    assert abs(grouped["val"]["y"]["accuracy"] - grouped["test"]["y"]["accuracy"]) <= 0.25
    assert grouped["val"]["y"]["accuracy"] <= 0.8
    assert any("set data.group_column" in w for w in random.get("warnings", []))
    assert "validation may share sources with training" in caplog.text
    iid_train, iid_test = _planted(40, 8, 2), _planted(15, 8, 3)  # i.i.d.: the number decides, in every group
    for df in (iid_train, iid_test):
        df["y"] = np.where(df["noise"] > 0, "a", "b")
    iid = _fit(tmp_path, "iid", iid_train.assign(token="same"), iid_test.assign(token="same"))
    assert iid["test"]["y"]["accuracy"] >= 0.85 and not iid.get("warnings")


def test_no_warning_when_validation_and_test_agree():
    task = Task("y", "y")
    task.fit_classes([0, 1])
    metrics = {"val": {"y": {"accuracy": 0.82}},
               "test": {"y": {"accuracy": 0.8, "bootstrap": {"metric": "accuracy", "low": 0.74, "high": 0.86, "level": 0.95}}}}
    assert flattering_validation(metrics, [task]) == []
    metrics["val"]["y"]["accuracy"] = 0.97
    assert "validation accuracy 0.970 is above the test's 95 % interval (0.740-0.860)" in flattering_validation(metrics, [task])[0]


def test_a_bad_group_column_is_one_line(tmp_path):
    train = _planted(10, 4, 0)
    with pytest.raises(ValueError, match="data.group_column 'who' is not a column of the training table"):
        _fit(tmp_path, "x", train, None, group="who")
    with pytest.raises(ValueError, match="data.group_column 'token' is also read as a feature"):
        _fit(tmp_path, "y", train, None, group="token")


def test_the_label_only_path_suggests_a_group_column_and_never_reads_it(tmp_path):
    from mmtune.autoconfig import auto_config

    said = []
    rng = np.random.default_rng(0)  # 30 speakers, each saying both words
    spoken = pd.DataFrame({"speaker": [f"s{i % 30}" for i in range(150)], "pitch": rng.normal(size=150),
                           "y": rng.choice(["yes", "no"], 150)})
    auto_config(spoken, "y", log=said.append)
    assert any("column 'speaker' may be a group" in s for s in said)
    raw = auto_config(_planted(30, 5, 0), "y", group="speaker", log=said.append)
    assert raw["data"]["group_column"] == "speaker" and "speaker" not in raw["data"]["columns"]["tabular"]


# ---- cross-validation --------------------------------------------------------------------------------------
def test_cv_gives_k_fits_whose_fold_metrics_equal_a_hand_made_split(tmp_path, tiny_bert, colour_verdict):
    from sklearn.model_selection import StratifiedKFold

    from conftest import base_config
    from mmtune.data.datamodule import label_codes

    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "frozen"}, trainer={"max_epochs": 3},
                      evaluation={"report": True, "linear_probe": False, "cv": 3})
    train = pd.read_csv(colour_verdict["train"]).drop(columns=["image"])
    res = mmtune.fit(cfg, train=train)
    cv = res.metrics["cv"]
    assert cv["k"] == 3 and [f["fold"] for f in cv["folds"]] == [0, 1, 2] and sum(f["rows"] for f in cv["folds"]) == len(train)
    accs = [f["val"]["label"]["accuracy"] for f in cv["folds"]]
    assert cv["mean"]["label"]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert cv["std"]["label"]["accuracy"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
    # fold 1 by hand: scikit-learn's stratified split, the same settings
    held = list(StratifiedKFold(3, shuffle=True, random_state=0).split(train, label_codes(train["label"])))[1][1]
    hand = {**cfg, "name": "hand", "evaluation": {"report": False, "linear_probe": False}}
    keep = np.setdiff1d(np.arange(len(train)), held)
    by_hand = mmtune.fit(hand, train=train.iloc[keep].reset_index(drop=True),
                         val=train.iloc[np.sort(held)].reset_index(drop=True)).metrics["val"]["label"]
    for key in ("n", "accuracy", "log_loss"):
        assert cv["folds"][1]["val"]["label"][key] == pytest.approx(by_hand[key], abs=1e-9), key
    assert (res.run_dir / "cv" / "fold-0" / "bundle.json").is_file() and (res.run_dir / "bundle.json").is_file()
    assert "3-fold cross-validation" in (res.run_dir / "report.html").read_text()


def test_grouped_cv_folds_keep_each_group_on_one_side():
    from mmtune.config import load_config
    from mmtune.crossval import fold_rows

    df = _planted(12, 5, 0)
    cfg = load_config({"name": "x", "data": {"columns": {"tabular": ["noise"]}, "label_column": "y",
                                             "group_column": "speaker"},
                       "model": {"encoders": {"t": {"modality": "tabular", "checkpoint": "tabular"}}}})
    folds = fold_rows(df, cfg, 4)
    assert sorted(np.concatenate(folds)) == list(range(len(df)))
    seen = [set(df["speaker"].iloc[f]) for f in folds]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])


def test_stackings_out_of_fold_predictions_keep_each_group_on_one_side(monkeypatch):
    import sklearn.model_selection as ms

    from mmtune.fusion.stacking import fit_stacking
    from test_fusion_strategies import _stacking_fixture

    model, ds, task, y = _stacking_fixture()
    groups = np.arange(len(y)) // 3  # 30 groups of 3 rows
    seen = []
    real = ms.cross_val_predict
    monkeypatch.setattr(ms, "cross_val_predict", lambda est, X, yy, cv, **k: (seen.append(list(cv)), real(est, X, yy, cv=cv, **k))[1])
    fit_stacking(model, ds, task, 5, 0, groups)
    assert len(seen) == 2  # one per output key
    for folds in seen:
        assert len(folds) == 5
        for train_rows, held in folds:
            assert not set(groups[train_rows]) & set(groups[held])
