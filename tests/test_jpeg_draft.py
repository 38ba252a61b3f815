"""Large JPEGs decoded at a reduced scale (``data.jpeg_draft``): the same pixels to within a rounding after the
resize, the same verdict on a damaged file; pictures turned upright by their EXIF orientation
(``data.exif_orientation``); and both the same in training, prediction, the server and the cache."""
import base64
import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import mmtune


def _photo(path, size=(1024, 768), seed=0, orientation=None):
    """A JPEG with structure at every scale (gradients, discs, fine noise), as a photograph has; ``orientation``: the
    EXIF orientation tag it carries."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 200)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    out.save(path, quality=90, exif=exif.tobytes())
    return path


def _resized(im, side):
    return np.asarray(im.resize((side, side), Image.BILINEAR), dtype=np.int16)


def test_a_large_jpeg_decodes_small_and_resizes_to_the_same_pixels(tmp_path):
    from mmtune.data.images import load_image
    from mmtune.modalities import Image as ImageEntry

    path = _photo(tmp_path / "photo.jpg")
    full = load_image(path)
    assert full.size == (1024, 768)
    # the smallest of 1/1 .. 1/8 keeping both sides >= 64: 1/8 -> 128 x 96
    assert load_image(path, draft=64).size == (128, 96)
    assert load_image(path, draft=200).size == (512, 384)  # 768 // 200 = 3: 1/2 is the smallest that keeps 200
    assert load_image(path, draft=800).size == (1024, 768)  # smaller than twice: in full
    # the image modality keeps twice the side it is resized to, and the resized pixels are a full decode's within
    # a rounding (a draft that kept only the side itself would differ by more)
    drafted = ImageEntry().read(str(path), None, side=32)
    assert drafted.size == (128, 96)
    diff = np.abs(_resized(drafted, 32) - _resized(full, 32))
    assert diff.max() <= 3 and diff.mean() < 0.75
    png = tmp_path / "photo.png"
    full.save(png)
    assert load_image(png, draft=64).size == (1024, 768)  # other formats in full


def test_a_damaged_jpeg_fails_drafted_as_in_full(tmp_path):
    from mmtune.data.images import load_image
    from mmtune.modalities import Image as ImageEntry

    data = _photo(tmp_path / "photo.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    for draft in (None, 1, 64):
        with pytest.raises(OSError, match="truncated"):
            load_image(cut, draft=draft)
    assert "is not a readable image (OSError: image file is truncated" in ImageEntry().check_file(cut)
    assert ImageEntry().check_file(tmp_path / "photo.jpg") is None


def _photo_rows(tmp_path, colour_verdict, n=4):
    """``n`` rows of the demo's test table, each with a 1024 x 768 photograph; the second one stored sideways with
    an EXIF orientation that turns it upright (6: turn it 90 degrees clockwise)."""
    rows = pd.read_csv(colour_verdict["test"]).head(n)
    folder = tmp_path / "photos"
    folder.mkdir()
    rows["image"] = [str(_photo(folder / f"{i}.jpg", seed=i, orientation=6 if i == 1 else None)) for i in range(n)]
    return rows


def test_prediction_and_the_server_decode_a_large_jpeg_as_training_does(tmp_path, tiny_run, colour_verdict):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmtune.config import load_config
    from mmtune.data.datamodule import TableDataModule
    from mmtune.finetune import build_strategy
    from mmtune.serving.server import ServeSettings, create_app

    rows = _photo_rows(tmp_path, colour_verdict)
    pred = mmtune.load(tiny_run.run_dir)
    assert pred.config.data.jpeg_draft and pred.config.data.exif_orientation
    assert pred.reads == {"image": {"side": 32, "orient": True}}  # the tiny ViT reads 32 px
    ds = pred.dataset(rows, with_labels=False)
    assert ds[0]["values"]["image"].size == (128, 96) and ds[1]["values"]["image"].size == (96, 128)  # upright

    # training reads the same rows at the same side
    raw = tiny_run.config.model_dump(mode="json")
    raw["data"].update(train=None, val=None, test=None)
    cfg = load_config(raw)
    labelled = rows.assign(label=pd.read_csv(colour_verdict["test"]).head(len(rows))["label"])
    data = TableDataModule(cfg, labelled, labelled).read().attach(pred.model, build_strategy(cfg.finetune))
    assert data.reads == pred.reads
    seen = [s["values"]["image"] for s in data.datasets["train"].__getitems__(range(len(data.datasets["train"])))]
    assert [im.size for im in seen] == [(128, 96), (96, 128), (128, 96), (128, 96)]

    # an upload is decoded as the file is, drafted and turned upright: the same probabilities
    ref = pred.predict_proba(rows.iloc[[1]], calibrated=True)
    body = {"id": rows["id"][1], "image": base64.b64encode(open(rows["image"][1], "rb").read()).decode(),
            "text": rows["text"][1]}
    with TestClient(create_app(pred, ServeSettings())) as client:
        got = client.post("/predict", json=body).json()["probabilities"]
    np.testing.assert_allclose([got[c] for c in ref.columns[1:]], ref.iloc[0, 1:].to_numpy(dtype=float), atol=1e-6)

    # decoded in full, the probabilities move, if only a little: the draft is really in use
    same = pred.predict_proba(rows, calibrated=False).iloc[:, 1:].to_numpy(dtype=float)
    full = mmtune.load(tiny_run.run_dir)
    full.reads = {"image": {"orient": True}}
    other = full.predict_proba(rows, calibrated=False).iloc[:, 1:].to_numpy(dtype=float)
    assert 0 < np.abs(other - same).max() < 0.05


def test_a_bundle_written_before_the_setting_decodes_in_full(tmp_path, tiny_run):
    import json

    import yaml

    from mmtune.bundle import file_manifest, read_bundle
    from mmtune.config import load_config
    from mmtune.config.migrate import stored_config

    saved = yaml.safe_load((tiny_run.run_dir / "config.yaml").read_text())
    keys = ("jpeg_draft", "exif_orientation")
    assert all(saved["data"][k] is True for k in keys)  # written into every new bundle
    older = {**saved, "data": {k: v for k, v in saved["data"].items() if k not in keys}}
    new, old = load_config(older).data, load_config(stored_config(older)).data
    assert new.jpeg_draft and new.exif_orientation  # the defaults for a new config...
    assert not old.jpeg_draft and not old.exif_orientation  # ...but a bundle without them read its files as stored
    assert load_config(stored_config(saved)).data.jpeg_draft is True
    # the same through the bundle reader, on a copy whose config lacks the keys (its manifest written again)
    copy = tmp_path / "older"
    shutil.copytree(tiny_run.run_dir, copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(older))
    meta = json.loads((copy / "bundle.json").read_text())
    meta["files"].update(file_manifest(copy, ["config.yaml"]))
    (copy / "bundle.json").write_text(json.dumps(meta))
    assert read_bundle(copy, model=False).config.data.jpeg_draft is False
    assert mmtune.load(copy).reads == {}


def test_the_embedding_cache_tells_a_drafted_decode_from_a_full_one(tiny_run, colour_verdict):
    from mmtune.finetune.fingerprints import rows_fingerprint

    pred = mmtune.load(tiny_run.run_dir)
    rows = pd.read_csv(colour_verdict["test"]).head(3)
    rows["image"] = [str(colour_verdict["test"].parent / p) for p in rows["image"]]
    drafted = pred.dataset(rows, with_labels=False)
    pred.reads = {"image": {"side": 32}}
    unturned = pred.dataset(rows, with_labels=False)
    pred.reads = {}
    full = pred.dataset(rows, with_labels=False)
    assert len({rows_fingerprint(drafted), rows_fingerprint(unturned), rows_fingerprint(full)}) == 3
    assert rows_fingerprint(drafted, ["text"]) == rows_fingerprint(full, ["text"])


def test_each_processor_says_the_side_it_resizes_to():
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from mmtune.data.collate import Collator
    from mmtune.encoders.fields import FieldProcessor, SharedProcessor
    from mmtune.encoders.processors import HFImageProcessor, JointProcessor, ResizeNormalizeProcessor

    assert ResizeNormalizeProcessor(96).sides() == {"image": 96}
    assert HFImageProcessor(ViTImageProcessor(size={"height": 224, "width": 160})).sides() == {"image": 224}
    assert HFImageProcessor(ViTImageProcessor(), image_size=64).sides() == {"image": 64}
    # resized on its shortest edge to 224 / 0.875, then cropped
    assert HFImageProcessor(ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)).sides() == {"image": 256}
    assert HFImageProcessor(ViTImageProcessor(do_resize=False)).sides() == {}
    assert JointProcessor({"image": ResizeNormalizeProcessor(48)}).sides() == {"image": 48}
    assert FieldProcessor(ResizeNormalizeProcessor(48), "image.back").sides() == {"image.back": 48}
    assert SharedProcessor(ResizeNormalizeProcessor(48), ["image", "image.back"]).sides() == {"image": 48, "image.back": 48}
    # two encoders of one column: the larger side; a modality the collator does not read is left out
    both = Collator({"a": ResizeNormalizeProcessor(48), "b": ResizeNormalizeProcessor(160),
                     "c": FieldProcessor(ResizeNormalizeProcessor(32), "image.back")}, ["image"])
    assert both.sides() == {"image": 160}


def test_a_picture_is_turned_upright_as_its_exif_orientation_says(tmp_path):
    from PIL import ImageOps

    from mmtune.data.images import load_image, orientation

    for tag in range(1, 9):
        path = _photo(tmp_path / f"o{tag}.jpg", size=(64, 32), orientation=tag)
        stored = load_image(path)
        assert stored.size == (64, 32)  # without orient: as stored
        upright = load_image(path, orient=True)
        with Image.open(path) as im:
            want = ImageOps.exif_transpose(im).convert("RGB")  # what photo viewers show
        assert upright.size == want.size == ((32, 64) if tag >= 5 else (64, 32))
        assert np.array_equal(np.asarray(upright), np.asarray(want)), tag
        # drafted and turned: the turn comes after the reduced decode
        assert load_image(path, draft=16, orient=True).size == ((16, 32) if tag >= 5 else (32, 16))

    class DamagedExif:
        def getexif(self):
            raise SyntaxError("not an EXIF block")

    assert orientation(DamagedExif()) == 1  # read as stored, never a crash
