"""What the Predictor runs collated batches on: the PyTorch model, or its ONNX export on onnxruntime.

A runner answers three questions about a collated batch (``{"inputs", "present", ...}``): the
probabilities per task (before calibration), the fused vector the heads read, and an encoder's pooled
output. Both runners give the same numbers (checked at export time); everything else in the Predictor —
validation, processors, calibration, decisions — is shared."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

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
    ``proba/<task>``, ``fused`` and ``pooled/<key>`` for every encoder output key."""

    def __init__(self, path: Path, output_modality: Mapping[str, str], device: torch.device, threads: Optional[int] = None):
        from ..extras import require

        ort = require("onnxruntime", "onnx", "running an ONNX export")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads or torch.get_num_threads() or os.cpu_count() or 1)
        # Idle compute threads sleep instead of spinning: the input path (decoding, tokenising) runs on the same
        # cores between and beside model calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError(f"device {device} asked for, but this onnxruntime has no CUDA provider "
                                 f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.name = "onnx"
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers, disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as exc:  # onnxruntime raises its own types for a missing, truncated or damaged graph
            from ..bundle import DamagedBundleError

            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DamagedBundleError(f"{str(path)!r} cannot be loaded as an ONNX model ({reason}): the file (or its "
                                     "model.onnx.data) is damaged; export again") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output_modality = dict(output_modality)
        self.device = device

    def _run(self, names: List[str], batch: Dict[str, Any]) -> List[np.ndarray]:
        return self.session.run(names, graph_feed(batch, self.inputs))

    def proba(self, tasks, batches) -> Dict[str, np.ndarray]:
        names = [f"proba/{t.name}" for t in tasks]
        out: Dict[str, list] = {t.name: [] for t in tasks}
        for batch in batches:
            for t, arr in zip(tasks, self._run(names, batch)):
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
