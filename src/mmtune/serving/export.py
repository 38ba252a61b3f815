"""Export a run bundle as ONNX (the whole model: encoders, fusion, heads) and, optionally, int8.

The export bundle is a folder the Predictor loads with ``backend="onnx"``: ``model.onnx`` (and
``model.int8.onnx``), the run's config, labels, calibration and encoder folders (processors and
architecture configs, no weights), and ``export.json`` — written last — with the graph's inputs and
outputs, the parity measured at export time on real rows and, for int8, the change in the main metric.
Adapters were merged into the weights when the run finished, so a LoRA run exports like any other."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..bundle import file_manifest
from ..evaluation.metrics import main_metric
from ..inference import probabilities
from .runners import (EXPORT_MARKER, ONNX_FILES, READABLE_EXPORT_FORMATS, OnnxRunner, graph_feed, input_layout,  # noqa: F401
                      read_export)

EXPORT_FORMAT = 2
COPIED = ("config.yaml", "labels.json", "calibration.json", "metrics.json", "encoders", "pruned.json")
"""Files of the run bundle an export bundle carries (everything but the weights and the training logs)."""
SEQUENCE_TENSORS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "input_values"}
"""Input tensors whose second axis is a length that varies from batch to batch."""
PARITY_TOLERANCE = 1e-4
QUANTIZED_OPS = ["MatMul"]
"""What int8 dynamic quantization rewrites: the transformer encoders' (and heads') matrix products by a weight.
(Dynamic ConvInteger is slower than onnxruntime's float convolution on CPU: convolutions go static, below.)"""
CONV_CHAIN_OPS = ("Conv", "Clip", "Relu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool")
"""What static int8 quantizes: every convolution, and the activations, residual sums and pools whose inputs all come
from quantized convolutions — so a block stays int8 from one convolution to the next, with no dequantize/quantize
pair between them (quantizing the convolutions alone made the pairs cost more than the convolutions saved)."""
CONVOLUTIONS = ("static", "float")
"""``convolutions`` of an int8 export: static int8 (calibrated), or left float."""
CALIBRATION_ROWS = 128
"""Rows of the check rows (the validation split by default) that calibrate the static int8 activations."""
INT8_METRIC_TOLERANCE = 0.01
"""The most the main metric may lose with static int8 convolutions on the check rows; beyond it they stay float."""
ATTENTION_OPSET = 23
"""The opset whose Attention operator the exporter writes scaled dot-product attention as (one node instead of a
dozen), when onnxruntime runs it (1.23 and later); older onnxruntime gets the exporter's default opset."""


class ExportError(ValueError):
    """The model could not be exported, or its export does not compute what the model computes."""


class ExportGraph(nn.Module):
    """The model as a function of flat tensors: ``(<encoder>/<tensor> ..., present/<field> ...) ->
    (proba/<task> ..., fused, pooled/<key> ...)``."""

    def __init__(self, model, tasks, layout: List[Tuple[str, str]], fields: List[str]):
        super().__init__()
        self.model, self.tasks, self.layout, self.fields = model, list(tasks), list(layout), list(fields)
        self.keys = sorted(model.output_modality)

    def input_names(self) -> List[str]:
        return [f"{e}/{k}" for e, k in self.layout] + [f"present/{m}" for m in self.fields]

    def output_names(self) -> List[str]:
        return [f"proba/{t.name}" for t in self.tasks] + ["fused"] + [f"pooled/{k}" for k in self.keys]

    def forward(self, *tensors):
        n = len(self.layout)
        inputs: Dict[str, Dict[str, torch.Tensor]] = {}
        for (enc, key), t in zip(self.layout, tensors[:n]):
            inputs.setdefault(enc, {})[key] = t
        outputs = self.model.encode(inputs)
        fused = self.model.fuse(outputs, dict(zip(self.fields, tensors[n:])))
        probs = [probabilities(t, self.model.heads[t.name](fused)) for t in self.tasks]
        return (*probs, fused, *[outputs[k].pooled for k in self.keys])


@dataclass
class ExportReport:
    folder: Path
    exporter: str
    rows_checked: int
    max_abs_prob_diff: float
    seconds: float
    int8: Optional[Dict[str, Any]] = None
    metrics: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"exporter": self.exporter, "rows_checked": self.rows_checked,
                "max_abs_prob_diff": self.max_abs_prob_diff, "seconds": round(self.seconds, 2),
                "int8": self.int8, "metrics": self.metrics}


