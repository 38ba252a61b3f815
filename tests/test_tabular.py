"""Numbers and categories as a modality: a label that depends on one numeric column, categories unseen in
training, missing numbers, inferred and forced column types, statistics from the training split only."""
import json

import numpy as np
import pandas as pd
import pytest

import mmtune
from conftest import base_config
from mmtune.demo import vocabulary


def _table(n, seed):
    rng = np.random.default_rng(seed)
    words = vocabulary()
    x = rng.uniform(0, 10, n)
    return pd.DataFrame({
        "id": [f"r{seed}-{i}" for i in range(n)],
        "text": [" ".join(rng.choice(words, 5)) for _ in range(n)],       # carries nothing
        "amount": np.round(x, 3),                                          # the label: amount above 5
        "brand": rng.choice(["acme", "globex", "initech"], n),           # noise
        "store": rng.integers(1, 4, n),                                    # integers, forced categorical below
        "label": np.where(x > 5, "high", "low"),
    })


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("tabular")
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert},
           "table": {"modality": "tabular", "checkpoint": "tabular", "types": {"store": "categorical"}}}
    cfg = base_config(tmp, enc, data={"columns": {"tabular": ["amount", "brand", "store"]}},
                      trainer={"max_epochs": 10}, optim={"lr": 5e-3}, evaluation={"modality_contribution": True})
    train = _table(400, 0)
    train.loc[::10, "amount"] = np.nan  # missing numbers are imputed and flagged, not bad rows
    train.loc[::10, "label"] = "low"
    return mmtune.fit(cfg, train=train, test=_table(150, 1)), train


@pytest.mark.stochastic
def test_a_label_in_one_numeric_column_is_learned(tabular_run):
    res, _ = tabular_run
    # the text carries nothing; chance is about 0.5. Seeds 0-2 gave 0.98-0.987 (single_stream fusion: 0.96),
    # alike with ATEN_CPU_CAPABILITY=default
    assert res.metrics["test"]["label"]["accuracy"] > 0.9


def test_types_statistics_and_unknown_categories(tabular_run, capsys):
    res, train = tabular_run
    meta = json.loads((res.run_dir / "encoders" / "table" / "processor" / "mmtune_processor.json").read_text())
    assert meta["types"] == {"amount": "numeric", "brand": "categorical", "store": "categorical"}
    assert meta["vocab"]["brand"] == ["acme", "globex", "initech"] and meta["vocab"]["store"] == ["1", "2", "3"]
    # the statistics come from the training split only (the 320 training rows; not validation, not test)
    split_train = pd.read_csv(res.run_dir / "predictions" / "val.csv")  # the held-out rows, for their ids
    rows = train[~train["id"].isin(split_train["id"])]
    mean, std = meta["stats"]["amount"]
    assert mean == pytest.approx(rows["amount"].mean(), abs=1e-9) and std == pytest.approx(rows["amount"].std(), abs=1e-9)
    new = _table(20, 2)
    new.loc[0, "brand"] = "never-seen"
    new.loc[1, "store"] = 99
    new.loc[2, "amount"] = np.nan
    pred = mmtune.load(res.run_dir)
    a = pred.predict_proba(new)
    b = res.in_memory().predict_proba(new)
    assert np.abs(a[["high", "low"]].to_numpy() - b[["high", "low"]].to_numpy()).max() <= 1e-6
    assert np.isfinite(a[["high", "low"]].to_numpy()).all()
    mc = res.metrics["modality_contribution"]
    assert mc["without tabular"]["change_vs_all"]["label"]["accuracy"] < -0.2  # hiding the table costs accuracy


def test_tabular_columns_are_named_and_checked(tmp_path, tiny_bert):
    enc = {"table": {"modality": "tabular", "checkpoint": "tabular"}}
    with pytest.raises(mmtune.ConfigError, match="tabular encoder 'table' needs its columns: set data.columns.tabular"):
        mmtune.load_config(base_config(tmp_path, enc))
    cfg = base_config(tmp_path, {"table": {**enc["table"], "columns": ["a"]}}, finetune={"type": "frozen"})
    with pytest.raises(mmtune.ConfigError, match="encoder 'table' is trained from scratch, so its outputs change"):
        mmtune.load_config(cfg)
    cfg = base_config(tmp_path, {"table": {**enc["table"], "columns": ["a", "b"]}}, trainer={"max_epochs": 1})
    df = pd.DataFrame({"id": range(8), "a": [1.0] * 8, "label": ["x", "y"] * 4})
    with pytest.raises(ValueError, match="has no column\\(s\\) 'b'"):
        mmtune.fit(cfg, train=df)
    df["b"] = [[1, 2]] + ["k"] * 7
    with pytest.raises(mmtune.BadRowsError, match="column 'a,b': column 'b': a number or a category is expected, got list"):
        mmtune.fit(cfg, train=df)


@pytest.mark.stochastic
def test_the_deciding_column_gets_the_largest_attribution(tabular_run):
    pytest.importorskip("captum")
    res, _ = tabular_run
    expl = res.load().explain(_table(60, 1), activation_rows=0)
    assert set(expl.rows[0]["columns"]["tabular"]) == {"amount", "brand", "store"}
    # The columns' attributions add up to how far the row's prediction is from the average row's (numbers at their
    # mean, categories unknown). Where that is large, the amount made it; where the average row already predicts
    # the row's class, there is nothing to attribute.
    moved = [r for r in expl.rows if sum(r["columns"]["tabular"].values()) > 0.5]
    assert len(moved) >= 10
    top = [max(r["columns"]["tabular"].items(), key=lambda kv: abs(kv[1]))[0] for r in moved]
    assert np.mean([t == "amount" for t in top]) >= 0.9
    assert expl.table["mean_attribution_share"]["tabular"] > expl.table["mean_attribution_share"]["text"]


def test_adapters_leave_an_encoder_trained_from_scratch_whole(tmp_path, tiny_bert):
    """LoRA beside a tabular column: the text encoder trains only its adapters, the tabular encoder (nothing
    pretrained to keep) trains every weight, and the adapters merge back into plain weights."""
    import torch

    enc = {"text": {"modality": "text", "checkpoint": tiny_bert},
           "table": {"modality": "tabular", "checkpoint": "tabular"}}
    cfg = base_config(tmp_path, enc, data={"columns": {"tabular": ["amount", "brand", "store"]}},
                      finetune={"type": "lora", "r": 4}, trainer={"max_epochs": 2})
    res = mmtune.fit(cfg, train=_table(120, 3))
    assert res.metrics["epochs_trained"] == 2
    model = res.model
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged
    from mmtune.finetune import build_strategy
    from mmtune.finetune.lora import add_adapters

    add_adapters(model, res.config.finetune)
    build_strategy(res.config.finetune).apply(model)
    text = {n for n, p in model.encoders["text"].named_parameters() if p.requires_grad}
    assert text and all("lora_" in n for n in text)
    assert all(p.requires_grad for p in model.encoders["table"].parameters())
