"""Options for long runs and large encoders: gradient checkpointing and torch.compile leave the trained weights
as they are without them; length buckets keep every row once per epoch and cut the padding."""
import numpy as np
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