def _sample_batch(predictor, ds):
    """A collated batch whose size differs from every other axis of its tensors (so that the exporter cannot
    mistake the batch axis for another one of the same length)."""
    for size in (7, 11, 13, 17, 19, 23):
        rows = [ds[i % len(ds)] for i in range(size)]
        batch = predictor.collator(rows)
        others = {d for e, k in input_layout(batch) for d in batch["inputs"][e][k].shape[1:]}
        if size not in others:
            return batch
    raise ExportError("could not build a sample batch whose size differs from the model's input lengths")


def _export_graph(graph: ExportGraph, batch, path: Path) -> str:
    """Write ``graph`` to ``path`` with a dynamic batch axis and dynamic sequence axes; returns the exporter used
    (torch.export, or the TorchScript-based exporter when torch.export cannot trace the model)."""
    import warnings

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes about optional torchvision ops
    args = tuple(batch["inputs"][e][k] for e, k in graph.layout) + tuple(batch["present"][m] for m in graph.fields)
    names = graph.input_names()
    seq = [k.split("::")[-1] in SEQUENCE_TENSORS and t.dim() > 1 for (e, k), t in zip(graph.layout, args)]
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from ..extras import require

            require("onnxscript", "onnx", "ONNX export")
            b = torch.export.Dim("batch", min=1, max=65536)
            shapes = tuple({0: b, 1: torch.export.Dim.AUTO} if s else {0: b} for s in seq) + tuple({0: b} for _ in graph.fields)
            dynamo_export(graph, args, path, names, graph.output_names(), (shapes,))
            return "torch.export"
        except Exception as exc:  # any tracing failure: try the other exporter before giving up
            errors.append(f"torch.export: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        try:
            axes = {n: ({0: "batch", 1: f"length_{i}"} if i < len(seq) and seq[i] else {0: "batch"})
                    for i, n in enumerate(names)}
            torch.onnx.export(graph, args, str(path), input_names=names, output_names=graph.output_names(),
                              dynamic_axes=axes, dynamo=False, opset_version=17)
            return "torchscript"
        except Exception as exc:
            errors.append(f"torchscript: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    raise ExportError("the model could not be exported to ONNX (" + "; ".join(errors) + ")")


def dynamo_export(module: nn.Module, args: Tuple[torch.Tensor, ...], path: Path, input_names: List[str],
                  output_names: List[str], dynamic_shapes) -> Optional[int]:
    """``module`` written to ``path`` by torch.export, at :data:`ATTENTION_OPSET` where onnxruntime runs it, with
    the attention heads folded (:func:`fold_attention_heads`). A graph with Attention nodes must run on ``args`` in
    onnxruntime, or it is written again at the exporter's default opset, where attention is plain matrix products
    (onnxruntime's Attention refuses some masks the exporter writes: one broadcast over the queries). Returns the
    opset asked for (None: the exporter's default)."""
    opset = _opset()
    for ask in ([opset, {}] if opset else [{}]):
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, dynamo=True, optimize=True, verbose=False, **ask)
        if not ask:
            return None
        fold_attention_heads(path)
        if _runs_on_onnxruntime(path, dict(zip(input_names, args))):
            return ask["opset_version"]
    return None


def _runs_on_onnxruntime(path: Path, tensors: Dict[str, torch.Tensor]) -> bool:
    """Whether the graph at ``path`` runs on CPU onnxruntime on ``tensors`` (a graph without Attention nodes is taken
    to: the export's parity check runs it next)."""
    import onnx
    import onnxruntime as ort

    if not any(n.op_type == "Attention" for n in onnx.load(str(path), load_external_data=False).graph.node):
        return True
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {i.name: tensors[i.name].detach().cpu().numpy() for i in session.get_inputs()})
        return True
    except Exception:  # onnxruntime's errors have no common class; any failure means: not this opset
        return False


