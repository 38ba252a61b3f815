"""``fit``: config + tables in, a run bundle out — a short recipe over the parts.

claim the run folder → data → model → strategy → train (Lightning) → evaluate and calibrate → bundle."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import lightning as L
import pandas as pd

from ..bundle import RunClaim, read_resume_state, write_bundle
from ..config import Config, load_config
from ..distributed import is_main_process
from ..data.datamodule import TableDataModule
from ..data.manifest import TableSource
from ..evaluation.evaluate import finalize
from ..evaluation.probe import compare as compare_probe
from ..evaluation.probe import linear_probe
from ..explain import reference_outputs
from ..extras import MissingExtraError, missing_for
from ..finetune import build_strategy, trainable_parameter_count
from ..finetune.fingerprints import cache_folder
from ..logs import quiet_libraries
from ..memory import keep_freed_memory
from ..presets import PRESETS
from ..losses import build_loss
from ..models import model_for
from ..training.trainer import train as train_model

log = logging.getLogger("mmtune")


def fit(config: Union[Config, str, Path, Mapping[str, Any], TableSource, None] = None, train: Optional[TableSource] = None,
        val: Optional[TableSource] = None, test: Optional[TableSource] = None, *, label: Optional[str] = None,
        columns: Optional[Mapping[str, str]] = None, group: Optional[str] = None, preset: Optional[str] = None,
        time_limit: Optional[float] = None,
        overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False,
        callbacks: Sequence[L.Callback] = (), extra: Union[Mapping[str, Any], Callable[[], Mapping[str, Any]], None] = None,
        keep: Sequence[str] = ()) -> "FitResult":
    """Fine-tune the configured model and write its run bundle.

    With ``label``, no config is needed: ``fit(table, label="y")`` (``table`` a DataFrame or a manifest path, as
    ``config`` or ``train``) infers each column's kind and builds the config (:mod:`mmtune.autoconfig`, printed);
    ``columns`` sets a column's kind (``{"notes": "text", "row_id": "ignore"}``), ``group`` the group column
    (``data.group_column``), ``preset`` the recipe (default
    ``balanced``), ``time_limit`` the budget in seconds; ``overrides`` apply on top.

    ``train`` / ``val`` / ``test`` (DataFrames or manifest paths) take precedence over the config's
    ``data.*`` paths. ``resume`` continues from ``checkpoints/last.ckpt`` (refused when the config changed
    in a way that changes the model or its training); ``overwrite`` builds the new run beside an existing
    one of the same name and replaces it only once complete. Returns the bundle folder and its metrics.
    A ``preset`` in the config fills in the settings the config does not set (:mod:`mmtune.presets`); the
    ``best`` preset runs a short search (:func:`mmtune.search.tune`) and refits its best trial. ``extra``
    entries (or what ``extra()`` returns after training) go into ``metrics.json`` as they are; ``keep`` names
    sub-folders of the old run an overwrite carries into the new one.

    Raises ConfigError (bad config), BadRowsError (bad rows with ``on_bad_rows: error``), MissingExtraError
    (an optional package the config needs), FileExistsError (the run folder is taken and neither ``resume``
    nor ``overwrite`` is set), RunInUseError (another process is writing the same run).
    """
    quiet_libraries()
    keep_freed_memory()
    if label is not None:
        from ..autoconfig import auto_config

        table = train if train is not None else config
        if table is None:
            raise ValueError("fit(table, label=...): give the training table (a DataFrame or a manifest path)")
        config = auto_config(table, label, test=test, columns=columns, group=group, preset=preset or "balanced",
                             log=lambda m: print(m, flush=True) if is_main_process() else None)
        train = table if isinstance(table, pd.DataFrame) else None
        test = test if isinstance(test, pd.DataFrame) else None
    elif preset is not None:
        overrides = [f"preset={preset}", *overrides]
    if time_limit is not None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be a positive number of seconds (got {time_limit})")
        overrides = [*overrides, "trainer.max_time={seconds: %d}" % max(1, round(time_limit))]
    cfg = config if isinstance(config, Config) and not overrides else load_config(config, overrides)
    resolved = cfg
    if cfg.preset:
        from ..config import apply_preset
        from ..presets import table_stats

        resolved = apply_preset(cfg, table_stats(cfg, train))
    check_extras(resolved)
    if cfg.preset and PRESETS.get(cfg.preset).search:
        from ..search import tune

        # the search applies the preset itself: its other starting recipes (the fast one) are built from the config
        # as the user wrote it, which the resolved settings would otherwise all override
        return tune(cfg, train=train, val=val, test=test, overwrite=overwrite).refit
    return train_run(resolved, train, val, test, resume=resume, overwrite=overwrite, callbacks=callbacks,
                     extra=extra, keep=keep)


def train_run(cfg: Config, train: Optional[TableSource] = None, val: Optional[TableSource] = None,
              test: Optional[TableSource] = None, *, resume: bool = False, overwrite: bool = False,
              callbacks: Sequence[L.Callback] = (), extra: Union[Mapping[str, Any], Callable[[], Mapping[str, Any]], None] = None,
              keep: Sequence[str] = ()) -> "FitResult":
    """One model from a config with nothing left to infer or resolve (its preset's settings applied, no search):
    claim the run folder, train, evaluate, calibrate, write the bundle. :func:`fit` ends here once it has built the
    config; the search's trials and refit, the cross-validation folds and the baselines start here, so a table enters
    :func:`fit` once. Arguments as :func:`fit`'s."""
    quiet_libraries()
    keep_freed_memory()
    check_extras(cfg)  # again for a config that did not come through fit (cheap: package lookups)
    main = is_main_process()  # in a distributed run only the main process writes
    if cfg.evaluation.cv and not resume:
        extra, keep, overwrite = _cross_validate(cfg, train, test, extra, keep, overwrite)
    with RunClaim(cfg.run_dir, resume, overwrite, follower=not main, keep=keep) as claim:
        run_dir = claim.work_dir
        previous = read_resume_state(run_dir, cfg) if claim.resume else None
        L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        data = TableDataModule(cfg, train, val, test).read()
        build_loss(cfg.loss).check_tasks(data.tasks)
        model = model_for(cfg, data.tasks)
        data.fit_encoders(model)
        started = time.perf_counter()
        probe = linear_probe(model, data, cache_folder(cfg), data.eval_batch_size, cfg.evaluation.calibration_bins,
                             cfg.trainer.seed, cfg.evaluation.linear_probe_rows, cfg.evaluation.few_shot,
                             cfg.evaluation.zero_shot_template) \
            if cfg.evaluation.linear_probe and main and cfg.task != "matching" else {}
        probe_seconds = time.perf_counter() - started
        strategy = build_strategy(cfg.finetune)
        strategy.prepare(model)
        strategy.apply(model)
        if cfg.trainer.gradient_checkpointing:
            done = [n for n, e in model.encoders.items() if e.enable_gradient_checkpointing()]
            log.info("gradient checkpointing in encoder(s) %s%s", ", ".join(done) or "(none)",
                     "" if len(done) == len(model.encoders) else
                     f"; not supported by {', '.join(n for n in model.encoders if n not in done)}")
        log.info("trainable parameters: %d", trainable_parameter_count(model))
        data.attach(model, strategy)
        info = train_model(cfg, model, strategy, data, run_dir, previous, callbacks)
        device, model = info.pop("device"), info.pop("model")
        if info.pop("global_rank") != 0:  # the other processes of a distributed run stop here
            return FitResult(cfg.run_dir, {}, cfg, model.cpu(), data.tasks, {}, main=False)
        info["trainable_parameters"] = trainable_parameter_count(model)
        strategy.finish(model)  # LoRA / IA3 folded into plain weights: what the bundle ships
        model.to(device)  # evaluation, calibration and contribution on the training device
        if cfg.task == "matching":
            metrics = _finish_matching(cfg, model, data, run_dir, device, info, extra)
            claim.commit()
            return FitResult(cfg.run_dir, metrics, cfg, model, data.tasks, {})
        counts = {k: v.numpy() for k, v in data.class_counts().items()}  # the training split's rows per class
        calibration, metrics, predictions = finalize(
            model, data.tasks, data.eval_loaders(), data.prepared.frames, cfg.evaluation, cfg.modalities,
            cfg.data.id_column, {s: data.shown(s) for s in data.splits if s != "train"}, device=device,
            group_column=cfg.data.group_column,
            class_counts=counts)
        reference = reference_outputs(model, data.eval_loader("train"))
        if cfg.evaluation.explain:
            metrics["explanations"] = _explain_worst(cfg, model, data, calibration, run_dir, device, reference)
        model.cpu()
        metrics["train_class_counts"] = {k: [int(x) for x in v] for k, v in counts.items()}
        metrics.update(info, **({"synthesis": data.synthesis} if data.synthesis is not None else {}),
                       **({"alignment": data.prepared.alignment} if data.prepared.alignment else {}),
                       **({"linear_probe": probe, "model_minus_probe": compare_probe(metrics, probe),
                           "linear_probe_seconds": round(probe_seconds, 2)} if probe else {}),
                       **dict((extra() if callable(extra) else extra) or {}))
        if cfg.evaluation.baselines and len(cfg.modalities) > 1:
            from .baselines import fit_baselines

            metrics["baselines"] = fit_baselines(cfg, metrics, train, val, test)
        report = _report(run_dir) if cfg.evaluation.report else None
        write_bundle(run_dir, cfg, model, data.tasks, calibration, metrics, data.rejected, predictions, report, reference)
        claim.commit()
    if cfg.evaluation.cv and cfg.evaluation.cv_ensemble and main:
        from ..crossval import ship_folds

        ship_folds(cfg, log=lambda m: log.info("%s", m))
    return FitResult(cfg.run_dir, metrics, cfg, model, data.tasks, calibration, reference=reference)


def _finish_matching(cfg: Config, model, data, run_dir: Path, device, info, extra) -> Dict[str, Any]:
    """A matcher's evaluation (:mod:`mmtune.evaluation.matching`: retrieval metrics of the held-out splits) and
    its bundle (no calibration: a pair's score is a cosine, its probability the pair head's)."""
    from ..evaluation.calibration import Calibration
    from ..evaluation.matching import evaluate_matching

    metrics, predictions = evaluate_matching(model, data.eval_loaders(), data.prepared.frames, cfg.data,
                                             {s: data.shown(s) for s in data.splits if s != "train"}, device)
    model.cpu()
    metrics.update(info, task="matching", **dict((extra() if callable(extra) else extra) or {}))
    write_bundle(run_dir, cfg, model, data.tasks, {t.name: Calibration() for t in data.tasks}, metrics, data.rejected,
                 predictions, _report(run_dir) if cfg.evaluation.report else None)
    return metrics


def _cross_validate(cfg: Config, train, test, extra, keep, overwrite):
    """Run the folds (:mod:`mmtune.crossval`) into ``RUN/cv`` before the run's own fit, refusing first what the run's
    claim would refuse; returns the fit's ``extra`` (with ``cv``), ``keep`` and ``overwrite`` for that fit."""
    from ..bundle import check_run_folder
    from ..crossval import cross_validate

    if cfg.preset and PRESETS.get(cfg.preset).search:
        raise ValueError(f"--cv with preset {cfg.preset!r} (a search): cross-validate a fixed recipe (fast, balanced) "
                         "or the search's best.yaml")
    run = cfg.run_dir
    check_run_folder(run)
    if run.is_dir() and any(p.name != "cv" for p in run.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(run)!r} already holds a run: pass --overwrite to replace it, or choose another "
                              "name (--set name=...)")
    cv = cross_validate(cfg, train, test, log=lambda m: log.info("%s", m))
    given = extra

    def merged():
        out = dict((given() if callable(given) else given) or {})
        return {**out, "cv": cv}

    return merged, (*keep, "cv"), True


