"""From the config's manifests to validated splits, datasets and DataLoaders: the LightningDataModule of a fit."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..modalities import kind, modality_of
from ..tasks import Task, label_key
from .collate import Collator, read_options
from .dataset import MultimodalDataset
from .manifest import (BadRowsError, ManifestSpec, TableSource, column_values, read_valid_rows, release_arrow_memory,
                       spec_from_config)
from .splits import group_folds

log = logging.getLogger("mmtune")


@dataclass
class PreparedData:
    """Validated splits ready for datasets: frames, the folder image paths resolve against, and
    the tasks with their class names (sorted by their text) from the training labels."""

    frames: Dict[str, pd.DataFrame]
    base_dirs: Dict[str, Optional[Path]]
    spec: ManifestSpec
    rejected: pd.DataFrame = field(default_factory=pd.DataFrame)
    alignment: Optional[Dict[str, Any]] = None
    """The report of ``data.align`` (per joined table: matches, reasons, time offsets)."""

    @property
    def tasks(self) -> List[Task]:
        return list(self.spec.tasks)

    def dataset(self, split: str, modalities, reads=None) -> MultimodalDataset:
        """``split``'s rows; ``reads``: how :class:`MultimodalDataset` reads their files (default: as stored)."""
        return MultimodalDataset(self.frames[split], self.spec, self.base_dirs[split], True, modalities, reads=reads)


def prepare_data(data_cfg, modalities, train: Optional[TableSource] = None, val: Optional[TableSource] = None,
                 test: Optional[TableSource] = None, weight_column: Optional[str] = None) -> PreparedData:
    """Read, validate and split. Every bad row of every split is found before anything trains.

    Raises BadRowsError listing them all (``on_bad_rows: error``), or drops them and returns them in
    ``rejected`` (``on_bad_rows: skip``). Raises ValueError when no training data is given."""
    spec = spec_from_config(data_cfg, modalities, weight_column=weight_column)
    sources = {"train": train if train is not None else data_cfg.train,
               "val": val if val is not None else data_cfg.val,
               "test": test if test is not None else data_cfg.test}
    alignment = None
    if sources["train"] is None and data_cfg.align is not None:
        from ..modalities import modality_of
        from .align import align_tables

        a = data_cfg.align
        files = [data_cfg.column(m) for m in modalities if modality_of(m).files]
        sources["train"], report = align_tables(a.tables, a.on, a.time, a.tolerance, a.direction, paths=files)
        alignment = report.to_json()
    if sources["train"] is None:
        raise ValueError("no training data: set data.train to a manifest file (or data.align) or pass a DataFrame")
    names = {s: (str(src) if not isinstance(src, pd.DataFrame) else f"{s} DataFrame") for s, src in sources.items() if src is not None}
    frames, base_dirs, bad, rejected = {}, {}, [], []
    for split in ("train", "val", "test"):  # the training rows first: their labels are the classes the others may use
        if sources[split] is None:
            continue
        frames[split], base_dirs[split], problems, dropped = read_valid_rows(
            sources[split], spec, split, check_known=split != "train", source_name=names[split])
        bad += problems
        rejected.append(dropped)
        if split == "train":
            for task in spec.tasks:
                task.fit_classes(_label_cells(frames["train"][task.column], task))
    rejected = pd.concat([r for r in rejected if len(r)], ignore_index=True) if any(len(r) for r in rejected) \
        else pd.DataFrame()
    if bad:
        if data_cfg.on_bad_rows == "error":
            raise BadRowsError(bad)
        warnings.warn(f"skipping {len({(b.split, b.row) for b in bad})} bad row(s); see rejected_rows.csv in the run bundle")

    for task in spec.tasks:
        if not task.regression and len(task.classes) < 2:
            raise ValueError(f"the training set has {len(task.classes)} class(es) in column {task.column!r}; need at least 2")
    strat = next((t.column for t in spec.tasks if not t.multilabel and not t.regression), None)
    group = data_cfg.group_column
    if group is not None:
        check_group_column(frames, group, data_cfg, spec)
    if "val" not in frames:  # (each split uses up the table it splits)
        frames["train"], frames["val"] = _split(frames.pop("train"), strat, data_cfg.val_fraction, data_cfg.split_seed,
                                                group, "validation")
        base_dirs["val"] = base_dirs["train"]
    if "test" not in frames and data_cfg.test_fraction > 0:
        frac = data_cfg.test_fraction / (1.0 - data_cfg.val_fraction) if sources["val"] is None else data_cfg.test_fraction
        frames["train"], frames["test"] = _split(frames.pop("train"), strat, min(frac, 0.9), data_cfg.split_seed + 1,
                                                 group, "test")
        base_dirs["test"] = base_dirs["train"]
    if group is not None:
        shared = {s: sorted(set(frames["train"][group].astype(str)) & set(df[group].astype(str)))
                  for s, df in frames.items() if s != "train" and group in df.columns}
        for s, common in shared.items():
            if common:
                warnings.warn(f"the {s} table shares {len(common)} group(s) of {group!r} with the training rows (e.g. "
                              f"{common[0]!r}): its scores may flatter the model")
    for split, df in frames.items():
        if len(df) == 0:
            raise ValueError(f"the {split} split is empty after validation")
    release_arrow_memory()  # the table before the split
    return PreparedData(frames, base_dirs, spec, rejected, alignment)


