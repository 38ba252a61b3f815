"""Numeric targets: standardised, trained beside a classification head, measured like scikit-learn, predicted
as numbers in the target's units."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

import mmtune
from conftest import base_config


def _frame(path, seed=0):
    df = pd.read_csv(path)
    rng = np.random.default_rng(seed)
    warm = df["label"].str.startswith("warm").astype(float)
    keep = df["label"].str.endswith("keep").astype(float)
    df["price"] = 100.0 + 20.0 * warm + 30.0 * keep + rng.normal(0, 2.0, len(df))  # a linear rule over both modalities
    df["image"] = [str(Path(path).parent / p) for p in df["image"]]
    return df


@pytest.fixture(scope="module")
def regressed(tmp_path_factory, tiny_vit, tiny_bert, colour_verdict):
    tmp = tmp_path_factory.mktemp("regression")
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp, enc, data={"tasks": {"price": {"column": "price", "regression": True},
                                                "label": {"column": "label", "weight": 0.5}}},
                      trainer={"max_epochs": 12, "monitor": "val_rmse"}, evaluation={"report": True})
    return mmtune.fit(cfg, train=_frame(colour_verdict["train"]), test=_frame(colour_verdict["test"], 1))


@pytest.mark.stochastic
def test_a_planted_linear_rule_is_learned(regressed):
    m = regressed.metrics["test"]["price"]
    # the target's spread is about 18 (20 and 30 between the classes, noise 2)
    assert m["r2"] > 0.9 and m["rmse"] < 6.0
    assert regressed.metrics["test"]["label"]["accuracy"] > 0.8  # the classification head beside it


def test_metrics_equal_sklearn_on_the_saved_predictions_and_reload(regressed, colour_verdict):
    preds = pd.read_csv(regressed.run_dir / "predictions" / "test.csv")
    y, p = preds["price:true"].to_numpy(), preds["price:pred"].to_numpy()
    m = regressed.metrics["test"]["price"]
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)), abs=1e-9)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-9)
    assert m["r2"] == pytest.approx(r2_score(y, p), abs=1e-9)
    task = {t["name"]: t for t in json.loads((regressed.run_dir / "labels.json").read_text())["tasks"]}["price"]
    train = _frame(colour_verdict["train"])
    assert task["regression"] and abs(task["mean"] - 100 - 10 - 15) < 3 and task["std"] > 10
    test = _frame(colour_verdict["test"], 1).head(25)
    pred = mmtune.load(regressed.run_dir)
    values = pred.predict(test, task="price")
    assert values.dtype == np.float64 and values.shape == (25,)
    assert np.abs(values - regressed.in_memory().predict(test, task="price")).max() <= 1e-4
    assert np.abs(values - p[:25]).max() <= 1e-4  # the same rows as the saved test predictions
    table = pred.predict_table(test)
    assert np.allclose(table["price.prediction"].astype(float), values)
    assert list(pred.predict_proba(test, task="price").columns) == ["id", "prediction"]
    assert pred.evaluate(test)["price"]["r2"] == pytest.approx(r2_score(test["price"], values), abs=1e-9)
    assert train["price"].std() > 10
    page = (regressed.run_dir / "report.html").read_text()
    assert "Predicted vs actual" in page and (regressed.run_dir / "plots" / "price_regression.png").is_file()
    logs = pd.read_csv(regressed.run_dir / "logs" / "metrics.csv")
    assert "val_rmse" in logs.columns


def test_a_target_that_is_not_a_number_is_a_bad_row(tmp_path, tiny_bert, colour_verdict):
    df = _frame(colour_verdict["train"]).drop(columns="image")
    df["price"] = df["price"].astype(object)
    df.loc[3, "price"] = "cheap"
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}},
                      data={"tasks": {"price": {"column": "price", "regression": True}}},
                      trainer={"max_epochs": 1, "monitor": "val_rmse"}, evaluation={"report": False})
    with pytest.raises(mmtune.BadRowsError, match="train row 4, column 'price': target must be a finite number, got 'cheap'"):
        mmtune.fit(cfg, train=df)
    with pytest.raises(mmtune.ConfigError, match="val_acc is not logged"):
        mmtune.load_config({**cfg, "trainer": {**cfg["trainer"], "monitor": "val_acc"}})
