"""Smaller models from a bundle: global magnitude pruning, or whole attention heads removed.

Unstructured: the smallest-magnitude weights of every linear and convolution layer (encoders, fusion, heads),
ranked together, set to zero with ``torch.nn.utils.prune`` and made permanent. The tensors keep their shapes:
the bundle compresses better, but dense CPU kernels run no faster.

Structured: whole attention heads of the transformer encoders — each head's query, key and value rows and its
columns of the attention output projection are cut out, the lowest-norm heads first (at least one kept per
layer) — and the expanded channels of inverted-residual CNN blocks (EfficientNet-Lite: the expand convolution's
filters, the depthwise filters, the projection's input columns and their batch norms), the lowest batch-norm
scale first. The tensors really shrink, so the model is smaller and faster. A pruned bundle records the heads
and channels each block keeps (``pruned.json``); :func:`apply_pruning` reshapes a freshly built model the same
way before its weights are loaded, so ``mmtune.load`` reads it like any other bundle.

An optional short fine-tuning (``finetune_epochs``) recovers accuracy; with unstructured pruning the masks stay
in place while it trains, so pruned weights stay zero."""
from __future__ import annotations

import gzip
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

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


def prunable_weights(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """The weights of every linear and convolution layer (embedding tables and norms are left alone)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.numel() > 1]


def prune_unstructured(model: nn.Module, sparsity: float) -> None:
    """Global magnitude pruning with ``torch.nn.utils.prune`` (masks attached; :func:`make_permanent` folds them)."""
    from torch.nn.utils import prune

    prune.global_unstructured(prunable_weights(model), pruning_method=prune.L1Unstructured, amount=float(sparsity))


def make_permanent(model: nn.Module) -> None:
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def sparsity_of(model: nn.Module) -> float:
    ws = [m.weight for m, _ in prunable_weights(model)]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws) / max(total, 1))


def finetune(model, config, tasks, epochs: int, log=print) -> None:
    """A short fine-tuning of every parameter on the run's training split (its config's data), with the run's
    loss and optimizer settings; pruning masks, if attached, keep pruned weights at zero."""
    from .data.datamodule import TableDataModule
    from .finetune import build_strategy
    from .finetune.strategies import STRATEGIES
    from .training.module import build_module

    if config.data.train is None and config.data.align is None:
        raise ValueError("--finetune-epochs needs the run's training data, and its config names none (data.train): "
                         "the run was fitted on tables passed in directly")
    torch.manual_seed(config.trainer.seed)
    data = TableDataModule(config).read()
    strategy = build_strategy(STRATEGIES.get("full").Config())
    for p in model.parameters():
        p.requires_grad_(True)
    data.attach(model, strategy)
    module = build_module(config, model, tasks, strategy, data.class_weights())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr * 0.1,
                            weight_decay=0.0)
    model.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for batch in data.train_dataloader():
            loss = module.objective(module(batch), batch["labels"], batch.get("weights"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss) * len(batch["index"]), n + len(batch["index"])
        log(f"  fine-tuning epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f}")
    model.eval()


def write_pruned(run_dir: Path, out: Path, model, pruned: Dict[str, Any]) -> Path:
    """A copy of the bundle in ``run_dir`` with ``model``'s weights and ``pruned.json``; bundle.json last."""
    from safetensors.torch import save_model

    from .bundle import MARKER, check_bundle, file_manifest
    from .io import atomic_write_dir

    def write(tmp: Path) -> None:
        for f in run_dir.iterdir():
            if f.name in (MARKER, "model.safetensors", "checkpoints", "logs", "export", "explanations", PRUNED) or f.name.startswith("."):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / PRUNED).write_text(json.dumps(pruned, indent=2))
        meta = check_bundle(run_dir)
        if isinstance(meta["files"], dict):  # format 3: the new files' sizes and hashes
            tops = {f.split("/", 1)[0] for f in meta["files"]} | {PRUNED}
            meta["files"] = file_manifest(tmp, sorted(f for f in tops if (tmp / f).exists()))
        else:
            meta["files"] = sorted(set(meta["files"]) | {PRUNED})
        meta["pruned_from"] = str(run_dir.resolve())
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))

    return atomic_write_dir(out, write)