def _opset() -> Dict[str, int]:
    """``opset_version`` for the exporter where onnxruntime runs :data:`ATTENTION_OPSET` (else the default)."""
    import onnxruntime

    try:
        major, minor = (int(x) for x in onnxruntime.__version__.split(".")[:2])
    except ValueError:
        return {}
    return {"opset_version": ATTENTION_OPSET} if (major, minor) >= (1, 23) else {}


def fold_attention_heads(model_path: Path) -> int:
    """Rewrite, in place, each opset-23 ``Attention`` node fed by ``Reshape -> Transpose(0, 2, 1, 3)`` per input
    and read through ``Transpose(0, 2, 1, 3) -> Reshape`` into the operator's 3-D form (``q_num_heads`` and
    ``kv_num_heads`` set, the heads split inside the kernel): four transposes per attention layer fewer, the same
    numbers. A node the pattern does not fit exactly (past key/values, a head count the graph's shapes do not give,
    a tensor read elsewhere too, a mask broadcast over the queries, which onnxruntime's Attention refuses) is left as
    it is. Returns the number of nodes rewritten; the file is only written when there is one."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    position = {id(n): k for k, n in enumerate(nodes)}
    producer = {o: n for n in nodes for o in n.output}
    readers: Dict[str, List[Any]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for o in graph.output:
        readers.setdefault(o.name, []).append(None)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in graph.value_info if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}

    def heads_swap(node) -> bool:
        return (node is not None and node.op_type == "Transpose"
                and [list(a.ints) for a in node.attribute if a.name == "perm"] == [[0, 2, 1, 3]])

    def only_reader(name: str):
        got = readers.get(name, [])
        return got[0] if len(got) == 1 else None

    dropped, rewritten = set(), 0
    for att in nodes:
        if att.op_type != "Attention" or att.domain not in ("", "ai.onnx") or len(att.input) < 3 or len(att.input) > 4 \
                or len([o for o in att.output if o]) != 1 or any(a.name.endswith("num_heads") for a in att.attribute):
            continue
        sources, heads, drop = [], [], []
        for name in att.input[:3]:
            swap = producer.get(name)
            split = producer.get(swap.input[0]) if heads_swap(swap) else None
            dims, whole = shapes.get(name, []), shapes.get(split.input[0] if split is not None else "", [])
            if split is None or split.op_type != "Reshape" or only_reader(name) is not att \
                    or only_reader(swap.input[0]) is not swap or len(dims) != 4 or not isinstance(dims[1], int) \
                    or dims[1] <= 0 or len(whole) != 3 or whole[:2] != [dims[0], dims[2]] \
                    or not (isinstance(dims[3], int) and whole[2] == dims[1] * dims[3]):
                break  # (batch, length, heads x size) split into (batch, heads, length, size), or not this node
            sources.append(split.input[0])
            heads.append(dims[1])
            drop += [swap, split]
        swap = only_reader(att.output[0])
        merge = only_reader(swap.output[0]) if heads_swap(swap) else None
        out, merged = shapes.get(att.output[0], []), shapes.get(merge.output[0] if merge is not None else "", [])
        mask = shapes.get(att.input[3], []) if len(att.input) > 3 and att.input[3] else None
        if len(sources) != 3 or heads[1] != heads[2] or merge is None or merge.op_type != "Reshape" \
                or len(out) != 4 or len(merged) != 3 or merged[:2] != [out[0], out[2]] \
                or not (isinstance(out[3], int) and merged[2] == heads[0] * out[3]) \
                or (mask is not None and (len(mask) < 2 or mask[-2] != out[2])):
            continue  # (onnxruntime's Attention wants a mask with a row per query: it does not broadcast one)
        for k, name in enumerate(sources):
            att.input[k] = name
        att.attribute.extend([helper.make_attribute("q_num_heads", heads[0]),
                              helper.make_attribute("kv_num_heads", heads[1])])
        att.output[0] = merge.output[0]
        dropped.update(position[id(n)] for n in drop + [swap, merge])
        rewritten += 1
    if rewritten:
        def copy(message):
            out = type(message)()
            out.CopyFrom(message)
            return out

        kept = [copy(n) for k, n in enumerate(nodes) if k not in dropped]
        computed = {o for n in kept for o in n.output}
        infos = [copy(v) for v in graph.value_info if v.name in computed]
        del graph.node[:]
        graph.node.extend(kept)
        del graph.value_info[:]
        graph.value_info.extend(infos)
        onnx.save(model, str(model_path))
    return rewritten


def conv_chain(model_path: Path) -> List[str]:
    """The nodes static int8 quantizes (:data:`CONV_CHAIN_OPS`): every Conv, then — in the graph's topological
    order — each activation, sum or pool whose every computed input comes from a node already in the chain."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constant = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    chain: List[str] = []
    produced: set = set()
    for node in graph.node:
        computed = [i for i in node.input if i and i not in constant]
        if node.op_type == "Conv" or (node.op_type in CONV_CHAIN_OPS and computed and all(i in produced for i in computed)):
            chain.append(node.name)
            produced.update(node.output)
    return chain


