"""Pruning: the sparsity asked for, heads really removed, pruned bundles that reload to the same predictions, masks
that hold through fine-tuning."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mmtune
from conftest import base_config
from mmtune.cli import main as cli
from mmtune.prune import attention_blocks, prunable_weights, prune_heads, prune_run, sparsity_of


@pytest.fixture
def run(tiny_run):
    """The session's tiny trained image+text run (read, never changed: every pruned copy is written elsewhere)."""
    return tiny_run


def _rows(colour_verdict):
    df = pd.read_csv(colour_verdict["test"])
    df["image"] = [str(Path(colour_verdict["test"]).parent / p) for p in df["image"]]
    return df


def test_unstructured_pruning_reaches_the_sparsity_and_reloads(run, colour_verdict, tmp_path):
    results = prune_run(run.run_dir, [0.3, 0.7], str(colour_verdict["test"]), out_dir=tmp_path, log=lambda *_: None)
    assert [r["model"] for r in results] == ["unpruned", "weights 0.3", "weights 0.7"]
    for r, s in zip(results[1:], (0.3, 0.7)):
        reloaded = mmtune.load(r["bundle"])
        assert abs(sparsity_of(reloaded.model) - s) < 0.01  # global: the share over every prunable weight
        assert r["reload_max_abs_diff"] <= 1e-6  # the bundle predicts what the pruned model in memory predicted
        assert r["parameters"] == results[0]["parameters"] and r["nonzero"] < results[0]["nonzero"]
        assert r["gzip_bytes"] < results[0]["gzip_bytes"]  # zeros compress; dense tensors keep their size
        assert not any("weight_orig" in k or "weight_mask" in k for k in reloaded.model.state_dict())
    # global magnitude: every weight kept is at least as large as every weight removed
    model = mmtune.load(results[2]["bundle"]).model
    original = mmtune.load(run.run_dir).model
    kept, removed = [], []
    for (m, _), (o, _) in zip(prunable_weights(model), prunable_weights(original)):
        kept.append(o.weight[m.weight != 0].abs().flatten())
        removed.append(o.weight[m.weight == 0].abs().flatten())
    assert torch.cat(kept).min() >= torch.cat(removed).max() - 1e-7


def test_structured_pruning_removes_heads(run, colour_verdict, tmp_path):
    before = mmtune.load(run.run_dir).model
    heads_before = {n: sum(b.heads for b in attention_blocks(e)) for n, e in before.encoders.items()}
    results = prune_run(run.run_dir, [0.5], str(colour_verdict["test"]), structured=True, out_dir=tmp_path,
                        log=lambda *_: None)
    reloaded = mmtune.load(results[1]["bundle"])
    heads_after = {n: sum(b.heads for b in attention_blocks(e)) for n, e in reloaded.model.encoders.items()}
    assert heads_before == {"image": 4, "text": 4} and heads_after == {"image": 2, "text": 2}
    assert all(b.heads >= 1 for e in reloaded.model.encoders.values() for b in attention_blocks(e))
    # each head removed: q, k, v rows (3 x (32 x 16 + 16)) and output columns (32 x 16)
    assert results[0]["parameters"] - results[1]["parameters"] == 4 * (3 * (32 * 16 + 16) + 32 * 16)
    assert results[1]["reload_max_abs_diff"] <= 1e-6
    rows = _rows(colour_verdict).head(8)
    assert reloaded.predict_proba(rows).shape == (8, 5)
    from mmtune.serving.export import export_onnx  # a pruned bundle exports like any other

    export_onnx(results[1]["bundle"], tmp_path / "onnx", data=rows, log=lambda *_: None)
    a = mmtune.load(tmp_path / "onnx").predict_proba(rows).drop(columns="id").to_numpy()
    assert np.abs(a - reloaded.predict_proba(rows).drop(columns="id").to_numpy()).max() <= 1e-4


