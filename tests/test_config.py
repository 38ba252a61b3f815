from pathlib import Path

import pytest
import yaml

from mmtune.config import Config, ConfigError, load_config

ENC = {"model": {"encoders": {"text": {"modality": "text", "checkpoint": "minilm-l6"}}}}


def test_unknown_key_names_key_and_valid_choices():
    with pytest.raises(ConfigError) as e:
        load_config({**ENC, "trainer": {"max_epoch": 3}})
    msg = str(e.value)
    assert "trainer.max_epoch" in msg and "max_epochs" in msg


def test_unknown_nested_encoder_key():
    with pytest.raises(ConfigError) as e:
        load_config({"model": {"encoders": {"text": {"modality": "text", "checkpoint": "x", "poolin": "mean"}}}})
    assert "model.encoders.text.poolin" in str(e.value) and "pooling" in str(e.value)


def test_bad_value_names_key_and_valid_values():
    with pytest.raises(ConfigError) as e:
        load_config({**ENC, "optim": {"name": "adagrad"}})
    msg = str(e.value)
    assert "optim.name" in msg and "adamw" in msg and "adagrad" in msg


def test_overrides_are_typed_and_nested():
    cfg = load_config(ENC, ["trainer.max_epochs=3", "optim.lr=1e-4", "model.fusion.hidden_dims=[8, 4]",
                            "data.id_column=id", "trainer.gradient_clip_val=null"])
    assert cfg.trainer.max_epochs == 3 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.fusion.hidden_dims == [8, 4] and cfg.data.id_column == "id"
    assert cfg.trainer.gradient_clip_val is None


def test_override_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="trainer.epochs"):
        load_config(ENC, ["trainer.epochs=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(ENC, ["trainer.max_epochs"])


def test_columns_are_named_per_modality_of_the_table():
    cfg = load_config({"data": {"columns": {"image": "photo"}}})
    assert cfg.data.column("image") == "photo" and cfg.data.column("text") == "text"
    with pytest.raises(ConfigError, match="data.columns': unknown modality 'video'; valid: image, text, tabular, audio"):
        load_config({"data": {"columns": {"video": "clip"}}})
    with pytest.raises(ConfigError, match="'data.image_column' is now 'data.columns.image'"):
        load_config({"data": {"image_column": "photo"}})


def test_yaml_roundtrip_and_relative_paths(tmp_path):
    (tmp_path / "train.csv").write_text("image,text,label\n")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({**ENC, "data": {"train": "train.csv"}}))
    cfg = load_config(cfg_path)
    assert Path(cfg.data.train) == tmp_path / "train.csv"
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


SHIPPED = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")) + [
    Path(__file__).parents[1] / "src" / "mmtune" / "configs" / "demo.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    assert isinstance(load_config(path), Config)


def test_override_words_yaml_reads_as_booleans_stay_words():
    cfg = load_config(ENC, ["name=off", "trainer.progress_bar=off", "data.label_column=yes"])
    assert cfg.name == "off" and cfg.trainer.progress_bar is False and cfg.data.label_column == "yes"