def _quantize(src: Path, dst: Path, calibration=None) -> None:
    """``dst``: ``src`` with its matrix products int8 (dynamic); with ``calibration`` (an iterable of graph feeds),
    its convolution chains (:func:`conv_chain`) static int8 first, QDQ, per-channel int8 weights and uint8
    activations calibrated on those feeds."""
    from ..extras import require

    require("onnxruntime", "onnx", "int8 quantization")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    import logging
    import warnings

    class _NoAdvice(logging.Filter):  # the quantizer's advice to pre-process, logged on the root logger
        def filter(self, record):
            text = record.getMessage()
            return "pre-processing before quantization" not in text and "model is already quantized" not in text

    root = logging.getLogger()
    quiet = _NoAdvice()
    root.addFilter(quiet)
    mid = dst.with_name(dst.stem + ".static-conv.onnx")
    try:
        if calibration is not None:
            feeds = iter(calibration)

            class Reader(CalibrationDataReader):
                def get_next(self):
                    return next(feeds, None)

            with warnings.catch_warnings():
                # the calibration ranges every tensor of these op types, also the additive attention masks (-inf)
                # outside the chain, whose ranges are never used; numpy's notes on them are noise
                warnings.filterwarnings("ignore", category=RuntimeWarning, module="onnxruntime")
                quantize_static(str(src), str(mid), Reader(), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(CONV_CHAIN_OPS), nodes_to_quantize=conv_chain(src),
                                per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
            src = mid
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS)
    finally:
        root.removeFilter(quiet)
        mid.unlink(missing_ok=True)