def check_extras(cfg: Config) -> None:
    """Every optional package the config's parts need, checked before any work (MissingExtraError)."""
    from ..fusion import fusion_class

    from ..modalities import modality_of

    needs = list(build_strategy(cfg.finetune).needs) + list(getattr(fusion_class(cfg.model.fusion), "needs", ()))
    needs += [n for m in cfg.modalities for n in modality_of(m).needs]
    sections = [cfg.synthesis, cfg.evaluation, *(getattr(cfg.augment, m) for m in cfg.modalities if hasattr(cfg.augment, m))]
    needs += [n for section in sections for n in section.needs()]
    needs += list(PRESETS.get(cfg.preset).needs) if cfg.preset else []
    missing = missing_for(needs)
    if missing:
        raise MissingExtraError("; ".join(missing))


def _explain_worst(cfg, model, data, calibration, run_dir: Path, device, reference) -> Dict[str, Any]:
    """The most confidently misclassified rows of the test split (else validation), explained into
    ``explanations/`` for the report to link."""
    from ..explain import explain_worst
    from ..serving.predictor import Predictor

    split = "test" if "test" in data.prepared.frames else "val"
    pred = Predictor(model, cfg, data.tasks, calibration, run_dir, device, workers=1, reference=reference)
    out = explain_worst(pred, data.prepared.frames[split], data.prepared.base_dirs[split], cfg.evaluation.explain,
                        run_dir / "explanations")
    if "skipped" in out:
        log.warning("explanations skipped: %s", out["skipped"])
    return {"split": split, **out}


