"""Options for long runs and large encoders: gradient checkpointing and torch.compile leave the trained weights
as they are without them; length buckets keep every row once per epoch and cut the padding."""
import numpy as np
import pytest
import torch

import mmtune
from conftest import base_config


def _text_fit(tmp_path, tiny_bert, colour_verdict, name, **trainer):
    enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, data={"columns": {"text": "text"}}, finetune={"type": "full"},
                      trainer={"max_epochs": 2, **trainer}, evaluation={"report": False, "explain": 0,
                                                                       "linear_probe": False})
    cfg["name"] = name
    return mmtune.fit(cfg, train=str(colour_verdict["train"]))


def _same_weights(a, b, atol):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_bert, colour_verdict):
    plain = _text_fit(tmp_path, tiny_bert, colour_verdict, "plain")
    ckpt = _text_fit(tmp_path, tiny_bert, colour_verdict, "ckpt", gradient_checkpointing=True)
    assert ckpt.model.encoders["text"].model.is_gradient_checkpointing
    assert not plain.model.encoders["text"].model.is_gradient_checkpointing
    _same_weights(plain, ckpt, 1e-5)  # dropout included: the recomputation replays the same random state


def test_compiled_training_steps_give_the_same_weights(tmp_path, tiny_bert, colour_verdict):
    plain = _text_fit(tmp_path, tiny_bert, colour_verdict, "plain")
    compiled = _text_fit(tmp_path, tiny_bert, colour_verdict, "compiled", compile="aot_eager")
    _same_weights(plain, compiled, 1e-4)
    assert not any(k.startswith("_orig_mod") for k in compiled.model.state_dict())