def _label_cells(column: pd.Series, task: Task):
    """The cells a task's classes come from: a single-label column's distinct values (in order of first
    appearance, which :meth:`Task.fit_classes` keeps), else every cell."""
    if task.multilabel or task.regression:
        return column
    try:
        return column.drop_duplicates()
    except TypeError:  # unhashable cells (lists): every cell
        return column


def label_codes(column: pd.Series) -> np.ndarray:
    """Per row, the rank of its label's text (:func:`label_key`) among the sorted distinct texts: equal codes for
    equal labels, ordered as a stratified split orders the texts themselves."""
    try:
        codes, uniques = pd.factorize(column)
    except TypeError:  # unhashable cells
        codes, uniques = pd.factorize(column.map(label_key))
    ranks = np.unique(np.asarray([label_key(u) for u in uniques], dtype=object), return_inverse=True)[1]
    return np.asarray(ranks).reshape(-1)[codes]


def check_group_column(frames: Dict[str, pd.DataFrame], group: str, data_cfg, spec) -> None:
    """ValueError naming the problem when ``group`` cannot group the training rows."""
    df = frames["train"]
    if group not in df.columns:
        raise ValueError(f"data.group_column {group!r} is not a column of the training table; its columns: "
                         f"{', '.join(map(str, df.columns))}")
    read = {c for _, col in spec.modality_columns for c in (col if isinstance(col, list) else [col])}
    if group in read:
        raise ValueError(f"data.group_column {group!r} is also read as a feature (data.columns): a group is never "
                         "a feature; drop it from data.columns")
    if group in {t.column for t in spec.tasks}:
        raise ValueError(f"data.group_column {group!r} is a label column")
    blank = int(df[group].isna().sum())
    if blank:
        raise ValueError(f"data.group_column {group!r} is empty in {blank} training row(s) (e.g. row "
                         f"{int(np.flatnonzero(df[group].isna().to_numpy())[0]) + 1}); every row needs its group")


def _split(df: pd.DataFrame, label_col: Optional[str], fraction: float, seed: int, group: Optional[str] = None,
           what: str = "held-out"):
    """Seeded split, stratified on ``label_col`` (the first single-label task) when every class can be; with
    ``group``, each group on one side (one fold of :func:`group_folds`, about ``fraction`` of the groups)."""
    from sklearn.model_selection import train_test_split

    if group is not None:
        labels = label_codes(df[label_col]) if label_col is not None else None
        groups = label_codes(df[group])
        k = max(2, int(round(1.0 / fraction)))
        a, b = group_folds(labels, groups, k, seed)[0]
        log.info("grouped %s split on %r: %d groups (%d rows) train, %d groups (%d rows) %s", what, group,
                 len(np.unique(groups[a])), len(a), len(np.unique(groups[b])), len(b), what)
        return _take_parts(df, np.sort(a), np.sort(b))
    rows = np.arange(len(df))
    stratify = None
    if label_col is not None:
        codes = label_codes(df[label_col])
        counts = np.bincount(codes)
        counts = counts[counts > 0]
        ok = counts.min() >= 2 and int(round(len(df) * fraction)) >= len(counts)
        stratify = codes if ok else None
        if stratify is None:
            warnings.warn("some class has fewer than 2 rows (or the held-out share is too small): the split is not stratified")
    a, b = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    return _take_parts(df, a, b)


