"""Load a run bundle and predict, with no network and without the original checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch

from ..bundle import check_bundle
from ..config import Config, load_config
from ..data.collate import Collator
from ..data.dataset import MultimodalDataset
from ..data.datamodule import spec_from_config
from ..data.manifest import BadRowsError, TableSource, label_key, read_table, validate_rows
from ..evaluation import classification_metrics
from ..inference import predict_proba_batches
from ..models import build_model


class Predictor:
    """A fine-tuned model with its processors and label map.

    ``predict_proba(data)`` returns a DataFrame with one column per class (plus the id column when
    configured); ``predict(data)`` returns the predicted labels. ``data`` is a DataFrame or a manifest
    path; every row is validated first and bad rows raise BadRowsError (nothing is dropped).
    """

    def __init__(self, model, config: Config, class_names: List[Any], task: str, run_dir: Optional[Path] = None,
                 device: Union[str, torch.device] = "cpu"):
        self.model = model.eval()
        self.config = config
        self.class_names = list(class_names)
        self.task = task
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.model.to(self.device)
        self.modalities = config.modalities
        self.spec = spec_from_config(config.data, self.modalities)
        self.collator = Collator({n: e.processor for n, e in model.encoders.items()}, self.modalities)

    @classmethod
    def load(cls, run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "Predictor":
        """Rebuild the model from ``run_dir`` (architecture configs, processors, safetensors weights).
        Raises FileNotFoundError when the folder is not a complete bundle."""
        from safetensors.torch import load_model

        from ..training.fit import quiet_libraries

        quiet_libraries()
        run_dir = Path(run_dir)
        check_bundle(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        labels = json.loads((run_dir / "labels.json").read_text())
        model = build_model(cfg.model, {labels["task"]: len(labels["classes"])}, bundle_dir=run_dir)
        load_model(model, str(run_dir / "model.safetensors"), strict=True, device="cpu")
        return cls(model, cfg, labels["classes"], labels["task"], run_dir, device)

    # ---- inputs ---------------------------------------------------------------------------
    def _dataset(self, data: TableSource, with_labels: bool) -> MultimodalDataset:
        df, base_dir = read_table(data)
        spec = self.spec if with_labels else _without_label(self.spec)
        bad = validate_rows(df, spec, base_dir, "input", known_labels=self.class_names if with_labels else None,
                            require_label=with_labels)
        if bad:
            raise BadRowsError(bad)
        index = {label_key(c): i for i, c in enumerate(self.class_names)} if with_labels else None
        return MultimodalDataset(df, spec, base_dir, index, self.modalities)

    def _proba(self, ds: MultimodalDataset, batch_size: Optional[int]) -> np.ndarray:
        bs = batch_size or self.config.trainer.eval_batch_size or 2 * self.config.trainer.batch_size
        batches = (self.collator([ds[i] for i in range(s, min(s + bs, len(ds)))]) for s in range(0, len(ds), bs))
        proba = predict_proba_batches(self.model, self.task, batches, self.device)
        return proba.reshape(len(ds), len(self.class_names))

    # ---- public API ---------------------------------------------------------------------------
    def predict_proba(self, data: TableSource, batch_size: Optional[int] = None) -> pd.DataFrame:
        """Class probabilities, one column per class name (as text), rows in input order; the id
        column first when ``data.id_column`` is configured."""
        ds = self._dataset(data, with_labels=False)
        proba = self._proba(ds, batch_size)
        out = pd.DataFrame(proba, columns=[str(c) for c in self.class_names])
        if self.spec.id_column:
            out.insert(0, self.spec.id_column, ds.df[self.spec.id_column].to_numpy())
        return out

    def predict(self, data: TableSource, batch_size: Optional[int] = None) -> np.ndarray:
        """The most probable class of each row (the training set's label values)."""
        ds = self._dataset(data, with_labels=False)
        proba = self._proba(ds, batch_size)
        names = np.empty(len(self.class_names), dtype=object)
        names[:] = self.class_names
        return names[proba.argmax(1)] if len(proba) else names[:0]

    def evaluate(self, data: TableSource, batch_size: Optional[int] = None) -> Dict[str, Any]:
        """Metrics (accuracy, macro F1, ROC-AUC, …) on labelled rows; labels unseen in training are bad rows."""
        ds = self._dataset(data, with_labels=True)
        return classification_metrics(ds.labels, self._proba(ds, batch_size))


def _without_label(spec):
    from dataclasses import replace

    return replace(spec, label_column=None)
