import pandas as pd
import pytest
from PIL import Image

from mmtune.config import load_config
from mmtune.data.datamodule import prepare_data
from mmtune.data.manifest import BadRowsError, ManifestSpec, read_table, validate_rows


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    return tmp_path


SPEC = ManifestSpec.simple({"image": "image", "text": "text"}, label_column="label", id_column="id")


def test_every_kind_of_bad_row_is_reported_with_row_and_reason(folder):
    df = pd.DataFrame({
        "id": ["a", "b", "c", "d", "e", "f", "g"],
        "image": ["ok.png", "missing.png", "broken.png", "ok.png", "ok.png", None, "ok.png"],
        "text": ["fine", "fine", "fine", "   ", "fine", "fine", float("nan")],
        "label": ["x", "x", "y", "y", None, "x", "y"],
    })
    bad = validate_rows(df, SPEC, folder, "train")
    got = {(b.row, b.column): b.reason for b in bad}
    assert set(got) == {(2, "image"), (3, "image"), (4, "text"), (5, "label"), (6, "image"), (7, "text")}
    assert "does not exist" in got[(2, "image")]
    assert "not a readable image" in got[(3, "image")]
    assert "empty text" in got[(4, "text")]
    assert "missing label" in got[(5, "label")]
    assert "NaN" in got[(6, "image")] and "NaN" in got[(7, "text")]


def test_unseen_label_in_val_is_a_bad_row(folder):
    df = pd.DataFrame({"id": [1], "image": ["ok.png"], "text": ["t"], "label": ["z"]})
    spec = ManifestSpec.simple({"image": "image", "text": "text"}, "label", "id")
    spec.tasks[0].fit_classes(["x", "y"])
    bad = validate_rows(df, spec, folder, "val", check_known=True)
    assert len(bad) == 1 and bad[0].row == 1 and "never occurs in the training set" in bad[0].reason


def test_missing_column_names_manifest_and_columns(folder):
    df = pd.DataFrame({"image": ["ok.png"], "caption": ["t"], "label": ["x"]})
    with pytest.raises(ValueError, match="'text'.*columns are: 'image', 'caption', 'label'"):
        validate_rows(df, ManifestSpec.simple({"image": "image", "text": "text"}, "label"), folder, "train", source_name="m.csv")


def _cfg(**data):
    return load_config({"data": {"id_column": "id", **data},
                        "model": {"encoders": {"t": {"modality": "text", "checkpoint": "x"},
                                               "i": {"modality": "image", "checkpoint": "y"}}}})


def test_all_problems_at_once_then_skip_keeps_them(folder):
    rows = [{"id": i, "image": "ok.png", "text": f"t{i}", "label": "xy"[i % 2]} for i in range(20)]
    rows[3]["image"] = "gone.png"
    rows[7]["text"] = ""
    df = pd.DataFrame(rows)
    df.to_csv(folder / "train.csv", index=False)
    with pytest.raises(BadRowsError) as e:
        prepare_data(_cfg().data, ["image", "text"], train=str(folder / "train.csv"))
    assert {(b.row, b.column) for b in e.value.bad_rows} == {(4, "image"), (8, "text")}
    assert "train row 4" in str(e.value) and "on_bad_rows=skip" in str(e.value)

    with pytest.warns(UserWarning, match="skipping 2 bad row"):
        data = prepare_data(_cfg(on_bad_rows="skip").data, ["image", "text"], train=str(folder / "train.csv"))
    kept = pd.concat([data.frames["train"], data.frames["val"]])
    assert len(kept) == 18 and set(kept["id"]) == set(range(20)) - {3, 7}
    assert list(data.rejected["row"]) == [4, 8] and list(data.rejected["value.id"]) == [3, 7]


def test_split_is_stratified_and_seeded(folder):
    df = pd.DataFrame({"id": range(40), "image": "ok.png", "text": "t", "label": ["a"] * 30 + ["b"] * 10})
    d1 = prepare_data(_cfg(val_fraction=0.2, split_seed=3).data, ["image", "text"], train=df.assign(image=str(folder / "ok.png")))
    d2 = prepare_data(_cfg(val_fraction=0.2, split_seed=3).data, ["image", "text"], train=df.assign(image=str(folder / "ok.png")))
    assert list(d1.frames["val"]["id"]) == list(d2.frames["val"]["id"])
    assert d1.frames["val"]["label"].value_counts().to_dict() == {"a": 6, "b": 2}
    assert d1.tasks[0].classes == ["a", "b"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "tsv"])
def test_formats_read_alike(folder, fmt):
    df = pd.DataFrame({"id": [1, 2], "image": ["ok.png", "ok.png"], "text": ["a", "b"], "label": [0, 1]})
    path = folder / f"m.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "tsv": lambda: df.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    got, base = read_table(path)
    assert base == folder and got["text"].tolist() == ["a", "b"] and got["label"].tolist() == [0, 1]
    assert validate_rows(got, SPEC, base, "train") == []


def test_unknown_format_and_missing_file(folder):
    (folder / "m.xlsx").write_text("")
    with pytest.raises(ValueError, match=r"unknown format '.xlsx'.*\.csv"):
        read_table(folder / "m.xlsx")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_table(folder / "nope.csv")
