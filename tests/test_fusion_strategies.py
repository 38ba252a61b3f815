"""One contract over every fusion x fine-tuning strategy, plus the cache, multitask, multi-label and
missing modalities."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mmtune
from conftest import base_config
from mmtune.config import load_config
from mmtune.data.collate import Collator
from mmtune.finetune import STRATEGIES as STRATEGY_TABLE
from mmtune.finetune import apply_strategy, param_groups, trainable_parameter_count
from mmtune.finetune.lora import add_adapters
from mmtune.fusion import FUSIONS as FUSION_TABLE
from mmtune.models import build_model

# The tables are the lists: a fusion or strategy registered there is tested by the contract below.
FUSIONS = FUSION_TABLE.names()
STRATEGIES = STRATEGY_TABLE.names()


def _fusion(name):
    """Small settings for fusion ``name`` (only the keys its own config has)."""
    wanted = {"type": name, "width": 16, "heads": 2, "hidden_dims": [] if FUSION_TABLE.get(name).linear_head else [16]}
    return {k: v for k, v in wanted.items() if k in FUSION_TABLE.get(name).Config.model_fields}


def _cfg(tiny_vit, tiny_bert, fusion, strategy, **extra):
    return load_config({
        "data": {"allow_missing": ["image", "text"]},
        "model": {"encoders": {"image": {"modality": "image", "checkpoint": tiny_vit},
                               "text": {"modality": "text", "checkpoint": tiny_bert}},
                  "fusion": _fusion(fusion), "head": {"hidden_dims": []}},
        "finetune": {"type": "frozen" if FUSION_TABLE.get(fusion).needs_cache else strategy, **extra},
    })


def _batch(model, n=4):
    col = Collator({k: e.processor for k, e in model.encoders.items()}, ["image", "text"])
    samples = []
    for i in range(n):
        values = {"image": Image.new("RGB", (32, 32), (60 * i, 200 - 40 * i, 30)),
                  "text": ["works perfectly", "it broke after one day", "great value", "poor quality"][i % 4]}
        if i == 1:
            values["image"] = None  # a row without its image
        if i == 2:
            values["text"] = None  # a row without its text
        samples.append({"values": values, "labels": {"label": i % 3}, "index": i})
    return col(samples)


# a fusion fitted on cached features (stacking) pairs only with a strategy that trains no encoder
COMBOS = [(f, s) for f in FUSIONS for s in STRATEGIES
          if not FUSION_TABLE.get(f).needs_cache or not STRATEGY_TABLE.get(s).trains_encoders]


@pytest.mark.parametrize("fusion,strategy", COMBOS)
def test_fusion_strategy_contract(tiny_vit, tiny_bert, fusion, strategy):
    cfg = _cfg(tiny_vit, tiny_bert, fusion, strategy)
    torch.manual_seed(0)
    model = build_model(cfg.model, {"label": 3}, allow_missing=True)
    peft_counts = add_adapters(model, cfg.finetune) if strategy in ("lora", "ia3") else {}
    apply_strategy(model, cfg.finetune)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    enc_trainable = {n for n in trainable if n.startswith("encoders.")}

    # What each strategy promises.
    n_head = sum(p.numel() for p in model.fusion.parameters()) + sum(p.numel() for p in model.heads.parameters())
    if strategy == "frozen":
        assert enc_trainable == set()
    elif strategy in ("lora", "ia3"):
        assert trainable_parameter_count(model) == sum(peft_counts.values()) + n_head
        assert all(("lora_" in n) or ("ia3_" in n) for n in enc_trainable) and enc_trainable
    elif strategy == "bitfit":
        assert enc_trainable and all(n.endswith("bias") for n in enc_trainable)
    elif strategy in ("partial", "gradual"):
        last = {f"encoders.{k}.{n}" for k, e in model.encoders.items() for n, p in e.named_parameters()
                if any(p is q for q in e.layer_groups()[-1])}
        assert enc_trainable == last
    elif strategy == "full":
        assert trainable == {n for n, _ in model.named_parameters()}

    batch = _batch(model)
    model.train()
    logits = model(batch["inputs"], batch["present"])["label"]
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, batch["labels"]["label"]).backward()
    # "reached": a gradient tensor exists (LoRA's A matrices get exact zeros at step 0, since B starts at 0)
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable, (sorted(trainable - got)[:5], sorted(got - trainable)[:5])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n in trainable if "lora_A" not in n} <= nonzero


@pytest.mark.parametrize("fusion", ["concat", "single_stream", "cross_attention", "gated", "late"])
def test_missing_modality_changes_only_that_row(tiny_vit, tiny_bert, fusion):
    cfg = _cfg(tiny_vit, tiny_bert, fusion, "frozen")
    torch.manual_seed(0)
    model = build_model(cfg.model, {"label": 3}, allow_missing=True).eval()
    batch = _batch(model)
    with torch.no_grad():
        a = model(batch["inputs"], batch["present"])["label"]
        present = {k: v.clone() for k, v in batch["present"].items()}
        present["text"][3] = False
        b = model(batch["inputs"], present)["label"]
        # a hidden modality's raw inputs do not matter at all
        swapped = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in batch["inputs"].items()}
        swapped["image"]["pixel_values"][1] = torch.randn_like(swapped["image"]["pixel_values"][1])
        c = model(swapped, batch["present"])["label"]
    assert torch.allclose(a[:3], b[:3], atol=1e-5) and not torch.allclose(a[3], b[3], atol=1e-5)
    assert torch.allclose(a, c, atol=1e-5)


def test_cross_attention_weights_are_kept(tiny_vit, tiny_bert):
    model = build_model(_cfg(tiny_vit, tiny_bert, "cross_attention", "frozen").model, {"label": 3}).eval()
    batch = _batch(model)
    with torch.no_grad():
        model(batch["inputs"], batch["present"])
    att = model.fusion.last_attention
    assert set(att) == {"image", "text"}
    t_img = batch["inputs"]["image"]["pixel_values"].shape[-1] // 8 * (batch["inputs"]["image"]["pixel_values"].shape[-2] // 8) + 1
    t_txt = batch["inputs"]["text"]["input_ids"].shape[1]
    assert att["text"].shape == (4, t_txt, 1 + t_img)  # text queries over [null] + image tokens
    assert att["image"].shape == (4, t_img, 1 + t_txt)
    assert torch.allclose(att["text"].sum(-1), torch.ones(4, t_txt), atol=1e-5)
    # padding of the text is never attended to
    pad = ~batch["inputs"]["text"]["attention_mask"].bool()
    assert att["image"][:, :, 1:][pad.unsqueeze(1).expand(-1, t_img, -1)].abs().max() == 0


def test_layer_wise_lr_decay_groups(tiny_vit, tiny_bert):
    model = build_model(_cfg(tiny_vit, tiny_bert, "concat", "full").model, {"label": 3})
    groups = param_groups(model, lr=1e-3, weight_decay=0.0, encoder_lr=1e-4, layer_decay=0.5)
    rates = {g["name"].rsplit("/", 1)[0]: g["lr"] for g in groups}
    n = len(model.encoders["text"].layer_groups())
    for i in range(n):
        assert rates[f"encoders.text/{i}"] == pytest.approx(1e-4 * 0.5 ** (n - 1 - i))
    assert rates["fusion"] == 1e-3 and rates["heads"] == 1e-3
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def _frame(paths, split):
    df = pd.read_csv(paths[split])
    df["image"] = [str(Path(paths[split]).parent / p) for p in df["image"]]
    return df


def test_cache_gives_the_same_logits_as_live_encoders(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    from mmtune.data.datamodule import prepare_data
    from mmtune.encoders.base import as_encoder_outputs
    from mmtune.finetune.feature_cache import build_cached_dataset, first
    from mmtune.data.datamodule import make_loader

    for fusion, dtype in (("concat", "float16"), ("single_stream", "float32"), ("single_stream", "float16")):
        cfg = _cfg(tiny_vit, tiny_bert, fusion, "frozen")
        data = prepare_data(cfg.data, cfg.modalities, train=_frame(colour_verdict, "train"))
        torch.manual_seed(0)
        model = build_model(cfg.model, {"label": 4}).eval()
        apply_strategy(model, cfg.finetune)
        specs = {n: e.model_dump(mode="json") for n, e in cfg.model.encoders.items()}
        ds = data.dataset("val", cfg.modalities)
        cached = build_cached_dataset(model, specs, ds, cfg.modalities, tmp_path / "cache", 16, token_dtype=dtype)
        live = Collator({n: e.processor for n, e in model.encoders.items()}, cfg.modalities)
        a_batch = live([ds[i] for i in range(len(ds))])
        b_batch = next(iter(make_loader(cached, first, len(ds), False)))
        with torch.no_grad():
            a = model(a_batch["inputs"], a_batch["present"])["label"]
            b = model(None, b_batch["present"], encoded=as_encoder_outputs(b_batch["encoded"]))["label"]
        # pooled outputs are stored as float32: exact; float16 tokens move the logits by about 1e-3
        assert torch.allclose(a, b, atol=1e-5 if fusion == "concat" or dtype == "float32" else 1e-2), (fusion, dtype)
        assert dtype == "float32" or fusion == "concat" or not torch.allclose(a, b, atol=1e-7)
    files = sorted((tmp_path / "cache").glob("*.cache"))
    assert len(files) == 6  # two encoders x (pooled only, float32 tokens, float16 tokens)
    # A second pass reads the files; a changed image file invalidates the entry.
    build_cached_dataset(model, specs, ds, cfg.modalities, tmp_path / "cache", 16)
    assert len(list((tmp_path / "cache").glob("*.cache"))) == 6
    img = Path(ds.df["image"][0])
    Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
    build_cached_dataset(model, specs, ds, cfg.modalities, tmp_path / "cache", 16)
    assert len(list((tmp_path / "cache").glob("*.cache"))) == 7


def test_cache_shards_read_back_any_rows_as_one_file_does(tmp_path, tiny_bert, colour_verdict):
    """Shards of 7 rows (each padded to its own longest text) give the same rows as one shard, in any order."""
    from mmtune.data.datamodule import prepare_data
    from mmtune.finetune.shards import Stored
    from mmtune.finetune.feature_cache import compute_outputs

    cfg = load_config({"data": {"columns": {"text": "text"}},
                       "model": {"encoders": {"text": {"modality": "text", "checkpoint": tiny_bert}}}})
    ds = prepare_data(cfg.data, cfg.modalities, train=_frame(colour_verdict, "train")).dataset("train", ["text"])
    enc = build_model(cfg.model, {"label": 4}).encoders["text"]
    read = {}
    for rows in (7, 100000):
        folder = tmp_path / str(rows)
        folder.mkdir()
        index = compute_outputs(enc, ds, 16, True, folder, token_dtype="float32", shard_rows=rows)
        read[rows] = {k: Stored([folder / n for n in names]) for k, names in index["files"].items()}
    assert len(read[7]["__tokens"].paths) > 1 and len(read[100000]["__tokens"].paths) == 1  # whole batches per shard
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:40]
    for field in ("__pooled", "__tokens", "__mask"):
        a, b = read[7][field].take(idx), read[100000][field].take(idx)
        width = a.shape[1] if a.ndim > 1 else None
        torch.testing.assert_close(a, b[:, :width] if width else b)  # one file pads to the longest of all rows
        if field == "__mask":
            assert not b[:, width:].any()


@pytest.mark.stochastic
def test_frozen_cached_fit_learns_and_reloads(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "frozen"}, trainer={"max_epochs": 30}, optim={"lr": 1e-2})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))
    assert list((tmp_path / "runs" / ".cache").glob("*.cache"))
    test = _frame(colour_verdict, "test")
    got = mmtune.load(res.run_dir).evaluate(test)["label"]
    assert got["accuracy"] == pytest.approx(res.metrics["test"]["label"]["accuracy"])
    assert got["accuracy"] > 0.5  # chance is 0.25; random tiny encoders, frozen


def test_lora_bundle_reloads_identically(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    import copy

    import lightning as L
    from mmtune.serving.predictor import Predictor

    test = _frame(colour_verdict, "test").head(40)
    captured = {}

    class Snapshot(L.Callback):  # the trained model, adapters still separate, before fit merges them
        def on_fit_end(self, trainer, module):
            model = copy.deepcopy(module.model).cpu()
            assert any("lora_" in n for n, _ in model.named_parameters())
            captured["before"] = Predictor(model, load_config(cfg), list(module.objective.tasks.values())).predict_proba(test)

    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "lora", "r": 4},
                      trainer={"max_epochs": 3, "restore_best": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]), callbacks=[Snapshot()])
    reloaded = mmtune.load(res.run_dir)
    assert not any("lora_" in n for n, _ in reloaded.model.named_parameters())
    after = reloaded.predict_proba(test, calibrated=False)  # the snapshot predates calibration
    cols = [str(c) for c in reloaded.class_names]
    assert np.abs(after[cols].to_numpy() - captured["before"][cols].to_numpy()).max() <= 1e-5
    # the adapters trained the head too: it is not the initial head
    assert res.metrics["trainable_parameters"] < sum(p.numel() for p in reloaded.model.parameters()) / 2


@pytest.mark.stochastic
def test_multitask_and_multilabel_bundle(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    df = _frame(colour_verdict, "train")
    df["family"] = df["label"].str.split("-").str[0]
    df["tags"] = ["|".join(t for t, on in [("keep", "keep" in l), ("warm", "warm" in l), ("any", True)] if on)
                  for l in df["label"]]
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"tasks": {"label": {"column": "label"},
                                                     "family": {"column": "family", "weight": 0.5},
                                                     "tags": {"column": "tags", "multilabel": True}}},
                      trainer={"max_epochs": 8}, evaluation={"report": True})
    res = mmtune.fit(cfg, train=df)
    m = res.metrics["val"]
    assert set(m) == {"label", "family", "tags"}
    assert {"f1_micro", "f1_macro", "subset_accuracy", "mean_average_precision"} <= set(m["tags"])
    assert m["family"]["accuracy"] > 0.8 and m["tags"]["f1_micro"] > 0.8
    tasks = {t["name"]: t for t in json.loads((res.run_dir / "labels.json").read_text())["tasks"]}
    calibration = json.loads((res.run_dir / "calibration.json").read_text())
    assert tasks["tags"]["classes"] == ["any", "keep", "warm"] and len(calibration["tags"]["thresholds"]) == 3
    page = (res.run_dir / "report.html").read_text()
    assert f"tags: multi-label; per-label thresholds {[round(x, 3) for x in calibration['tags']['thresholds']]}" in page
    logs = pd.read_csv(res.run_dir / "logs" / "metrics.csv")
    assert {"val_acc/family", "val_f1_macro/tags"} <= set(logs.columns)

    pred = mmtune.load(res.run_dir)
    sample = df.head(30)
    proba = pred.predict_proba(sample)
    assert set(proba) == {"label", "family", "tags"}
    assert np.allclose(proba["family"][["cool", "warm"]].sum(1), 1.0, atol=1e-5)
    labels = pred.predict(sample, task="tags")
    assert all(isinstance(v, list) for v in labels)
    assert all("any" in v for v in labels)
    # reload parity against a second, independent load
    again = mmtune.load(res.run_dir).predict_proba(sample)
    for t in proba:
        assert np.abs(proba[t].drop(columns="id").to_numpy() - again[t].drop(columns="id").to_numpy()).max() <= 1e-6
    ev = pred.evaluate(sample)
    assert set(ev) == {"label", "family", "tags"}
    table = pred.predict_table(sample)
    assert list(table.columns[:2]) == ["id", "label.prediction"]
    assert {"family.prediction", "family.prob_warm", "tags.prediction", "tags.prob_any"} <= set(table.columns)
    assert all("any" in v.split("|") for v in table["tags.prediction"])


def test_two_encoders_on_one_modality_plus_missing_rows(tmp_path, tiny_vit, tiny_resnet, tiny_bert, colour_verdict):
    df = _frame(colour_verdict, "train")
    df.loc[::7, "image"] = None  # some rows lack the image
    df.loc[3::11, "text"] = ""  # some lack the text
    enc = {"vit": {"modality": "image", "checkpoint": tiny_vit}, "resnet": {"modality": "image", "checkpoint": tiny_resnet},
           "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"allow_missing": ["image", "text"]}, trainer={"max_epochs": 4},
                      model={"modality_dropout": 0.2})
    res = mmtune.fit(cfg, train=df)
    pred = mmtune.load(res.run_dir)
    assert set(pred.model.encoders) == {"resnet", "text", "vit"}
    p = pred.predict_proba(df.head(20))
    assert np.isfinite(p.drop(columns="id").to_numpy()).all()


@pytest.mark.stochastic
def test_stacking_fits_end_to_end_and_reloads(tmp_path, tiny_vit, tiny_bert, colour_verdict):
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, model={"fusion": {"type": "stacking", "folds": 3}},
                      finetune={"type": "frozen"})
    cfg["model"]["head"] = {"hidden_dims": []}
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))
    assert res.metrics["epochs_trained"] == 0
    assert res.metrics["test"]["label"]["accuracy"] > 0.5
    pred = mmtune.load(res.run_dir)
    assert pred.evaluate(_frame(colour_verdict, "test"))["label"]["accuracy"] == pytest.approx(
        res.metrics["test"]["label"]["accuracy"])


def _stacking_fixture(n_per_class=(30, 30, 30), dim=40, seed=0):
    """A model-like object with a StackingFusion over two outputs, and a CachedDataset where output
    ``a`` carries the label weakly in many noisy dimensions (in-sample fits look far better than they are)
    and ``b`` is noise."""
    from types import SimpleNamespace

    from mmtune.finetune.feature_cache import CachedDataset
    from mmtune.fusion.stacking import StackingFusion
    from mmtune.tasks import Task

    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    a = rng.normal(size=(len(y), dim)) + 0.6 * np.eye(len(n_per_class), dim)[y]
    b = rng.normal(size=(len(y), dim))
    fusion = StackingFusion({"a": dim, "b": dim}, len(n_per_class))
    model = SimpleNamespace(fusion=fusion, heads={"label": torch.nn.Linear(fusion.out_dim, len(n_per_class))},
                            output_modality={"a": "image", "b": "text"})
    ds = CachedDataset({"a": {"pooled": torch.tensor(a, dtype=torch.float32)},
                        "b": {"pooled": torch.tensor(b, dtype=torch.float32)}},
                       {"image": torch.ones(len(y), dtype=torch.bool), "text": torch.ones(len(y), dtype=torch.bool)},
                       {"label": y.tolist()})
    task = Task("label", "label")
    task.fit_classes([f"c{i}" for i in y])
    return model, ds, task, y


def test_stacking_meta_classifier_is_fitted_on_out_of_fold_probabilities():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mmtune.fusion.stacking import _logistic_into_linear, fit_stacking

    model, ds, task, y = _stacking_fixture()
    fit_stacking(model, ds, task, folds=3, seed=0)
    got = model.heads["label"].weight.detach().clone()

    def meta_weights(parts):
        lin = torch.nn.Linear(6, 3)
        _logistic_into_linear(lin, np.concatenate(parts, 1), y, 3, 0)
        return lin.weight.detach()

    est = lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    X = {k: ds.outputs[k]["pooled"].numpy().astype(np.float64) for k in ("a", "b")}
    oof = [cross_val_predict(est(), X[k], y, cv=StratifiedKFold(3, shuffle=True, random_state=0),
                             method="predict_proba") for k in ("a", "b")]
    in_sample = [est().fit(X[k], y).predict_proba(X[k]) for k in ("a", "b")]
    assert torch.allclose(got, meta_weights(oof), atol=1e-6)
    # what a meta-classifier fitted on in-sample probabilities would be: clearly different
    assert (got - meta_weights(in_sample)).abs().max() > 0.1


def test_stacking_refuses_a_class_too_small_for_cross_validation():
    from mmtune.fusion.stacking import fit_stacking

    model, ds, task, _ = _stacking_fixture(n_per_class=(30, 30, 1))
    with pytest.raises(ValueError, match="class 'c2' has 1 training row"):
        fit_stacking(model, ds, task, folds=3, seed=0)


def test_gradual_unfreezing_thaws_one_group_per_epoch(tmp_path, tiny_bert, colour_verdict):
    import lightning as L

    seen = []

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append(sum(p.requires_grad for p in module.model.encoders["text"].parameters()))

    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc,
                      finetune={"type": "gradual", "unfreeze_last": 1, "unfreeze_every": 1},
                      trainer={"max_epochs": 3, "limit_train_batches": 2})
    mmtune.fit(cfg, train=str(colour_verdict["train"]), callbacks=[Watch()])
    assert seen[0] < seen[1] < seen[2]


@pytest.mark.parametrize("fusion", [f for f in FUSIONS if not FUSION_TABLE.get(f).needs_cache])
@pytest.mark.parametrize("strategy", ["partial", "lora"])
def test_clip_joint_encoder_with_every_fusion(tiny_clip, fusion, strategy):
    cfg = load_config({
        "data": {"allow_missing": ["image", "text"]},
        "model": {"encoders": {"clip": {"modality": "image_text", "checkpoint": tiny_clip}},
                  "fusion": _fusion(fusion)},
        "finetune": {"type": strategy},
    })
    torch.manual_seed(0)
    model = build_model(cfg.model, {"label": 3}, allow_missing=True)
    assert set(model.output_modality) == {"clip.image", "clip.text"}
    if strategy == "lora":
        add_adapters(model, cfg.finetune)
    apply_strategy(model, cfg.finetune)
    batch = _batch(model)
    model.train()
    logits = model(batch["inputs"], batch["present"])["label"]
    torch.nn.functional.cross_entropy(logits, batch["labels"]["label"]).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert not model.encoders["clip"].model.logit_scale.requires_grad if strategy != "lora" else True
