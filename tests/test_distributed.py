"""A real 2-process DDP fit on CPU (gloo) through Lightning's own launcher: one bundle, written once, equal to
what one process gets with the same global batch; validation metrics over every row exactly once."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import base_config
from mmtune.distributed import EvalShard


def test_eval_shards_cover_every_row_once(monkeypatch):
    import mmtune.distributed as d

    rows = list(range(37))
    seen = []
    for rank in range(3):
        monkeypatch.setattr(d, "world", lambda rank=rank: (3, rank))
        shard = EvalShard(rows)
        seen += list(shard)
        assert len(shard) == len(list(shard))
    assert sorted(seen) == rows  # no row twice, none left out (a DistributedSampler pads to 39)


def _fit(cfg_path, *sets):
    cmd = [sys.executable, "-m", "mmtune.cli", "fit", str(cfg_path), *[a for s in sets for a in ("--set", s)]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_process_ddp_fit_equals_one_process(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    train = pd.read_csv(colour_verdict["train"])
    folder = colour_verdict["train"].parent
    for split, frame in (("train", train.iloc[:128]), ("val", train.iloc[128:165])):  # 128 = 8 steps of 16; 37 val rows
        frame = frame.assign(image=[str(folder / p) for p in frame["image"]])
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "frozen", "cache": False},
                      trainer={"max_epochs": 3, "early_stopping_patience": None},
                      evaluation={"report": False, "linear_probe": False})
    cfg["data"].update(train=str(tmp_path / "train.csv"), val=str(tmp_path / "val.csv"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    one = _fit(tmp_path / "cfg.yaml", "name=one", "trainer.batch_size=16", "trainer.devices=1", "trainer.accelerator=cpu")
    two = _fit(tmp_path / "cfg.yaml", "name=two", "trainer.batch_size=8", "trainer.strategy=ddp", "trainer.devices=2",
               "trainer.accelerator=cpu")
    assert one.stdout.count("run bundle:") == 1 and two.stdout.count("run bundle:") == 1  # only rank 0 reports
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["one", "two"]
    logs = {n: pd.read_csv(runs / n / "logs" / "metrics.csv") for n in ("one", "two")}
    val = {n: df.dropna(subset=["val_acc"]).sort_values("epoch") for n, df in logs.items()}
    assert len(val["two"]) == 3  # one validation row per epoch: logged once, not once per process
    # every validation row scored exactly once, gathered over both processes: the same accuracy as one process
    assert val["two"]["val_acc"].tolist() == pytest.approx(val["one"]["val_acc"].tolist(), abs=1e-6)
    assert val["two"]["val_loss"].tolist() == pytest.approx(val["one"]["val_loss"].tolist(), abs=1e-4)
    w1, w2 = (load_file(str(runs / n / "model.safetensors")) for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    trained = [k for k in w1 if k.startswith(("fusion.", "heads."))]
    assert trained and max(float((w1[k] - w2[k]).abs().max()) for k in trained) <= 1e-4
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-4
    m1, m2 = (json.loads((runs / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert m1["val"]["label"]["n"] == m2["val"]["label"]["n"] == 37
    assert m2["val"]["label"]["accuracy"] == pytest.approx(m1["val"]["label"]["accuracy"], abs=1e-9)
    assert len(pd.read_csv(runs / "two" / "predictions" / "val.csv")) == 37


@pytest.mark.parametrize("restore_best", [True, False])
def test_after_a_sharding_strategy_the_bundle_holds_the_consolidated_weights(tmp_path, tiny_bert, colour_verdict,
                                                                            monkeypatch, restore_best):
    """With a strategy that shards the weights, the main process evaluates and bundles an unsharded copy loaded
    from the consolidated checkpoint (the best epoch's, or the final state saved after training), never the
    live module: the bundle equals a plain run's, though the live weights were wiped."""
    import mmtune
    import mmtune.distributed as d

    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "full"},
                      trainer={"max_epochs": 2, "early_stopping_patience": None, "restore_best": restore_best},
                      evaluation={"report": False, "linear_probe": False, "explain": 0})
    train = colour_verdict["train"]
    plain = mmtune.fit({**cfg, "name": "plain"}, train=str(train))
    import lightning as L
    import torch

    save = L.Trainer.save_checkpoint

    def save_then_shard(trainer, *args, **kwargs):  # the final save gathers the whole weights; the live ones are not
        save(trainer, *args, **kwargs)
        if trainer.state.finished:
            with torch.no_grad():
                for p in trainer.lightning_module.model.parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(d, "shards_weights", lambda strategy: True)
    monkeypatch.setattr(L.Trainer, "save_checkpoint", save_then_shard)
    sharded = mmtune.fit({**cfg, "name": "sharded"}, train=str(train))
    w1, w2 = (load_file(str(r.run_dir / "model.safetensors")) for r in (plain, sharded))
    assert w1.keys() == w2.keys() and all(bool((w1[k] == w2[k]).all()) for k in w1)
    assert sharded.metrics["val"]["label"]["accuracy"] == plain.metrics["val"]["label"]["accuracy"]
