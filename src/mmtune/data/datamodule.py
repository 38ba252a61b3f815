"""From the config's manifests to validated splits and DataLoaders."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
import torch
from torch.utils.data import DataLoader

from .dataset import MultimodalDataset
from ..tasks import Task, label_key, tasks_from_config
from .manifest import (BadRow, BadRowsError, ManifestSpec, TableSource, read_table, rejected_rows_frame,
                       validate_rows)


def spec_from_config(data_cfg, modalities, tasks: Optional[List[Task]] = None,
                     weight_column: Optional[str] = None) -> ManifestSpec:
    return ManifestSpec(
        image_column=data_cfg.image_column if "image" in modalities else None,
        text_column=data_cfg.text_column if "text" in modalities else None,
        tasks=tuple(tasks if tasks is not None else tasks_from_config(data_cfg)),
        id_column=data_cfg.id_column,
        allow_missing=tuple(data_cfg.allow_missing),
        weight_column=weight_column,
    )


@dataclass
class PreparedData:
    """Validated splits ready for datasets: frames, the folder image paths resolve against, and
    the tasks with their class names (sorted by their text) from the training labels."""

    frames: Dict[str, pd.DataFrame]
    base_dirs: Dict[str, Optional[Path]]
    spec: ManifestSpec
    rejected: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def tasks(self) -> List[Task]:
        return list(self.spec.tasks)

    def dataset(self, split: str, modalities) -> MultimodalDataset:
        return MultimodalDataset(self.frames[split], self.spec, self.base_dirs[split], True, modalities)


def prepare_data(data_cfg, modalities, train: Optional[TableSource] = None, val: Optional[TableSource] = None,
                 test: Optional[TableSource] = None, weight_column: Optional[str] = None) -> PreparedData:
    """Read, validate and split. Every bad row of every split is found before anything trains.

    Raises BadRowsError listing them all (``on_bad_rows: error``), or drops them and returns them in
    ``rejected`` (``on_bad_rows: skip``). Raises ValueError when no training data is given."""
    spec = spec_from_config(data_cfg, modalities, weight_column=weight_column)
    sources = {"train": train if train is not None else data_cfg.train,
               "val": val if val is not None else data_cfg.val,
               "test": test if test is not None else data_cfg.test}
    if sources["train"] is None:
        raise ValueError("no training data: set data.train to a manifest file or pass a DataFrame")
    frames, base_dirs = {}, {}
    for split, src in sources.items():
        if src is None:
            continue
        frames[split], base_dirs[split] = read_table(src)
    names = {s: (str(src) if not isinstance(src, pd.DataFrame) else f"{s} DataFrame") for s, src in sources.items() if src is not None}

    train_df = frames["train"]
    bad: List[BadRow] = validate_rows(train_df, spec, base_dirs["train"], "train", source_name=names["train"])
    bad_train_rows = {b.row - 1 for b in bad}
    good_train = train_df.drop(index=sorted(bad_train_rows))
    for task in spec.tasks:
        task.fit_classes(good_train[task.column].tolist())
    for split in ("val", "test"):
        if split in frames:
            bad += validate_rows(frames[split], spec, base_dirs[split], split, check_known=True,
                                 source_name=names[split])
    rejected = rejected_rows_frame(frames, bad)
    if bad:
        if data_cfg.on_bad_rows == "error":
            raise BadRowsError(bad)
        warnings.warn(f"skipping {len({(b.split, b.row) for b in bad})} bad row(s); see rejected_rows.csv in the run bundle")
        for split in list(frames):
            drop = {b.row - 1 for b in bad if b.split == split}
            frames[split] = frames[split].drop(index=sorted(drop)).reset_index(drop=True)

    for task in spec.tasks:
        if len(task.classes) < 2:
            raise ValueError(f"the training set has {len(task.classes)} class(es) in column {task.column!r}; need at least 2")
    strat = next((t.column for t in spec.tasks if not t.multilabel), None)
    if "val" not in frames:
        frames["train"], frames["val"] = _split(frames["train"], strat, data_cfg.val_fraction, data_cfg.split_seed)
        base_dirs["val"] = base_dirs["train"]
    if "test" not in frames and data_cfg.test_fraction > 0:
        frac = data_cfg.test_fraction / (1.0 - data_cfg.val_fraction) if sources["val"] is None else data_cfg.test_fraction
        frames["train"], frames["test"] = _split(frames["train"], strat, min(frac, 0.9), data_cfg.split_seed + 1)
        base_dirs["test"] = base_dirs["train"]
    for split, df in frames.items():
        if len(df) == 0:
            raise ValueError(f"the {split} split is empty after validation")
    return PreparedData(frames, base_dirs, spec, rejected)


def _split(df: pd.DataFrame, label_col: Optional[str], fraction: float, seed: int):
    """Seeded split, stratified on ``label_col`` (the first single-label task) when every class can be."""
    from sklearn.model_selection import train_test_split

    if label_col is None:
        a, b = train_test_split(df, test_size=fraction, random_state=seed)
        return a.reset_index(drop=True), b.reset_index(drop=True)
    keys = df[label_col].map(label_key)
    counts = keys.value_counts()
    stratify = keys if counts.min() >= 2 and int(round(len(df) * fraction)) >= len(counts) else None
    if stratify is None:
        warnings.warn("some class has fewer than 2 rows (or the held-out share is too small): the split is not stratified")
    a, b = train_test_split(df, test_size=fraction, random_state=seed, stratify=stratify)
    return a.reset_index(drop=True), b.reset_index(drop=True)


def make_loader(dataset, collator, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                sampler=None) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=collator, num_workers=num_workers,
                      generator=gen if shuffle and sampler is None else None, persistent_workers=num_workers > 0)