def _report(run_dir: Path):
    from ..evaluation.report import build_report

    return lambda: build_report(run_dir)


@dataclass
class FitResult:
    run_dir: Path
    metrics: Dict[str, Any]
    config: Config
    model: Any = None
    """The trained model as it is in memory after fit (LoRA merged, on the CPU) — what the bundle holds."""
    tasks: Any = None
    """The tasks with their classes."""
    calibration: Dict[str, Any] = field(default_factory=dict)
    """Task name -> the fitted :class:`~mmtune.evaluation.calibration.Calibration`."""
    main: bool = True
    """False in the other processes of a distributed run: they wrote nothing, and ``metrics`` is empty."""

    reference: Dict[str, Any] = field(default_factory=dict)
    """The training rows' average encoder outputs (the explanations' baseline)."""

    def in_memory(self):
        """A :class:`~mmtune.Predictor` over the in-memory model (no reloading from the bundle)."""
        from ..serving.predictor import Predictor

        return Predictor(self.model, self.config, self.tasks, self.calibration, self.run_dir, reference=self.reference)

    def load(self):
        """The bundle as a :class:`~mmtune.Predictor`."""
        from ..serving.predictor import Predictor

        return Predictor.load(self.run_dir)


__all__ = ["FitResult", "fit", "quiet_libraries"]
