"""The core's contracts: the tables of parts (every entry, and one registered from outside the package),
the bundle as the only way to a trained model (including bundles of the earlier format), and a predictor
that needs neither Lightning nor the training code nor the optional extras."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mmtune
from conftest import base_config
from mmtune.bundle import read_bundle
from mmtune.config import load_config
from mmtune.fusion import FUSIONS, Fusion, FusionConfig
from mmtune.losses import LOSSES, Loss, LossConfig
from mmtune.optim import OPTIMIZERS, SCHEDULES
from mmtune.tasks import Task

FORMAT1 = Path(__file__).parent / "data" / "bundle_format1"


# ---- bundles written before the redesign ------------------------------------------------------


def test_a_format1_bundle_loads_and_predicts_what_it_predicted():
    """tests/data/bundle_format1 was written by the format-1 code (late fusion, LoRA, label smoothing,
    calibration inside labels.json), with the probabilities that code predicted for rows/rows.csv."""
    b = read_bundle(FORMAT1 / "bundle")
    assert b.meta["format"] == 1
    assert b.config.model.fusion.type == "late" and b.config.model.fusion.weights == "learned"
    assert b.config.finetune.type == "lora" and b.config.finetune.r == 4
    assert b.config.loss.type == "cross_entropy" and b.config.loss.label_smoothing == 0.05
    stored = json.loads((FORMAT1 / "bundle" / "labels.json").read_text())["tasks"][0]["temperature"]
    assert b.calibration["label"].temperature == pytest.approx(stored)
    got = mmtune.load(FORMAT1 / "bundle").predict_proba(FORMAT1 / "rows" / "rows.csv")
    expected = pd.read_csv(FORMAT1 / "expected_proba.csv")
    assert list(got["id"]) == list(expected["id"])
    cols = [c for c in expected.columns if c != "id"]
    assert np.abs(got[cols].to_numpy() - expected[cols].to_numpy()).max() <= 1e-6


def test_a_bundle_of_an_unknown_format_names_its_version(tmp_path):
    shutil.copytree(FORMAT1 / "bundle", tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    meta["format"] = 7
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has format version 7; this mmtune reads format 1, 2"):
        mmtune.load(tmp_path / "b")


# ---- the predictor stands alone ------------------------------------------------------------------


def test_importing_the_predictor_imports_no_training_and_no_extras():
    code = ("import sys, mmtune, mmtune.serving.predictor, mmtune.serving.server, mmtune.bundle\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'peft', 'kornia',"
            " 'imblearn', 'matplotlib') or m.startswith('mmtune.training')]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_is_named_before_any_work(tmp_path, tiny_bert, monkeypatch, capsys):
    from mmtune import extras

    monkeypatch.setattr(extras, "available", lambda module: module != "peft")
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}}, finetune={"type": "lora"})
    with pytest.raises(extras.MissingExtraError, match=r"finetune.type lora / ia3\) needs the optional package 'peft': "
                                                       r"pip install 'mmtune\[lora\]'"):
        mmtune.fit(cfg, train=pd.DataFrame({"text": ["a"], "label": ["x"]}))
    assert not (tmp_path / "runs" / "t").exists()


# ---- every entry of the tables ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FUSIONS.names())
def test_every_fusion_owns_a_config_named_after_it(name):
    cls = FUSIONS.get(name)
    cfg = cls.Config()
    assert cfg.type == name
    assert load_config({"model": {"fusion": {"type": name}}, **({"finetune": {"type": "frozen"}} if cls.needs_cache else {}),
                        **({"model": {"fusion": {"type": name}, "head": {"hidden_dims": []}}} if cls.linear_head else {})
                        }).model.fusion == cfg


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_a_per_row_loss_with_gradients(name):
    loss = LOSSES.get(name)(LOSSES.get(name).Config())
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    # a loss that reads the training prior gets it as the objective gives it
    prior = {"log_prior": torch.log(torch.tensor([0.6, 0.3, 0.1]))} if loss.uses_prior else {}
    rows = loss.single_label(logits, target, **prior)
    assert rows.shape == (6,) and torch.isfinite(rows).all() and (rows >= 0).all()
    rows.sum().backward()
    assert logits.grad.abs().sum() > 0
    # a confident right answer costs less than a confident wrong one
    good = torch.tensor([[5.0, 0.0, 0.0]])
    assert loss.single_label(good, torch.tensor([0]), **prior) < loss.single_label(good, torch.tensor([1]), **prior)
    multi = loss.multi_label(torch.zeros(2, 3), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    assert multi.shape == (2,)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_lowers_a_convex_loss(name):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    o = load_config({"optim": {"name": name, "lr": 0.05}}).optim
    opt = OPTIMIZERS.get(name)([{"params": [w], "weight_decay": 0.0}], o)
    first = float((w ** 2).sum())
    for _ in range(20):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert float((w ** 2).sum()) < first


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_builds_for_lightning(name):
    cfg = load_config({"schedule": {"name": name}})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    out = SCHEDULES.get(name)(opt, cfg.schedule, cfg.optim, "val_loss", lambda: 10)
    assert out is None or (set(out) >= {"scheduler", "interval"} and out["interval"] in ("step", "epoch"))


# ---- a fusion and a loss from outside the package -----------------------------------------------


class MeanOfProjections(Fusion):
    """Each output's pooled vector projected to ``width``; the mean over the present ones."""

    class Config(FusionConfig):
        type: Literal["mean_of_projections"] = "mean_of_projections"
        width: int = 16

    @classmethod
    def build(cls, cfg, inputs):
        return cls(inputs.pooled_dims, cfg.width)

    def __init__(self, dims, width):
        super().__init__()
        self.keys = sorted(dims)
        self.proj = nn.ModuleDict({k.replace(".", "__"): nn.Linear(d, width) for k, d in dims.items()})
        self.out_dim = width

    def forward(self, outputs, present):
        parts = [self.proj[k.replace(".", "__")](outputs[k].pooled) * present[k].float().unsqueeze(-1) for k in self.keys]
        count = torch.stack([present[k].float() for k in self.keys], 1).sum(1, keepdim=True).clamp_min(1.0)
        return torch.stack(parts, 0).sum(0) / count


