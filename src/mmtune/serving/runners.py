"""What the Predictor runs collated batches on: the PyTorch model, or its ONNX export on onnxruntime.

A runner answers three questions about a collated batch (``{"inputs", "present", ...}``): the
probabilities per task (before calibration), the fused vector the heads read, and an encoder's pooled
output. Both runners give the same numbers (checked at export time); everything else in the Predictor —
validation, processors, calibration, decisions — is shared."""
from __future__ import annotations

import collections
import itertools
import operator
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
"""Backend name -> the file of an export bundle it runs."""
BACKENDS = ("torch", *ONNX_FILES)
EXPORT_MARKER = "export.json"
"""The file an export bundle (:mod:`mmtune.serving.export`) writes last."""
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]
"""onnxruntime graph rewrites left out: its fused SkipLayerNormalization ran slower on CPU than the Add and
LayerNormalization it replaces (the demo bundle's transformer text encoder: 13 % of the int8 model's time, 4 % of
fp32's; docs/guides/deploy.md)."""
READABLE_EXPORT_FORMATS = (1, 2)
"""1: no list of files; 2: ``files`` with each file's size and SHA-256, checked when the export is loaded."""


class TorchRunner:
    """The model itself, on ``device``."""

    name = "torch"

    def __init__(self, model, device: torch.device):
        self.model = model.eval()
        self.device = device
        self.model.to(device)
        self.output_modality: Dict[str, str] = dict(model.output_modality)

    def proba(self, tasks, batches) -> Dict[str, np.ndarray]:
        from ..inference import predict_proba_batches

        return predict_proba_batches(self.model, tasks, batches, self.device)

    @torch.inference_mode()
    def vectors(self, batch: Dict[str, Any], kind: str) -> np.ndarray:
        from ..inference import move

        batch = move(batch, self.device)
        outputs = self.model.encode(batch["inputs"])
        if kind == "fused":
            return self.model.fuse(outputs, batch["present"]).float().cpu().numpy()
        return outputs[kind].pooled.float().cpu().numpy()


