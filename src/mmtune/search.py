"""``mmtune tune``: a hyper-parameter search with optuna, its best trial refitted into a normal run bundle.

The study lives in the run folder (``RUN/tune/study.db``, SQLite), so a killed search continues where it
stopped when run again: trials it left running are marked failed, finished and pruned trials count towards
``--trials``. The first trial of a new study is the config as written (a search never ends below it).
Each trial is a :func:`~mmtune.fit` of its own config in ``RUN/tune/trials`` (without report, probe or
explanations), pruned by optuna's successive halving over epochs (many short trials, the promising ones
continued) from its per-epoch validation metric; frozen-encoder trials share the embedding cache, so after
the first such trial each costs seconds. The best trial so far keeps its bundle. The best trial's config is
written to ``RUN/tune/best.yaml`` and refitted into ``RUN`` (replacing a previous bundle only once complete) —
or, when the budget cannot hold a refit or the refit ends worse than the trial, the trial's own model is shipped;
the trials table and plot are in its report.

Search space: :data:`DEFAULT_SPACE`, narrowed or extended by a YAML mapping of dotted config keys::

    optim.lr: {low: 1.0e-4, high: 3.0e-3, log: true}   # a float range (int: true for integers)
    finetune.type: {choices: [frozen, lora]}           # a choice
    trainer.max_epochs: 5                              # fixed: not searched
    model.fusion.type: null                            # not searched: the config's own value stays
    only: true                                         # optional: the YAML's keys alone, no defaults

Two keys stand for several settings: ``model.fusion.width`` (``hidden_dims: [w]`` or ``width: w``,
whichever the fusion has) and ``augment.strength`` (0-1: image crop, rotation and colour jitter, and text word
dropout, scaled together; only for strategies that run the encoders live). A key of a part section
(``finetune.*``, ``model.fusion.*``, ``loss.*``) is only searched when the trial's type has that setting.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L

from .config import get_raw_key, raw_section, set_raw_key
from .modalities import MODALITIES

log = logging.getLogger("mmtune")

DEFAULT_SPACE: Dict[str, Any] = {
    "finetune.type": {"choices": ["frozen", "partial", "lora"]},
    "finetune.r": {"choices": [4, 8, 16]},
    "finetune.unfreeze_last": {"low": 1, "high": 4, "int": True},
    "finetune.probe_epochs": {"choices": [0, 2]},
    "model.fusion.type": {"choices": ["concat", "bilinear", "gated", "late", "cross_attention"]},
    "model.fusion.width": {"choices": [128, 256, 512]},
    "model.fusion.rank": {"choices": [8, 16, 32]},
    "model.fusion.heads": {"choices": [2, 4, 8]},
    "model.fusion.dropout": {"low": 0.0, "high": 0.4},
    "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "finetune.encoder_lr": {"low": 1e-5, "high": 1e-3, "log": True},
    "optim.weight_decay": {"low": 1e-4, "high": 0.1, "log": True},
    "augment.strength": {"low": 0.0, "high": 1.0},
    "loss.label_smoothing": {"low": 0.0, "high": 0.2},
    "trainer.max_epochs": {"low": 3, "high": 15, "int": True},
}
"""What ``mmtune tune`` searches by default."""

CACHED_FIRST = 8
"""After the starting recipes and the config as written, this many drawn trials are frozen ones on the embedding
cache, whose epochs cost a fraction of a second: a search tries many heads (fusions, widths, learning rates, epochs)
before the trials that train encoders (one of which can take half a short budget) — in ``bench/automl.py`` a
240 s search on speech × pictures had finished three trials, its first drawn one a partial unfreezing for 150 s."""

CACHED_EPOCHS: Dict[str, Any] = {"low": 10, "high": 80, "int": True, "log": True}
"""What a trial whose encoders are frozen and cached draws for ``trainer.max_epochs`` when the space's range is the
default one: an epoch of a head on the embedding cache costs a fraction of a second, and a small head on a pair of
frozen encoders can need many of them (speech × pictures in ``bench/automl.py``: the fast recipe at 30 epochs 0.57 /
0.47 / 0.65 over three seeds, at 60 epochs with patience 20 0.70 / 0.61 / 0.65). Such a trial's early-stopping
patience is at least a third of its epochs, so a noisy small validation split does not end it early."""

_PARTS = {"finetune": "finetune", "model.fusion": "model.fusion", "loss": "loss"}
_VIRTUAL = ("model.fusion.width", "augment.strength")
_TRIAL_SETTINGS = {"evaluation.report": False, "evaluation.explain": 0, "evaluation.linear_probe": False,
                   "evaluation.baselines": False, "evaluation.modality_contribution": False,
                   "evaluation.worst_examples": 0, "evaluation.flatter_warning": False, "trainer.progress_bar": False}


class SearchError(ValueError):
    """A bad search space or search setting (the message names the key)."""


# ---- the space --------------------------------------------------------------------------------------
@dataclass
class Param:
    key: str
    choices: Optional[List[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    name: Optional[str] = None
    """The parameter's name in the study (default: ``key``): another range of the same key needs its own."""

    def suggest(self, trial):
        name = self.name or self.key
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.integer:
            return f"integer {int(self.low)} to {int(self.high)}{' (log)' if self.log else ''}"
        return f"{self.low:g} to {self.high:g}{' (log)' if self.log else ''}"


