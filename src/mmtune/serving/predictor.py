"""Load a run bundle and predict, with no network and without the original checkpoints."""
from __future__ import annotations

import operator
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ..bundle import read_bundle
from ..ensemble import shipped_ensemble
from ..config import Config
from ..data.collate import Collator, read_options
from ..data.dataset import MultimodalDataset, read_once_dataset
from ..data.manifest import TableSource, row_index, spec_from_config
from ..evaluation.calibration import Calibration
from ..evaluation.metrics import calibrate, decide, task_metrics  # noqa: F401  (decide: the server's too)
from ..tasks import Task
from .runners import BACKENDS, ONNX_FILES, OnnxRunner, TorchRunner


SPLIT_READ_S = 0.001
"""A prediction batch whose rows took longer than this each to read (decoded, images resized) in the batch before is
split across the decoding threads; quicker rows (small pictures) are read whole on the collating thread, where the
threads would spend more contending for the interpreter than they save (docs/guides/deploy.md)."""
KEEP_TOKENS_ROWS = 200_000
"""Prediction on at most this many rows keeps the tokens it counted to sort the rows by (a few bytes a token), so that
collating does not tokenise the texts again; a larger table tokenises them twice and holds only the counts."""
PREDICT_ADVICE = ("Prediction never skips rows: fix these rows (or remove them from the input) and run it "
                  "again.")


class Batches:
    """An iterator over collated batches that says how many are left (``operator.length_hint``): a runner starts
    the first on its own when it knows that more follow (:class:`~mmtune.serving.runners.OnnxRunner`)."""

    def __init__(self, batches, count: int):
        self._batches, self._left = iter(batches), int(count)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        self._left -= 1
        return batch

    def __length_hint__(self) -> int:
        return max(self._left, 0)