class Brier(Loss):
    """Squared error between the softmax and the one-hot target."""

    calls = 0

    class Config(LossConfig):
        type: Literal["brier"] = "brier"

    def single_label(self, logits, target, weight=None):
        Brier.calls += 1
        onehot = torch.nn.functional.one_hot(target, logits.shape[-1]).float()
        return ((torch.softmax(logits.float(), -1) - onehot) ** 2).sum(-1)


@pytest.fixture
def external_parts():
    FUSIONS.register("mean_of_projections", MeanOfProjections)
    LOSSES.register("brier", Brier)
    yield
    FUSIONS.unregister("mean_of_projections")
    LOSSES.unregister("brier")


@pytest.mark.stochastic
def test_a_fusion_and_a_loss_registered_outside_train_and_reload(tmp_path, tiny_vit, tiny_bert, colour_verdict,
                                                                  external_parts):
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, model={"fusion": {"type": "mean_of_projections", "width": 24}},
                      loss={"type": "brier"}, finetune={"type": "frozen"}, optim={"lr": 1e-2},
                      trainer={"max_epochs": 15}, evaluation={"report": False})
    Brier.calls = 0
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]))
    assert Brier.calls > 0
    assert isinstance(res.model.fusion, MeanOfProjections) and res.model.fusion.out_dim == 24
    # frozen random tiny encoders; chance is 0.25, either modality alone tops out at 0.5; seeds 0-3 gave
    # 0.72-0.75 (AVX2 and ATEN_CPU_CAPABILITY=default alike)
    assert res.metrics["val"]["label"]["accuracy"] > 0.6
    reloaded = mmtune.load(res.run_dir)
    assert isinstance(reloaded.model.fusion, MeanOfProjections)
    assert read_bundle(res.run_dir, model=False).config.loss.type == "brier"
    test = pd.read_csv(colour_verdict["test"]).head(30)
    test["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in test["image"]]
    a = res.in_memory().predict_proba(test).drop(columns="id").to_numpy()
    b = reloaded.predict_proba(test).drop(columns="id").to_numpy()
    assert np.abs(a - b).max() <= 1e-6


def test_an_unregistered_part_is_refused_with_the_table_names():
    with pytest.raises(mmtune.ConfigError, match="unknown fusion 'mean_of_projections'; valid: concat, single_stream"):
        load_config({"model": {"fusion": {"type": "mean_of_projections"}}})
    with pytest.raises(mmtune.ConfigError, match="unknown loss 'brier'; valid: cross_entropy, focal"):
        load_config({"loss": {"type": "brier"}})


def test_calibration_is_returned_not_set_on_the_tasks(tmp_path, tiny_bert, colour_verdict):
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}},
                      trainer={"max_epochs": 2}, evaluation={"report": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]))
    assert not hasattr(res.tasks[0], "temperature")
    stored = json.loads((res.run_dir / "calibration.json").read_text())["label"]
    assert res.calibration["label"].temperature == pytest.approx(stored["temperature"])
    assert res.metrics["calibration"]["label"]["temperature"] == pytest.approx(stored["temperature"])
    assert Task.from_json(json.loads((res.run_dir / "labels.json").read_text())["tasks"][0]).classes == res.tasks[0].classes


