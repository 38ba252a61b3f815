"""Strategies, optimizer groups and schedules on the one model class."""


import pandas as pd
import pytest
import torch

from mmtune.config import load_config
from mmtune.finetune import STRATEGIES
from mmtune.data.collate import Collator
from mmtune.finetune import apply_strategy, param_groups, trainable_parameter_count
from mmtune.models import build_model
from mmtune.optim import cosine_with_warmup
from PIL import Image


def _model(tiny_vit, tiny_bert, **model):
    cfg = load_config({"model": {"encoders": {"image": {"modality": "image", "checkpoint": tiny_vit},
                                              "text": {"modality": "text", "checkpoint": tiny_bert}}, **model}})
    return build_model(cfg.model, {"label": 3})


def _batch(model):
    col = Collator({n: e.processor for n, e in model.encoders.items()}, ["image", "text"])
    samples = [{"values": {"image": Image.new("RGB", (32, 32), (i * 40, 0, 0)), "text": f"works perfectly {i}"},
                "labels": {"label": i % 3}, "index": i} for i in range(4)]
    return col(samples)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(batch["inputs"], batch["present"])["label"]
    torch.nn.functional.cross_entropy(out, batch["labels"]["label"]).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _ft(name, **settings):
    """The ``finetune`` section of strategy ``name`` with those of ``settings`` it has."""
    cls = STRATEGIES.get(name).Config
    return cls(**{k: v for k, v in settings.items() if k in cls.model_fields})


@pytest.mark.parametrize("strategy", ["full", "frozen", "partial"])
def test_gradients_reach_exactly_the_trainable_parameters(tiny_vit, tiny_bert, strategy):
    model = _model(tiny_vit, tiny_bert)
    apply_strategy(model, _ft(strategy, unfreeze_last=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    got = _grads(model, _batch(model))
    assert got == trainable
    enc_params = {n for n in trainable if n.startswith("encoders.")}
    if strategy == "frozen":
        assert enc_params == set()
    if strategy == "partial":
        # the deepest group of each encoder: the last layer norm (ViT) / last transformer layer (BERT)
        last = {f"encoders.{name}.{n}" for name, e in model.encoders.items()
                for n, p in e.named_parameters() if any(p is q for q in e.layer_groups()[-1])}
        assert enc_params == last
    if strategy == "full":
        assert trainable == {n for n, _ in model.named_parameters()}


def test_frozen_encoders_stay_in_eval_mode(tiny_vit, tiny_bert):
    model = _model(tiny_vit, tiny_bert)
    apply_strategy(model, _ft("frozen"))
    model.train()
    assert all(not e.training for e in model.encoders.values())
    assert model.fusion.training
    apply_strategy(model, _ft("full"))
    model.train()
    assert all(e.training for e in model.encoders.values())


def test_param_groups_lr_and_no_decay(tiny_vit, tiny_bert):
    model = _model(tiny_vit, tiny_bert)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, encoder_lr=1e-5)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoders/decay", "encoders/no_decay", "fusion/decay", "fusion/no_decay",
                            "heads/decay", "heads/no_decay"}
    assert by_name["encoders/decay"]["lr"] == 1e-5 and by_name["fusion/decay"]["lr"] == 1e-3
    assert all(p.ndim >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == trainable_parameter_count(model)


def test_cosine_with_warmup_shape():
    f = cosine_with_warmup(100, 0.1, 0.0, 1e-3)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=1e-6) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) - 1e-12 for i in range(10, 100))


