"""Reshaping a model to the attention heads and CNN channels a pruned bundle keeps — the half of pruning that reading
a bundle needs (:func:`apply_pruning`), with the structural surgery the pruning command (:mod:`mmtune.prune`) uses to
cut heads and channels. It knows models, not bundles' other files or the command."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

PRUNED = "pruned.json"


class Block:
    """One attention block: the module ``att`` with its query, key and value linears (``qkv`` names), the head
    width, and the output projection ``owner.<out>``. Two layouts: BERT-like (``attention.self.query`` … with
    ``attention_head_size``, ``attention.output.dense``) and the ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``
    one (ViT in recent transformers, with ``head_dim``)."""

    def __init__(self, path, att, qkv, size_attr, owner, out):
        self.path, self.att, self.qkv, self.size_attr, self.owner, self.out = path, att, qkv, size_attr, owner, out

    @property
    def head_dim(self) -> int:
        return int(getattr(self.att, self.size_attr))

    @property
    def heads(self) -> int:
        return getattr(self.att, self.qkv[0]).out_features // self.head_dim

    @property
    def output(self) -> nn.Linear:
        return getattr(self.owner, self.out)


def attention_blocks(module: nn.Module) -> List[Block]:
    """Every attention block of a transformers encoder whose heads can be cut out."""
    out = []
    for path, m in module.named_modules():
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "head_dim"):
            out.append(Block(path, m, ("q_proj", "k_proj", "v_proj"), "head_dim", m, "o_proj"))
            continue
        selfs = [(n, c) for n, c in m.named_children() if all(isinstance(getattr(c, x, None), nn.Linear) for x in ("query", "key", "value"))]
        output = getattr(m, "output", None)
        if len(selfs) == 1 and isinstance(getattr(output, "dense", None), nn.Linear) and hasattr(selfs[0][1], "attention_head_size"):
            name, att = selfs[0]
            out.append(Block(f"{path}.{name}" if path else name, att, ("query", "key", "value"), "attention_head_size", output, "dense"))
    return out


def _keep(block: Block, heads: List[int]) -> None:
    """Keep only ``heads`` (indices) of one attention block, in place."""
    d, att = block.head_dim, block.att
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)
    for name in block.qkv:
        old: nn.Linear = getattr(att, name)
        new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None).to(old.weight)
        with torch.no_grad():
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
        setattr(att, name, new)
    dense = block.output
    new_dense = nn.Linear(len(rows), dense.out_features, bias=dense.bias is not None).to(dense.weight)
    with torch.no_grad():
        new_dense.weight.copy_(dense.weight[:, rows])
        if dense.bias is not None:
            new_dense.bias.copy_(dense.bias)
    setattr(block.owner, block.out, new_dense)
    for attr in ("num_attention_heads", "num_heads"):
        if hasattr(att, attr):
            setattr(att, attr, len(heads))
    if hasattr(att, "all_head_size"):
        att.all_head_size = len(rows)


def _weakest(scores: List[Tuple[float, str, int]], sizes: Dict[str, int], fraction: float, floor) -> Dict[str, set]:
    """Ranked together, the lowest-scoring ``fraction`` of the units (``(score, block, index)``), never leaving a
    block fewer than ``floor(its size)``: ``{block: indices removed}``."""
    n_remove = int(round(fraction * len(scores)))
    removed: Dict[str, set] = {path: set() for path in sizes}
    for _, path, i in sorted(scores):
        if n_remove == 0:
            break
        if sizes[path] - len(removed[path]) > floor(sizes[path]):
            removed[path].add(i)
            n_remove -= 1
    return removed


def prune_heads(model: nn.Module, fraction: float) -> Dict[str, Dict[str, int]]:
    """Remove ``fraction`` of the attention heads of every transformer encoder, lowest norm first (the norm of a
    head's columns of the output projection times that of its value rows). Returns ``{encoder: {block: heads
    kept}}``."""
    kept: Dict[str, Dict[str, int]] = {}
    for name, enc in model.encoders.items():
        blocks = attention_blocks(enc)
        if not blocks:
            continue
        scores = []
        for blk in blocks:
            d = blk.head_dim
            for h in range(blk.heads):
                cols = slice(h * d, (h + 1) * d)
                with torch.no_grad():
                    score = float(blk.output.weight[:, cols].norm() * getattr(blk.att, blk.qkv[2]).weight[cols].norm())
                scores.append((score, blk.path, h))
        removed = _weakest(scores, {blk.path: blk.heads for blk in blocks}, fraction, lambda n: 1)  # a head per layer
        kept[name] = {}
        for blk in blocks:
            heads = [h for h in range(blk.heads) if h not in removed[blk.path]]
            _keep(blk, heads)
            kept[name][blk.path] = len(heads)
    return kept


# ---- channels of inverted-residual CNN blocks (EfficientNet-Lite: expand 1x1, depthwise, project 1x1) ----------

_MBCONV = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv")


def channel_blocks(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, block) for every inverted-residual block whose expanded channels can be cut out: the channels exist
    only inside the block, so its input and output widths stay as they are."""
    return [(path, m) for path, m in module.named_modules()
            if all(isinstance(getattr(m, n, None), (nn.Conv2d, nn.BatchNorm2d)) for n in _MBCONV)]


