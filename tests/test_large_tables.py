"""Tables larger than memory: manifests read and validated in chunks, datasets that keep no per-row Python
objects, and an embedding cache read a batch's rows at a time, nothing of it held in the process."""
import os
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmtune.data.dataset import MultimodalDataset
from mmtune.data.datamodule import _split, label_codes
from mmtune.data.manifest import (ManifestSpec, count_rows, join_chunks, read_valid_rows, table_chunks,
                                  validate_rows)
from mmtune.distributed import text_lengths
from mmtune.finetune.shards import Stored
from mmtune.finetune.feature_cache import present_masks
from mmtune.finetune.fingerprints import rows_fingerprint

SPEC = ManifestSpec.simple({"image": "image", "text": "text"}, label_column="label", id_column="id")
WRITERS = {
    "csv": lambda df, p: df.to_csv(p, index=False),
    "tsv": lambda df, p: df.to_csv(p, sep="\t", index=False),
    "jsonl": lambda df, p: df.to_json(p, orient="records", lines=True),
    "parquet": lambda df, p: df.to_parquet(p, index=False),
    "arrow": lambda df, p: df.to_feather(p),
    "ipc": lambda df, p: _write_stream(df, p),
}


def _write_stream(df, path):
    """The Arrow IPC streaming format (no footer), in batches of 10 rows."""
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=10):
            writer.write_batch(batch)


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "ok.png")
    return tmp_path


def _rows(n, bad=()):
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "image": ["ok.png"] * n,
                       "text": [f"words {'x ' * (i % 7)}row {i}" for i in range(n)],
                       "label": [["cat", "dog", "emu"][i % 3] for i in range(n)]})
    for i in bad:
        df.loc[i, "image"] = "gone.png"
    return df


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_chunked_reading_and_validation_match_the_whole_table(folder, fmt):
    """Every format read 4 rows at a time gives the table a whole read gives; the bad rows of later chunks keep
    their row numbers in the file, and their values go into the rejected rows."""
    df = _rows(23, bad=(5, 17, 22))
    path = folder / f"m.{fmt}"
    WRITERS[fmt](df, path)
    chunks, base = table_chunks(path, rows=4)
    sizes = [len(c) for c in chunks]
    assert base == folder.resolve() and count_rows(path) == 23
    assert sizes == ([4, 4, 2, 4, 4, 2, 3] if fmt == "ipc" else [4, 4, 4, 4, 4, 3])  # chunks never span batches
    whole = join_chunks(list(table_chunks(path, rows=4)[0]))
    pd.testing.assert_frame_equal(whole.astype(str), df.astype(str))

    good, _, bad, rejected = read_valid_rows(path, SPEC, "train", rows=4)
    assert [(b.row, b.column) for b in bad] == [(6, "image"), (18, "image"), (23, "image")]
    assert [b.row for b in bad] == [b.row for b in validate_rows(df, SPEC, folder, "train")]
    assert rejected["value.id"].tolist() == ["r5", "r17", "r22"] and rejected["row"].tolist() == [6, 18, 23]
    assert good["id"].tolist() == [f"r{i}" for i in range(23) if i not in (5, 17, 22)]


def test_an_unreadable_chunk_names_the_file(folder):
    path = folder / "m.jsonl"
    path.write_text('{"id": "a", "image": "ok.png", "text": "t", "label": "x"}\n' * 5 + "{not json\n")
    with pytest.raises(ValueError, match="m.jsonl.*could not be read"):
        read_valid_rows(path, SPEC, "train", rows=2)


def test_the_stratified_split_is_sklearns_split_of_the_label_texts():
    """Splitting row numbers with integer label codes gives exactly the rows sklearn's split of the table
    stratified on the label texts gives (1, 1.0 and '1' are one label)."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    labels = rng.choice(np.array(["b", "a", 1, 1.0, "1", "c"], dtype=object), size=300)
    df = pd.DataFrame({"id": np.arange(300), "label": labels})
    keys = df["label"].map(lambda v: str(int(v)) if isinstance(v, float) else str(v))
    assert len(set(label_codes(df["label"]))) == 4
    train, val = _split(df.copy(), "label", 0.2, 7)  # (the split uses up the table it is given)
    want_train, want_val = train_test_split(df, test_size=0.2, random_state=7, stratify=keys)
    assert train["id"].tolist() == want_train["id"].tolist() and val["id"].tolist() == want_val["id"].tolist()


def test_batches_taken_at_once_equal_rows_taken_one_by_one(folder):
    df = _rows(50).assign(weight=np.linspace(0.5, 2, 50))
    df.loc[3, "text"] = None
    spec = ManifestSpec.simple({"image": "image", "text": "text"}, "label", "id", allow_missing=("text",))
    spec.weight_column = "weight"
    spec.tasks[0].fit_classes(df["label"])
    ds = MultimodalDataset(df, spec, folder)
    rows = [7, 3, 49, 0]
    batch = ds.__getitems__(rows)
    for item, i in zip(batch, rows):
        one = ds[i]
        assert item["index"] == one["index"] == i and item["labels"] == one["labels"]
        assert item["values"]["text"] == one["values"]["text"] and item["weight"] == one["weight"]
        assert item["labels"]["label"] == ["cat", "dog", "emu"].index(df["label"][i])
    assert batch[1]["values"]["text"] is None and batch[0]["values"]["image"].size == (8, 8)
    assert ds.labels["label"].dtype == np.int64 and pd.isna(list(ds.cells("text"))[3])
    assert present_masks(ds, ["text"])["text"].tolist() == [i != 3 for i in range(50)]
    assert text_lengths(ds)[:4] == [3, 4, 5, 0]


def _passes_peak(df, folder, path) -> int:
    """Peak Python-heap bytes (tracemalloc: Python objects and numpy arrays) of reading + validating the
    manifest and of a dataset's whole-column passes."""
    df.to_parquet(path, index=False)
    spec = ManifestSpec.simple({"image": "image", "text": "text"}, "label", "id")
    tracemalloc.start()
    try:
        good, base, bad, _ = read_valid_rows(path, spec, "train")
        spec.tasks[0].fit_classes(good["label"].drop_duplicates())
        ds = MultimodalDataset(good, spec, base)
        present_masks(ds, ["image", "text"])
        rows_fingerprint(ds)
        text_lengths(ds)
        assert not bad and len(ds) == len(df)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_reading_validating_and_dataset_passes_stays_flat_as_rows_grow(folder):
    """Four times the rows cost at most 16 bytes more per added row (labels as int64, masks, lengths): no
    per-row Python object survives a chunk. Holding a column as a list of strings costs > 60 bytes a row."""
    small = _passes_peak(_rows(70_000), folder, folder / "small.parquet")
    large = _passes_peak(_rows(280_000), folder, folder / "large.parquet")
    assert (large - small) / 210_000 < 16, (small, large)


