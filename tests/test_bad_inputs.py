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
    from mmtune.fusion.stacking import fit_stacking

    model, ds, task, _ = _stacking_fixture(n_per_class=(30, 30, 1))
    with pytest.raises(ValueError, match="class 'c2' has 1 training row.*at least 2 per class"):
        fit_stacking(model, ds, task, folds=3, seed=0)


def test_cache_key_follows_image_contents_not_size_and_mtime(tmp_path):
    import os

    from mmtune.data.dataset import MultimodalDataset
    from mmtune.data.manifest import ManifestSpec
    from mmtune.finetune.fingerprints import rows_fingerprint

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
    from mmtune.finetune.fingerprints import encoder_fingerprint

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


def test_prediction_decodes_each_picture_once_and_still_names_every_unreadable_file(tmp_path, tiny_run, monkeypatch):
    """Prediction's validation only checks that files exist, and its rows are decoded once; a file that then fails
    to decode (a truncated JPEG, text named .png) gets the same error as a validation that decoded everything:
    every bad row named, in the prediction's words. Decoding twice (validation, then the dataset) would count
    2 x rows; deferring without the full check would name only the first bad row, or raise Pillow's error."""
    from mmtune.data import images

    _truncated_jpeg(tmp_path)
    (tmp_path / "words.png").write_text("not a picture")
    rows = pd.read_csv(tiny_run.config.data.test).head(12)
    rows["image"] = [str(Path(tiny_run.config.data.test).parent / p) for p in rows["image"]]
    pred = mmtune.load(tiny_run.run_dir)
    want = pred.predict_proba(rows)
    decoded = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda path, **kw: (decoded.append(str(path)), real(path, **kw))[1])
    got = pred.predict_proba(rows)
    assert len(decoded) == len(rows) and sorted(decoded) == sorted(rows["image"])
    assert np.array_equal(got.to_numpy(), want.to_numpy())

    bad = rows.copy()
    bad.loc[3, "image"] = str(tmp_path / "cut.jpg")
    bad.loc[7, "image"] = str(tmp_path / "words.png")
    bad.loc[9, "image"] = str(tmp_path / "gone.png")
    with pytest.raises(mmtune.BadRowsError, match="input row 10, column 'image': image file .*gone.png.* does not "
                                                  "exist") as err:  # found without decoding: nothing run
        pred.predict_proba(bad)
    assert [b.row for b in err.value.bad_rows] == [10]
    bad.loc[9, "image"] = rows.loc[9, "image"]
    decoded.clear()
    with pytest.raises(mmtune.BadRowsError) as err:
        pred.predict_proba(bad, batch_size=4)
    reasons = {b.row: b.reason for b in err.value.bad_rows}
    assert set(reasons) == {4, 8}, reasons
    assert "cut.jpg" in reasons[4] and "not a readable image" in reasons[4]
    assert "words.png" in reasons[8] and "not a readable image" in reasons[8]
    assert "Prediction never skips rows" in str(err.value) and "on_bad_rows" not in str(err.value)
    assert cli(["predict", "--run", str(tiny_run.run_dir), "--data", str(_csv(bad, tmp_path)),
                "--out", str(tmp_path / "p.csv")]) == 2 and not (tmp_path / "p.csv").exists()