def _param(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.clone(), requires_grad=old.requires_grad)


def _keep_channels(block: nn.Module, idx: torch.Tensor) -> None:
    """Keep only the expanded channels ``idx`` of one block, in place (the convolution and batch-norm modules keep
    their classes, e.g. the package's same-padding convolution)."""
    n = len(idx)
    expand, depthwise, project = block._expand_conv, block._depthwise_conv, block._project_conv
    with torch.no_grad():
        expand.weight = _param(expand.weight, expand.weight[idx])
        expand.out_channels = n
        depthwise.weight = _param(depthwise.weight, depthwise.weight[idx])
        depthwise.in_channels = depthwise.out_channels = depthwise.groups = n
        project.weight = _param(project.weight, project.weight[:, idx])
        project.in_channels = n
        for conv in (expand, depthwise):
            if conv.bias is not None:
                conv.bias = _param(conv.bias, conv.bias[idx])
        for bn in (block._bn0, block._bn1):
            bn.weight = _param(bn.weight, bn.weight[idx])
            bn.bias = _param(bn.bias, bn.bias[idx])
            bn.running_mean = bn.running_mean[idx].clone()
            bn.running_var = bn.running_var[idx].clone()
            bn.num_features = n


def prune_channels(model: nn.Module, fraction: float) -> Dict[str, Dict[str, int]]:
    """Remove ``fraction`` of the expanded channels of every inverted-residual CNN block, ranked together by
    |batch-norm scale after the depthwise convolution| × the norm of the channel's column of the projection (every
    block keeps at least an eighth of its channels); each removed channel's constant part is folded into the next
    batch norm (:func:`_fold_constant`). Returns ``{encoder: {block: channels kept}}``."""
    kept: Dict[str, Dict[str, int]] = {}
    for name, enc in model.encoders.items():
        blocks = channel_blocks(enc)
        if not blocks:
            continue
        scores = []
        with torch.no_grad():
            for path, b in blocks:
                s = b._bn1.weight.abs() * b._project_conv.weight.flatten(2).norm(dim=(0, 2))
                scores += [(float(v), path, c) for c, v in enumerate(s)]
        size = {path: b._bn1.num_features for path, b in blocks}
        removed = _weakest(scores, size, fraction, lambda n: max(1, n // 8))
        kept[name] = {}
        for path, b in blocks:
            idx = torch.tensor([c for c in range(size[path]) if c not in removed[path]], dtype=torch.long)
            _fold_constant(b, sorted(removed[path]))
            _keep_channels(b, idx)
            kept[name][path] = len(idx)
    return kept


def _fold_constant(block: nn.Module, removed: List[int]) -> None:
    """A channel with a small batch-norm scale outputs about act(its batch-norm shift) whatever the input: fold that
    constant, through the projection, into the following batch norm's running mean, so that cutting the channel
    removes only its varying part."""
    if not removed or not isinstance(getattr(block, "_bn2", None), nn.BatchNorm2d):
        return
    act = getattr(block, "_swish", None) or nn.ReLU6()
    with torch.no_grad():
        const = act(block._bn1.bias[removed].view(1, -1, 1, 1)).view(-1)
        w = block._project_conv.weight[:, removed].flatten(1)  # (out, removed) for a 1x1 projection
        block._bn2.running_mean -= w @ const


def apply_pruning(model: nn.Module, bundle_dir: Path) -> None:
    """Reshape a model built from a bundle's configs to the heads its ``pruned.json`` records (before its weights
    load)."""
    path = Path(bundle_dir) / PRUNED
    if not path.is_file():
        return
    spec = json.loads(path.read_text())
    for name, blocks in spec.get("heads", {}).items():
        enc = model.encoders[name]
        found = {blk.path: blk for blk in attention_blocks(enc)}
        for block, n in blocks.items():
            if block not in found:
                raise ValueError(f"{str(path)!r} names attention block {block!r}, which encoder {name!r} does not have")
            _keep(found[block], list(range(int(n))))
    for name, blocks in spec.get("channels", {}).items():
        found = dict(channel_blocks(model.encoders[name]))
        for block, n in blocks.items():
            if block not in found:
                raise ValueError(f"{str(path)!r} names CNN block {block!r}, which encoder {name!r} does not have")
            _keep_channels(found[block], torch.arange(int(n)))
