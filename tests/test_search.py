"""Good results without hand-tuning: presets fill in what a config leaves open (and the docs say what),
the optuna search prunes, resumes after a kill and refits its best trial to the same validation score, and a
distilled student beats the same student trained on labels alone."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mmtune
from conftest import base_config
from mmtune.cli import main as cli
from mmtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]


# ---- presets ---------------------------------------------------------------------------------------------
def test_the_readme_shows_each_presets_settings_as_the_code_applies_them():
    from mmtune.presets import preset_table

    assert preset_table() in (ROOT / "docs" / "guides" / "presets-and-search.md").read_text()


def test_a_preset_fills_what_the_config_leaves_open_and_explicit_keys_win(tmp_path):
    from mmtune.config import apply_preset
    from mmtune.presets import TableStats, preset_settings

    enc = {"image": {"modality": "image", "checkpoint": "x"}, "text": {"modality": "text", "checkpoint": "y"}}
    raw = {"name": "p", "data": {"columns": {"image": "image", "text": "text"}}, "model": {"encoders": enc},
           "preset": "balanced", "trainer": {"max_epochs": 3}, "finetune": {"type": "lora", "r": 4}}
    stats = TableStats(rows=1000, modalities=("image", "text"), image_encoders=("image",))
    cfg = apply_preset(load_config(raw), stats)
    want = preset_settings("balanced", stats)
    assert cfg.trainer.max_epochs == 3  # the config's own value
    assert cfg.finetune.type == "lora" and cfg.finetune.r == 4 and cfg.finetune.layer_decay is None  # its own type
    assert cfg.loss.label_smoothing == want["loss"]["label_smoothing"] == 0.1
    assert cfg.augment.image.enabled and cfg.augment.text.word_dropout == want["augment.text"]["word_dropout"]
    assert cfg.trainer.batch_size == want["trainer.batch_size"] and cfg.optim.lr == want["optim.lr"]
    assert cfg.model.encoders["image"].image_size is None  # 160 px only from 20,000 rows
    big = apply_preset(load_config({**raw, "finetune": {}}), TableStats(50_000, ("image", "text"), ("image",)))
    assert big.model.encoders["image"].image_size == 160 and big.trainer.max_epochs == 3
    assert big.finetune.type == "partial" and big.finetune.layer_decay == 0.8 and big.finetune.encoder_lr == 2e-4
    fast = apply_preset(load_config({**raw, "preset": "fast", "finetune": {}, "trainer": {}}), stats)
    assert fast.finetune.type == "frozen" and fast.finetune.cache and fast.trainer.max_epochs == 60
    assert not fast.augment.image.enabled  # cached features cannot be augmented


def test_fit_with_a_preset_and_a_time_limit(tmp_path, tiny_bert, colour_verdict, capsys):
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"columns": {"text": "text"}}, evaluation={"report": False, "explain": 0})
    del cfg["trainer"]["max_epochs"], cfg["trainer"]["batch_size"], cfg["optim"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["fit", str(path), "--preset", "fast", "--set", f"data.train={colour_verdict['train']}"]) == 0
    bundle = load_config(tmp_path / "runs" / "t" / "config.yaml")
    assert bundle.preset == "fast" and bundle.finetune.type == "frozen" and bundle.trainer.max_epochs == 60
    assert bundle.trainer.batch_size == 32 and bundle.optim.lr == 1e-3
    assert bundle.model.fusion.type == "concat"  # one modality
    # a budget of one second stops a 30-epoch run early (the cache is built before the clock starts)
    assert cli(["fit", str(path), "--preset", "fast", "--time-limit", "1", "--set", "name=short",
                "--set", f"data.train={colour_verdict['train']}", "--set", "trainer.batch_size=4"]) == 0
    short = json.loads((tmp_path / "runs" / "short" / "metrics.json").read_text())
    assert load_config(tmp_path / "runs" / "short" / "config.yaml").trainer.max_time == {"seconds": 1}
    assert short["epochs_trained"] < 30
    assert cli(["fit", str(path), "--time-limit", "-3"]) == 2
    assert "--time-limit must be a positive number" in capsys.readouterr().err


# ---- search ----------------------------------------------------------------------------------------------
def _frozen_text(tmp_path, tiny_bert, **extra):
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"columns": {"text": "text"}}, finetune={"type": "frozen"},
                      trainer={"max_epochs": 3, "monitor": "val_loss"})
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def test_a_three_trial_search_prunes_and_refits_its_best_trial(tmp_path, tiny_bert, colour_verdict):
    from mmtune.search import tune

    cfg = _frozen_text(tmp_path, tiny_bert, finetune={"cache": False},  # a trial on the cache is never pruned
                       evaluation={"report": True})
    # the config as written (lr 3e-3) is the first trial; the two drawn ones barely move: pruned after epoch 2
    out = tune(cfg, train=str(colour_verdict["train"]), trials=3,
               space={"only": True, "optim.lr": {"low": 1e-7, "high": 1e-6, "log": True}})
    states = [t["state"] for t in out.trials]
    assert states[0] == "complete" and out.trials[0]["params"] == "the config as written"
    assert states.count("pruned") >= 1 and len(states) == 3
    pruned = [t for t in out.trials if t["state"] == "pruned"]
    assert all(t["epochs"] < 3 for t in pruned)
    run = tmp_path / "runs" / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["search"]["best_trial"] == 0
    assert metrics["search"]["refit_value"] == pytest.approx(out.best_value, abs=1e-5)
    assert (run / "tune" / "study.db").is_file() and (run / "tune" / "trials.csv").is_file()
    assert load_config(run / "config.yaml").optim.lr == 3e-3
    # trial folders are removed as they end, but the best trial's: the search can ship its own weights
    assert [p.name for p in (run / "tune" / "trials").glob("trial-*")] == ["trial-0"]
    html = (run / "report.html").read_text()
    assert "<h2>Search</h2>" in html and "the config as written" in html


def test_a_trial_on_the_embedding_cache_runs_to_its_end(tmp_path, tiny_bert, colour_verdict):
    """The same search as above on the cache: the drawn trials that barely move are not pruned (their whole run costs
    seconds, and a head can sit at chance for epochs before it learns)."""
    from mmtune.search import tune

    cfg = _frozen_text(tmp_path, tiny_bert)
    out = tune(cfg, train=str(colour_verdict["train"]), trials=3, refit=False,
               space={"only": True, "optim.lr": {"low": 1e-7, "high": 1e-6, "log": True}})
    assert [t["state"] for t in out.trials] == ["complete"] * 3 and all(t["epochs"] == 3 for t in out.trials)


def test_the_first_drawn_trials_are_frozen_ones_on_the_embedding_cache(tmp_path, tiny_bert, colour_verdict):
    """A trial that trains encoders can take half a short budget; the first CACHED_FIRST drawn trials try heads on
    the cache (seconds each) — unless the space has no frozen strategy, or only that one."""
    from mmtune.search import CACHED_FIRST, tune

    assert CACHED_FIRST >= 2
    cfg = _frozen_text(tmp_path, tiny_bert, trainer={"max_epochs": 1})
    cfg["finetune"] = {"type": "full"}
    out = tune(cfg, train=str(colour_verdict["train"]), trials=3, refit=False,
               space={"only": True, "finetune.type": {"choices": ["full", "frozen"]}})
    assert [t["params"] for t in out.trials] == ["the config as written", "finetune.type=frozen",
                                                 "finetune.type=frozen"]
    cfg["name"] = "other"
    out = tune(cfg, train=str(colour_verdict["train"]), trials=2, refit=False,
               space={"only": True, "finetune.type": {"choices": ["full", "partial"]}})
    assert out.trials[1]["params"] in ("finetune.type=full", "finetune.type=partial")


def test_fit_with_the_best_preset_searches_inside_the_budget_and_refits(tmp_path, tiny_bert, colour_verdict, monkeypatch):
    import mmtune.recipe.fit as recipe

    calls = {"fit": 0, "train_run": 0}
    for name in calls:  # the table enters fit once; the trials and the refit start from the resolved configs
        def counted(*args, _real=getattr(recipe, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(recipe, name, counted)
    cfg = _frozen_text(tmp_path, tiny_bert, data={"train": str(colour_verdict["train"])},
                       evaluation={"report": False, "explain": 0})
    del cfg["finetune"], cfg["trainer"]["max_epochs"], cfg["optim"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    assert cli(["fit", str(path), "--preset", "best", "--time-limit", "30"]) == 0
    assert time.monotonic() - t0 <= 30 * 1.1 + 5  # the budget holds (+ the command's own start-up)
    run = tmp_path / "runs" / "t"
    search = json.loads((run / "metrics.json").read_text())["search"]
    refit = "refit_value" in search
    assert calls == {"fit": 1, "train_run": len([t for t in search["trials"] if t["state"] in ("complete", "pruned")]) + refit}
    # the fast recipe is the first trial (seconds on the cache), the config as written (balanced) the second, each run
    # to its end (a known recipe is not pruned)
    assert search["trials"][0]["params"] == "the fast preset" and search["trials"][0]["state"] == "complete"
    assert search["trials"][1]["params"] == "the config as written" and search["trials"][1]["state"] == "complete"
    # and they are two recipes, not one twice (frozen over the cache against partial fine-tuning: other values)
    assert search["trials"][1]["epoch_values"] != search["trials"][0]["epoch_values"]
    if search["best_trial"] == 0:
        assert load_config(run / "tune" / "best.yaml").finetune.type == "frozen"
    bundle = load_config(run / "config.yaml")
    assert bundle.trainer.max_time is not None  # the refit got what was left of the budget
    if search["best_trial"] == 1:  # the balanced settings won: they are what the bundle holds
        assert bundle.finetune.type == "partial" and bundle.loss.label_smoothing == 0.1


def _trial_proba(folder, colour_verdict):
    rows = pd.read_csv(colour_verdict["test"]).drop(columns=["image"])
    return mmtune.load(folder).predict_proba(rows).drop(columns="id").to_numpy()


def test_a_refit_the_budget_cannot_hold_ships_the_trials_own_model_and_says_so(tmp_path, tiny_bert, colour_verdict,
                                                                               monkeypatch, caplog):
    import mmtune.search as search

    monkeypatch.setattr(search, "REFIT_END", 0.0)  # nothing left for a refit
    cfg = _frozen_text(tmp_path, tiny_bert, evaluation={"report": True})
    out = search.tune(cfg, train=str(colour_verdict["train"]), trials=2, time_limit=600,
                      space={"only": True, "optim.lr": {"low": 1e-7, "high": 1e-6, "log": True}})
    run = tmp_path / "runs" / "t"
    s = json.loads((run / "metrics.json").read_text())["search"]
    assert s["shipped"] == f"trial {s['best_trial']}" and "no refit" in s["shipped_why"]
    assert "shipping trial" in caplog.text
    own = run / "tune" / "trials" / f"trial-{s['best_trial']}"
    assert np.array_equal(_trial_proba(run, colour_verdict), _trial_proba(own, colour_verdict))  # its own weights
    assert load_config(run / "config.yaml").name == "t" and (run / "report.html").is_file()
    assert out.refit.run_dir == run


def test_a_refit_that_ends_worse_than_its_trial_is_not_shipped(tmp_path, tiny_bert, colour_verdict, monkeypatch,
                                                               caplog):
    import mmtune.config
    import mmtune.search as search

    real = mmtune.config.load_config
    seen = []

    def short_refit(source=None, overrides=()):  # the refit (the run's own name, after the search's) gets one epoch
        if isinstance(source, dict) and source.get("name") == "t":
            seen.append(1)
            if len(seen) > 1:
                source = {**source, "trainer": {**source["trainer"], "max_epochs": 1}}
        return real(source, overrides)

    monkeypatch.setattr(mmtune.config, "load_config", short_refit)
    cfg = _frozen_text(tmp_path, tiny_bert, evaluation={"report": False})
    out = search.tune(cfg, train=str(colour_verdict["train"]), trials=1)
    s = out.refit.metrics["search"]
    assert s["refit_value"] > out.best_value  # val_loss: the one-epoch refit is worse...
    assert s["shipped"] == "trial 0" and "worse than the trial's" in s["shipped_why"]  # ...and not what ships
    assert "worse than trial 0's" in caplog.text
    run = tmp_path / "runs" / "t"
    assert np.array_equal(_trial_proba(run, colour_verdict), _trial_proba(run / "tune" / "trials" / "trial-0", colour_verdict))


def test_the_time_limit_holds_for_the_whole_search(tmp_path, tiny_bert, colour_verdict):
    import mmtune.search as search

    cfg = _frozen_text(tmp_path, tiny_bert, evaluation={"report": True}, trainer={"max_epochs": 30})
    t0 = time.monotonic()
    search.tune(cfg, train=str(colour_verdict["train"]), trials=50, time_limit=25,
                space={"only": True, "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    assert time.monotonic() - t0 <= 25 * 1.1  # search, refit or shipping, evaluation, report and bundle


SEARCH_SCRIPT = """
import sys
from mmtune.search import tune
tune(sys.argv[1], trials=3, space=sys.argv[2])
"""


def test_a_killed_search_resumes_and_its_best_drawn_trial_refits_to_the_same_score(tmp_path, tiny_bert, colour_verdict):
    from mmtune.search import tune

    # the config as written learns nothing (lr 1e-7); the drawn trials do, so the best trial is a drawn one.
    # full fine-tuning (no cache) makes each trial last long enough to be killed in the middle of one.
    cfg = _frozen_text(tmp_path, tiny_bert, optim={"lr": 1e-7}, finetune={"type": "full"},
                       data={"train": str(colour_verdict["train"])})
    cfg["trainer"]["max_epochs"] = 4
    path, space = tmp_path / "c.yaml", tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(cfg))
    space.write_text(yaml.safe_dump({"only": True, "optim.lr": {"low": 3e-3, "high": 1e-2, "log": True}}))
    db = tmp_path / "runs" / "t" / "tune" / "study.db"
    proc = subprocess.Popen([sys.executable, "-c", SEARCH_SCRIPT, str(path), str(space)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # sqlite3 reads while the search writes
            states = _states(db) if db.is_file() else []
            if states[:1] == ["COMPLETE"] and "RUNNING" in states[1:]:  # inside the second trial
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _states(db)
    first = _values(db)[0]
    out = tune(path, trials=3, space=space)
    after = [t["state"] for t in out.trials]
    assert after.count("complete") + after.count("pruned") == 3
    assert out.trials[0]["value"] == pytest.approx(first)  # the finished trial was kept, not redone
    assert before[1] == "RUNNING"  # killed inside a trial: it is marked failed, and another takes its place
    assert after[1] == "fail" and len(after) == 4
    best = min((t for t in out.trials if t["state"] == "complete"), key=lambda t: t["value"])
    assert best["trial"] != 0 and out.best_value == best["value"]
    run = tmp_path / "runs" / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["search"]["refit_value"] == pytest.approx(best["value"], abs=1e-4)
    assert load_config(run / "config.yaml").optim.lr == pytest.approx(out.best_params["optim.lr"])


def _states(db):
    try:
        with sqlite3.connect(db) as con:
            return [r[0] for r in con.execute("select state from trials order by number")]
    except sqlite3.OperationalError:  # the file exists, its tables not yet
        return []


def _values(db):
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute(
            "select v.value from trials t left join trial_values v on v.trial_id = t.trial_id order by t.number")]


def test_search_spaces_and_conditional_keys():
    from mmtune.search import DEFAULT_SPACE, SearchError, load_space, trial_config

    cfg = load_config({"model": {"encoders": {"a": {"modality": "text", "checkpoint": "x"},
                                              "b": {"modality": "image", "checkpoint": "y"}}},
                       "data": {"columns": {"text": "t", "image": "i"}}})
    space = load_space({"optim.lr": {"low": 1e-4, "high": 1e-3, "log": True}, "loss.label_smoothing": None,
                        "trainer.batch_size": 8}, cfg)
    assert set(space) == set(DEFAULT_SPACE) - {"loss.label_smoothing"} | {"trainer.batch_size"}
    assert space["optim.lr"].high == 1e-3 and space["trainer.batch_size"].value == 8
    with pytest.raises(SearchError, match="unknown config key 'optim.lrr'.*valid keys at optim: .*lr"):
        load_space({"optim.lrr": {"low": 1, "high": 2}}, cfg)
    with pytest.raises(SearchError, match="key 'optim.lr': need low < high"):
        load_space({"optim.lr": {"low": 1e-2, "high": 1e-3}}, cfg)
    with pytest.raises(SearchError, match="'trainer.max_epochs' needs choices, or numbers low and high"):
        load_space({"trainer.max_epochs": {"low": 3}}, cfg)
    base = cfg.to_dict()
    raw = trial_config(base, {"finetune.type": "frozen", "model.fusion.type": "gated", "model.fusion.width": 64,
                              "augment.strength": 1.0, "finetune.encoder_lr": 1e-4})
    c = load_config(raw)
    assert c.finetune.type == "frozen" and c.model.fusion.width == 64 and not c.augment.image.enabled
    augmented = {**base, "augment": {"image": {"enabled": True}, "text": {"word_dropout": 0.1}}}
    c = load_config(trial_config(augmented, {"finetune.type": "frozen"}))  # a balanced base, a frozen trial
    assert not c.augment.image.enabled and c.augment.text.word_dropout == 0.0
    raw = trial_config(base, {"finetune.type": "partial", "model.fusion.width": 64, "augment.strength": 0.5})
    c = load_config(raw)
    assert c.model.fusion.hidden_dims == [64] and c.augment.image.enabled and c.augment.image.rotation == 10.0
    assert c.augment.text.word_dropout == 0.1
    # the bilinear fusion takes its rank, and the width as its shared layer; a fusion without a rank ignores it
    c = load_config(trial_config(base, {"model.fusion.type": "bilinear", "model.fusion.rank": 8,
                                        "model.fusion.width": 128}))
    assert c.model.fusion.type == "bilinear" and c.model.fusion.rank == 8 and c.model.fusion.hidden_dims == [128]
    c = load_config(trial_config(base, {"model.fusion.type": "gated", "model.fusion.rank": 8}))
    assert c.model.fusion.type == "gated" and not hasattr(c.model.fusion, "rank")


def test_cli_tune_refuses_to_replace_a_run_without_overwrite(tmp_path, tiny_bert, colour_verdict, capsys):
    cfg = _frozen_text(tmp_path, tiny_bert, data={"train": str(colour_verdict["train"])})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "model.safetensors").write_text("an earlier run")
    assert cli(["tune", str(path), "--trials", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "runs" / "t" / "model.safetensors").read_text() == "an earlier run"
    (tmp_path / "bad.yaml").write_text("optim.lr: {low: 0.1}\n")
    assert cli(["tune", str(path), "--space", str(tmp_path / "bad.yaml"), "--overwrite"]) == 2
    assert "needs choices, or numbers low and high" in capsys.readouterr().err


# ---- distillation ----------------------------------------------------------------------------------------
_W = np.random.default_rng(123).normal(size=(3, 6))
_COLS = [f"f{i}" for i in range(6)]


def _planted(n, seed):
    """The class is the arg-max of a fixed linear map of six numbers."""
    x = np.random.default_rng(seed).normal(size=(n, 6))
    df = pd.DataFrame(np.round(x, 4), columns=_COLS)
    df["label"] = np.array(["a", "b", "c"])[(x @ _W.T).argmax(1)]
    df["id"] = [f"{seed}-{i}" for i in range(n)]
    return df


def _tab(tmp_path, name, seed=0):
    enc = {"table": {"modality": "tabular", "checkpoint": "tabular"}}
    cfg = base_config(tmp_path, enc, data={"columns": {"tabular": _COLS}}, optim={"lr": 3e-3},
                      trainer={"max_epochs": 30, "monitor": "val_loss", "seed": seed},
                      evaluation={"report": False, "explain": 0})
    cfg["name"] = name
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return mmtune.fit(_tab(tmp, "teacher"), train=_planted(800, 1), test=_planted(600, 9)), tmp


@pytest.mark.stochastic
def test_a_distilled_student_beats_the_same_student_on_labels_alone(teacher, tmp_path):
    from mmtune.distill import distill

    res, _ = teacher
    test, small, unlabelled = _planted(600, 9), _planted(40, 2), _planted(600, 3).drop(columns=["label"])
    alone = mmtune.fit(_tab(tmp_path, "alone"), train=small, test=test)
    student = distill(str(res.run_dir), _tab(tmp_path, "student"), train=small, test=test, unlabelled=unlabelled)
    a, s = alone.metrics["test"]["label"]["accuracy"], student.metrics["test"]["label"]["accuracy"]
    # seeds 0-2: labels alone 0.62-0.67, distilled 0.92-0.93 (teacher 0.96), alike with ATEN_CPU_CAPABILITY=default
    assert s > a + 0.15 and s > 0.85
    d = json.loads((student.run_dir / "metrics.json").read_text())["distillation"]
    assert d["unlabelled_rows"] == 600 and [r["model"] for r in d["comparison"]] == ["teacher", "student"]
    assert d["comparison"][1]["accuracy"] == pytest.approx(s)


def test_distillation_with_no_soft_weight_is_the_plain_fit_and_soft_targets_are_tempered(teacher, tmp_path):
    from mmtune.data.datamodule import prepare_data
    from mmtune.distill import distill, soft_targets
    from mmtune.serving.predictor import Predictor

    res, _ = teacher
    small = _planted(60, 4)
    plain = mmtune.fit(_tab(tmp_path, "plain"), train=small)
    same = distill(str(res.run_dir), _tab(tmp_path, "same"), train=small, alpha=0.0)
    for a, b in zip(plain.model.state_dict().values(), same.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    mixed = distill(str(res.run_dir), _tab(tmp_path, "mixed"), train=small, alpha=0.7)
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                     mixed.model.state_dict().values()))  # the soft loss acts
    t = Predictor.load(res.run_dir)
    frame = prepare_data(load_config(_tab(tmp_path, "x")).data, ["tabular"], small).frames["train"]
    p = t.predict_proba(frame, calibrated=False)[["a", "b", "c"]].to_numpy()
    want = p ** 0.5 / (p ** 0.5).sum(1, keepdims=True)
    got = soft_targets(t, frame, t.tasks, 2.0)["label"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_cli_distill_prints_teacher_and_student_side_by_side(teacher, tmp_path, capsys):
    res, _ = teacher
    train = tmp_path / "train.csv"
    _planted(60, 5).to_csv(train, index=False)
    cfg = _tab(tmp_path, "cli-student")
    cfg["data"]["train"] = str(train)
    cfg["trainer"]["max_epochs"] = 3
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["distill", "--teacher", str(res.run_dir), "--student", str(path), "--temperature", "3"]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "p50 ms (1 row)" in out
    assert cli(["distill", "--teacher", str(res.run_dir), "--student", str(path), "--alpha", "2"]) == 2
    assert "--alpha must be between 0 and 1" in capsys.readouterr().err
    assert cli(["distill", "--teacher", str(tmp_path / "nowhere"), "--student", str(path), "--overwrite"]) == 2


def test_tied_trials_go_to_the_config_as_written():
    """Two recipes that both separate a small validation split perfectly tie (calibrated loss 0 for both): the
    config as written wins the tie, not whichever ran first; a real difference still decides."""
    from types import SimpleNamespace

    from mmtune.search import _best_trial

    def trial(number, value, **attrs):
        return SimpleNamespace(number=number, value=value, user_attrs=attrs)

    fast, written, drawn = trial(0, 0.0, start="fast"), trial(1, 0.0, baseline=True), trial(2, 0.3)
    assert _best_trial([fast, written, drawn], "min") is written
    assert _best_trial([trial(0, 0.0, start="fast"), trial(1, 0.01, baseline=True)], "min").number == 0
    assert _best_trial([trial(0, 0.9), trial(1, 0.9), trial(2, 0.8, baseline=True)], "max").number == 0
    assert _best_trial([trial(0, float("nan"), baseline=True), trial(1, 0.5)], "min").number == 1


def test_a_trial_draws_only_keys_its_strategy_can_use():
    """LP-FT's head-first epochs and augmentation only for strategies that train encoders: a frozen trial with
    either would be refused (probe epochs) or meaningless (augmenting cached outputs)."""
    optuna = pytest.importorskip("optuna")
    from mmtune.search import _suggest, load_space, trial_config

    cfg = load_config({"model": {"encoders": {"a": {"modality": "text", "checkpoint": "x"},
                                              "b": {"modality": "image", "checkpoint": "y"}}},
                       "data": {"columns": {"text": "t", "image": "i"}}})
    space = load_space({}, cfg)
    every = {"finetune.type": "frozen", "finetune.r": 8, "finetune.unfreeze_last": 2, "finetune.probe_epochs": 2,
             "model.fusion.type": "concat", "model.fusion.width": 128, "model.fusion.rank": 8, "model.fusion.heads": 2,
             "model.fusion.dropout": 0.1, "optim.lr": 1e-3, "finetune.encoder_lr": 1e-4, "optim.weight_decay": 0.01,
             "augment.strength": 0.5, "loss.label_smoothing": 0.1, "trainer.max_epochs": 5,
             "trainer.max_epochs (cached)": 40}
    frozen = _suggest(optuna.trial.FixedTrial(every), space, cfg.to_dict())
    assert "finetune.probe_epochs" not in frozen and "augment.strength" not in frozen
    load_config(trial_config(cfg.to_dict(), frozen))  # a valid config
    partial = _suggest(optuna.trial.FixedTrial({**every, "finetune.type": "partial"}), space, cfg.to_dict())
    assert partial["finetune.probe_epochs"] == 2 and partial["augment.strength"] == 0.5
    assert load_config(trial_config(cfg.to_dict(), partial)).finetune.probe_epochs == 2


def test_a_trial_on_the_embedding_cache_draws_long_training_with_patience_to_match():
    """A cached frozen trial's epochs cost a fraction of a second: it draws them from CACHED_EPOCHS (10-80) and waits a
    third of them before stopping early; a trial that trains encoders keeps the default 3-15, and a space that sets
    its own range of epochs (or the patience) is used as written."""
    optuna = pytest.importorskip("optuna")
    from mmtune.search import CACHED_EPOCHS, _suggest, load_space

    cfg = load_config({"model": {"encoders": {"a": {"modality": "text", "checkpoint": "x"}}},
                       "data": {"columns": {"text": "t"}}, "trainer": {"early_stopping_patience": 4}})
    space = {k: v for k, v in load_space({}, cfg).items() if k in ("finetune.type", "trainer.max_epochs")}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {"frozen": [], "partial": [], "lora": []}
    for _ in range(40):
        trial = study.ask()
        values = _suggest(trial, space, cfg.to_dict())
        drawn[values["finetune.type"]].append(values)
        study.tell(trial, 0.0)
    assert drawn["frozen"] and drawn["partial"]
    for v in drawn["frozen"]:
        assert CACHED_EPOCHS["low"] <= v["trainer.max_epochs"] <= CACHED_EPOCHS["high"]
        assert v["trainer.early_stopping_patience"] == max(4, round(v["trainer.max_epochs"] / 3))
    assert max(v["trainer.max_epochs"] for v in drawn["frozen"]) > 15
    for v in drawn["partial"] + drawn["lora"]:
        assert 3 <= v["trainer.max_epochs"] <= 15 and "trainer.early_stopping_patience" not in v
    own = load_space({"only": True, "finetune.type": {"choices": ["frozen"]},
                      "trainer.max_epochs": {"low": 2, "high": 4, "int": True}}, cfg)
    values = _suggest(optuna.trial.FixedTrial({"finetune.type": "frozen", "trainer.max_epochs": 3}), own, cfg.to_dict())
    assert values == {"finetune.type": "frozen", "trainer.max_epochs": 3}