def test_stored_cache_reads_rows_in_order_and_holds_nothing_in_memory(tmp_path):
    """``take`` returns the asked rows in the asked order across shards of different token lengths and
    precisions (padded to the longest shard touched, as float32), equal to numpy's own reading; and reading
    every row of a 64 MiB shard leaves resident memory where it was (positioned reads: nothing mapped or kept)."""
    import pickle

    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((300, 5, 4)).astype(np.float16), rng.standard_normal((200, 3, 4)).astype(np.float16),
              rng.standard_normal((100, 6, 4)).astype(np.float32)]
    for k, a in enumerate(shards):
        np.save(tmp_path / f"t.{k}.npy", a)
    st = Stored([tmp_path / f"t.{k}.npy" for k in range(3)])
    whole = np.concatenate([np.pad(a.astype(np.float32), [(0, 0), (0, 6 - a.shape[1]), (0, 0)]) for a in shards])
    for idx in ([450, 2, 299, 300, 17], [3, 1, 2], list(range(290, 320)), [599, 0, 599]):
        got = st.take(torch.as_tensor(idx)).numpy()
        longest = max(shards[int(np.searchsorted([300, 500, 600], i, side="right"))].shape[1] for i in idx)
        assert got.dtype == np.float32 and got.shape == (len(idx), longest, 4)
        np.testing.assert_array_equal(got, whole[idx][:, :longest])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(st)).take(torch.arange(600)).numpy(), whole)

    if not os.path.exists("/proc/self/status"):
        pytest.skip("resident memory is read from /proc")
    big = np.ones((64 * 1024, 256), dtype=np.float32)  # 64 MiB
    np.save(tmp_path / "big.0.npy", big)
    del big
    store = Stored([tmp_path / "big.0.npy"])
    before = _rss_file_kib()
    order = np.random.default_rng(1).permutation(64 * 1024)
    for start in range(0, 64 * 1024, 4096):
        assert float(store.take(torch.as_tensor(order[start:start + 4096])).sum()) == 4096 * 256
    assert _rss_file_kib() - before < 8 * 1024  # an eighth of what was read, at most


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def _tabular_rows(n):
    rng = np.random.default_rng(n)
    return pd.DataFrame({"id": np.arange(n), "price": rng.normal(10, 3, n), "colour": rng.choice(["red", "blue", "green"], n),
                         "size": np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 5, n)), "label": rng.choice(["a", "b"], n)})


def _tabular_fit_peak(df):
    from mmtune.data.datamodule import _Rows
    from mmtune.encoders.tabular import TabularProcessor

    spec = ManifestSpec.simple({"tabular": ["price", "colour", "size"]}, "label", "id")
    ds = MultimodalDataset(df, spec, None, with_labels=False)
    proc = TabularProcessor(["price", "colour", "size"])
    tracemalloc.start()
    try:
        proc.fit(_Rows(ds, ["tabular"]))
        return proc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tabular_inputs_are_fitted_in_passes_over_chunks_with_the_same_statistics(monkeypatch):
    """A tabular encoder's types, statistics and vocabularies come from passes over the training rows read a chunk
    at a time — equal to numpy's mean and standard deviation and to a fit on a list of the rows — and the fit's
    memory does not grow with the rows (4x the rows: under 4 bytes more per added row)."""
    import mmtune.data.dataset
    from mmtune.encoders.tabular import TabularProcessor

    monkeypatch.setattr(mmtune.data.dataset, "CHUNK_ROWS", 8192)  # both sizes many chunks long
    df = _tabular_rows(40_000)
    proc, small = _tabular_fit_peak(df)
    assert proc.types == {"price": "numeric", "colour": "categorical", "size": "numeric"}
    assert proc.stats["price"] == pytest.approx([df["price"].mean(), df["price"].std(ddof=1)], rel=1e-12)
    assert proc.stats["size"] == pytest.approx([df["size"].mean(), df["size"].std(ddof=1)], rel=1e-12)  # NaN left out
    assert proc.vocab["colour"] == ["blue", "green", "red"]
    listed = TabularProcessor(["price", "colour", "size"])
    listed.fit(iter(df[["price", "colour", "size"]].to_dict("records")))  # a one-shot iterator is read into a list
    assert (listed.types, listed.stats, listed.vocab) == (proc.types, proc.stats, proc.vocab)
    _, large = _tabular_fit_peak(_tabular_rows(160_000))
    assert (large - small) / 120_000 < 4, (small, large)