def _take_parts(df: pd.DataFrame, *rows) -> tuple:
    """``df``'s rows at each of ``rows`` as new tables, built a column at a time; each column of ``df`` is dropped
    from it once copied (``df`` is used up), so the copies never need the whole table twice."""
    if df.columns.has_duplicates:  # (a column name twice: copied whole)
        return tuple(df.take(r).reset_index(drop=True) for r in rows)
    columns: list = [{} for _ in rows]
    for name in list(df.columns):
        col = df.pop(name)
        for part, r in zip(columns, rows):
            part[name] = col.take(r).reset_index(drop=True)
        del col
        release_arrow_memory()
    return tuple(pd.DataFrame(part) if part else pd.DataFrame(index=range(len(r))) for part, r in zip(columns, rows))


def make_loader(dataset, collator, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                sampler=None, pin_memory: bool = False) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=collator, num_workers=num_workers, pin_memory=pin_memory,
                      generator=gen if shuffle and sampler is None else None, persistent_workers=num_workers > 0)


class TableDataModule(L.LightningDataModule):
    """The data of one fit. :meth:`read` validates and splits the tables (the tasks' classes come from the
    training rows); :meth:`attach` builds the datasets for a model and strategy — raw rows with the
    encoders' processors, or cached encoder outputs (plus synthetic rows) when the strategy trains no
    encoder — then Lightning asks for the loaders. Class weights come from the training split."""

    def __init__(self, cfg, train: Optional[TableSource] = None, val: Optional[TableSource] = None,
                 test: Optional[TableSource] = None):
        super().__init__()
        self.cfg = cfg
        self.sources = (train, val, test)
        self.modalities = cfg.modalities
        self.prepared: Optional[PreparedData] = None
        self.datasets: Dict[str, Any] = {}
        self.synthesis: Optional[Dict[str, Any]] = None

    # ---- tables ---------------------------------------------------------------------------------
    def read(self) -> "TableDataModule":
        """Read, validate and split (see :func:`prepare_data`)."""
        self.prepared = prepare_data(self.cfg.data, self.modalities, *self.sources, self.cfg.imbalance.sample_weight_column)
        return self

    @property
    def tasks(self) -> List[Task]:
        return self.prepared.tasks

    @property
    def rejected(self) -> pd.DataFrame:
        return self.prepared.rejected

    @property
    def splits(self) -> List[str]:
        return [s for s in ("train", "val", "test") if s in self.prepared.frames]

    def shown(self, split: str) -> Dict[str, list]:
        """Per modality, each row's value as the saved predictions show it (an image's absolute path)."""
        ds = self.prepared.dataset(split, self.modalities)
        return {m: ds.shown(m) for m, _ in ds.columns}

    def fit_encoders(self, model) -> Dict[str, str]:
        """Encoders trained from scratch (tabular) fit their inputs — column types, statistics, vocabularies —
        on the training split, before anything trains; returns what each said about its columns."""
        out = {}
        for name, enc in model.encoders.items():
            if hasattr(enc, "fit_inputs"):
                ds = self.prepared.dataset("train", self.modalities)
                mods = list(enc.processor.modalities)
                out[name] = enc.fit_inputs(_Rows(ds, mods))
                print(f"encoder {name!r} columns: {out[name]} (force a type with model.encoders.{name}.types)")
        return out

    # ---- datasets -------------------------------------------------------------------------------
    def attach(self, model, strategy) -> "TableDataModule":
        """Datasets for ``model`` trained with ``strategy``: cached encoder outputs (computed once per rows and
        encoder, see :mod:`mmtune.finetune.feature_cache`) when it uses the cache, else raw rows."""
        cfg, p = self.cfg, self.prepared
        self.model = model
        self.cached = strategy.uses_cache
        plain = Collator({n: e.processor for n, e in model.encoders.items()}, self.modalities)
        self.reads = read_options(cfg, [plain], self.modalities)
        """How the datasets read their files (``data.jpeg_draft``, ``data.exif_orientation``), as prediction does."""
        if self.cached:
            from ..finetune.feature_cache import build_cached_dataset, first
            from ..finetune.fingerprints import encoder_fingerprint

            from ..finetune.fingerprints import cache_folder

            cache_dir = cache_folder(cfg)
            specs = {n: e.model_dump(mode="json") for n, e in cfg.model.encoders.items()}
            prints = {n: encoder_fingerprint(enc, specs[n]) for n, enc in model.encoders.items()}
            from ..distributed import training_device

            device = training_device(cfg.trainer.accelerator)
            self.datasets = {s: build_cached_dataset(model, specs, p.dataset(s, self.modalities, self.reads), self.modalities,
                                                     cache_dir, self.eval_batch_size, prints, device,
                                                     getattr(cfg.finetune, "cache_dtype", "float16"))
                             for s in self.splits}
            self.collate = first
        else:
            self.datasets = {s: p.dataset(s, self.modalities, self.reads) for s in self.splits}
            self.collate = plain
        if cfg.synthesis.method != "none":
            from ..synthesis.oversample import synthesize_cached

            task = self.tasks[0]
            self.datasets["train"], self.synthesis = synthesize_cached(
                self.datasets["train"], sorted(self.datasets["train"].outputs), cfg.synthesis, task.name,
                cfg.trainer.seed, task.classes)
        return self

    @property
    def eval_batch_size(self) -> int:
        t = self.cfg.trainer
        return t.eval_batch_size or 2 * t.batch_size

    @property
    def workers(self) -> int:
        return 0 if self.cached else self.cfg.data.num_workers

    # ---- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled, or drawn by the class-balancing sampler; raw values augmented per modality (training only)."""
        from .samplers import balanced_sampler

        cfg, ds, seed = self.cfg, self.datasets["train"], self.cfg.trainer.seed
        from ..distributed import train_sampler

        sampler = train_sampler(ds, seed)
        if cfg.data.bucket_by_length and not self.cached and not cfg.imbalance.sampler:
            from ..distributed import LengthBuckets, text_lengths

            lengths = self.collate.lengths(ds)  # token counts; words where no processor counts tokens
            sampler = LengthBuckets(ds, text_lengths(ds) if lengths is None else lengths, cfg.trainer.batch_size, seed)
        if cfg.imbalance.sampler:
            task = next((x for x in self.tasks if not x.multilabel and not x.regression), None)
            if task is None:
                raise ValueError("imbalance.sampler needs a single-label task to balance")
            # classes only: sample weights act in the loss, so a row counts w once (not w from the sampler and w again)
            sampler = balanced_sampler(np.asarray(ds.labels[task.name]), None, seed)
        collate = self.collate
        if not self.cached:
            augments = {m: modality_of(m).value_augment(getattr(cfg.augment, kind(m), None), self.model, seed)
                        for m in self.modalities}
            collate = Collator(collate.processors, self.modalities, {m: f for m, f in augments.items() if f is not None})
        return make_loader(ds, collate, cfg.trainer.batch_size, True, self.workers, seed, sampler, self._pin)

    @property
    def _pin(self) -> bool:
        """Pinned host memory when Lightning trains on a GPU (faster, asynchronous copies)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def eval_loader(self, split: str, shard: bool = False) -> DataLoader:
        """Every row of ``split`` in order; ``shard``: this process's share of them (Lightning's validation in a
        distributed run: each row scored once, the metrics gathered over all processes)."""
        from ..distributed import EvalShard

        ds = self.datasets[split]
        return make_loader(ds, self.collate, self.eval_batch_size, False, self.workers,
                           sampler=EvalShard(ds) if shard else None)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val", shard=True)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test", shard=True)

    def eval_loaders(self) -> Dict[str, DataLoader]:
        return {s: self.eval_loader(s) for s in self.splits if s != "train"}

    def class_counts(self) -> Dict[str, torch.Tensor]:
        """Per single-label task, the training split's rows of each class (the long-tail losses' prior)."""
        out = {}
        for task in self.tasks:
            if not task.multilabel and not task.regression:
                labels = np.asarray(self.datasets["train"].labels[task.name], dtype=int)
                out[task.name] = torch.as_tensor(np.bincount(labels, minlength=len(task.classes)), dtype=torch.float32)
        return out

    def class_weights(self) -> Dict[str, torch.Tensor]:
        """Per single-label task, the loss weight of each class from the training split's counts."""
        from ..losses import class_weights

        imb = self.cfg.imbalance
        out = {}
        for task in self.tasks:
            if task.multilabel or task.regression or imb.class_weights == "none":
                continue
            labels = np.asarray(self.datasets["train"].labels[task.name], dtype=int)
            w = class_weights(np.bincount(labels, minlength=len(task.classes)), imb.class_weights, imb.effective_beta,
                              task.classes)
            if w is not None:
                out[task.name] = w
        return out


class _Rows:
    """The training cells an encoder fits its inputs on, read again a chunk at a time on every iteration (never a
    list of all rows): the cells of one modality, or for several one dict per row."""

    def __init__(self, ds, modalities):
        self.ds, self.modalities = ds, list(modalities)

    def __iter__(self):
        if len(self.modalities) == 1:
            return self.ds.cells(self.modalities[0])
        return (dict(zip(self.modalities, row)) for row in zip(*(self.ds.cells(m) for m in self.modalities)))
