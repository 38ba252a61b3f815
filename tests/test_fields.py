"""Several columns of one modality: two text columns where only the second carries the label, read by two
encoders or by one shared encoder with a learned embedding per column."""
import random

import numpy as np
import pandas as pd
import pytest

import mmtune
from conftest import base_config
from mmtune.demo import ITEMS, KEEP, OPENERS, RETURN


def _notes(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        verdict = "keep" if i % 2 else "return"
        rows.append({"id": f"n{seed}-{i}",
                     "title": f"{rng.choice(OPENERS)} {rng.choice(ITEMS)} {rng.choice(KEEP + RETURN)}".strip(),  # noise
                     "body": f"this {rng.choice(ITEMS)}: {rng.choice(KEEP if verdict == 'keep' else RETURN)}",
                     "label": verdict})
    return pd.DataFrame(rows)


@pytest.mark.stochastic
@pytest.mark.parametrize("shared", [False, True], ids=["two-encoders", "one-shared-encoder"])
def test_the_column_that_carries_the_label_is_found(tmp_path, tiny_bert, shared):
    if shared:
        enc = {"t": {"modality": "text", "checkpoint": tiny_bert, "fields": ["text", "text.body"]}}
    else:
        enc = {"title": {"modality": "text", "checkpoint": tiny_bert},
               "body": {"modality": "text.body", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"columns": {"text": "title"}}, trainer={"max_epochs": 6},
                      evaluation={"report": False})
    res = mmtune.fit(cfg, train=_notes(240, 0), test=_notes(80, 1))
    m = res.metrics
    # seeds 0-2, both kernels: accuracy 1.0; hiding the body costs 0.43-0.5, hiding the title 0.0
    assert m["test"]["label"]["accuracy"] > 0.85
    mc = m["modality_contribution"]
    assert set(mc) >= {"all", "without text", "without text.body"}  # contribution per column
    assert mc["without text.body"]["change_vs_all"]["label"]["accuracy"] < -0.25
    assert mc["without text"]["change_vs_all"]["label"]["accuracy"] > -0.1
    keys = set(res.model.output_modality)
    assert keys == ({"t.text", "t.text.body"} if shared else {"title", "body"})
    new = _notes(12, 2)
    new.loc[0, "title"] = None
    with pytest.raises(mmtune.BadRowsError, match="column 'title': missing text"):
        mmtune.load(res.run_dir).predict(new)
    new.loc[0, "title"] = "anything"
    a = res.in_memory().predict_proba(new).drop(columns="id").to_numpy()
    b = mmtune.load(res.run_dir).predict_proba(new).drop(columns="id").to_numpy()
    assert np.abs(a - b).max() <= 1e-6


def test_fields_are_checked():
    with pytest.raises(mmtune.ConfigError, match="encoder fields \\['text', 'image.back'\\]: two or more columns"):
        mmtune.load_config({"model": {"encoders": {"t": {"modality": "text", "checkpoint": "x",
                                                          "fields": ["text", "image.back"]}}}})
    with pytest.raises(mmtune.ConfigError, match="unknown modality 'video.front'"):
        mmtune.load_config({"data": {"columns": {"video.front": "f"}}})
