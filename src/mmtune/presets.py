"""Named recipes: ``preset: fast | balanced | best`` (or ``mmtune fit --preset``) fills in the training settings
from the size of the table and the columns it has; every key the config sets itself wins over the preset.

``fast``      frozen encoders over the embedding cache and a small head: one pass through the encoders, then
              seconds per epoch (no cache when an encoder trains from scratch: tabular columns).
``balanced``  the deepest two layer groups of each encoder train with layer-wise learning-rate decay, with
              augmentation of the image and text columns and label smoothing; from 20,000 rows, images at
              160 px (each epoch runs the image encoders) and fewer epochs.
``best``      a hyper-parameter search (:mod:`mmtune.search`) inside the time budget that tries the ``fast`` recipe
              first and ``balanced`` next, then the best trial refitted into the run bundle.

The settings a preset applies are dotted config keys (:func:`preset_settings`); the table of them in docs/guides/presets-and-search.md is
produced from :data:`PRESETS`, and the tests check the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .modalities import MODALITIES
from .registry import Registry
from .tasks import classifies_single_label


@dataclass(frozen=True)
class TableStats:
    """What a preset looks at."""

    rows: int
    """Rows of the training table (before the validation split)."""
    modalities: Sequence[str] = ()
    """The modalities of the columns (``data.columns`` keys)."""
    image_encoders: Sequence[str] = ()
    """Names of the encoders whose inputs are resized to their ``image_size`` (images; ``Modality.resized``)."""
    from_scratch: bool = False
    """Some encoder is trained from scratch (tabular): its outputs change while training, so nothing is cached."""
    single_label: bool = True
    """Some task is a single-label classification (so ``val_calibrated_loss`` is logged and can be monitored)."""


@dataclass(frozen=True)
class Preset:
    summary: str
    settings: Callable[[TableStats], Dict[str, Any]]
    """Dotted config key -> value."""
    search: bool = False
    """Run :func:`mmtune.search.tune` over the default space from these settings, then refit the best."""
    search_trials: int = 0
    search_seconds: int = 0
    """The default budget of the search when neither ``trainer.max_time`` nor ``--time-limit`` gives one."""
    ensemble: int = 0
    """How many of the best trials the search keeps to choose an ensemble from (0: no ensemble)."""
    search_starts: Tuple[str, ...] = ()
    """Other presets whose recipes the search tries first (as they are, never pruned), before the config as written."""

    @property
    def needs(self) -> Tuple[Tuple[str, str, str], ...]:
        """The optional packages the preset needs: optuna for a search."""
        return (("optuna", "tune", "a preset with a hyper-parameter search"),) if self.search else ()


PRESETS: Registry = Registry("preset")
"""Preset name (``preset``) -> :class:`Preset`."""


def _epochs(rows: int, small: int, medium: int, large: int) -> int:
    return small if rows < 2_000 else medium if rows < 20_000 else large


def _fusion(s: TableStats, dropout: float) -> Dict[str, Any]:
    """Several modalities meet in the bilinear fusion, which can read how they agree (a picture and the note that
    names it) where a concatenation needs many more rows to learn it; one modality is concatenated."""
    if len(s.modalities) >= 2:
        return {"type": "bilinear", "rank": 16, "hidden_dims": [256], "dropout": dropout}
    return {"type": "concat", "hidden_dims": [256], "dropout": dropout}


def _monitor(s: TableStats) -> Dict[str, Any]:
    """Select epochs by the loss after the best temperature: the plain loss rises as a model grows over-confident
    while it still gets better (temperature scaling removes that after training)."""
    return {"trainer.monitor": "val_calibrated_loss"} if s.single_label else {}


def _fast(s: TableStats) -> Dict[str, Any]:
    return {
        # an encoder trained from scratch trains under frozen too, but then nothing can be cached
        "finetune": {"type": "frozen", "cache": not s.from_scratch},
        "model.fusion": _fusion(s, 0.2),
        "optim.lr": 1e-3, "optim.weight_decay": 0.01,
        "schedule.name": "cosine", "schedule.warmup_fraction": 0.05,
        "trainer.max_epochs": _epochs(s.rows, 60, 15, 8), "trainer.batch_size": 32,
        # cached epochs cost seconds: a small validation split's noise should not stop the fit early (on the
        # speech and pairs tasks of bench/automl.py, 60 epochs with patience 20 reached 0.70 where 30 with 10 had 0.63)
        "trainer.early_stopping_patience": 20 if s.rows < 2_000 else 10, **_monitor(s),
    }


def _balanced(s: TableStats) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "finetune": {"type": "partial", "unfreeze_last": 2, "layer_decay": 0.8,
                     "encoder_lr": 1e-4 if s.rows < 20_000 else 2e-4},
        "model.fusion": _fusion(s, 0.1),
        "loss": {"type": "cross_entropy", "label_smoothing": 0.1},
        "optim.lr": 1e-3, "optim.weight_decay": 0.01,
        "schedule.name": "cosine", "schedule.warmup_fraction": 0.1,
        "trainer.max_epochs": _epochs(s.rows, 12, 8, 4), "trainer.batch_size": 32,
        "trainer.early_stopping_patience": 3, **_monitor(s),
    }
    for m in s.modalities:  # each modality's light augmentation, as its augmentation config declares it
        light = getattr(MODALITIES.get(m).Augment, "light", None) if m in MODALITIES else None
        if light:
            out[f"augment.{m}"] = dict(light)
    if s.rows >= 20_000:  # a large table: every epoch runs the image encoders, so a smaller input halves the time
        out.update({f"model.encoders.{name}.image_size": 160 for name in s.image_encoders})
    return out


PRESETS.register("fast", Preset("frozen encoders + embedding cache + a small head", _fast))
PRESETS.register("balanced", Preset("partial unfreezing with layer-wise decay, augmentation, label smoothing",
                                    _balanced))
PRESETS.register("best", Preset("a search (the fast recipe first, then balanced) that fills the time budget; the best trial "
                                "refitted or shipped as it is, with an ensemble of the best trials when selection "
                                "on validation prefers one", _balanced, search=True, search_trials=200, search_seconds=1800,
                                ensemble=5, search_starts=("fast",)))

_PARTS = ("finetune", "model.fusion", "loss")


def preset_settings(name: str, stats: TableStats) -> Dict[str, Any]:
    """The dotted keys preset ``name`` sets for a table like ``stats`` (ValueError naming the valid presets)."""
    return PRESETS.get(name).settings(stats)


def explicit_keys(cfg) -> List[str]:
    """Dotted keys the config sets itself (in its file, dict or overrides), down to the leaves."""
    out: List[str] = []

    def walk(node, prefix: str) -> None:
        for key in getattr(node, "model_fields_set", ()):
            value = getattr(node, key)
            dotted = f"{prefix}{key}"
            if hasattr(value, "model_fields_set"):
                out.append(dotted) if not value.model_fields_set else walk(value, dotted + ".")
            elif isinstance(value, dict) and value and all(hasattr(v, "model_fields_set") for v in value.values()):
                for name, v in value.items():  # model.encoders.<name>
                    walk(v, f"{dotted}.{name}.")
            else:
                out.append(dotted)

    walk(cfg, "")
    return out


def table_stats(cfg, train=None) -> TableStats:
    """Rows of the training table (``train`` or ``data.train``) and the modalities of the columns."""
    from .data.manifest import count_rows

    source = train if train is not None else cfg.data.train
    rows = 0
    if source is not None:
        rows = count_rows(source)
    elif cfg.data.align is not None:
        rows = max(count_rows(t) for t in cfg.data.align.tables)
    from .encoders.offline import from_scratch

    images = [n for n, e in cfg.model.encoders.items() if e.modality in MODALITIES and MODALITIES.get(e.modality).resized]
    scratch = any(from_scratch(e.checkpoint) for e in cfg.model.encoders.values())
    single = classifies_single_label(list((cfg.data.tasks or {}).values()))
    return TableStats(rows=rows, modalities=tuple(cfg.modalities), image_encoders=tuple(images), from_scratch=scratch,
                      single_label=single)


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def preset_table(stats: Optional[TableStats] = None) -> str:
    """Markdown: each preset's settings for a table like ``stats`` (default: 1,000 rows of image + text)."""
    stats = stats or TableStats(rows=1000, modalities=("image", "text"))
    lines = ["| preset | what it does | settings (1,000 image + text rows) |", "|---|---|---|"]
    for name, p in PRESETS.items():
        flat = []
        for k, v in p.settings(stats).items():
            flat += [f"`{k}.{s}={w}`" for s, w in v.items()] if isinstance(v, dict) else [f"`{k}={v}`"]
        extra = f" Search: {p.search_trials} trials or {p.search_seconds} s." if p.search else ""
        lines.append(f"| `{name}` | {p.summary}.{extra} | {' '.join(flat)} |")
    return "\n".join(lines)