def export_onnx(run_dir, out_dir=None, data=None, quantize: Optional[str] = None, log=print,
                ensemble: Optional[bool] = None, convolutions: str = "static") -> ExportReport:
    """Export the bundle in ``run_dir`` to ``out_dir`` (default ``<run_dir>/export``), replacing it only once the
    new export is complete and checked. ``data`` (a manifest or DataFrame; default: the run's validation split,
    rebuilt from its config) are the real rows parity is measured on: the ONNX probabilities must match the
    PyTorch model's within 1e-4, or ExportError is raised and nothing is written. ``quantize="int8"`` also
    writes ``model.int8.onnx`` and measures its change in each task's main metric (labelled rows). A run that
    ships an ensemble (:mod:`mmtune.ensemble`) exports each member the same way — the run's own model in ``out_dir``,
    the others in ``out_dir/ensemble/<member>``, each checked alone — with the ensemble's weights and calibration in
    ``out_dir/ensemble/ensemble.json``, so the ONNX backend loads the ensemble as the torch one does; ``ensemble``
    False exports the run's own model only. ``convolutions`` (int8): ``static`` quantizes the convolution chains
    statically, calibrated on the first :data:`CALIBRATION_ROWS` check rows, and keeps them only if no main metric
    loses more than :data:`INT8_METRIC_TOLERANCE` on the check rows (:func:`_int8`); ``float`` leaves them float."""
    from ..extras import require
    from ..io import atomic_write_dir
    from ..ensemble import shipped_ensemble
    from .predictor import Predictor

    require("onnxruntime", "onnx", "ONNX export")
    require("onnx", "onnx", "ONNX export")
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; valid: int8")
    if convolutions not in CONVOLUTIONS:
        raise ValueError(f"unknown int8 convolutions {convolutions!r}; valid: {', '.join(CONVOLUTIONS)}")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    check_export_folder(out_dir, run_dir)
    started = time.perf_counter()
    from .matching import classifier_only

    pred = classifier_only(Predictor.load(run_dir, ensemble=False), "mmtune export (ONNX)")
    ens = shipped_ensemble(run_dir, ensemble)
    rows, labelled = _rows(pred, data)
    ds = pred.dataset(rows, with_labels=labelled)
    batch = _sample_batch(pred, ds)
    graph = ExportGraph(pred.model, pred.tasks, input_layout(batch), sorted(batch["present"])).eval()
    report: Dict[str, Any] = {}

    def write(tmp: Path) -> None:
        for name in COPIED:
            src = run_dir / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        with torch.no_grad():
            report["exporter"] = _export_graph(graph, batch, tmp / ONNX_FILES["onnx"])
        fp32 = OnnxRunner(tmp / ONNX_FILES["onnx"], pred.model.output_modality, torch.device("cpu"))
        ref = pred.proba_of(ds, None, calibrated=False)
        got = pred.proba_of(ds, None, calibrated=False, runner=fp32)
        diff = max(float(np.abs(ref[t] - got[t]).max()) if len(ref[t]) else 0.0 for t in ref)
        report["diff"] = diff
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"the ONNX model's probabilities differ from the PyTorch model's by up to {diff:.2e} on "
                              f"{len(ds)} rows (tolerance {PARITY_TOLERANCE:g}); not written")
        if labelled:
            report["metrics"] = {"torch": _main_metrics(pred, ds, ref)}
        if quantize == "int8":
            report["int8"] = _int8(pred, ds, ref, labelled, tmp, fp32, convolutions, report.get("metrics", {}))
        rep = ExportReport(out_dir, report["exporter"], len(ds), diff, time.perf_counter() - started,
                           report.get("int8"), report.get("metrics", {}))
        meta = {
            "format": EXPORT_FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source_run": str(run_dir.resolve()),
            "inputs": graph.input_names(),
            "outputs": graph.output_names(),
            "output_modality": dict(pred.model.output_modality),
            "onnx_files": {k: v for k, v in ONNX_FILES.items() if (tmp / v).is_file()},
            "check": rep.to_json(),
        }
        if ens is not None:
            _export_members(ens, tmp, rows, quantize, log, convolutions)
        meta["files"] = file_manifest(tmp, sorted(p.name for p in tmp.iterdir()))
        (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=2))
        report["rep"] = rep

    atomic_write_dir(out_dir, write)
    rep = report["rep"]
    log(f"exported {run_dir} -> {out_dir} ({rep.exporter}); parity on {rep.rows_checked} rows: "
        f"max |Δ prob| {rep.max_abs_prob_diff:.1e}")
    if rep.int8 is not None:
        change = rep.int8.get("metric_change")
        said = "; ".join(f"{t} {k} {v:+.4f}" for t, m in change.items() for k, v in m.items()) if change else "no labels"
        convs = rep.int8["convolutions"] + (f" ({rep.int8['convolutions_note']})" if rep.int8.get("convolutions_note") else "")
        flips = "; ".join(f"{t} {n} of {rep.rows_checked}" for t, n in rep.int8.get("decisions_changed", {}).items())
        log(f"int8: max |Δ prob| {rep.int8['max_abs_prob_diff']:.3f}; change in the main metric: {said}; "
            + (f"decisions changed: {flips}; " if flips else "") + f"convolutions {convs}")
    return rep


