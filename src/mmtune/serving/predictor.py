"""Load a run bundle and predict, with no network and without the original checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch

from ..bundle import read_bundle
from ..config import Config
from ..data.collate import Collator
from ..data.dataset import MultimodalDataset
from ..data.manifest import BadRowsError, TableSource, read_table, spec_from_config, validate_rows
from ..evaluation.calibration import Calibration
from ..evaluation.metrics import task_metrics
from ..inference import predict_proba_batches
from ..tasks import Task


PREDICT_ADVICE = ("Prediction never skips rows: fix these rows (or remove them from the input) and run it "
                  "again.")


class Predictor:
    """A fine-tuned model with its processors and label maps.

    ``data`` is a DataFrame or a manifest path; every row is validated first and bad rows raise
    BadRowsError (nothing is dropped). With one task, ``predict`` returns an array of labels (a list
    of labels per row for a multi-label task) and ``predict_proba`` a DataFrame; with several tasks
    both return ``{task: ...}`` unless ``task=`` picks one.
    """

    def __init__(self, model, config: Config, tasks: List[Task], calibration: Optional[Dict[str, Calibration]] = None,
                 run_dir: Optional[Path] = None, device: Union[str, torch.device] = "cpu"):
        self.model = model.eval()
        self.config = config
        self.tasks = list(tasks)
        self.calibration = {t.name: (calibration or {}).get(t.name) or Calibration() for t in self.tasks}
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.model.to(self.device)
        self.modalities = config.modalities
        self.spec = spec_from_config(config.data, self.modalities, self.tasks)
        self.collator = Collator({n: e.processor for n, e in model.encoders.items()}, self.modalities)

    @property
    def class_names(self) -> List[Any]:
        """The classes of the (first) task."""
        return self.tasks[0].classes

    @classmethod
    def load(cls, run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "Predictor":
        """Rebuild the model from ``run_dir`` (:func:`~mmtune.bundle.read_bundle`: architecture configs,
        processors, safetensors weights). Raises FileNotFoundError when the folder is not a complete bundle."""
        from ..logs import quiet_libraries

        quiet_libraries()
        b = read_bundle(run_dir)
        return cls(b.model, b.config, b.tasks, b.calibration, b.run_dir, device)

    # ---- inputs ---------------------------------------------------------------------------
    def _dataset(self, data: TableSource, with_labels: bool) -> MultimodalDataset:
        df, base_dir = read_table(data)
        bad = validate_rows(df, self.spec, base_dir, "input", check_known=with_labels, require_label=with_labels)
        if bad:
            raise BadRowsError(bad, advice=PREDICT_ADVICE)
        return MultimodalDataset(df, self.spec, base_dir, with_labels, self.modalities)

    def _batches(self, ds: MultimodalDataset, batch_size: Optional[int]):
        bs = batch_size or self.config.trainer.eval_batch_size or 2 * self.config.trainer.batch_size
        return (self.collator([ds[i] for i in range(s, min(s + bs, len(ds)))]) for s in range(0, len(ds), bs))

    def _proba(self, ds: MultimodalDataset, batch_size: Optional[int], calibrated: bool = True) -> Dict[str, np.ndarray]:
        proba = predict_proba_batches(self.model, self.tasks, self._batches(ds, batch_size), self.device)
        if calibrated:
            proba = {t.name: self.calibration[t.name].probabilities(t, proba[t.name]) for t in self.tasks}
        return proba

    @staticmethod
    def _index(data: TableSource, n: int) -> pd.Index:
        """The input DataFrame's own index (results line up with it), or 0..n-1 for a file."""
        return data.index if isinstance(data, pd.DataFrame) else pd.RangeIndex(n)

    def _pick(self, task: Optional[str]) -> List[Task]:
        if task is None:
            return self.tasks
        for t in self.tasks:
            if t.name == task:
                return [t]
        raise KeyError(f"unknown task {task!r}; tasks: {[t.name for t in self.tasks]}")

    # ---- public API ---------------------------------------------------------------------------
    def predict_proba(self, data: TableSource, batch_size: Optional[int] = None, task: Optional[str] = None,
                      calibrated: bool = True):
        """Class probabilities, one column per class name (as text), rows in input order; the id
        column first when ``data.id_column`` is configured. ``{task: DataFrame}`` for several tasks.
        ``calibrated`` applies the temperature fitted on validation (single-label tasks)."""
        ds = self._dataset(data, with_labels=False)
        proba = self._proba(ds, batch_size, calibrated)
        out = {}
        for t in self._pick(task):
            columns = ["prediction"] if t.regression else [str(c) for c in t.classes]
            df = pd.DataFrame(proba[t.name], columns=columns, index=self._index(data, len(ds)))
            if self.spec.id_column:
                df.insert(0, self.spec.id_column, ds.df[self.spec.id_column].to_numpy())
            out[t.name] = df
        return out if len(out) > 1 else next(iter(out.values()))

    def predict(self, data: TableSource, batch_size: Optional[int] = None, task: Optional[str] = None):
        """The most probable class of each row (single-label), or the list of labels whose probability
        reaches the task's tuned threshold (multi-label). ``{task: labels}`` for several tasks."""
        ds = self._dataset(data, with_labels=False)
        proba = self._proba(ds, batch_size)
        out = {t.name: decide(t, proba[t.name], self.calibration[t.name]) for t in self._pick(task)}
        return out if len(out) > 1 else next(iter(out.values()))

    def predict_table(self, data: TableSource, batch_size: Optional[int] = None) -> pd.DataFrame:
        """One row per input row: the id column (when configured), then per task the prediction
        (multi-label: the labels joined by the task's separator) and ``prob_<class>`` per class; with
        several tasks the columns are prefixed ``<task>.``. What ``mmtune predict`` writes."""
        ds = self._dataset(data, with_labels=False)
        proba = self._proba(ds, batch_size)
        out = pd.DataFrame(index=self._index(data, len(ds)))
        if self.spec.id_column:
            out[self.spec.id_column] = ds.df[self.spec.id_column].to_numpy()
        multi = len(self.tasks) > 1
        for t in self.tasks:
            prefix = f"{t.name}." if multi else ""
            labels = decide(t, proba[t.name], self.calibration[t.name])
            out[f"{prefix}prediction"] = [t.separator.join(map(str, v)) for v in labels] if t.multilabel else list(labels)
            if t.regression:
                continue
            for j, c in enumerate(t.classes):
                out[f"{prefix}prob_{c}"] = proba[t.name][:, j]
        return out

    @property
    def embedding_kinds(self) -> List[str]:
        """What :meth:`embed` can return: ``fused`` and each encoder output (encoder name, or ``name.field``)."""
        return ["fused", *sorted(self.model.output_modality)]

    def embed(self, data: TableSource, kind: str = "fused", batch_size: Optional[int] = None) -> pd.DataFrame:
        """One vector per row: ``fused`` — the representation the heads read — or an encoder's pooled output
        (``kind`` = its name; ``name.field`` for a joint or shared encoder). Columns ``e0 … e{d-1}`` after the
        id column (when configured), rows in input order; an encoder's vector of a row that lacks its modality
        is NaN (the blank input's output means nothing)."""
        from ..inference import move

        if kind not in self.embedding_kinds:
            raise ValueError(f"unknown embedding kind {kind!r}; valid: {', '.join(self.embedding_kinds)}")
        ds = self._dataset(data, with_labels=False)
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(ds, batch_size):
                batch = move(batch, self.device)
                outputs = self.model.encode(batch["inputs"])
                if kind == "fused":
                    feats = self.model.fuse(outputs, batch["present"]).float()
                else:
                    feats = outputs[kind].pooled.float().clone()
                    present = batch["present"].get(self.model.output_modality[kind])
                    if present is not None:
                        feats[~present] = float("nan")
                chunks.append(feats.cpu().numpy())
        arr = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
        out = pd.DataFrame(arr, columns=[f"e{i}" for i in range(arr.shape[1])], index=self._index(data, len(ds)))
        if self.spec.id_column:
            out.insert(0, self.spec.id_column, ds.df[self.spec.id_column].to_numpy())
        return out

    def evaluate(self, data: TableSource, batch_size: Optional[int] = None,
                 contribution: bool = False) -> Dict[str, Dict[str, Any]]:
        """``{task: metrics}`` on labelled rows (calibrated, with the tuned thresholds); labels unseen in
        training are bad rows. ``contribution`` adds ``"modality_contribution"``: the metrics with each
        modality hidden through the present-mask."""
        ds = self._dataset(data, with_labels=True)
        proba = self._proba(ds, batch_size)
        out: Dict[str, Any] = {t.name: task_metrics(t, ds.labels[t.name], proba[t.name], self.config.evaluation.calibration_bins,
                                                    self.calibration[t.name]) for t in self.tasks}
        if contribution and len(self.modalities) > 1:
            from ..evaluation.ablation import modality_contribution

            out["modality_contribution"] = modality_contribution(
                self.model, self.tasks, self.calibration, list(self._batches(ds, batch_size)), ds.labels,
                list(self.modalities))
        return out


def calibrate(task: Task, proba: np.ndarray, calibration: Optional[Calibration] = None) -> np.ndarray:
    """The calibration's temperature applied (single-label); multi-label probabilities unchanged. Kept in
    float64: temperature scaling is monotone, and in float64 no two classes tie where the raw float32
    probabilities do not, so the argmax never changes (float32 could round two classes to one value)."""
    return (calibration or Calibration()).probabilities(task, proba)


def decide(task: Task, proba: np.ndarray, calibration: Optional[Calibration] = None):
    """Labels from probabilities: per-label thresholds (multi-label), p(class 1) against the tuned threshold
    (binary with a threshold, tuned on calibrated probabilities), else the argmax."""
    from ..evaluation.metrics import decide_single

    if task.regression:
        return np.asarray(proba, dtype=np.float64)[:, 0]
    cal = calibration or Calibration()
    names = np.empty(len(task.classes), dtype=object)
    names[:] = task.classes
    if task.multilabel:
        th = np.asarray(cal.thresholds or [0.5] * len(task.classes))
        return [list(names[row >= th]) for row in proba]
    return names[decide_single(proba, cal.threshold)] if len(proba) else names[:0]