def test_length_buckets_see_every_row_once_with_less_padding():
    from mmtune.distributed import LengthBuckets

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 1000).tolist()
    data = list(range(1000))
    batch = 16

    def padding(order):
        batches = [order[i:i + batch] for i in range(0, len(order), batch)]
        return sum(batch * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in batches)

    one = LengthBuckets(data, lengths, batch, seed=3, replicas=(1, 0))
    first = list(one)
    assert sorted(first) == data
    one.set_epoch(1)
    assert list(one) != first and sorted(one) == data  # a new seeded order each epoch
    assert list(LengthBuckets(data, lengths, batch, seed=3, replicas=(1, 0))) == first
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    assert padding(first) < 0.2 * padding(shuffled)
    # two processes: together every row (the shares are even), and each process's batch comes from one pool
    shares = [list(LengthBuckets(data, lengths, batch, seed=3, replicas=(2, r))) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == data and len(shares[0]) == len(shares[1]) == 500
    assert padding(shares[0]) < 0.2 * padding(shuffled[:500])


class PaddingShare:
    """The share of padding in the training batches' attention masks."""

    def __init__(self):
        import lightning as L

        outer = self

        class Hook(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, idx):
                masks = [v for v in _tensors(batch["inputs"], "attention_mask")]
                outer.ones += sum(float(m.sum()) for m in masks)
                outer.cells += sum(m.numel() for m in masks)
                outer.sampler = type(trainer.train_dataloader.sampler).__name__

        self.hook, self.ones, self.cells, self.sampler = Hook(), 0.0, 0, None

    @property
    def share(self):
        return 1 - self.ones / self.cells


def _tensors(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and torch.is_tensor(v):
                yield v
            else:
                yield from _tensors(v, key)


def test_a_fit_with_length_buckets_pads_less(tmp_path, tiny_bert, colour_verdict):
    shares = {}
    for bucket in (False, True):
        enc = {"text": {"modality": "text", "checkpoint": tiny_bert}}
        cfg = base_config(tmp_path, enc, data={"columns": {"text": "text"}, "bucket_by_length": bucket},
                          trainer={"max_epochs": 1}, evaluation={"report": False, "explain": 0, "linear_probe": False})
        cfg["name"] = f"bucket-{bucket}"
        watch = PaddingShare()
        mmtune.fit(cfg, train=str(colour_verdict["train"]), callbacks=[watch.hook])
        shares[bucket] = watch
    assert shares[True].sampler == "LengthBuckets" and shares[False].sampler == "DistributedSampler"
    assert shares[True].cells < shares[False].cells and shares[True].share < 0.5 * shares[False].share


def test_prediction_batches_rows_of_similar_token_counts(tiny_run, colour_verdict):
    """A prediction sorts its rows by the tokens their texts fill (each row's count is the positions it holds in a
    batch of its own), not by their characters: rows of few long words and rows of many short ones are told apart,
    so batches pad little; the results still come back in input order, as each row alone gives them."""
    from pathlib import Path

    import pandas as pd

    pred = mmtune.load(tiny_run.run_dir)
    rows = pd.read_csv(colour_verdict["test"]).head(8)
    rows["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in rows["image"]]
    # 9 tokens in 60 characters, against 14 tokens in 23: by characters the word rows would come first
    rows["text"] = ["perfectly " * 6 if i % 2 else "a b c d e f g h i j k l" for i in range(len(rows))]
    rows.loc[5, "text"] = "excellent"  # 3 tokens
    ds = pred.dataset(rows, with_labels=False)
    name = next(n for n, p in pred.collator.processors.items() if hasattr(p, "tokenizer"))
    alone = [int(pred.collator([ds[i]])["inputs"][name]["attention_mask"].sum()) for i in range(len(ds))]
    lengths = pred.collator.lengths(ds)
    assert lengths.tolist() == alone and sorted(set(alone)) == [3, 8, 14]
    order = pred.length_order(ds)
    assert order.tolist() == [0, 2, 4, 6, 1, 3, 7, 5]  # most tokens first, ties in input order
    batches = list(pred.batches(ds, 4, order))
    assert [int(b["inputs"][name]["attention_mask"].numel()) for b in batches] == [4 * 14, 4 * 8]
    together = pred.predict_proba(rows, batch_size=4, calibrated=False).drop(columns="id", errors="ignore")
    one_by_one = pd.concat([pred.predict_proba(rows.iloc[[i]], calibrated=False) for i in range(len(rows))])
    np.testing.assert_allclose(together.to_numpy(), one_by_one.drop(columns="id", errors="ignore").to_numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokens_kept_from_the_count_pad_to_the_batch_the_tokenizer_makes(tiny_bert, side):
    """TextProcessor.tokens / pad: every batch of any rows (absent texts, truncated ones, repeats) is the tensors the
    tokenizer makes of those texts, the same names, values and dtype, on either padding side; and settings stay."""
    from transformers import AutoTokenizer

    from mmtune.encoders.processors import TextProcessor, Tokens

    text = TextProcessor(AutoTokenizer.from_pretrained(tiny_bert), max_length=7)
    text.tokenizer.padding_side = side
    cells = ["works", None, "", "a b c d e f g h i j", "b a", "c", "a b c"]
    backend = text.tokenizer.backend_tokenizer
    text({"text": ["a b c"]})
    settings = (backend.padding, backend.truncation)
    whole = text.tokens({"text": cells})
    parts = Tokens.concat([text.tokens({"text": cells[:3]}), text.tokens({"text": cells[3:]})])  # chunk by chunk
    assert whole.lengths.tolist() == parts.lengths.tolist() == text.lengths({"text": cells}).tolist() == [3, 2, 2, 7, 4, 3, 5]
    assert (backend.padding, backend.truncation) == settings
    rng = np.random.default_rng(0)
    for kept in (whole, parts):
        for rows in [[3], [1, 2], [0, 3, 3, 6]] + [rng.choice(len(cells), 4).tolist() for _ in range(10)]:
            got, want = text.pad(kept, rows), text({"text": [cells[r] for r in rows]})
            assert list(got) == list(want) == ["input_ids", "token_type_ids", "attention_mask"]
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (rows, k)
    from mmtune.encoders.fields import FieldProcessor, SharedProcessor

    field = FieldProcessor(text, "text.title")  # a field column's texts: its tokens, padded as its call makes them
    kept = field.tokens({"text.title": cells})
    for k, v in field.pad(kept, [3, 0, 1]).items():
        assert torch.equal(v, field({"text.title": [cells[3], cells[0], cells[1]]})[k])
    shared = SharedProcessor(text, ["text", "text.title"])  # one encoder over two columns: each field's tokens
    columns = {"text": cells, "text.title": cells[::-1]}
    kept = shared.tokens(columns)
    assert kept.lengths.tolist() == shared.lengths(columns).tolist()
    rows = [2, 3, 0]
    got, want = shared.pad(kept, rows), shared({f: [c[r] for r in rows] for f, c in columns.items()})
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    from PIL import Image

    from mmtune.encoders.processors import JointProcessor, ResizeNormalizeProcessor

    joint = JointProcessor({"image": ResizeNormalizeProcessor(8), "text": text})  # a joint encoder (CLIP's)
    pictures = [np.full((5, 6, 3), 40 * i, dtype=np.uint8) for i in range(len(cells))]
    columns = {"image": [Image.fromarray(p) for p in pictures], "text": cells}
    kept = joint.tokens(columns)
    assert kept.lengths.tolist() == joint.lengths(columns).tolist()
    batch = {m: [v[r] for r in rows] for m, v in columns.items()}
    got, want = joint.pad(kept, rows, batch), joint(batch)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert JointProcessor({"image": ResizeNormalizeProcessor(8)}).tokens(columns) is None  # nothing to count


def test_prediction_tokenises_each_text_once_and_predicts_the_same(tiny_run, colour_verdict, monkeypatch):
    """predict_proba keeps the tokens it counted to sort the rows by: the collating step tokenises nothing, and the
    probabilities are those of tokenising every batch again (a table over KEEP_TOKENS_ROWS does)."""
    from pathlib import Path

    import pandas as pd

    import mmtune.serving.predictor as predictor
    from mmtune.encoders.processors import TextProcessor

    rows = pd.read_csv(colour_verdict["test"]).head(30)
    rows["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in rows["image"]]
    pred = mmtune.load(tiny_run.run_dir)
    calls = []
    real = TextProcessor.__call__
    monkeypatch.setattr(TextProcessor, "__call__", lambda self, columns: (calls.append(1), real(self, columns))[1])
    for workers in (1, 2):
        pred.workers = workers
        calls.clear()
        once = pred.predict_proba(rows, batch_size=8)
        assert calls == []  # each text tokenised once, when counted
        monkeypatch.setattr(predictor, "KEEP_TOKENS_ROWS", 0)
        twice = pred.predict_proba(rows, batch_size=8)
        monkeypatch.setattr(predictor, "KEEP_TOKENS_ROWS", 200_000)
        assert len(calls) == 4  # the four batches tokenised again
        pd.testing.assert_frame_equal(once, twice, check_exact=True)


def test_a_joint_processor_counts_the_tokens_of_its_text_part(tiny_bert):
    from transformers import AutoTokenizer

    from mmtune.data.collate import Collator
    from mmtune.encoders.processors import JointProcessor, ResizeNormalizeProcessor, TextProcessor

    text = TextProcessor(AutoTokenizer.from_pretrained(tiny_bert), max_length=6)
    joint = JointProcessor({"image": ResizeNormalizeProcessor(8), "text": text})
    cells = {"image": [None, None, None], "text": ["works", "a b c d e f g h", None]}
    backend = text.tokenizer.backend_tokenizer
    text({"text": ["a b c"]})
    settings = (backend.padding, backend.truncation)
    assert text.lengths(cells).tolist() == [3, 6, 2]  # truncated to max_length; an absent text is the empty one's
    # the tokenizer's padding and truncation as a batch left them: counting never changes them under another
    # thread's batch (a fast tokenizer raises "Already borrowed" when they change during its call)
    assert (backend.padding, backend.truncation) == settings
    assert joint.lengths(cells).tolist() == [3, 6, 2]
    assert JointProcessor({"image": ResizeNormalizeProcessor(8)}).lengths(cells) is None
    assert Collator({"image": ResizeNormalizeProcessor(8)}, ["image"]).lengths([1, 2]) is None


def test_images_resized_on_the_decoding_threads_give_the_same_batch():
    """Prediction's decoding threads resize each image ahead of the collating thread (Collator.prepare): the batch
    is the same tensor as when the processor resizes them itself; training's value augments, and an ensemble that
    hands the decoded samples to other processors, get the images as decoded."""
    from PIL import Image

    from mmtune.data.collate import Collator
    from mmtune.encoders.processors import JointProcessor, ResizeNormalizeProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 30), (12, 12), (9, 50))]

    def samples():
        return [{"values": {"image": im}, "labels": {}, "index": i} for i, im in enumerate(images + [None])]

    for proc in (ResizeNormalizeProcessor(12), JointProcessor({"image": ResizeNormalizeProcessor(12)})):
        collator = Collator({"image": proc}, ["image"])
        prepared = collator.prepare(samples())
        assert [s["values"]["image"] and s["values"]["image"].size for s in prepared] == [(12, 12)] * 3 + [None]
        assert prepared[1]["values"]["image"] is images[1]  # already the side: not copied
        torch.testing.assert_close(collator(prepared)["inputs"]["image"]["pixel_values"],
                                   collator(samples())["inputs"]["image"]["pixel_values"], rtol=0, atol=0)
    # a Hugging Face processor that resizes to a height and width: its own resize then has nothing left to do
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from mmtune.encoders.processors import HFImageProcessor

    for hf, size in ((HFImageProcessor(ViTImageProcessor(size={"height": 12, "width": 10})), (10, 12)),
                     (HFImageProcessor(ViTImageProcessor(), image_size=16), (16, 16))):
        collator = Collator({"image": hf}, ["image"])
        prepared = collator.prepare(samples())
        assert [s["values"]["image"] and s["values"]["image"].size for s in prepared] == [size] * 3 + [None]
        torch.testing.assert_close(collator(prepared)["inputs"]["image"]["pixel_values"],
                                   collator(samples())["inputs"]["image"]["pixel_values"], rtol=0, atol=0)
    # one that resizes the shortest edge with transformers' own resize (CLIP's), before its centre crop: the sizes
    # it computes, each image upscaled or downscaled, and one already the side left as it is
    from transformers import CLIPImageProcessor

    clip = HFImageProcessor(CLIPImageProcessor(size={"shortest_edge": 12}, crop_size={"height": 10, "width": 10}))
    collator = Collator({"image": clip}, ["image"])
    prepared = collator.prepare(samples())
    assert [s["values"]["image"] and s["values"]["image"].size for s in prepared] == [(12, 16), (12, 12), (66, 12), None]
    assert prepared[1]["values"]["image"] is images[1]
    torch.testing.assert_close(collator(prepared)["inputs"]["image"]["pixel_values"],
                               collator(samples())["inputs"]["image"]["pixel_values"], rtol=0, atol=0)
    # ConvNeXt's own resize (a crop_pct enlargement, then a crop) is left to it
    shortest = HFImageProcessor(ConvNextImageProcessor(size={"shortest_edge": 12}, crop_pct=0.875))
    assert shortest.prepare({"image": images})["image"] == images
    bounded = HFImageProcessor(CLIPImageProcessor(size={"shortest_edge": 12, "longest_edge": 20}))
    assert bounded.prepare({"image": images})["image"] == images  # a longest-edge bound too: left to it
    # one column, two encoders at two sides: each resizes the image as decoded, so neither resizes it ahead
    two = Collator({"a": ResizeNormalizeProcessor(12), "b": ResizeNormalizeProcessor(20)}, ["image"])
    assert [s["values"]["image"] for s in two.prepare(samples())] == images + [None]
    augmented = Collator({"image": ResizeNormalizeProcessor(12)}, ["image"], {"image": lambda im: im})
    assert [s["values"]["image"] for s in augmented.prepare(samples())] == images + [None]
    kept = Collator({"image": ResizeNormalizeProcessor(12)}, ["image"], keep_samples=True)
    assert [s["values"]["image"] for s in kept.prepare(samples())] == images + [None]


def test_a_batch_is_split_across_the_decoding_threads_only_when_its_rows_read_slowly(tiny_run, colour_verdict,
                                                                                     monkeypatch):
    """The first batch is read on the decoding threads (the model starts sooner); each next one there only when the
    rows of the one before took longer than SPLIT_READ_S each to read, else whole on the collating thread. The
    batches are the same either way."""
    import threading
    from pathlib import Path

    import pandas as pd

    import mmtune.serving.predictor as predictor

    rows = pd.read_csv(colour_verdict["test"]).head(40)
    rows["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in rows["image"]]
    pred = mmtune.load(tiny_run.run_dir)
    pred.workers = 2
    ds = pred.dataset(rows, with_labels=False)
    read, seen = ds.__getitems__, []
    ds.__getitems__ = lambda part: (seen.append((len(part), threading.current_thread().name)), read(part))[1]
    got = {}
    for limit in (0.0, float("inf")):
        monkeypatch.setattr(predictor, "SPLIT_READ_S", limit)
        seen.clear()
        got[limit] = list(pred.batches(ds, 10))
        where = [name.split("_")[0] for _, name in seen]
        if limit == 0.0:  # every row slower than the limit: every batch in two parts, on the decoding threads
            assert [n for n, _ in seen] == [5] * 8 and set(where) == {"mmtune-decode"}
        else:
            assert [n for n, _ in seen] == [5, 5, 10, 10, 10] and where == ["mmtune-decode"] * 2 + ["mmtune-collate"] * 3
    for a, b in zip(got[0.0], got[float("inf")]):
        torch.testing.assert_close(a["inputs"], b["inputs"], rtol=0, atol=0)


def test_batches_with_a_modality_hidden_still_say_how_many_follow(tiny_run, colour_verdict):
    """The disagreement check and the modality contribution hide a modality through the present-mask; their batches
    still tell the runner how many follow, so that side-by-side ONNX batches start at once."""
    import operator

    import pandas as pd

    rows = pd.read_csv(colour_verdict["test"]).head(20)
    rows["image"] = [str(colour_verdict["test"].parent / p) for p in rows["image"]]
    pred = mmtune.load(tiny_run.run_dir)
    real, seen = pred.runner.proba, []

    def proba(tasks, batches):
        seen.append(operator.length_hint(batches))
        got = list(batches)
        assert all(not b["present"]["image"].any() for b in got)
        return real(tasks, got)

    pred.runner.proba = proba
    pred.proba_of(pred.dataset(rows, with_labels=False), 4, hidden=["image"])
    assert seen == [5]