def _int8(pred, ds, ref, labelled: bool, tmp: Path, fp32: OnnxRunner, convolutions: str,
          metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``model.int8.onnx`` and measure it on the check rows ``ds`` (``ref``: the model's probabilities). Static
    int8 convolutions need labelled rows (the change in the main metric is their test) and are kept only when no
    task's main metric loses more than :data:`INT8_METRIC_TOLERANCE`; otherwise they stay float, and the entry's
    ``convolutions_note`` says why."""
    src, dst = tmp / ONNX_FILES["onnx"], tmp / ONNX_FILES["onnx-int8"]
    note = None
    has_convs = bool(conv_chain(src))
    static = convolutions == "static" and has_convs
    if static and not labelled:
        static, note = False, "kept float: the check rows have no labels to test static int8 on"
    while True:
        calibration = None
        if static:
            first = np.arange(min(CALIBRATION_ROWS, len(ds)))
            calibration = (graph_feed(b, fp32.inputs) for b in pred.batches(ds, 32, first))
        _quantize(src, dst, calibration)
        q = pred.proba_of(ds, None, calibrated=False, runner=OnnxRunner(dst, pred.model.output_modality, torch.device("cpu")))
        entry: Dict[str, Any] = {"max_abs_prob_diff": max(float(np.abs(ref[t] - q[t]).max()) if len(ref[t]) else 0.0 for t in ref),
                                 "size_bytes": dst.stat().st_size,
                                 "convolutions": "static" if static else "float" if has_convs else "none"}
        changed = {t.name: int((ref[t.name].argmax(1) != q[t.name].argmax(1)).sum()) for t in pred.tasks
                   if not (t.regression or t.multilabel) and len(ref[t.name])}
        if changed:
            entry["decisions_changed"] = changed
        if static:
            entry["calibration_rows"] = min(CALIBRATION_ROWS, len(ds))
        if labelled:
            m8 = _main_metrics(pred, ds, q)
            entry["metric_change"] = {t: {k: m8[t][k] - metrics["torch"][t][k] for k in m8[t]} for t in m8}
            worst = min(v for m in entry["metric_change"].values() for v in m.values())
            if static and worst < -INT8_METRIC_TOLERANCE:
                static, note = False, (f"kept float: static int8 changed the main metric by {worst:+.4f} on "
                                       f"{len(ds)} rows (at most -{INT8_METRIC_TOLERANCE:g} allowed)")
                continue
            metrics["int8"] = m8
        if note:
            entry["convolutions_note"] = note
        return entry


def _export_members(ens: Dict[str, Any], tmp: Path, rows, quantize: Optional[str], log, convolutions: str) -> None:
    """Each ensemble member but the run's own model exported into ``tmp/ensemble/<name>``, and the ensemble's
    description (paths within the export) beside them."""
    from ..ensemble import FOLDER, MARKER

    members = []
    (tmp / FOLDER).mkdir(exist_ok=True)
    for m in ens["members"]:
        if m["path"] == ".":
            members.append({"name": m["name"], "path": ".", "weight": m["weight"]})
            continue
        where = f"{FOLDER}/{m['name']}"
        log(f"ensemble member {m['name']}:")
        export_onnx(m["folder"], tmp / where, data=rows, quantize=quantize, log=log, ensemble=False,
                    convolutions=convolutions)
        members.append({"name": m["name"], "path": where, "weight": m["weight"]})
    out = {k: v for k, v in ens.items() if k not in ("members",)}
    out["members"] = members
    (tmp / FOLDER / MARKER).write_text(json.dumps(out, indent=2, default=str))


def check_export_folder(out_dir: Path, run_dir: Path) -> None:
    """Refuse an export folder whose replacement would lose something: the run itself or a folder holding it, a
    file, or a folder that holds anything but an earlier export bundle (nothing is deleted to find out)."""
    from ..io import check_output

    check_output(out_dir, inputs={"run bundle": [run_dir]}, kind="folder", replaces=EXPORT_MARKER)


def _main_metrics(pred, ds, proba) -> Dict[str, Dict[str, float]]:
    from ..evaluation.metrics import task_metrics

    out = {}
    for t in pred.tasks:
        m = task_metrics(t, ds.labels[t.name], pred.calibration[t.name].probabilities(t, proba[t.name]),
                         calibration=pred.calibration[t.name])
        out[t.name] = {main_metric(t): float(m[main_metric(t)])}
    return out


def _rows(pred, data):
    """The rows to check the export on, and whether they carry labels."""
    from ..data.manifest import absolute_paths, read_table

    if data is None:
        from ..data.datamodule import prepare_data

        cfg = pred.config
        try:
            prepared = prepare_data(cfg.data, cfg.modalities)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"no rows to check the export on: pass --data (the run's own data cannot be read: {exc})") from None
        df, base = prepared.frames["val"], prepared.base_dirs["val"]
        df = df.copy()
        absolute_paths(df, cfg, base)
        return df, True
    df, base = read_table(data)
    df = df.copy()
    absolute_paths(df, pred.config, base)
    labelled = all(t.column in df.columns for t in pred.tasks)
    return df, labelled