def parse_space(entries: Mapping[str, Any], where: str = "the search space") -> Dict[str, Any]:
    """``{key: Param or fixed value}`` from a space mapping (SearchError naming the key otherwise)."""
    out: Dict[str, Any] = {}
    for key, spec in entries.items():
        if not isinstance(key, str) or not key:
            raise SearchError(f"{where}: key {key!r} must be a dotted config key such as optim.lr")
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            out[key] = _Fixed(spec)
            continue
        unknown = set(spec) - {"choices", "low", "high", "log", "int"}
        if unknown:
            raise SearchError(f"{where}: key {key!r} has unknown setting(s) {sorted(unknown)}; valid: choices, or "
                              "low, high, log, int")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices or not all(
                    c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise SearchError(f"{where}: key {key!r}: choices must be a non-empty list of numbers, strings or "
                                  f"booleans (got {choices!r})")
            out[key] = Param(key, choices=list(choices))
            continue
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise SearchError(f"{where}: key {key!r} needs choices, or numbers low and high (got {dict(spec)!r})") from None
        if not low < high or (spec.get("log") and low <= 0):
            raise SearchError(f"{where}: key {key!r}: need low < high (and low > 0 with log: true); got {low}, {high}")
        out[key] = Param(key, low=low, high=high, log=bool(spec.get("log", False)), integer=bool(spec.get("int", False)))
    return out


@dataclass
class _Fixed:
    value: Any


def load_space(path: Optional[Union[str, Path, Mapping[str, Any]]], cfg) -> Dict[str, Any]:
    """The default space for ``cfg``, with a YAML file (or mapping) narrowing or extending it."""
    from .config import read_yaml_mapping

    user: Dict[str, Any] = {}
    if isinstance(path, Mapping):
        user = dict(path)
    elif path is not None:
        user = read_yaml_mapping(Path(path), "search space", SearchError)
    only = bool(user.pop("only", False))
    space = {} if only else dict(_default_space(cfg))
    space.update(user)
    parsed = parse_space({k: v for k, v in space.items() if v is not None},
                         str(path) if isinstance(path, (str, Path)) else "the search space")
    for key in parsed:
        _check_key(key)
    return parsed


def check_space(parsed: Mapping[str, Any], base: Dict[str, Any]) -> None:
    """Every choice and both bounds of every key, each set alone in the base config (a part's setting with a type of
    the space that has it), validated as a trial's config would be — before the first trial, so a space whose
    values the schema refuses stops the search with one line naming the key and the value."""
    from .config import ConfigError, _tables, load_config

    tables = _tables()
    for key, p in parsed.items():
        values = [p.value] if isinstance(p, _Fixed) else p.choices if p.choices is not None else [
            int(p.low) if p.integer else p.low, int(p.high) if p.integer else p.high]
        setting = {}
        section = next((s for s in _PARTS if key.startswith(s + ".")), None)
        if section is not None and not key.endswith(".type") and key not in _VIRTUAL:
            types = [get_raw_key(base, f"{section}.type") or {"finetune": "full", "model.fusion": "concat",
                                                        "loss": "cross_entropy"}[section]]
            tp = parsed.get(f"{section}.type")
            types += list(tp.choices or []) if isinstance(tp, Param) else [tp.value] if isinstance(tp, _Fixed) else []
            having = [t for t in types if t in tables[section][0].names() and _has_setting(tables, section, t, key)]
            if not having:
                continue  # no type of this search has the setting: it is never used (as in a trial)
            setting = {f"{section}.type": having[0]}
        for value in values:
            try:
                load_config(trial_config(base, {**setting, key: value}))
            except (ConfigError, ValueError, TypeError) as exc:
                raise SearchError(f"search space: {key} = {value!r} is not a valid setting ({_reason(exc)})") from None


def _default_space(cfg) -> Dict[str, Any]:
    """The default space, less what cannot apply here: adapters without peft, frozen encoders when one
    trains from scratch (it cannot be cached), fusions for several modalities with one encoder."""
    from .encoders.offline import from_scratch
    from .extras import missing_for

    space = copy.deepcopy(DEFAULT_SPACE)
    strategies = space["finetune.type"]["choices"]
    if missing_for([("peft", "lora", "")]):
        strategies.remove("lora")
    scratch = any(from_scratch(e.checkpoint) for e in cfg.model.encoders.values())
    if scratch:
        strategies.remove("frozen")
    if len(cfg.model.encoders) < 2:
        space.pop("model.fusion.type")
    if not _strengths(cfg.modalities):
        space.pop("augment.strength")
    return space


def _check_key(key: str) -> None:
    from .config import Config, _model_in, _valid_keys

    if key in _VIRTUAL:
        return
    parts = key.split(".")
    if parts[0] in ("finetune", "loss") or parts[:2] == ["model", "fusion"]:
        return  # a part's settings depend on its type: checked when a trial's config is validated
    if parts[0] == "model" and len(parts) > 2 and parts[1] == "encoders":
        return
    node: Any = Config
    for i, part in enumerate(parts):
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            valid = _valid_keys(parts[:i])
            raise SearchError(f"search space: unknown config key {key!r}" + (f"; valid keys at "
                              f"{'.'.join(parts[:i]) or 'the top'}: {', '.join(valid)}" if valid else ""))
        node = _model_in(fields[part].annotation) if i < len(parts) - 1 else None


# ---- one trial's config ---------------------------------------------------------------------------------
def trial_config(base: Dict[str, Any], values: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` (a config dict) with ``values`` (dotted key -> value) applied: a changed part ``type`` keeps
    only the base settings the new type has; the two combined keys are expanded."""
    from .config import _keep_settings_of_new_type, _tables

    raw = copy.deepcopy(base)
    tables = _tables()
    types = {f"{section}.type" for section in _PARTS if f"{section}.type" in values}
    for key in types:
        set_raw_key(raw, key, values[key])
    _keep_settings_of_new_type(raw, types)  # as an override of a part's type does
    for key, value in values.items():
        if key.endswith(".type") and key.rsplit(".", 1)[0] in _PARTS:
            continue
        if key == "model.fusion.width":
            node = raw_section(raw, "model.fusion")
            fields = tables["model.fusion"][0].get(node.get("type", "concat")).Config.model_fields
            if "width" in fields:
                node["width"] = int(value)
            elif "hidden_dims" in fields:
                node["hidden_dims"] = [int(value)]
        elif key == "augment.strength":
            _set_augment(raw, float(value))
        else:
            section = next((s for s in _PARTS if key.startswith(s + ".")), None)
            if section is not None:
                node = raw_section(raw, section)
                name = node.get("type") or {"finetune": "full", "model.fusion": "concat", "loss": "cross_entropy"}[section]
                if key[len(section) + 1:] not in tables[section][0].get(name).Config.model_fields:
                    continue  # this trial's type has no such setting
            set_raw_key(raw, key, value)
    if _cached(raw):  # cached encoder outputs cannot be augmented: the base config's augmentation is off here
        for name, node in (raw.get("augment") or {}).items():
            augment = MODALITIES.get(name).Augment if name in MODALITIES else None
            if isinstance(node, dict) and augment is not None:
                node.update(augment.off)
    return raw


def _cached(raw: Dict[str, Any]) -> bool:
    ft = raw.get("finetune") or {}
    return ft.get("type", "full") == "frozen" and ft.get("cache", True)


def _strengths(modalities) -> Dict[str, Any]:
    """Modality -> its augmentation config, for the modalities whose augmentation the search scales."""
    return {m: MODALITIES.get(m).Augment for m in modalities
            if m in MODALITIES and getattr(MODALITIES.get(m).Augment, "at_strength", None) is not None}


def _set_augment(raw: Dict[str, Any], s: float) -> None:
    if _cached(raw):
        return  # cached encoder outputs: inputs cannot be augmented
    for name, augment in _strengths((raw.get("data") or {}).get("columns") or {}).items():
        set_raw_key(raw, f"augment.{name}", {**((raw.get("augment") or {}).get(name) or {}), **augment.at_strength(s)})


# ---- watching a fit -----------------------------------------------------------------------------------
class Watch(L.Callback):
    """The best value of the monitored metric over a fit's validations; with an optuna ``trial``, each epoch's
    value is reported and a trial the pruner stops raises ``optuna.TrialPruned``."""

    def __init__(self, monitor: str, mode: str, trial=None, prune: bool = True):
        self.monitor, self.mode, self.trial, self.prune = monitor, mode, trial, prune
        self.best: Optional[float] = None
        self.values: List[float] = []

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        self.values.append(value)
        if math.isfinite(value) and (self.best is None or (value < self.best if self.mode == "min" else value > self.best)):
            self.best = value
        if self.trial is not None:
            import optuna

            self.trial.report(value, trainer.current_epoch)
            # asked even when it may not prune: successive halving records each trial's rungs as it is asked
            if self.trial.should_prune() and self.prune:
                raise optuna.TrialPruned(f"epoch {trainer.current_epoch}: {self.monitor}={value:.4f}")


# ---- the search ---------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    study_dir: Path
    best_params: Dict[str, Any]
    best_value: Optional[float]
    trials: List[Dict[str, Any]]
    refit: Any = None
    """The :class:`~mmtune.recipe.fit.FitResult` of the best trial's config (None with ``refit=False``)."""
    summary: Dict[str, Any] = field(default_factory=dict)


def tune(config, train=None, val=None, test=None, *, trials: Optional[int] = None,
         time_limit: Optional[float] = None, space=None, overrides: Sequence[str] = (), overwrite: bool = False,
         refit: bool = True, ensemble: Optional[int] = None) -> TuneResult:
    """Search, then refit the best trial into the run bundle ``output_dir/name``.

    ``trials``: finished (complete or pruned) trials the study should hold (default: the preset's, else 10);
    ``time_limit`` seconds for the whole command (default ``trainer.max_time``; a ``best`` preset without one gets
    its own budget): the search starts no trial after 60 % of it, every trial stops training by 85 %; the best
    trial so far keeps its bundle. The refit runs only when what is left can hold it (1.25 × the trial's time),
    stops by 93 %, and when it ends worse than its trial (or cannot run) the trial's own model is shipped instead,
    with a warning and ``metrics["search"]["shipped"]``. ``ensemble`` N > 1 (default: the preset's, else off) keeps
    the N best trials' bundles and, after the refit, chooses an ensemble of the shipped model and those trials by
    greedy selection on validation (:mod:`mmtune.ensemble`), written to ``RUN/ensemble`` and loaded by
    :meth:`~mmtune.Predictor.load` when it has more than one member. A run folder that holds a bundle but no study
    is refused unless ``overwrite``.
    """
    from .config import load_config
    from .extras import require
    from .finetune.fingerprints import cache_folder
    from .presets import PRESETS

    from .memory import keep_freed_memory

    keep_freed_memory()
    optuna = require("optuna", "tune", "the hyper-parameter search (mmtune tune, preset best)")
    cfg = config if not overrides and not isinstance(config, (str, Path, Mapping)) else load_config(config, overrides)
    preset = PRESETS.get(cfg.preset) if cfg.preset else None
    starts: Dict[str, Dict[str, Any]] = {}  # other presets' recipes, tried first (never pruned)
    if preset is not None:  # the preset's settings are the first trial and what the search does not change
        from .config import apply_preset
        from .presets import table_stats

        stats = table_stats(cfg, train)
        for name in preset.search_starts:
            start = apply_preset(load_config({**cfg.model_dump(mode="json", exclude_unset=True), "preset": name}), stats)
            starts[name] = {**start.to_dict(), "preset": None}
        cfg = apply_preset(cfg, stats)
    if trials is None:
        trials = preset.search_trials if preset is not None and preset.search else 10
    if trials < 1:
        raise SearchError(f"--trials must be at least 1 (got {trials})")
    if ensemble is None:
        ensemble = preset.ensemble if preset is not None and preset.search else 0
    if ensemble < 0:
        raise SearchError(f"--ensemble must be 0 (off) or the number of trials to choose from (got {ensemble})")
    budget = time_limit if time_limit is not None else seconds_of(cfg.trainer.max_time)
    if budget is None and preset is not None and preset.search:
        budget = float(preset.search_seconds)
    base = cfg.to_dict()
    base["preset"] = None
    parsed = load_space(space, cfg)
    check_space(parsed, base)
    run_dir = cfg.run_dir
    study_dir = run_dir / "tune"
    if run_dir.is_dir() and any(p.name != "tune" for p in run_dir.iterdir()) and not study_dir.is_dir() and not overwrite:
        raise FileExistsError(f"{str(run_dir)!r} already holds a run: the search's refit would replace it; pass "
                              "--overwrite, or choose another name (--set name=...)")
    from .bundle import check_run_folder, hold_lock

    check_run_folder(run_dir)
    study_dir.mkdir(parents=True, exist_ok=True)

    lock = hold_lock(run_dir.parent / f".{run_dir.name}.tune.lock", f"the search of {str(run_dir)!r} is running in "
                     "another process (pid {pid}); wait for it, or choose another name (--set name=...)")
    try:
        started = time.monotonic()
        from .schema import monitor_mode

        mode = monitor_mode(cfg.trainer.monitor)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(study_dir / 'study.db').resolve()}")
        study = optuna.create_study(
            storage=storage, study_name="mmtune", load_if_exists=True,
            direction="minimize" if mode == "min" else "maximize",
            sampler=optuna.samplers.TPESampler(seed=cfg.trainer.seed, n_startup_trials=4),
            # multi-fidelity: many short trials, the promising ones continued (epochs are the resource): after
            # 1, 3, 9 … epochs a trial goes on only while it is in the best third of the trials that got as far
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
        _fail_leftovers(study, storage)
        if not study.trials:
            # other presets' recipes first (the fast one costs seconds on the embedding cache), so that a budget too
            # short for the config as written still ends with a model trained to its end; then the config as written
            for name in starts:
                study.enqueue_trial({}, user_attrs={"start": name})
            study.enqueue_trial({}, user_attrs={"baseline": True})
            strategy = parsed.get("finetune.type")
            if isinstance(strategy, Param) and strategy.choices and "frozen" in strategy.choices \
                    and len(strategy.choices) > 1:
                for _ in range(CACHED_FIRST):  # drawn like any trial, but on the embedding cache
                    study.enqueue_trial({"finetune.type": "frozen"}, user_attrs={"cached_first": True})
        done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        remaining = trials - len(done)
        cache_dir = str(cache_folder(cfg).resolve())
        # the best finished trials whose bundles are on disk (best first): the best can ship as it is, the others
        # are the ensemble's candidates
        keep_n = max(1, ensemble)
        kept: List[Tuple[float, Path]] = []
        for t in study.trials:
            bundle = t.user_attrs.get("bundle")
            if t.state == optuna.trial.TrialState.COMPLETE and bundle and (Path(bundle) / "bundle.json").is_file():
                kept.append((t.value, Path(bundle)))
        kept = _ranked(kept, mode)
        for _, extra_dir in kept[keep_n:]:
            shutil.rmtree(extra_dir, ignore_errors=True)
        del kept[keep_n:]

        def objective(trial):
            start = trial.user_attrs.get("start")
            fixed = trial.user_attrs.get("baseline") or start in starts
            values = {} if fixed else _suggest(trial, parsed, base)
            raw = trial_config(starts.get(start, base), values)
            for key, value in _TRIAL_SETTINGS.items():
                set_raw_key(raw, key, value)
            raw.update(name=f"trial-{trial.number}", output_dir=str(study_dir / "trials"))
            if (raw.get("finetune") or {}).get("type") == "frozen":
                set_raw_key(raw, "finetune.cache_dir", cache_dir)
            left = _left(budget, started, TRIALS_END)
            if left is not None:
                set_raw_key(raw, "trainer.max_time", {"seconds": max(1, int(left))})
            trial.set_user_attr("values", values)
            try:
                tcfg = load_config(raw)
            except ValueError as exc:  # these settings do not fit together: this trial fails alone, in one line
                reason = _reason(exc)
                trial.set_user_attr("error", reason)
                log.warning("trial %d: its settings do not fit together (%s); the search goes on", trial.number, reason)
                return float("nan")
            from .recipe.fit import train_run

            # a known recipe runs to its end, and so does a head on the embedding cache: its whole run costs seconds,
            # and on a hard pair task it can sit at chance for epochs before it learns (speech × pictures: the fast
            # recipe's validation loss stayed at ln 2 for 7 epochs, then fell to 0.58; pruned at epoch 1 or 3, the
            # search's cached trials never got there)
            watch = Watch(tcfg.trainer.monitor, mode, trial, prune=not fixed and not _cached(raw))
            folder = study_dir / "trials" / tcfg.name
            t0 = time.monotonic()
            try:
                train_run(tcfg, train, val, test, overwrite=True, callbacks=[watch])
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            finally:
                trial.set_user_attr("seconds", round(time.monotonic() - t0, 2))
                trial.set_user_attr("epoch_values", watch.values)
            if watch.best is None:
                shutil.rmtree(folder, ignore_errors=True)
                raise SearchError("the trial logged no validation metric")
            # the best trials so far keep their bundles: the search can ship a trial's own weights, or ensemble them
            kept.append((watch.best, folder))
            ranked = _ranked(kept, mode)
            for _, dropped in ranked[keep_n:]:
                shutil.rmtree(dropped, ignore_errors=True)
            kept[:] = ranked[:keep_n]
            if any(d == folder for _, d in kept):
                trial.set_user_attr("bundle", str(folder))
            return watch.best

        if remaining > 0:
            timeout = _left(budget, started, SEARCH_END)
            # a trial whose settings do not fit together fails alone (its objective returns NaN, said in one line);
            # any other error — bad rows, a missing file or package — stops the search with its own message
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(), gc_after_trial=True)
        table = trials_table(study)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise SearchError(f"no trial of the search in {str(study_dir)!r} finished; see its trials.csv")
        best = _best_trial(complete, mode)
        best_values = best.user_attrs.get("values", {})
        best_raw = trial_config(starts.get(best.user_attrs.get("start"), base), best_values)
        from .io import atomic_write_text
        import yaml

        atomic_write_text(study_dir / "best.yaml", yaml.safe_dump(best_raw, sort_keys=False))
        _write_trials_csv(study_dir / "trials.csv", table)
        summary = {"trials": table, "best_trial": best.number, "best_value": best.value, "monitor": cfg.trainer.monitor,
                   "direction": mode, "best_params": best_values, "study": str(study_dir / "study.db")}
        out = TuneResult(study_dir, best_values, best.value, table, summary=summary)
        if refit:
            own = Path(best.user_attrs.get("bundle", "")) if best.user_attrs.get("bundle") else None
            own = own if own is not None and (own / "bundle.json").is_file() else None
            left = _left(budget, started, REFIT_END)
            needed = float(best.user_attrs.get("seconds") or 0.0)
            if own is not None and left is not None and left < 1.25 * needed + 5:
                # a refit cut short by the budget would ship a worse model: ship the trial's own
                out.refit = ship_trial(own, best_raw, summary, best.number,
                                       f"the budget left {left:.0f} s, and the trial took {needed:.0f} s: no refit")
            else:
                if left is not None:
                    set_raw_key(best_raw, "trainer.max_time", {"seconds": max(1, int(left))})
                from .recipe.fit import train_run

                watch = Watch(cfg.trainer.monitor, mode)
                rcfg = load_config(best_raw)
                out.refit = train_run(rcfg, train, val, test, overwrite=True, keep=("tune",), callbacks=[watch],
                                extra=lambda: {"search": {**summary, "refit_value": watch.best}})
                summary["refit_value"] = watch.best
                if own is not None and (watch.best is None or _better(best.value, watch.best, mode, REFIT_TOLERANCE)):
                    said = "none" if watch.best is None else f"{watch.best:.4f}"
                    log.warning("search: the refit reached %s=%s, worse than trial %d's %.4f; the trial's own model is "
                                "shipped instead", cfg.trainer.monitor, said, best.number, best.value)
                    out.refit = ship_trial(own, best_raw, summary, best.number,
                                           f"the refit reached {said}, worse than the trial's {best.value:.4f}")
            summary.update(out.refit.metrics.get("search", {}))
            if ensemble > 1:
                summary["ensemble"] = _ensemble_trials(run_dir, kept, best.number, log)
                if summary["ensemble"]["members"] and (run_dir / "report.html").is_file():
                    from .evaluation.report import build_report

                    build_report(run_dir)  # with the ensemble's section (report.html is regenerable)
        log.info("search: best trial %d, %s=%.4f; refit %s", best.number, cfg.trainer.monitor, best.value,
                 summary.get("refit_value"))
        return out
    finally:
        os.close(lock)


SEARCH_END = 0.6
"""Share of the budget after which the search starts no new trial."""
TRIALS_END = 0.85
"""Share of the budget by which every trial has stopped training (its evaluation follows)."""
REFIT_END = 0.93
"""Share of the budget by which the refit stops training: its evaluation, report and bundle fit in the rest."""
REFIT_TOLERANCE = 1e-4
"""How much worse than its trial a refit may end (the same seeded fit, so equal on one machine) and still ship."""


def _better(a: Optional[float], b: Optional[float], mode: str, tolerance: float = 0.0) -> bool:
    """Whether ``a`` is better than ``b`` by more than ``tolerance`` (``mode`` min or max)."""
    if a is None or not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a < b - tolerance if mode == "min" else a > b + tolerance


TIE_TOLERANCE = 1e-6
"""Trials whose monitored values differ by no more than this are tied."""


def _best_trial(complete, mode: str):
    """The finished trial with the best value; among tied ones (within :data:`TIE_TOLERANCE`, e.g. several that
    separate a small validation split perfectly) the config as written, else the earliest."""
    finite = [t for t in complete if t.value is not None and math.isfinite(t.value)] or list(complete)
    top = min(finite, key=lambda t: (t.value if mode == "min" else -t.value, t.number))
    tied = [t for t in finite if not _better(top.value, t.value, mode, TIE_TOLERANCE)]
    return next((t for t in tied if t.user_attrs.get("baseline")), min(tied, key=lambda t: t.number))


def _ranked(kept, mode: str):
    """``(value, folder)`` pairs, best first (a NaN or missing value last)."""
    def key(item):
        v = item[0]
        bad = v is None or not math.isfinite(v)
        return (bad, 0.0 if bad else (v if mode == "min" else -v))

    return sorted(kept, key=key)


def _ensemble_trials(run_dir: Path, kept, best_number: int, log) -> Dict[str, Any]:
    """The ensemble of the shipped model and the kept trials (:func:`mmtune.ensemble.build_ensemble`); what the
    search's summary says of it."""
    from .ensemble import FOLDER, build_ensemble

    old = run_dir / FOLDER
    if old.is_dir():  # an earlier search's ensemble: its members may be kept trials again
        shutil.rmtree(old)
    candidates = {"run": run_dir}
    for _, folder in kept:
        if (folder / "bundle.json").is_file():
            candidates[folder.name] = folder
    try:
        meta = build_ensemble(run_dir, candidates, move=[n for n in candidates if n != "run"], source="search",
                              log_fn=lambda m: log.info("%s", m))
    except (ValueError, OSError, KeyError) as exc:
        log.warning("search: no ensemble (%s); the run ships its single model", exc)
        return {"members": None, "why": str(exc)}
    if meta is None:
        log.info("search: the ensemble selection chose a single model; the run ships it alone")
        return {"members": None, "why": "selection chose a single model"}
    return {"members": {m["name"]: m["weight"] for m in meta["members"]},
            "val": meta["metrics"].get("val"), "test": meta["metrics"].get("test")}


def ship_trial(folder: Path, raw: Dict[str, Any], summary: Dict[str, Any], number: int, why: str):
    """The run bundle made from trial ``number``'s own bundle in ``folder`` (its weights, calibration, metrics and
    predictions) under the run's config ``raw``, with the report rebuilt; returns a FitResult."""
    import pandas as pd

    from .bundle import RunClaim, read_bundle, write_bundle
    from .config import load_config
    from .recipe.fit import FitResult

    cfg = load_config(raw)
    b = read_bundle(folder)
    metrics = {**b.metrics, "search": {**summary, "shipped": f"trial {number}", "shipped_why": why}}
    if cfg.evaluation.flatter_warning:  # (quiet inside the trial: said once, for the model that ships)
        from .evaluation.metrics import flattering_validation

        warned = flattering_validation(metrics, b.tasks)
        for w in warned:
            log.warning(w)
        if warned:
            metrics["warnings"] = warned
    predictions = {p.stem: pd.read_csv(p) for p in sorted((folder / "predictions").glob("*.csv"))}
    log.warning("search: shipping trial %d's own model (%s)", number, why)
    with RunClaim(cfg.run_dir, overwrite=True, keep=("tune",)) as claim:
        report = None
        if cfg.evaluation.report:
            from .evaluation.report import build_report

            report = lambda: build_report(claim.work_dir)  # noqa: E731
        write_bundle(claim.work_dir, cfg, b.model, b.tasks, b.calibration, metrics, None, predictions, report,
                     b.reference)
        claim.commit()
    return FitResult(cfg.run_dir, metrics, cfg, b.model, b.tasks, b.calibration, reference=b.reference)


def _reason(exc: Exception) -> str:
    """The first line of a config error that says something (not its "invalid configuration:" heading)."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip() not in ("", "invalid configuration:")]
    return lines[0] if lines else type(exc).__name__


_ENCODER_TRAINING = ("finetune.probe_epochs", "augment.strength")
"""Settings only a strategy that trains its encoders uses: nothing is fine-tuned after a probe, and cached frozen
encoders see no augmentation."""


def _trains_encoders(tables, strategy: Optional[str]) -> bool:
    table = tables["finetune"][0]
    return strategy not in table or getattr(table.get(strategy), "trains_encoders", True)


def _has_setting(tables, section: str, type_name: str, key: str) -> bool:
    """Whether part ``type_name`` of ``section`` uses setting ``key`` (a trial of another type does not draw it)."""
    return key[len(section) + 1:] in tables[section][0].get(type_name).Config.model_fields and (
        key not in _ENCODER_TRAINING or _trains_encoders(tables, type_name))


def _suggest(trial, space: Mapping[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """Values for this trial: the part types first, then the keys their types have."""
    from .config import _tables

    values: Dict[str, Any] = {}
    tables = _tables()
    order = sorted(space, key=lambda k: (not k.endswith(".type"), k))
    for key in order:
        p = space[key]
        section = next((s for s in _PARTS if key.startswith(s + ".")), None)
        if section is not None and not key.endswith(".type") and key != "model.fusion.width":
            name = values.get(f"{section}.type", get_raw_key(base, f"{section}.type"))
            if not _has_setting(tables, section, name, key):
                continue
        trains = _trains_encoders(tables, values.get("finetune.type", get_raw_key(base, "finetune.type")))
        if key in _ENCODER_TRAINING and not trains:
            continue
        if key == "trainer.max_epochs" and not trains and p == parse_space({key: DEFAULT_SPACE[key]})[key]:
            cached = parse_space({key: CACHED_EPOCHS})[key]
            cached.name = f"{key} (cached)"
            values[key] = cached.suggest(trial)
            if "trainer.early_stopping_patience" not in space:
                patience = get_raw_key(base, "trainer.early_stopping_patience")
                if patience is not None:  # None: the base config does not stop early
                    values["trainer.early_stopping_patience"] = max(int(patience), round(values[key] / 3))
            continue
        values[key] = p.value if isinstance(p, _Fixed) else p.suggest(trial)
    return values


def _fail_leftovers(study, storage) -> None:
    """Trials a killed search left running (this process holds the search's lock, so nothing else runs them)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, t.number)
        storage.set_trial_user_attr(trial_id, "note", "left running by a stopped search")
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)


def trials_table(study) -> List[Dict[str, Any]]:
    import optuna

    out = []
    for t in study.trials:
        if t.state == optuna.trial.TrialState.WAITING:
            continue  # enqueued, not started (the cached first trials beyond the search's count)
        out.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                    "epochs": len(t.user_attrs.get("epoch_values", [])), "seconds": t.user_attrs.get("seconds"),
                    "params": "the config as written" if t.user_attrs.get("baseline") else
                    f"the {t.user_attrs['start']} preset" if t.user_attrs.get("start") else
                    ", ".join(f"{k}={_short(v)}" for k, v in (t.user_attrs.get("values") or {}).items()),
                    "epoch_values": t.user_attrs.get("epoch_values", [])})
    return out


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _write_trials_csv(path: Path, table: List[Dict[str, Any]]) -> None:
    import pandas as pd

    from .io import atomic_write_with

    df = pd.DataFrame([{k: v for k, v in r.items() if k != "epoch_values"} for r in table])
    atomic_write_with(path, lambda tmp: df.to_csv(tmp, index=False))


def seconds_of(max_time) -> Optional[float]:
    """``trainer.max_time`` ("DD:HH:MM:SS" or {"days", "hours", "minutes", "seconds"}) in seconds."""
    if max_time is None:
        return None
    if isinstance(max_time, Mapping):
        from datetime import timedelta

        return timedelta(**max_time).total_seconds()
    parts = [float(x) for x in str(max_time).split(":")]
    scale = [86400, 3600, 60, 1][-len(parts):]
    return sum(a * b for a, b in zip(parts, scale))


def _left(budget: Optional[float], started: float, share: float) -> Optional[float]:
    if budget is None:
        return None
    return max(0.0, budget * share - (time.monotonic() - started))