def input_layout(batch: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(encoder name, tensor name) of every model input tensor of a collated batch, in a fixed order."""
    return [(e, k) for e in sorted(batch["inputs"]) for k in sorted(batch["inputs"][e])]


def graph_feed(batch: Dict[str, Any], wanted: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """The ONNX graph's inputs from a collated batch: ``<encoder>/<tensor>`` and ``present/<field>``."""
    feed = {f"{e}/{k}": batch["inputs"][e][k].numpy() for e, k in input_layout(batch)}
    feed.update({f"present/{m}": v.numpy() for m, v in batch["present"].items()})
    return feed if wanted is None else {n: feed[n] for n in wanted}


class OnnxRunner:
    """An export bundle's graph on onnxruntime (CPU, or CUDA when asked and available). Outputs:
    ``proba/<task>``, ``fused`` and ``pooled/<key>`` for every encoder output key.

    On a CPU with several threads, a call with one batch runs it on all of them (onnxruntime's threads inside each
    operator), and a call with several batches runs as many whole batches at once, each on one thread of a second
    session made for it (built at the first such call; it holds its own copy of the weights): the operators of the
    demo's image and text encoders are too small to keep two threads busy, and a batch per core ran a table
    6-14 % faster (docs/guides/deploy.md). Each batch is run whole either way, so the numbers are the same: dynamic
    int8 measures each batch's activations, and splitting a batch would change them."""

    def __init__(self, path: Path, output_modality: Mapping[str, str], device: torch.device, threads: Optional[int] = None):
        from ..extras import require

        self._ort = require("onnxruntime", "onnx", "running an ONNX export")
        self.threads = int(threads or torch.get_num_threads() or os.cpu_count() or 1)
        self.name = "onnx"
        self.path = Path(path)
        self.device = device
        self.session = self._session(self.threads)
        self._lanes = None  # (one-thread session, pool): made at the first call with several batches
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output_modality = dict(output_modality)

    def _session(self, threads: int):
        ort = self._ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        # Idle compute threads sleep instead of spinning: the input path (decoding, tokenising) runs on the same
        # cores between and beside model calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError(f"device {self.device} asked for, but this onnxruntime has no CUDA provider "
                                 f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        try:
            return ort.InferenceSession(str(self.path), opts, providers=providers, disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as exc:  # onnxruntime raises its own types for a missing, truncated or damaged graph
            from ..bundle import DamagedBundleError

            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DamagedBundleError(f"{str(self.path)!r} cannot be loaded as an ONNX model ({reason}): the file (or "
                                     "its model.onnx.data) is damaged; export again") from None

    def _run(self, names: List[str], batch: Dict[str, Any], session=None) -> List[np.ndarray]:
        return (session or self.session).run(names, graph_feed(batch, self.inputs))

    def _runs(self, names: List[str], batches) -> Iterator[List[np.ndarray]]:
        """Each batch's outputs, in order: a lone batch on the session's threads; several, up to ``threads`` whole
        batches at once on the one-thread session (CPU). The first batch starts as soon as it is collated when
        ``batches`` says that more follow (``operator.length_hint``: the Predictor's batches do), and one batch waits
        beyond those running, so that a session that ends before the oldest running batch has the next at once."""
        known = operator.length_hint(batches, 0)
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        lanes = self.threads >= 2 and self.device.type == "cpu"
        if not (lanes and known > 1):
            second = next(batches, None)
            if second is None or not lanes:
                yield self._run(names, first)
                for batch in ([] if second is None else itertools.chain([second], batches)):
                    yield self._run(names, batch)
                return
            batches = itertools.chain([second], batches)
        if self._lanes is None:
            from concurrent.futures import ThreadPoolExecutor

            self._lanes = (self._session(1), ThreadPoolExecutor(self.threads, thread_name_prefix="mmtune-onnx"))
        session, pool = self._lanes
        pending: collections.deque = collections.deque([pool.submit(self._run, names, first, session)])
        for batch in batches:
            pending.append(pool.submit(self._run, names, batch, session))
            if len(pending) > self.threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def proba(self, tasks, batches) -> Dict[str, np.ndarray]:
        names = [f"proba/{t.name}" for t in tasks]
        out: Dict[str, list] = {t.name: [] for t in tasks}
        for arrays in self._runs(names, batches):
            for t, arr in zip(tasks, arrays):
                out[t.name].append(arr)
        return {t.name: (np.concatenate(out[t.name]) if out[t.name] else np.zeros((0, t.outputs), np.float32))
                for t in tasks}

    def vectors(self, batch: Dict[str, Any], kind: str) -> np.ndarray:
        return self._run(["fused" if kind == "fused" else f"pooled/{kind}"], batch)[0]


def read_export(folder: Path) -> Dict[str, Any]:
    """export.json of an export bundle, after checking its format and every file it lists (sizes, hashes)."""
    from ..bundle import DamagedBundleError, read_json_file, verify_files

    folder = Path(folder)
    what = f"export bundle {str(folder)!r}"
    meta = read_json_file(folder / EXPORT_MARKER, what)
    if not isinstance(meta, dict):
        raise DamagedBundleError(f"{str(folder / EXPORT_MARKER)!r} is damaged (not a JSON object); export again")
    if meta.get("format") not in READABLE_EXPORT_FORMATS:
        raise ValueError(f"{what} has format version {meta.get('format')!r}; this mmtune reads export format "
                         f"{', '.join(map(str, READABLE_EXPORT_FORMATS))}. Export it again with this version.")
    if meta["format"] >= 2:
        verify_files(folder, meta.get("files"), what)
    for key, kind in (("onnx_files", dict), ("output_modality", dict), ("inputs", list), ("outputs", list)):
        if not isinstance(meta.get(key), kind):
            raise DamagedBundleError(f"{str(folder / EXPORT_MARKER)!r} is damaged ({key!r} missing or not a "
                                     f"{kind.__name__}); export again")
    return meta