def _latency_ms(pred, row, calls: int = 50) -> float:
    pred.predict_proba(row)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        pred.predict_proba(row)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def prune_run(run_dir, sparsities: List[float], data, structured: bool = False, finetune_epochs: int = 0,
              out_dir=None, log=print) -> List[Dict[str, Any]]:
    """Prune the bundle in ``run_dir`` at each sparsity (a share of the prunable weights, or of the attention heads
    with ``structured``), optionally fine-tune, write a bundle for each (``out_dir/<run>-pruned-<kind>-<s>``,
    default beside the run) and measure it on ``data`` next to the unpruned model: the task's main metric, parameter
    count (and non-zero ones), bundle size (and gzip size), single-row latency. Returns one dict per model."""
    from .data.manifest import absolute_paths, read_table
    from .evaluation.metrics import main_metric
    from .serving.predictor import Predictor

    from .io import check_output

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir.parent
    kind = "structured" if structured else "weights"
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ValueError(f"--sparsity {s}: each value must lie strictly between 0 and 1")
    if not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is not a folder")
    for s in sparsities:  # each pruned bundle replaces only an earlier pruned bundle of its name
        check_output(out_dir / f"{run_dir.name}-pruned-{kind}-{s:g}", inputs={"run bundle": [run_dir]}, kind="folder",
                     replaces=PRUNED)
    df, base = read_table(data)
    absolute_paths(df, Predictor.load(run_dir, ensemble=False).config, base)

    def measure(pred, name, folder: Path, sparsity) -> Dict[str, Any]:
        task = pred.tasks[0]
        m = pred.evaluate(df)[task.name]
        weights = folder / "model.safetensors"
        raw = weights.read_bytes()
        params = sum(p.numel() for p in pred.model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in pred.model.parameters())
        pred.predict_proba(df.head(32))
        t = time.perf_counter()
        pred.predict_proba(df)
        rows_per_s = len(df) / (time.perf_counter() - t)
        return {"model": name, "sparsity": sparsity, "metric": main_metric(task), "value": float(m[main_metric(task)]),
                "parameters": params, "nonzero": nonzero, "bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6)),
                "p50_ms": _latency_ms(pred, df.head(1)), "rows_per_s": rows_per_s, "bundle": str(folder)}

    base_pred = Predictor.load(run_dir, ensemble=False)
    results = [measure(base_pred, "unpruned", run_dir, 0.0)]
    for s in sparsities:
        pred = Predictor.load(run_dir, ensemble=False)
        model = pred.model
        pruned: Dict[str, Any] = {"kind": kind, "sparsity": s}
        if structured:
            pruned["heads"], pruned["channels"] = prune_heads(model, s), prune_channels(model, s)
            if not pruned["heads"] and not pruned["channels"]:
                raise ValueError("--structured: the model has no transformer encoder with attention heads and no "
                                 "inverted-residual CNN (EfficientNet-Lite) whose channels could be removed")
        else:
            prune_unstructured(model, s)
        if finetune_epochs:
            log(f"sparsity {s}: fine-tuning {finetune_epochs} epoch(s)")
            finetune(model, pred.config, pred.tasks, finetune_epochs, log)
        make_permanent(model)
        pruned["weight_sparsity"] = sparsity_of(model)
        folder = write_pruned(run_dir, out_dir / f"{run_dir.name}-pruned-{kind}-{s:g}", model, pruned)
        in_memory = Predictor(model, pred.config, pred.tasks, pred.calibration, folder)
        reloaded = Predictor.load(folder, ensemble=False)
        row = measure(reloaded, f"{kind} {s:g}", folder, s)
        a = in_memory.predict_proba(df.head(16), calibrated=False)
        b = reloaded.predict_proba(df.head(16), calibrated=False)
        row["reload_max_abs_diff"] = float((a.select_dtypes("number") - b.select_dtypes("number")).abs().to_numpy().max())
        results.append(row)
    log(table(results))
    return results


def table(results: List[Dict[str, Any]]) -> str:
    base = results[0]
    lines = [f"{'model':16} {base['metric']:>9} {'change':>8} {'params':>11} {'non-zero':>11} {'MB':>7} {'gzip MB':>8} "
             f"{'p50 ms':>7} {'rows/s':>7}"]
    for r in results:
        lines.append(f"{r['model']:16} {r['value']:9.4f} {r['value'] - base['value']:+8.4f} {r['parameters']:11d} "
                     f"{r['nonzero']:11d} {r['bytes'] / 2**20:7.1f} {r['gzip_bytes'] / 2**20:8.1f} {r['p50_ms']:7.1f} "
                     f"{r['rows_per_s']:7.1f}")
    return "\n".join(lines)