def test_decoding_threads_that_meet_bad_files_validate_the_table_once(tmp_path, tiny_run, monkeypatch):
    """The first batch is read on both decoding threads; when each meets a bad file, the table is validated in full
    once (the other thread waits for that report and raises it), not once per thread."""
    from mmtune.data import dataset

    _truncated_jpeg(tmp_path)
    (tmp_path / "words.png").write_text("not a picture")
    rows = pd.read_csv(tiny_run.config.data.test).head(12)
    rows["image"] = [str(Path(tiny_run.config.data.test).parent / p) for p in rows["image"]]
    rows.loc[1, "image"] = str(tmp_path / "cut.jpg")  # in the first thread's half of the batch
    rows.loc[7, "image"] = str(tmp_path / "words.png")  # in the second's
    pred = mmtune.load(tiny_run.run_dir)
    pred.workers = 2
    calls = []
    real = dataset.validate_rows
    monkeypatch.setattr(dataset, "validate_rows", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(3):
        calls.clear()
        with pytest.raises(mmtune.BadRowsError) as err:
            pred.predict_proba(rows, batch_size=12)
        assert sorted(b.row for b in err.value.bad_rows) == [2, 8] and len(calls) == 1


def _csv(df: pd.DataFrame, folder: Path) -> Path:
    path = folder / "rows.csv"
    df.to_csv(path, index=False)
    return path


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
    with pytest.raises(mmtune.ConfigError) as err:  # another type's setting names that type, and how to choose it
        load_config({"model": {"fusion": {"rank": 8}}})
    assert str(err.value).splitlines()[1].strip() == (
        "unknown config key 'model.fusion.rank'; valid keys there: dropout, hidden_dims, type ('rank' is a setting "
        "of bilinear: set model.fusion.type with it; without it the type is 'concat')")
    with pytest.raises(mmtune.ConfigError) as err:  # under a preset, the type is not concat yet: the advice says so
        load_config({"preset": "fast", "model": {"fusion": {"rank": 8}}})
    assert "set model.fusion.type with it; the preset 'fast' chooses the type only after it has read the table" \
        in str(err.value) and "without it the type is" not in str(err.value)
    from mmtune.config import apply_preset
    from mmtune.presets import TableStats

    named = apply_preset(load_config({"preset": "fast", "model": {"fusion": {"type": "bilinear", "rank": 8}}}),
                         TableStats(rows=500, modalities=("image", "text")))
    assert named.model.fusion.model_dump() == {"type": "bilinear", "hidden_dims": [256], "dropout": 0.2, "rank": 8}
    with pytest.raises(mmtune.ConfigError, match=r"'loss.label_smoothing'.*\('label_smoothing' is a setting of cross_entropy"):
        load_config({"loss": {"type": "focal", "label_smoothing": 0.1}})
    with pytest.raises(mmtune.ConfigError) as err:  # a key no type has gets no such hint
        load_config({"model": {"fusion": {"nope": 8}}})
    assert str(err.value).strip().endswith("valid keys there: dropout, hidden_dims, type")
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
    with pytest.raises(ValueError, match="best.ckpt' is not a readable mmtune checkpoint .UnpicklingError.: nothing "
                                         "in it was run"):
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


# ------------------------------------------------------------------------------------------------
# nothing lost: outputs never replace inputs, runs or folders they do not own


def _copy(small_bundle, tmp_path, name="copy") -> Path:
    run = tmp_path / name
    shutil.copytree(small_bundle.run_dir, run)
    return run


def test_export_never_replaces_the_run_or_a_folder_it_does_not_own(tmp_path, small_bundle, capsys):
    pytest.importorskip("onnxruntime")
    run = _copy(small_bundle, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for out, said in ((run, "is the run bundle"), (tmp_path, "holds the run bundle"),
                      (other, "holds files and is not what this command writes (export.json missing)"),
                      (other / "notes.txt", "is a file")):
        assert cli(["export", "--run", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the run as it was
    assert (other / "notes.txt").read_text() == "keep me"


def test_evaluate_never_replaces_its_data_or_the_bundle(tmp_path, small_bundle, colour_verdict, capsys, monkeypatch):
    from mmtune.serving import predictor

    data = tmp_path / "rows.csv"
    _train_frame(colour_verdict).head(5).to_csv(data, index=False)
    table = data.read_bytes()
    run = _copy(small_bundle, tmp_path)
    called = []
    monkeypatch.setattr(predictor.Predictor, "load", classmethod(lambda cls, *a, **k: called.append(1)))
    for out, said in ((data, "is the --data file"), (run / "metrics.json", "is the run bundle's file"),
                      (run / "encoders", "is a folder")):
        assert cli(["evaluate", "--run", str(run), "--data", str(data), "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert cli(["predict", "--run", str(run), "--data", str(data), "--out", str(run / "labels.json")]) == 2
    assert "--out" in capsys.readouterr().err  # unknown format .json: refused before any check of the bundle
    assert cli(["explain", "--run", str(run), "--data", str(data), "--out", str(run)]) == 2
    assert "is the run bundle" in capsys.readouterr().err
    assert data.read_bytes() == table and not called
    mmtune.load(run)  # still complete and unchanged


def test_prune_replaces_only_its_own_earlier_bundles(tmp_path, small_bundle, colour_verdict, capsys):
    run = _copy(small_bundle, tmp_path)
    victim = tmp_path / "copy-pruned-weights-0.5"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    data = tmp_path / "rows.csv"
    _train_frame(colour_verdict).head(8).to_csv(data, index=False)
    assert cli(["prune", "--run", str(run), "--sparsity", "0.5", "--data", str(data)]) == 2
    assert "holds files and is not what this command writes" in capsys.readouterr().err
    assert (victim / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------------
# bundles: every file listed with its size and hash; a missing or changed file is named


@pytest.mark.parametrize("damage", ["delete", "truncate", "edit"])
def test_a_bundle_file_missing_or_changed_is_named(tmp_path, small_bundle, damage, capsys):
    run = _copy(small_bundle, tmp_path)
    meta = json.loads((run / "bundle.json").read_text())
    assert meta["format"] == 3 and "encoders/text/processor/tokenizer.json" in meta["files"]
    assert meta["files"]["model.safetensors"]["bytes"] == (run / "model.safetensors").stat().st_size
    tok = run / "encoders" / "text" / "processor" / "tokenizer.json"
    if damage == "delete":  # what once made every word [UNK], silently
        tok.unlink()
        said = "lacks 'encoders/text/processor/tokenizer.json'"
    elif damage == "truncate":
        tok.write_bytes(tok.read_bytes()[:100])
        said = "'encoders/text/processor/tokenizer.json' is damaged or was replaced"
    else:  # same size, other bytes
        text = tok.read_bytes()
        tok.write_bytes(text.replace(b"works", b"wOrks", 1))
        said = "'encoders/text/processor/tokenizer.json' has changed since the bundle was written"
    with pytest.raises((FileNotFoundError, ValueError), match=said):
        mmtune.load(run)
    assert cli(["predict", "--run", str(run), "--data", "x.csv", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert said.split("'")[1] in err and "Traceback" not in err


@pytest.mark.parametrize("edit, said", [
    (lambda m: {**m, "files": 5}, "'files' is int, not the list of the bundle's files"),
    (lambda m: {**m, "format": 1, "files": sorted({f.split("/")[0] for f in m["files"]})},
     "says format 1, but the bundle's files are those of format 2"),
    (lambda m: {**m, "format": 2}, "says format 2, but the bundle's files are those of format 3"),
    (lambda m: [m], "not a JSON object"),
    (lambda m: {**m, "files": {"../../etc/passwd": {"bytes": 1, "sha256": "0"}}}, "outside the bundle"),
])
def test_an_edited_bundle_json_is_refused_by_its_files(tmp_path, small_bundle, edit, said):
    """A bundle relabelled format 1 once dropped calibration.json silently (probabilities moved by 0.1)."""
    run = _copy(small_bundle, tmp_path)
    meta = json.loads((run / "bundle.json").read_text())
    (run / "bundle.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(ValueError, match=said):
        mmtune.load(run)


def test_a_format2_bundle_loads_and_predicts_what_it_predicted():
    """tests/data/bundle_format2 was written by the format-2 code (files listed by name only; gated fusion, LoRA)."""
    folder = Path(__file__).parent / "data" / "bundle_format2"
    b = mmtune.bundle.read_bundle(folder / "bundle")
    assert b.meta["format"] == 2 and b.config.model.fusion.type == "gated"
    got = mmtune.load(folder / "bundle").predict_proba(folder / "rows" / "rows.csv")
    expected = pd.read_csv(folder / "expected_proba.csv")
    cols = [c for c in expected.columns if c != "id"]
    assert list(got["id"]) == list(expected["id"])
    assert np.abs(got[cols].to_numpy() - expected[cols].to_numpy()).max() <= 1e-6


@pytest.mark.parametrize("name, damage, said", [
    ("bundle.json", b"{not json", "bundle.json' is damaged (not valid JSON"),
    ("labels.json", b"[]", "labels.json' is damaged or was replaced"),
])
def test_damaged_json_of_a_bundle_is_one_line_naming_it(tmp_path, small_bundle, capsys, name, damage, said):
    run = _copy(small_bundle, tmp_path)
    (run / name).write_bytes(damage)
    assert cli(["predict", "--run", str(run), "--data", "x.csv", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and "network" not in err, err


# ------------------------------------------------------------------------------------------------
# export bundles: format and files checked as a run bundle's are


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, small_bundle, colour_verdict):
    pytest.importorskip("onnxruntime")
    from mmtune.serving.export import export_onnx

    out = tmp_path_factory.mktemp("small-export") / "export"
    export_onnx(small_bundle.run_dir, out, data=_train_frame(colour_verdict).head(20), quantize="int8",
                log=lambda *_: None)
    return out


@pytest.mark.parametrize("damage, said", [
    (lambda e: (e / "export.json").write_text(json.dumps({**json.loads((e / "export.json").read_text()), "format": 99})),
     "has format version 99; this mmtune reads export format 1, 2"),
    (lambda e: (e / "export.json").write_text("{"), "export.json' is damaged (not valid JSON"),
    (lambda e: (e / "model.onnx").write_bytes((e / "model.onnx").read_bytes()[:500]), "'model.onnx' is damaged or was replaced"),
    (lambda e: (e / "model.int8.onnx").unlink(), "lacks 'model.int8.onnx'"),
    (lambda e: (e / "encoders/text/processor/tokenizer_config.json").write_text("{]"), "tokenizer_config.json' is damaged"),
    (lambda e: (e / "encoders/text/processor/mmtune_processor.json").write_text("{}"), "mmtune_processor.json' is damaged"),
])
def test_a_damaged_export_bundle_is_one_line_naming_the_file(tmp_path, small_export, capsys, damage, said):
    exp = tmp_path / "export"
    shutil.copytree(small_export, exp)
    damage(exp)
    assert cli(["predict", "--run", str(exp), "--data", "x.csv", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and "network" not in err, err


def test_an_onnx_file_that_onnxruntime_cannot_read_is_one_line(tmp_path, small_export):
    """The runner's own check, for an export of format 1 (no list of files to compare with)."""
    from mmtune.serving.runners import OnnxRunner

    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="model.onnx' cannot be loaded as an ONNX model .* export again"):
        OnnxRunner(tmp_path / "model.onnx", {}, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# the search: a space the schema refuses stops before the first trial


def test_a_search_space_of_invalid_values_stops_before_any_trial(tmp_path, tiny_bert, colour_verdict, capsys):
    pytest.importorskip("optuna")
    import yaml

    cfg = _text_cfg(tmp_path, tiny_bert)
    cfg["data"]["train"] = str(colour_verdict["train"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    for space, said in (("finetune.type: {choices: [nope]}", "finetune.type = 'nope' is not a valid setting"),
                        ("optim.lr: {low: -1.0, high: 0.1}", "optim.lr = -1.0 is not a valid setting"),
                        ("finetune.type: {choices: [lora]}\nfinetune.r: {choices: [0, 4]}", "finetune.r = 0 is not a valid"),
                        ("model.fusion.type: {choices: [concat, nope]}", "model.fusion.type = 'nope'")):
        (tmp_path / "space.yaml").write_text(space)
        assert cli(["tune", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "space.yaml"), "--trials", "2"]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
        assert not (tmp_path / "runs" / "t" / "tune" / "trials").exists()  # no trial ran


# ------------------------------------------------------------------------------------------------
# one line, not a traceback


def test_planted_and_damaged_encoder_checkpoints_are_one_line(tmp_path, tiny_bert, colour_verdict, capsys):
    import yaml

    flag = tmp_path / "payload-ran"
    for damage in ("pickle", "truncate"):
        ckpt = tmp_path / f"bert-{damage}"
        shutil.copytree(tiny_bert, ckpt)
        if damage == "pickle":  # no safetensors: transformers falls back to the PyTorch file
            (ckpt / "model.safetensors").unlink()
            torch.save({"payload": _Planted(str(flag))}, ckpt / "pytorch_model.bin")
        else:
            w = ckpt / "model.safetensors"
            w.write_bytes(w.read_bytes()[:1000])
        cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": str(ckpt)}},
                          data={"id_column": "id", "train": str(colour_verdict["train"])}, name=f"r-{damage}")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert cli(["fit", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err
        assert f"encoder checkpoint '{ckpt}' could not be loaded: a file of the local checkpoint folder is damaged" in err
        assert "Traceback" not in err and "network" not in err and len(err.strip().splitlines()) == 1, err
    assert not flag.exists()


def test_a_planted_best_checkpoint_on_resume_is_one_line(tmp_path, tiny_bert, colour_verdict, capsys):
    import yaml

    cfg = _text_cfg(tmp_path, tiny_bert)
    cfg["trainer"]["max_epochs"] = 1
    cfg["data"]["train"] = str(colour_verdict["train"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["fit", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "t"
    (run / "bundle.json").unlink()
    flag = tmp_path / "payload-ran"
    best = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert best
    for p in best:
        torch.save({"state_dict": {}, "payload": _Planted(str(flag))}, p)
    assert cli(["fit", str(tmp_path / "c.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is not a readable mmtune checkpoint (UnpicklingError): nothing in it was run" in err, err
    assert "Traceback" not in err and not flag.exists()


def test_output_dirs_and_run_names_the_file_system_cannot_hold(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "afile").write_text("")
    cases = [("output_dir: " + str(tmp_path / "afile" / "runs") + "\nname: x", "which is a file; give a folder"),
             ("output_dir: " + str(tmp_path) + "\nname: afile", "is a file; choose another name"),
             ("output_dir: " + str(tmp_path) + "\nname: " + "n" * 250, "run name of 250 bytes is too long: at most 200")]
    for head, said in cases:
        (tmp_path / "c.yaml").write_text(head + "\ndata: {train: t.csv}\nmodel: {encoders: {t: {modality: text, "
                                         "checkpoint: ./no-model}}}\n")
        assert cli(["fit", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert cli(["fit", str(tmp_path / "deep.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is nested too deeply to be a config" in err and "Traceback" not in err


@pytest.mark.parametrize("args, said", [
    (["--port", "99999"], "--port 99999: give a port number from 1 to 65535"),
    (["--allow-paths", "/no/such/folder"], "--allow-paths '/no/such/folder' is not a folder"),
    (["--max-request-rows", "0"], "--max-request-rows must be positive"),
])
def test_serve_refuses_bad_settings_before_loading(args, said, capsys, monkeypatch):
    from mmtune.serving import server

    monkeypatch.setattr(server, "serve", lambda *a, **k: pytest.fail("served"))
    assert cli(["serve", "--run", "somewhere", *args]) == 2
    assert said in capsys.readouterr().err