class Predictor:
    """A fine-tuned model with its processors and label maps.

    ``data`` is a DataFrame or a manifest path; every row is validated first and bad rows raise
    BadRowsError (nothing is dropped). With one task, ``predict`` returns an array of labels (a list
    of labels per row for a multi-label task) and ``predict_proba`` a DataFrame; with several tasks
    both return ``{task: ...}`` unless ``task=`` picks one.
    """

    def __init__(self, model, config: Config, tasks: List[Task], calibration: Optional[Dict[str, Calibration]] = None,
                 run_dir: Optional[Path] = None, device: Union[str, torch.device] = "cpu", runner=None,
                 workers: Optional[int] = None, reference: Optional[Dict[str, torch.Tensor]] = None,
                 processors: Optional[Mapping[str, Any]] = None):
        self.config = config
        self.tasks = list(tasks)
        self.calibration = {t.name: (calibration or {}).get(t.name) or Calibration() for t in self.tasks}
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.runner = runner or TorchRunner(model, self.device)
        self.model = model if isinstance(self.runner, TorchRunner) else None
        """The PyTorch model (None on an ONNX backend)."""
        self.modalities = config.modalities
        self.spec = spec_from_config(config.data, self.modalities, self.tasks)
        if processors is None:
            processors = {n: e.processor for n, e in model.encoders.items()}
        # a runner that reads the decoded rows with processors of its own (an ensemble's) has the collator keep them
        self.collator = Collator(dict(processors), self.modalities,
                                 keep_samples=bool(getattr(self.runner, "reads_samples", False)))
        self.reads = read_options(config, [self.collator, *(getattr(self.runner, "collators", None) or [])],
                                  self.modalities)
        """How each file modality's files are read, as in training (an image's ``side``: ``data.jpeg_draft``;
        ``orient``: ``data.exif_orientation``); empty for a bundle written before both, which reads them as stored."""
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        self._pool = None
        self.reference = dict(reference or {})
        """The training rows' average encoder outputs (the explanations' baseline)."""
        self.members: Optional[List[Dict[str, Any]]] = None
        """An ensemble's members (``name``, ``path``, ``weight``); None for a single model."""

    @property
    def backend(self) -> str:
        """``torch``, ``onnx`` or ``onnx-int8``."""
        return self.runner.name

    @property
    def class_names(self) -> List[Any]:
        """The classes of the (first) task."""
        return self.tasks[0].classes

    @classmethod
    def load(cls, run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu", backend: Optional[str] = None,
             workers: Optional[int] = None, ensemble: Optional[bool] = None) -> "Predictor":
        """Rebuild the model from ``run_dir`` (:func:`~mmtune.bundle.read_bundle`: architecture configs,
        processors, safetensors weights). ``backend``: ``torch`` (default for a run bundle), ``onnx`` or
        ``onnx-int8`` (an export bundle written by :func:`~mmtune.serving.export.export_onnx`, or a run bundle
        holding one in ``export/``; the default for an export bundle). ``ensemble``: a run that ships an ensemble
        (``RUN/ensemble``, :mod:`mmtune.ensemble`) loads as one by default; False loads the run's own single model,
        True insists on the ensemble. Raises FileNotFoundError when the folder is not a complete bundle (or has no
        export of that kind, or no ensemble when one is asked for)."""
        from ..logs import quiet_libraries
        from ..memory import keep_freed_memory
        from .runners import EXPORT_MARKER, read_export

        quiet_libraries()
        keep_freed_memory()
        run_dir = Path(run_dir)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        exported = (run_dir / EXPORT_MARKER).is_file()
        if backend is None:
            backend = "onnx" if exported else "torch"
        if backend == "torch":
            if exported:
                raise ValueError(f"{str(run_dir)!r} is an ONNX export bundle (it has no PyTorch weights): load it with "
                                 "backend 'onnx' or 'onnx-int8'")
            meta = shipped_ensemble(run_dir, ensemble)
            if meta is not None:
                def torch_member(folder):
                    m = read_bundle(folder)
                    return TorchRunner(m.model, torch.device(device)), m.calibration, m

                return cls._from_members(meta, run_dir, device, workers, torch_member)
            b = read_bundle(run_dir)
            if b.config.task == "matching":  # two towers: embed, search, score pairs (serving/matching.py)
                from .matching import MatchPredictor

                return MatchPredictor.from_bundle(b, device)
            return cls(b.model, b.config, b.tasks, b.calibration, b.run_dir, device, workers=workers, reference=b.reference)
        folder = run_dir if exported else run_dir / "export"
        if not (folder / EXPORT_MARKER).is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} has no ONNX export ({EXPORT_MARKER} missing): run "
                                    f"`mmtune export --run {run_dir}` first")
        def onnx_member(where):
            meta = read_export(where)
            if backend not in meta.get("onnx_files", {}):
                raise FileNotFoundError(f"the export in {str(where)!r} has no {backend} model (it has "
                                        f"{', '.join(meta.get('onnx_files', {})) or 'none'}); export again with "
                                        "--quantize int8")
            m = read_bundle(where, model=False, complete=False)  # no PyTorch model: its processors are read apart
            runner = OnnxRunner(where / ONNX_FILES[backend], meta["output_modality"], torch.device(device))
            runner.name = backend
            return runner, m.calibration, m

        meta = shipped_ensemble(folder, ensemble)
        if meta is not None:
            return cls._from_members(meta, folder, device, workers, onnx_member)
        runner, calibration, b = onnx_member(folder)
        return cls(None, b.config, b.tasks, calibration, folder, device, runner=runner, workers=workers,
                   processors=_processors(b.config, folder))

    @classmethod
    def _from_members(cls, meta, folder: Path, device, workers, make) -> "Predictor":
        """One predictor over an ensemble's members (``make(folder)`` -> runner, calibration, bundle)."""
        from ..ensemble import EnsembleRunner, member_runners

        members, first, collators = member_runners(meta, make)
        tasks = first.tasks
        calibration = {t.name: Calibration.from_json((meta.get("calibration") or {}).get(t.name)) for t in tasks}
        pred = cls(first.model, first.config, tasks, calibration, Path(folder), device,
                   runner=EnsembleRunner(members, collators), workers=workers, reference=first.reference,
                   processors=None if first.model is not None else _processors(first.config, first.run_dir))
        pred.members = [{k: m[k] for k in ("name", "path", "weight")} for m in meta["members"]]
        return pred

    # ---- inputs ---------------------------------------------------------------------------
    def dataset(self, data: TableSource, with_labels: bool) -> MultimodalDataset:
        """``data`` validated into a dataset of this model's columns (BadRowsError naming every bad row); what
        :meth:`proba_of` and the export, the server and the explanations run on.

        Each file is decoded once, when its row is read: validation checks that it exists. A file that does not
        decode then (truncated, not an image) stops the work with the same error as a validation that decoded
        everything: the whole table is validated in full at that moment, and every bad row is named."""
        return read_once_dataset(data, self.spec, "input", PREDICT_ADVICE, with_labels, self.modalities, self.reads)

    def length_order(self, ds: MultimodalDataset, keep: Optional[Dict[str, Any]] = None) -> np.ndarray:
        """Rows sorted by the positions their inputs fill before padding (the texts' token counts, longest first),
        so that a batch pads to similar lengths; input order when no processor pads. ``keep`` (a dict): the tokens
        counted are left there, by encoder, for :meth:`batches` (:meth:`Collator.lengths`)."""
        lengths = self.collator.lengths(ds, keep=keep) if len(ds) > 1 else None
        if lengths is None:
            return np.arange(len(ds))
        return np.argsort(-lengths, kind="stable")

    def batches(self, ds: MultimodalDataset, batch_size: Optional[int], order: Optional[np.ndarray] = None,
                tokens: Optional[Mapping[str, Any]] = None):
        """Collated batches over ``order`` (default: input order). Rows are decoded (images read and
        resized, audio resampled) and each batch is processed on worker threads, one batch ahead; an encoder in
        ``tokens`` (from :meth:`length_order`) pads its rows' kept tokens instead of tokenising again."""
        bs = batch_size or self.config.trainer.eval_batch_size or 2 * self.config.trainer.batch_size
        idx = np.arange(len(ds)) if order is None else order
        chunks = [idx[s:s + bs] for s in range(0, len(ds), bs)]
        if self.workers <= 1 or len(ds) <= 1:
            return Batches((self.collator(ds.__getitems__(c), tokens) for c in chunks), len(chunks))
        return Batches(self._threaded(ds, chunks, tokens), len(chunks))

    def _threaded(self, ds, chunks, tokens=None):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:  # row decoding, and one batch collated ahead of the one being run
            self._pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="mmtune-decode"),
                          ThreadPoolExecutor(1, thread_name_prefix="mmtune-collate"))
        rows, ahead = self._pool

        def read(part):  # decoded, and each value's own processing done (an image resized); and the seconds it took
            start = time.perf_counter()
            items = self.collator.prepare(ds.__getitems__(part))
            return items, time.perf_counter() - start

        def collate(c, split: bool):
            # split: a batch in one part per worker, each part's cells taken at once and read on its thread (per-row
            # tasks cost more in scheduling and in taking cells one at a time than small files take to decode)
            parts = [p for p in np.array_split(np.asarray(c), self.workers) if len(p)] if split else [np.asarray(c)]
            done = list(rows.map(read, parts)) if split else [read(parts[0])]
            seconds_per_row = sum(s for _, s in done) / max(len(c), 1)
            return self.collator([item for items, _ in done for item in items], tokens), seconds_per_row

        # the first batch split, so that the model starts soon; each next one as its rows' reading cost in the last
        pending = ahead.submit(collate, chunks[0], True) if chunks else None
        for k in range(len(chunks)):
            batch, seconds_per_row = pending.result()
            if k + 1 < len(chunks):
                pending = ahead.submit(collate, chunks[k + 1], seconds_per_row > SPLIT_READ_S)
            yield batch

    def proba_of(self, ds: MultimodalDataset, batch_size: Optional[int], calibrated: bool = True,
               runner=None, hidden: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Probabilities per task in row order; ``hidden`` modalities are masked out through the present-mask."""
        tokens: Dict[str, Any] = {}
        order = self.length_order(ds, keep=tokens if len(ds) <= KEEP_TOKENS_ROWS else None)
        batches = self.batches(ds, batch_size, order, tokens)
        if hidden:
            from ..evaluation.ablation import masked_batches

            # still saying how many follow, so that side-by-side ONNX batches start at once (OnnxRunner)
            batches = Batches(masked_batches(batches, list(hidden)), operator.length_hint(batches))
        proba = (runner or self.runner).proba(self.tasks, batches)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        proba = {k: v[inverse] for k, v in proba.items()}
        if calibrated:
            proba = {t.name: self.calibration[t.name].probabilities(t, proba[t.name]) for t in self.tasks}
        return proba

    @staticmethod
    def row_index(data: TableSource, n: int) -> pd.Index:
        """The input DataFrame's own index (results line up with it), or 0..n-1 for a file."""
        return row_index(data, n)

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
        ds = self.dataset(data, with_labels=False)
        proba = self.proba_of(ds, batch_size, calibrated)
        out = {}
        for t in self._pick(task):
            columns = ["prediction"] if t.regression else [str(c) for c in t.classes]
            df = pd.DataFrame(proba[t.name], columns=columns, index=self.row_index(data, len(ds)))
            if self.spec.id_column:
                df.insert(0, self.spec.id_column, ds.df[self.spec.id_column].to_numpy())
            out[t.name] = df
        return out if len(out) > 1 else next(iter(out.values()))

    def disagreement(self, data: TableSource, batch_size: Optional[int] = None, task: Optional[str] = None) -> pd.DataFrame:
        """The consistency check of a classifier's table: per row, the prediction from each modality alone (the
        others hidden through the present-mask, as the modality contribution does) and ``disagreement`` — the
        largest total-variation distance between two one-modality predictions (0: every modality tells the same
        story, 1: they put all their mass on different classes). Sorted with the most disagreeing rows first.
        Meaningful for a model that has seen rows with a modality absent (``model.modality_dropout``,
        ``data.allow_missing``). Needs a single-label task and at least two modalities."""
        t = self._pick(task)[0] if task or len(self.tasks) == 1 else None
        if t is None or t.regression or t.multilabel:
            raise ValueError("the disagreement check needs one single-label task (name it with task=...)")
        if len(self.modalities) < 2:
            raise ValueError(f"the disagreement check compares modalities; this model reads one ({self.modalities[0]})")
        ds = self.dataset(data, with_labels=False)
        alone = {m: self.proba_of(ds, batch_size, hidden=[o for o in self.modalities if o != m])[t.name]
                 for m in self.modalities}
        full = self.proba_of(ds, batch_size)[t.name]
        mods = list(alone)
        tv = np.zeros(len(ds))
        for i, a in enumerate(mods):
            for b in mods[i + 1:]:
                tv = np.maximum(tv, 0.5 * np.abs(alone[a] - alone[b]).sum(1))
        classes = [str(c) for c in t.classes]
        out = pd.DataFrame({"row": np.arange(len(ds)), "disagreement": tv,
                            "prediction": [classes[k] for k in full.argmax(1)]})
        if self.spec.id_column:
            out.insert(1, "id", ds.df[self.spec.id_column].astype(str).to_numpy())
        for m in mods:
            out[f"{m} only"] = [classes[k] for k in alone[m].argmax(1)]
            out[f"{m} only probability"] = alone[m].max(1)
        for m, _ in ds.columns:
            out[m] = ds.shown(m)
        return out.sort_values("disagreement", ascending=False, kind="stable").reset_index(drop=True)

    def predict(self, data: TableSource, batch_size: Optional[int] = None, task: Optional[str] = None):
        """The most probable class of each row (single-label), or the list of labels whose probability
        reaches the task's tuned threshold (multi-label). ``{task: labels}`` for several tasks."""
        ds = self.dataset(data, with_labels=False)
        proba = self.proba_of(ds, batch_size)
        out = {t.name: decide(t, proba[t.name], self.calibration[t.name]) for t in self._pick(task)}
        return out if len(out) > 1 else next(iter(out.values()))

    def predict_table(self, data: TableSource, batch_size: Optional[int] = None) -> pd.DataFrame:
        """One row per input row: the id column (when configured), then per task the prediction
        (multi-label: the labels joined by the task's separator) and ``prob_<class>`` per class; with
        several tasks the columns are prefixed ``<task>.``. What ``mmtune predict`` writes."""
        ds = self.dataset(data, with_labels=False)
        proba = self.proba_of(ds, batch_size)
        out = pd.DataFrame(index=self.row_index(data, len(ds)))
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
        return ["fused", *sorted(self.runner.output_modality)]

    def embed(self, data: TableSource, kind: str = "fused", batch_size: Optional[int] = None) -> pd.DataFrame:
        """One vector per row: ``fused`` — the representation the heads read — or an encoder's pooled output
        (``kind`` = its name; ``name.field`` for a joint or shared encoder). Columns ``e0 … e{d-1}`` after the
        id column (when configured), rows in input order; an encoder's vector of a row that lacks its modality
        is NaN (the blank input's output means nothing)."""
        if kind not in self.embedding_kinds:
            raise ValueError(f"unknown embedding kind {kind!r}; valid: {', '.join(self.embedding_kinds)}")
        ds = self.dataset(data, with_labels=False)
        chunks = []
        for batch in self.batches(ds, batch_size):
            feats = np.array(self.runner.vectors(batch, kind), dtype=np.float32)
            present = batch["present"].get(self.runner.output_modality.get(kind, ""))
            if kind != "fused" and present is not None:
                feats[~present.numpy()] = np.nan
            chunks.append(feats)
        arr = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
        out = pd.DataFrame(arr, columns=[f"e{i}" for i in range(arr.shape[1])], index=self.row_index(data, len(ds)))
        if self.spec.id_column:
            out.insert(0, self.spec.id_column, ds.df[self.spec.id_column].to_numpy())
        return out

    def explain(self, data: TableSource, steps: int = 32, task: Optional[str] = None, activation_rows: int = 8):
        """Why each row got its prediction (an :class:`~mmtune.explain.Explanation`: per row the contribution of
        each modality by masking and by attribution share, word attributions of texts, Grad-CAM maps of images
        and recordings, per-column attributions of tables, attention maps and gates; a summary over the rows).
        ``.write(folder)`` draws it. Needs the PyTorch backend and captum (``mmtune[explain]``)."""
        from ..explain import Explainer

        return Explainer(self, steps, task).explain(data, activation_rows=activation_rows)

    def evaluate(self, data: TableSource, batch_size: Optional[int] = None,
                 contribution: bool = False) -> Dict[str, Dict[str, Any]]:
        """``{task: metrics}`` on labelled rows (calibrated, with the tuned thresholds); labels unseen in
        training are bad rows. ``contribution`` adds ``"modality_contribution"``: the metrics with each
        modality hidden through the present-mask."""
        ds = self.dataset(data, with_labels=True)
        proba = self.proba_of(ds, batch_size)
        out: Dict[str, Any] = {t.name: task_metrics(t, ds.labels[t.name], proba[t.name], self.config.evaluation.calibration_bins,
                                                    self.calibration[t.name]) for t in self.tasks}
        if contribution and len(self.modalities) > 1:
            from ..evaluation.ablation import modality_contribution

            out["modality_contribution"] = modality_contribution(
                lambda batches: self.runner.proba(self.tasks, batches), self.tasks, self.calibration, list(self.batches(ds, batch_size)), ds.labels,
                list(self.modalities))
        return out


def _processors(config, folder: Path) -> Dict[str, Any]:
    """Each encoder's processor, read from the export bundle's ``encoders/<name>`` folder: all an ONNX backend needs
    of the encoders (the names of their outputs are in export.json). Building the model instead, even without
    weights, imported each encoder's model code: ``mmtune predict`` of 200 rows on an int8 export took 15.0-15.8 s with
    it and 11.3-12.5 s without, on a 2-core AVX2 CPU."""
    from ..encoders import saved_processors

    return saved_processors(config.model.encoders, folder)