def test_changing_a_part_type_by_override_keeps_only_its_own_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune: {type: partial, unfreeze_last: 2, encoder_lr: 0.001}\n"
                    "model: {fusion: {type: late, weights: mean, width: 32}}\n")
    cfg = load_config(path, ["finetune.type=lora", "finetune.r=2", "model.fusion.type=concat"])
    assert cfg.finetune.type == "lora" and cfg.finetune.r == 2 and cfg.finetune.encoder_lr == 0.001
    assert cfg.model.fusion.type == "concat" and not hasattr(cfg.model.fusion, "weights")
    with pytest.raises(mmtune.ConfigError, match="unknown config key 'model.fusion.weights'"):
        load_config({"model": {"fusion": {"type": "concat", "weights": "mean"}}})


def test_the_cli_lists_the_tables(capsys):
    from mmtune.cli import main

    assert main(["parts"]) == 0
    out = capsys.readouterr().out
    for table in (FUSIONS, LOSSES, OPTIMIZERS, SCHEDULES):
        assert ", ".join(table.names()) in out
    with pytest.raises(SystemExit) as done:  # fit's help lists them too (built only for that help)
        main(["fit", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "parts a config can name:" in out and ", ".join(FUSIONS.names()) in out
    from mmtune.cli import _parser

    sub = next(a for a in _parser(["predict"])._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sub.choices["fit"].epilog is None  # another command does not import every table to list them


def test_every_optional_package_is_declared_by_the_part_or_section_that_needs_it(monkeypatch):
    """fit's check asks the parts (strategy, fusion, modalities) and the config sections (augmentation, synthesis,
    evaluation, the preset) what they need: nothing is listed twice, and a section that is off needs nothing."""
    from mmtune import extras
    from mmtune.recipe.fit import check_extras

    monkeypatch.setattr(extras, "available", lambda module: False)

    def missing(raw):
        try:
            check_extras(load_config(raw))
        except extras.MissingExtraError as exc:
            return sorted(part.split(" needs the optional package ")[1].split(":")[0] for part in str(exc).split("; "))
        return []

    plain = {"evaluation": {"report": False}, "data": {"columns": {"text": "t"}}}
    assert missing(plain) == []
    assert missing({**plain, "evaluation": {"report": True}}) == ["'matplotlib'"]
    assert missing({**plain, "synthesis": {"method": "smote"}, "finetune": {"type": "frozen"}}) == ["'imblearn'"]
    image = {**plain, "model": {"encoders": {"img": {"modality": "image", "checkpoint": "x"}}}}
    assert missing({**image, "augment": {"image": {"enabled": True}}}) == ["'kornia'"]
    assert missing({**image, "augment": {"image": {"enabled": False}}}) == []
    assert missing({**plain, "preset": "best"}) == ["'optuna'"]
    assert missing({**plain, "finetune": {"type": "lora"}}) == ["'peft'"]