def test_missing_modality_is_masked_not_crashed(tiny_vit, tiny_bert):
    model = _model(tiny_vit, tiny_bert).eval()
    batch = _batch(model)
    with torch.no_grad():
        full = model(batch["inputs"], batch["present"])["label"]
        present = {k: v.clone() for k, v in batch["present"].items()}
        present["image"][1] = False
        masked = model(batch["inputs"], present)["label"]
    assert torch.allclose(full[[0, 2, 3]], masked[[0, 2, 3]], atol=1e-6)
    assert not torch.allclose(full[1], masked[1])


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "plateau"])
@pytest.mark.parametrize("optim", ["adam", "adamw", "sgd"])
def test_every_optimizer_and_schedule_runs_as_configured(tmp_path, tiny_bert, colour_verdict, optim, schedule):
    """The optimizer class is the configured one and the learning rate follows the configured schedule,
    step by step, through a real fit."""
    import lightning as L

    import mmtune
    from conftest import base_config

    class Record(L.Callback):
        def __init__(self):
            self.lrs, self.opt = [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.opt = trainer.optimizers[0]
            self.sched = [c.scheduler for c in trainer.lr_scheduler_configs]
            self.lrs.append((trainer.current_epoch, self.opt.param_groups[0]["lr"]))

    rec = Record()
    lr = 3e-3
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}},
                      trainer={"max_epochs": 3, "limit_train_batches": 4},
                      optim={"name": optim, "lr": lr},
                      schedule={"name": schedule, "step_epochs": 1, "gamma": 0.5, "warmup_fraction": 0.25,
                                "patience": 0},
                      evaluation={"report": False})
    mmtune.fit(cfg, train=str(colour_verdict["train"]), callbacks=[rec])
    assert type(rec.opt).__name__.lower() == optim
    lrs = [v for _, v in rec.lrs]
    per_epoch = [[v for e, v in rec.lrs if e == k] for k in range(3)]
    assert len(lrs) == 12
    if schedule == "constant":
        assert lrs == pytest.approx([lr] * 12)
    elif schedule == "step":
        assert all(per_epoch[k] == pytest.approx([lr / 2 ** k] * 4) for k in range(3))
    elif schedule == "cosine":  # 3 warmup steps up to lr, then down towards 0
        expected = [lr * cosine_with_warmup(12, 0.25, 0.0, lr)(i) for i in range(12)]
        assert lrs == pytest.approx(expected)
        assert lrs[2] == pytest.approx(lr) and lrs[0] < lrs[1] < lrs[2] > lrs[6] > lrs[11]
    else:  # plateau: ReduceLROnPlateau on the monitor, constant within an epoch, never rising
        assert [type(x).__name__ for x in rec.sched] == ["ReduceLROnPlateau"] and rec.sched[0].factor == 0.5
        assert all(len(set(e)) == 1 for e in per_epoch)
        firsts = [e[0] for e in per_epoch]
        assert firsts[0] == pytest.approx(lr) and firsts == sorted(firsts, reverse=True)


def test_step_and_time_budgets_reach_the_trainer(tmp_path, tiny_bert, colour_verdict):
    import mmtune
    from conftest import base_config

    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}},
                      trainer={"max_epochs": 5, "max_steps": 3, "max_time": "00:01:00:00", "val_check_interval": 2},
                      evaluation={"report": False, "linear_probe": False})
    seen = {}

    import lightning as L

    class Probe(L.Callback):
        def on_fit_end(self, trainer, module):
            seen.update(step=trainer.global_step, vals=trainer.val_check_interval)

    res = mmtune.fit(cfg, train=str(colour_verdict["train"]), callbacks=[Probe()])
    assert seen["step"] == 3 and seen["vals"] == 2
    logs = pd.read_csv(res.run_dir / "logs" / "metrics.csv")
    assert logs["val_loss"].notna().sum() >= 1  # validated within the first epoch, after 2 batches
    with pytest.raises(mmtune.ConfigError, match="trainer.max_steps"):
        load_config({"trainer": {"max_steps": -5}})


