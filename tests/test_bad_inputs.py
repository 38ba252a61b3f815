"""What mmtune refuses, and how: one case per bad input, silently-wrong number or unsafe operation.

Each case states the input and the expected behaviour: a one-line error naming the row / key / file
and what would be valid, a number that is right, or nothing lost / nothing run.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mmtune
from conftest import base_config
from mmtune.cli import main as cli
from mmtune.config import load_config


def _text_cfg(tmp_path, tiny_bert, **extra):
    extra = {"evaluation": {"report": False}, **extra}
    return base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert}},
                       data={"id_column": "id"}, trainer={"max_epochs": 2}, **extra)


def _train_frame(colour_verdict, with_images=False):
    df = pd.read_csv(colour_verdict["train"])
    if with_images:
        df["image"] = [str(Path(colour_verdict["train"]).parent / p) for p in df["image"]]
        return df
    return df.drop(columns=["image"])


# ------------------------------------------------------------------------------------------------
# silently wrong numbers


def test_stacking_with_a_one_row_class_is_an_error_naming_the_class():
    from test_fusion_strategies import _stacking_fixture
    from mmtune.training.stacking import fit_stacking

    model, ds, task, _ = _stacking_fixture(n_per_class=(30, 30, 1))
    with pytest.raises(ValueError, match="class 'c2' has 1 training row.*at least 2 per class"):
        fit_stacking(model, ds, task, folds=3, seed=0)


def test_cache_key_follows_image_contents_not_size_and_mtime(tmp_path):
    import os

    from mmtune.data.dataset import MultimodalDataset
    from mmtune.data.manifest import ManifestSpec
    from mmtune.finetune.feature_cache import rows_fingerprint

    path = tmp_path / "a.bmp"  # BMP: the size depends on the dimensions only
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    st = os.stat(path)
    ds = lambda: MultimodalDataset(pd.DataFrame({"image": ["a.bmp"], "label": ["x"]}),
                                   ManifestSpec.simple({"image": "image"}), tmp_path, with_labels=False)
    before = rows_fingerprint(ds())
    Image.new("RGB", (8, 8), (0, 0, 255)).save(path)  # same size on disk, other pixels
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert rows_fingerprint(ds()) != before


def test_cache_key_follows_the_checkpoints_config(tmp_path, tiny_bert):
    from mmtune.config import EncoderConfig
    from mmtune.encoders import build_encoder
    from mmtune.finetune.feature_cache import encoder_fingerprint

    other = tmp_path / "bert-gelu-new"
    shutil.copytree(tiny_bert, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_act"] = "gelu_new"  # same weights, other outputs
    (other / "config.json").write_text(json.dumps(cfg))
    prints = []
    for ck in (tiny_bert, str(other)):
        spec = EncoderConfig(modality="text", checkpoint=ck)
        spec_json = {**spec.model_dump(mode="json"), "checkpoint": "same"}  # only the files differ
        prints.append(encoder_fingerprint(build_encoder(spec), spec_json))
    assert prints[0] != prints[1]


def test_relative_manifest_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "train.csv").write_text("text,label\na,x\n")
    (tmp_path / "train.csv").write_text("text,label\nDECOY,y\n")  # same name in the current directory
    (tmp_path / "proj" / "c.yaml").write_text("data: {train: train.csv}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "proj" / "c.yaml")
    assert Path(cfg.data.train) == tmp_path / "proj" / "train.csv"
    # a path typed as an override is a shell path: relative to the current directory
    cfg = load_config(tmp_path / "proj" / "c.yaml", ["data.train=train.csv"])
    assert Path(cfg.data.train) == tmp_path / "train.csv"
    cfg = load_config(tmp_path / "proj" / "c.yaml", ["data.val=train.csv"])
    assert (Path(cfg.data.train), Path(cfg.data.val)) == (tmp_path / "proj" / "train.csv", tmp_path / "train.csv")


def _truncated_jpeg(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    good = folder / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    bad = folder / "cut.jpg"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def test_a_truncated_jpeg_is_a_bad_row_and_skip_works(tmp_path):
    from mmtune.data.datamodule import prepare_data

    _truncated_jpeg(tmp_path)
    rows = [{"image": "full.jpg", "text": "t", "label": lab} for lab in "abab"] + \
           [{"image": "cut.jpg", "text": "t", "label": "a"}]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config({"data": {"train": str(tmp_path / "m.csv"), "val": str(tmp_path / "m.csv")}})
    with pytest.raises(mmtune.BadRowsError, match=r"train row 5, column 'image': image file .*cut.jpg.* not a readable"):
        prepare_data(cfg.data, ["image", "text"])
    cfg.data.on_bad_rows = "skip"
    with pytest.warns(UserWarning, match="skipping 2 bad row"):
        data = prepare_data(cfg.data, ["image", "text"])
    assert len(data.frames["train"]) == 4 and set(data.rejected["row"]) == {5}


@pytest.mark.parametrize("bits", [16, 12])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, bits):
    from mmtune.data.images import load_image

    ramp = np.linspace(0, 2 ** bits - 1, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / f"g{bits}.png"
    Image.fromarray(ramp).save(path)
    got = np.asarray(load_image(path))[:, :, 0].astype(float)
    assert got.shape == (64, 64)
    assert (got == 255).mean() < 0.01  # the old convert("RGB") put 99.6 % of pixels at 255
    assert np.abs(got - ramp / (2 ** bits - 1) * 255).max() <= 1.0


def test_weight_decay_never_reaches_tokens_position_or_modality_embeddings(tiny_vit, tiny_bert):
    from mmtune.finetune import param_groups
    from mmtune.models import build_model

    cfg = load_config({"model": {"encoders": {"image": {"modality": "image", "checkpoint": tiny_vit},
                                              "text": {"modality": "text", "checkpoint": tiny_bert}},
                                 "fusion": {"type": "single_stream", "width": 16, "heads": 2}}})
    model = build_model(cfg.model, {"label": 3})
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = {name[id(p)] for g in param_groups(model, 1e-3, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {name[id(p)] for g in param_groups(model, 1e-3, 0.1) if g["weight_decay"] == 0 for p in g["params"]}
    for needle in ("cls_token", "position_embeddings", "word_embeddings", "LayerNorm", "bias"):
        assert not any(needle in n for n in decayed), needle
        assert any(needle in n for n in undecayed), needle
    fusion_direct = [n for n, p in model.fusion.named_parameters() if p.ndim >= 2 and "weight" not in n.split(".")[-1]]
    assert fusion_direct and all(f"fusion.{n}" in undecayed for n in fusion_direct)  # modality / fusion tokens
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linear and linear <= decayed  # every linear weight does decay


def test_label_smoothing_is_not_a_focal_loss_setting():
    with pytest.raises(mmtune.ConfigError, match="unknown config key 'loss.label_smoothing'; valid keys there: alpha, gamma, type"):
        load_config({"loss": {"type": "focal", "label_smoothing": 0.1}})
    with pytest.raises(mmtune.ConfigError, match="sampler and imbalance.class_weights both rebalance"):
        load_config({"imbalance": {"sampler": True, "class_weights": "inverse"}})


def test_focal_alpha_on_a_multiclass_task_is_refused(tmp_path, tiny_bert, colour_verdict):
    cfg = _text_cfg(tmp_path, tiny_bert, loss={"type": "focal", "gamma": 2.0, "alpha": 0.25})
    with pytest.raises(ValueError, match="loss.alpha \\(focal\\) is defined for binary tasks; task 'label' has 4 classes"):
        mmtune.fit(cfg, train=_train_frame(colour_verdict))
    assert not (tmp_path / "runs" / "t").exists() or not list((tmp_path / "runs" / "t").rglob("*.ckpt"))


def test_sampler_with_sample_weights_counts_a_row_once(tmp_path, tiny_bert, colour_verdict):
    from mmtune.config import load_config as lc
    from mmtune.data.datamodule import TableDataModule
    from mmtune.finetune import build_strategy
    from mmtune.models import build_model

    df = _train_frame(colour_verdict)
    df["w"] = np.where(df["label"] == "warm-keep", 3.0, 1.0)
    cfg = lc(_text_cfg(tmp_path, tiny_bert, imbalance={"sampler": True, "sample_weight_column": "w"}))
    model = build_model(cfg.model, {"label": 4})
    data = TableDataModule(cfg, df).read().attach(model, build_strategy(cfg.finetune))
    loader = data.train_dataloader()
    y = np.asarray(data.datasets["train"].labels["label"])
    w = loader.sampler.weights.numpy()
    assert np.allclose(w, 1.0 / np.bincount(y)[y])  # the sampler balances classes only; the loss applies w


def test_ece_is_one_number_per_split_whatever_the_bin_count(tmp_path, tiny_bert, colour_verdict):
    cfg = _text_cfg(tmp_path, tiny_bert, evaluation={"report": False, "calibration_bins": 7})
    res = mmtune.fit(cfg, train=_train_frame(colour_verdict))
    m = res.metrics
    assert m["val"]["label"]["ece_bins"] == 7
    assert m["val"]["label"]["ece"] == pytest.approx(m["calibration"]["label"]["ece_val_after"], abs=1e-12)


def test_temperature_never_changes_the_predicted_class():
    from mmtune.evaluation.calibration import Calibration
    from mmtune.serving.predictor import calibrate, decide
    from mmtune.tasks import Task

    task = Task("label", "label")
    task.fit_classes(["a", "b"])
    cal = Calibration(temperature=20.0)
    raw = np.array([[0.49999997, 0.50000003], [0.6, 0.4]], dtype=np.float32)
    # float32 calibrated values tie here: argmax of the tie would say "a" for row 1
    assert np.float32(calibrate(task, raw, cal)[0, 0]) == np.float32(calibrate(task, raw, cal)[0, 1])
    assert list(decide(task, calibrate(task, raw, cal), cal)) == ["b", "a"]
    assert calibrate(task, raw, cal)[0].argmax() == 1


def test_image_processors_always_use_the_pil_backend_and_record_it(tmp_path, tiny_vit):
    from mmtune.encoders.processors import HFImageProcessor, load_hf_image_processor, load_processor

    proc = HFImageProcessor(load_hf_image_processor(tiny_vit), 32)
    proc.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "mmtune_processor.json").read_text())
    assert meta["backend"] == "pil" and "Pil" in type(load_processor(tmp_path / "p").image_processor).__name__
    meta["backend"] = "torchvision"
    (tmp_path / "p" / "mmtune_processor.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="uses image backend 'torchvision'; this mmtune reads 'pil'"):
        load_processor(tmp_path / "p")
    src = Path(mmtune.__file__).parent
    assert not [p for p in src.rglob("*.py") if "except:" in p.read_text() or "except Exception:\n        pass" in p.read_text()]


def test_an_empty_checkpoint_is_refused_not_loaded(tmp_path, tiny_bert):
    from mmtune.models import build_model
    from mmtune.finetune import build_strategy
    from mmtune.tasks import Task
    from mmtune.training.module import build_module

    cfg = load_config(_text_cfg(tmp_path, tiny_bert))
    task = Task("label", "label")
    task.fit_classes(["a", "b"])
    module = build_module(cfg, build_model(cfg.model, {"label": 2}), [task], build_strategy(cfg.finetune))
    torch.save({"state_dict": {}}, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match=r"does not match this model: \d+ missing"):
        module.load_checkpoint_weights(tmp_path / "empty.ckpt")


def test_resume_after_a_model_change_names_the_keys(tmp_path, tiny_bert, colour_verdict, capsys):
    df = _train_frame(colour_verdict)
    cfg = _text_cfg(tmp_path, tiny_bert)
    cfg["trainer"]["max_epochs"] = 1
    mmtune.fit(cfg, train=df)
    (tmp_path / "runs" / "t" / "bundle.json").unlink()  # as if killed before the end
    changed = {**cfg, "model": {**cfg["model"], "fusion": {"hidden_dims": [8], "dropout": 0.0}}}
    with pytest.raises(ValueError, match=r"config differs .* at model.fusion.hidden_dims: \[32\] -> \[8\]"):
        mmtune.fit(changed, train=df, resume=True)
    more = {**cfg, "trainer": {**cfg["trainer"], "max_epochs": 2}}  # more epochs: a resumable change
    assert mmtune.fit(more, train=df, resume=True).metrics["epochs_trained"] == 2


# ------------------------------------------------------------------------------------------------
# nothing lost, no one in


@pytest.mark.parametrize("name", ["../victim", "", "a/b", ".", ".."])
def test_run_names_that_leave_output_dir_are_refused(tmp_path, name):
    with pytest.raises(mmtune.ConfigError, match="must be a plain folder name"):
        load_config({"name": name, "output_dir": str(tmp_path)})


def test_overwrite_with_bad_data_keeps_the_old_bundle(tmp_path, tiny_bert, colour_verdict):
    df = _train_frame(colour_verdict)
    cfg = _text_cfg(tmp_path, tiny_bert)
    cfg["trainer"]["max_epochs"] = 1
    first = mmtune.fit(cfg, train=df)
    before = sorted(p.relative_to(first.run_dir) for p in first.run_dir.rglob("*"))
    bad = df.copy()
    bad.loc[2, "text"] = ""
    with pytest.raises(mmtune.BadRowsError):
        mmtune.fit(cfg, train=bad, overwrite=True)
    assert sorted(p.relative_to(first.run_dir) for p in first.run_dir.rglob("*")) == before
    mmtune.load(first.run_dir)  # still a complete bundle
    # no staging folder is left beside the run (the lock file and the shared embedding cache stay)
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.endswith(".lock") and p.name != ".cache"] == ["t"]
    second = mmtune.fit({**cfg, "trainer": {**cfg["trainer"], "seed": 1}}, train=df, overwrite=True)
    assert second.run_dir == first.run_dir and mmtune.load(second.run_dir)


class _Planted:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def test_resume_never_unpickles_a_planted_checkpoint(tmp_path, tiny_bert, colour_verdict):
    df = _train_frame(colour_verdict)
    cfg = _text_cfg(tmp_path, tiny_bert)
    cfg["trainer"]["max_epochs"] = 1
    res = mmtune.fit(cfg, train=df)
    (res.run_dir / "bundle.json").unlink()
    flag = tmp_path / "payload-ran"
    torch.save({"epoch": 0, "payload": _Planted(str(flag))}, res.run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not a readable mmtune checkpoint"):
        mmtune.fit(cfg, train=df, resume=True)
    assert not flag.exists()


def test_best_checkpoint_restore_never_unpickles(tmp_path, tiny_bert):
    import pickle

    from mmtune.models import build_model
    from mmtune.tasks import Task
    from mmtune.finetune import build_strategy
    from mmtune.training.module import build_module

    cfg = load_config(_text_cfg(tmp_path, tiny_bert))
    task = Task("label", "label")
    task.fit_classes(["a", "b"])
    module = build_module(cfg, build_model(cfg.model, {"label": 2}), [task], build_strategy(cfg.finetune))
    flag = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "payload": _Planted(str(flag))}, tmp_path / "best.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        module.load_checkpoint_weights(tmp_path / "best.ckpt")
    assert not flag.exists()


def test_a_second_fit_of_the_same_run_gets_one_line(tmp_path, tiny_bert, colour_verdict, capsys):
    from mmtune.bundle import RunClaim

    df = _train_frame(colour_verdict)
    df.to_csv(tmp_path / "train.csv", index=False)
    cfg = _text_cfg(tmp_path, tiny_bert)
    cfg["data"]["train"] = str(tmp_path / "train.csv")
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    with RunClaim(tmp_path / "runs" / "t"):  # another fit holds the run
        assert cli(["fit", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is in use by another mmtune process (pid" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_local_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "c.yaml").write_text(
        "name: x\noutput_dir: " + str(tmp_path / "runs") + "\ndata: {train: t.csv}\n"
        "model: {encoders: {t: {modality: text, checkpoint: ./my-bert-typo}}}\n")
    assert cli(["fit", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "encoder checkpoint './my-bert-typo' is not a folder" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, tiny_bert, colour_verdict):
    tmp = tmp_path_factory.mktemp("small-bundle")
    res = mmtune.fit(_text_cfg(tmp, tiny_bert), train=_train_frame(colour_verdict))
    return res


def test_a_truncated_weights_file_is_one_line(tmp_path, small_bundle, capsys):
    run = tmp_path / "copy"
    shutil.copytree(small_bundle.run_dir, run)
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="'model.safetensors' is damaged or was replaced"):
        mmtune.load(run)
    assert cli(["predict", "--run", str(run), "--data", "x.csv", "--out", str(tmp_path / "p.csv")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_unknown_bundle_format_is_refused(tmp_path, small_bundle):
    run = tmp_path / "copy"
    shutil.copytree(small_bundle.run_dir, run)
    meta = json.loads((run / "bundle.json").read_text())
    meta["format"] = 99
    (run / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has format version 99; this mmtune reads format 1"):
        mmtune.load(run)


def test_predict_out_is_checked_before_any_work(tmp_path, small_bundle, colour_verdict, capsys, monkeypatch):
    from mmtune.serving import predictor

    called = []
    monkeypatch.setattr(predictor.Predictor, "load", classmethod(lambda cls, *a, **k: called.append(1)))
    data = tmp_path / "rows.csv"
    _train_frame(colour_verdict).head(5).to_csv(data, index=False)
    (tmp_path / "out.csv").mkdir()  # a folder that looks like a file name
    run = str(small_bundle.run_dir)
    assert cli(["predict", "--run", run, "--data", str(data), "--out", str(tmp_path / "out.csv")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert cli(["predict", "--run", run, "--data", str(data), "--out", str(data)]) == 2
    assert "is the --data file" in capsys.readouterr().err
    assert not called


def test_predict_bad_rows_advice_speaks_of_prediction(small_bundle, colour_verdict):
    df = _train_frame(colour_verdict).head(5)
    df.loc[1, "text"] = " "
    with pytest.raises(mmtune.BadRowsError) as err:
        mmtune.load(small_bundle.run_dir).predict(df)
    assert "input row 2, column 'text'" in str(err.value)
    assert "Prediction never skips rows" in str(err.value) and "on_bad_rows" not in str(err.value)


def test_predictions_keep_the_input_index(small_bundle, colour_verdict):
    df = _train_frame(colour_verdict)
    subset = df[df["label"].str.endswith("keep")].iloc[::3]
    pred = mmtune.load(small_bundle.run_dir)
    proba, table = pred.predict_proba(subset), pred.predict_table(subset)
    assert list(proba.index) == list(subset.index) == list(table.index)
    subset = subset.assign(prediction=table["prediction"])  # assignment aligns on the index
    assert list(subset["prediction"]) == list(pred.predict(subset.drop(columns="prediction")))