def test_the_removed_heads_are_the_weakest(run):
    model = mmtune.load(run.run_dir).model
    blk = attention_blocks(model.encoders["text"])[0]
    d = blk.head_dim
    scores = [float(blk.output.weight[:, h * d:(h + 1) * d].norm() * blk.att.value.weight[h * d:(h + 1) * d].norm())
              for h in range(blk.heads)]
    kept_out = blk.output.weight.detach().clone()
    prune_heads(model, 0.5)
    strongest = int(np.argmax(scores))
    new = attention_blocks(model.encoders["text"])[0]
    assert new.heads == 1 and torch.equal(new.output.weight, kept_out[:, strongest * d:(strongest + 1) * d])


def test_fine_tuning_keeps_the_pruned_weights_at_zero(run, colour_verdict, tmp_path, capsys):
    assert cli(["prune", "--run", str(run.run_dir), "--sparsity", "0.5", "--finetune-epochs", "1",
                "--data", str(colour_verdict["test"]), "--out", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "fine-tuning epoch 1/1" in said and "weights 0.5" in said
    model = mmtune.load(tmp_path / f"{run.run_dir.name}-pruned-weights-0.5").model
    assert abs(sparsity_of(model) - 0.5) < 0.01
    before = mmtune.load(run.run_dir).model
    changed = [not torch.equal(a.weight, b.weight) for (a, _), (b, _) in zip(prunable_weights(model), prunable_weights(before))]
    assert all(changed)  # fine-tuned (not only masked)
    assert cli(["prune", "--run", str(run.run_dir), "--sparsity", "0.5,1.5", "--data", str(colour_verdict["test"])]) == 2
    assert "--sparsity 1.5: each value must lie strictly between 0 and 1" in capsys.readouterr().err


def test_structured_pruning_removes_cnn_channels(tmp_path, tiny_bert, colour_verdict):
    from mmtune.prune import channel_blocks

    enc = {"image": {"modality": "image", "checkpoint": "efficientnet-lite0", "image_size": 32},
           "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, finetune={"type": "frozen"}, trainer={"max_epochs": 2},
                      evaluation={"explain": 0, "report": False, "linear_probe": False})
    res = mmtune.fit(cfg, train=str(colour_verdict["train"]))
    before = mmtune.load(res.run_dir).model
    channels = sum(b._bn1.num_features for _, b in channel_blocks(before.encoders["image"]))
    results = prune_run(res.run_dir, [0.3], str(colour_verdict["test"]), structured=True, out_dir=tmp_path, log=lambda *_: None)
    after = mmtune.load(results[1]["bundle"])
    blocks = channel_blocks(after.model.encoders["image"])
    assert len(blocks) == 15  # every block but the first (which has no expansion)
    assert sum(b._bn1.num_features for _, b in blocks) == channels - round(0.3 * channels)
    assert all(b._depthwise_conv.groups == b._bn1.num_features == b._project_conv.in_channels for _, b in blocks)
    assert results[1]["parameters"] < results[0]["parameters"] and results[1]["reload_max_abs_diff"] <= 1e-6
    # a channel cut keeps its constant part (folded into the next batch norm): the unpruned model whose cut channels
    # have a zero batch-norm scale — so that each outputs exactly act(its shift) — computes what the pruned one does
    import torch

    x = torch.randn(2, 3, 32, 32)
    full = before.encoders["image"].eval()
    with torch.no_grad():
        for (_, b), (_, small) in zip(channel_blocks(full), blocks):
            kept = {round(v, 7) for v in small._bn1.weight.tolist()}
            removed = [c for c, v in enumerate(b._bn1.weight.tolist()) if round(v, 7) not in kept]
            assert len(removed) == b._bn1.num_features - small._bn1.num_features
            b._bn1.weight[removed] = 0
        a = full(pixel_values=x).pooled
        c = after.model.encoders["image"].eval()(pixel_values=x).pooled
    assert torch.allclose(a, c, atol=1e-5)