def test_cli_device_names_are_checked(capsys):
    from mmtune.cli import main as cli

    assert cli(["predict", "--run", "nowhere", "--data", "x.csv", "--out", "p.csv", "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err or "CUDA device(s)" in err


# ---- weight averaging ---------------------------------------------------------------------------------
def _soup_fit(tmp_path, tiny_bert, colour_verdict, soup):
    import pandas as pd

    import mmtune
    from conftest import base_config

    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, name=soup, finetune={"type": "frozen"},
                      trainer={"max_epochs": 5, "average_best": 3, "soup": soup, "monitor": "val_acc"},
                      evaluation={"report": False, "linear_probe": False})
    train = pd.read_csv(colour_verdict["train"]).drop(columns=["image"])
    return mmtune.fit(cfg, train=train)


def test_a_uniform_soup_is_the_mean_of_the_best_checkpoints(tmp_path, tiny_bert, colour_verdict):
    from mmtune.training.module import _read_state

    res = _soup_fit(tmp_path, tiny_bert, colour_verdict, "uniform")
    soup = res.metrics["soup"]
    assert soup["kind"] == "uniform" and len(soup["members"]) == 3
    states = [_read_state(res.run_dir / "checkpoints" / n) for n in soup["members"]]
    weights = dict(res.model.state_dict())
    for key in states[0]:
        mean = torch.stack([s[key].double() for s in states]).mean(0)
        assert torch.allclose(weights[key.removeprefix("model.")].double(), mean, atol=1e-6), key
    # and it is not just the best epoch
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_greedy_soup_keeps_only_members_that_do_not_hurt_validation(tmp_path, tiny_bert, colour_verdict):
    res = _soup_fit(tmp_path, tiny_bert, colour_verdict, "greedy")
    soup = res.metrics["soup"]
    assert soup["kind"] == "greedy" and soup["members"][0] == soup["candidates"][0]
    assert set(soup["members"]) <= set(soup["candidates"]) and len(soup["candidates"]) == 3
    best_alone = soup["scores"][soup["candidates"][0]]
    assert soup["val_acc"] >= best_alone - 1e-9  # the soup's validation accuracy is never below the best epoch's


# ---- LP-FT ----------------------------------------------------------------------------------------------
def test_lp_ft_trains_the_head_alone_first_then_the_encoders(tmp_path, tiny_bert, colour_verdict):
    import lightning as L
    import pandas as pd

    import mmtune
    from conftest import base_config

    snaps = []

    class Snap(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            m = module.model
            snaps.append({"enc": m.encoders["text"].model.encoder.layer[-1].output.dense.weight.detach().clone(),
                          "head": next(m.heads["label"].parameters()).detach().clone()})

    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "full", "probe_epochs": 2, "encoder_lr": 1e-3},
                      trainer={"max_epochs": 3}, evaluation={"report": False, "linear_probe": False})
    from mmtune.models import build_model

    start = build_model(load_config(cfg).model, {"label": 4}).encoders["text"].model.encoder.layer[-1].output.dense.weight
    train = pd.read_csv(colour_verdict["train"]).drop(columns=["image"])
    mmtune.fit(cfg, train=train, callbacks=[Snap()])
    assert torch.equal(snaps[0]["enc"], start.detach()) and torch.equal(snaps[1]["enc"], start.detach())  # probe
    assert not torch.equal(snaps[2]["enc"], snaps[1]["enc"])  # then the encoder fine-tunes
    assert not torch.equal(snaps[0]["head"], snaps[1]["head"])  # the head trains from the first epoch
    with pytest.raises(ValueError, match="strategy 'frozen' trains no encoder"):
        load_config({**cfg, "finetune": {"type": "frozen", "probe_epochs": 1}})
    # early stopping leaves the fine-tuning its own patience after the probe epochs
    from mmtune.training.trainer import build_trainer

    stopping = load_config({**cfg, "trainer": {**cfg["trainer"], "max_epochs": 20, "early_stopping_patience": 3}})
    assert build_trainer(stopping, tmp_path / "t", 4).fit_loop.min_epochs == 2 + 3 + 1
    plain = load_config({**cfg, "finetune": {"type": "full"}, "trainer": {**cfg["trainer"], "early_stopping_patience": 3}})
    assert not build_trainer(plain, tmp_path / "u", 4).fit_loop.min_epochs
