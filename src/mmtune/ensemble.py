"""Ensembles of run bundles: chosen by greedy selection over their validation predictions (Caruana et al. 2004),
stored beside the run's own model, loaded by :meth:`~mmtune.Predictor.load` as one predictor.

An ensemble lives in ``RUN/ensemble/ensemble.json``: its members (run bundles inside the run folder — the run's own
model is ``"."``, a search's trials are moved into ``RUN/ensemble/trial-<n>``, cross-validation folds stay in
``RUN/cv/fold-<i>``), their weights, the ensemble's own calibration and its metrics. A member is a complete run
bundle (checked as any bundle is when it loads); the ensemble averages the members' *calibrated* probabilities
(regression: predictions) with its weights, then applies its own calibration (a temperature and decision thresholds
fitted on the averaged validation probabilities). Members must read their inputs alike (the same encoders and
processors, the same tasks and classes): a batch is decoded once and run through each member.

Selection (:func:`greedy_selection`): start from nothing; each round add (with replacement) the candidate that
makes the running average's validation loss lowest — negative log-likelihood (single-label), binary cross-entropy
(multi-label), mean squared error over the target's variance (regression), averaged over tasks — then keep the
prefix of rounds with the lowest loss. The weights are the counts over that prefix. The validation rows choose
the weights, so the ensemble's validation figures flatter it a little; its test figures do not.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

log = logging.getLogger("mmtune")

FOLDER = "ensemble"
MARKER = "ensemble.json"
FORMAT = 1
ROUNDS = 25
"""Rounds of greedy selection (members added, with replacement)."""


class EnsembleError(ValueError):
    pass


# ---- the candidates' predictions ------------------------------------------------------------------------------
def stored_predictions(bundle_dir: Path, tasks, calibration, split: str) -> Optional[Dict[str, Any]]:
    """A bundle's stored predictions of ``split`` (``predictions/<split>.csv``): ``{"rows", "labels": {task},
    "proba": {task: calibrated (N, C)}}``, or None when the bundle has none."""
    path = Path(bundle_dir) / "predictions" / f"{split}.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    labels: Dict[str, Any] = {}
    proba: Dict[str, np.ndarray] = {}
    for t in tasks:
        true = df[f"{t.name}:true"]
        if t.regression:
            labels[t.name] = true.to_numpy(np.float64)
            proba[t.name] = df[f"{t.name}:pred"].to_numpy(np.float64)[:, None]
            continue
        if t.multilabel:
            hot = np.zeros((len(df), len(t.classes)), dtype=np.int64)
            for i, v in enumerate(true.fillna("").astype(str)):
                for j in filter(None, v.split("|")):
                    hot[i, int(float(j))] = 1
            labels[t.name] = hot
        else:
            labels[t.name] = true.to_numpy(np.int64)
        raw = df[[f"{t.name}:p:{c}" for c in t.classes]].to_numpy(np.float64)
        proba[t.name] = np.asarray(calibration[t.name].probabilities(t, raw), dtype=np.float64)
    return {"rows": df["row"].to_numpy(), "labels": labels, "proba": proba}


def task_loss(task, y, p: np.ndarray) -> float:
    """What selection minimises for one task (lower is better)."""
    p = np.asarray(p, dtype=np.float64)
    if task.regression:
        y = np.asarray(y, dtype=np.float64)
        return float(np.mean((p[:, 0] - y) ** 2) / max(float(np.var(y)), 1e-12))
    q = np.clip(p, 1e-12, 1 - 1e-12)
    if task.multilabel:
        y = np.asarray(y, dtype=np.float64)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    y = np.asarray(y, dtype=np.int64)
    return float(-np.mean(np.log(q[np.arange(len(y)), y])))


def mixture(probas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Dict[str, np.ndarray]:
    """The weighted average of the members' (calibrated) probabilities, per task."""
    w = np.asarray(weights, dtype=np.float64)
    return {t: sum(wi * np.asarray(p[t], dtype=np.float64) for wi, p in zip(w, probas) if wi > 0) / w.sum()
            for t in probas[0]}


def greedy_selection(candidates: Sequence[Mapping[str, np.ndarray]], labels: Mapping[str, Any], tasks,
                     rounds: int = ROUNDS) -> Tuple[List[int], List[float]]:
    """Caruana's ensemble selection with replacement: ``(counts per candidate, loss after each round)``; the
    counts are those of the best prefix of rounds (the first, on ties)."""
    if not candidates:
        raise EnsembleError("ensemble selection needs at least one candidate")

    def loss(p):
        return float(np.mean([task_loss(t, labels[t.name], p[t.name]) for t in tasks]))

    total = {t.name: np.zeros_like(np.asarray(candidates[0][t.name], dtype=np.float64)) for t in tasks}
    picks: List[int] = []
    history: List[float] = []
    for r in range(rounds):
        scores = [loss({t.name: (total[t.name] + c[t.name]) / (r + 1) for t in tasks}) for c in candidates]
        best = int(np.argmin(scores))
        picks.append(best)
        history.append(scores[best])
        for t in tasks:
            total[t.name] = total[t.name] + candidates[best][t.name]
    stop = int(np.argmin(history)) + 1
    counts = np.bincount(picks[:stop], minlength=len(candidates)).tolist()
    return counts, history


# ---- building ------------------------------------------------------------------------------------------------
def _reads_alike(a, b) -> bool:
    """Two members' configs decode and encode rows the same way (a batch collated once serves both)."""
    from .config import get_raw_key as _get

    da, db = a.to_dict(), b.to_dict()
    return all(_strip_paths(_get(da, k)) == _strip_paths(_get(db, k)) for k in ("model.encoders", "data"))


def _strip_paths(node):
    """A config section without the settings that do not change how a row is read (table paths, split seeds)."""
    if isinstance(node, dict):
        return {k: _strip_paths(v) for k, v in node.items()
                if k not in ("train", "val", "test", "val_fraction", "split_seed", "group_column", "cache_dir")}
    return node


def build_ensemble(run_dir: Path, candidates: Mapping[str, Path], *, move: Sequence[str] = (), rounds: int = ROUNDS,
                   weights: Optional[Mapping[str, float]] = None, source: str = "search",
                   log_fn=None) -> Optional[Dict[str, Any]]:
    """Choose an ensemble of the run bundles ``candidates`` (name -> folder; all trained on the same split, their
    predictions of it stored) and write ``RUN/ensemble/ensemble.json``. The candidates named in ``move`` that are
    chosen are moved into ``RUN/ensemble/<name>``. ``weights`` fixes the weights instead of selecting them (a
    cross-validation's folds: their validation rows differ, so nothing is selected and nothing is calibrated
    again). Returns what was written (None when the ensemble would be a single model: nothing is written)."""
    from .bundle import read_bundle
    from .evaluation.calibration import Calibration
    from .evaluation.evaluate import fit_calibration
    from .evaluation.metrics import main_metric, task_metrics
    from .io import atomic_write_text

    say = log_fn or (lambda m: log.info("%s", m))
    run_dir = Path(run_dir)
    bundles = {name: read_bundle(folder, model=False) for name, folder in candidates.items()}
    names = list(bundles)
    ref = bundles[names[0]]
    usable = [n for n in names if _reads_alike(ref.config, bundles[n].config)
              and [t.to_json() for t in bundles[n].tasks] == [t.to_json() for t in ref.tasks]]
    for n in set(names) - set(usable):
        say(f"ensemble: {n} reads its inputs differently from {names[0]}; left out")
    tasks = ref.tasks
    preds = {s: {n: stored_predictions(candidates[n], tasks, bundles[n].calibration, s) for n in usable}
             for s in ("val", "test")}
    eval_cfg = ref.config.evaluation
    if weights is None:
        val = {n: p for n, p in preds["val"].items() if p is not None}
        first = next(iter(val.values()), None)
        val = {n: p for n, p in val.items() if np.array_equal(p["rows"], first["rows"])
               and all(np.array_equal(np.asarray(p["labels"][t.name]), np.asarray(first["labels"][t.name])) for t in tasks)}
        if len(val) < 2:
            return None
        order = list(val)
        counts, history = greedy_selection([val[n]["proba"] for n in order], first["labels"], tasks, rounds)
        chosen = {n: c / sum(counts) for n, c in zip(order, counts) if c}
        selection = {"rounds": rounds, "loss": "validation NLL (MSE / var for regression), mean over tasks",
                     "history": [round(h, 6) for h in history], "candidates": order,
                     "candidate_loss": {n: float(np.mean([task_loss(t, first["labels"][t.name], val[n]["proba"][t.name])
                                                          for t in tasks])) for n in order}}
        if len(chosen) < 2:
            return None
    else:
        chosen = {n: float(w) / sum(weights.values()) for n, w in weights.items() if n in usable and w > 0}
        selection = {"fixed": True}
        if len(chosen) < 2:
            return None
    members = list(chosen)
    w = [chosen[n] for n in members]
    calibration: Dict[str, Any] = {}
    metrics: Dict[str, Any] = {}
    for split in ("val", "test"):
        got = [preds[split].get(n) for n in members]
        if any(g is None for g in got) or any(not np.array_equal(g["rows"], got[0]["rows"]) for g in got):
            continue
        p = mixture([g["proba"] for g in got], w)
        y = got[0]["labels"]
        if split == "val" and weights is None:
            calibration = {t.name: fit_calibration(t, y[t.name], p[t.name], eval_cfg)[0] if not t.regression
                           else Calibration() for t in tasks}
        cal = {t.name: calibration.get(t.name) or Calibration() for t in tasks}
        metrics[split] = {t.name: task_metrics(t, y[t.name], cal[t.name].probabilities(t, p[t.name]),
                                               eval_cfg.calibration_bins, cal[t.name]) for t in tasks}
        metrics[f"members_{split}"] = {n: {t.name: g_m for t, g_m in
                                           ((t, task_metrics(t, g["labels"][t.name], g["proba"][t.name],
                                                             eval_cfg.calibration_bins, bundles[n].calibration[t.name]))
                                            for t in tasks)} for n, g in zip(members, got)}
    if weights is not None and not calibration:  # fixed weights: the members' decision thresholds, averaged
        for t in tasks:
            cals = [bundles[n].calibration[t.name] for n in members]
            th = [c.threshold for c in cals if c.threshold is not None]
            ths = [c.thresholds for c in cals if c.thresholds]
            calibration[t.name] = Calibration(None, float(np.mean(th)) if len(th) == len(cals) else None,
                                              np.mean(ths, axis=0).tolist() if len(ths) == len(cals) else None)
    target = run_dir / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for n in members:
        folder = Path(candidates[n])
        if n in move and folder.resolve() != (target / n).resolve():
            dest = target / n
            if dest.exists():
                shutil.rmtree(dest)
            shutil.move(str(folder), str(dest))
            folder = dest
        paths[n] = Path(folder).resolve().relative_to(run_dir.resolve()).as_posix() or "."
    meta = {"format": FORMAT, "source": source,
            "members": [{"name": n, "path": paths[n], "weight": round(chosen[n], 6)} for n in members],
            "calibration": {t: c.to_json() for t, c in calibration.items()},
            "selection": selection, "metrics": metrics, "shipped": True}
    atomic_write_text(target / MARKER, json.dumps(meta, indent=2, default=_json_default))
    headline = {t.name: main_metric(t) for t in tasks}
    for split in ("val", "test"):
        if split in metrics:
            said = "; ".join(f"{t} {k} {metrics[split][t][k]:.4f}" for t, k in headline.items()
                             if isinstance(metrics[split][t].get(k), (int, float)))
            say(f"ensemble of {len(members)} ({', '.join(f'{n} {chosen[n]:.2f}' for n in members)}): {split} {said}")
    return meta


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v).__name__)


# ---- reading -------------------------------------------------------------------------------------------------
def read_ensemble(run_dir: Path) -> Optional[Dict[str, Any]]:
    """``RUN/ensemble/ensemble.json`` checked (format, members inside the run, weights), or None when the run has
    no ensemble. Raises DamagedBundleError on a damaged or planted file."""
    from .bundle import DamagedBundleError, read_json_file

    run_dir = Path(run_dir)
    path = run_dir / FOLDER / MARKER
    if not path.is_file():
        return None
    meta = read_json_file(path, f"ensemble of {str(run_dir)!r}")
    bad = lambda why: DamagedBundleError(f"{str(path)!r} is damaged ({why}); refit, or delete the ensemble folder to "  # noqa: E731
                                         "use the run's own model")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, this mmtune reads {FORMAT}")
    members = meta.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise bad("fewer than two members")
    root = run_dir.resolve()
    for m in members:
        if not isinstance(m, dict) or not isinstance(m.get("path"), str) or not isinstance(m.get("weight"), (int, float)):
            raise bad("a member without a path or weight")
        if not np.isfinite(m["weight"]) or m["weight"] <= 0:
            raise bad(f"member {m.get('name')!r} has weight {m['weight']!r}")
        where = (root / m["path"]).resolve()
        if where != root and root not in where.parents:
            raise bad(f"member {m.get('name')!r} lies outside the run folder ({m['path']!r})")
        m["folder"] = where
    if not isinstance(meta.get("calibration", {}), dict):
        raise bad("calibration is not an object")
    return meta


def shipped_ensemble(folder: Path, ensemble: Optional[bool] = None) -> Optional[Dict[str, Any]]:
    """The ensemble a load of ``folder`` uses: its checked ``ensemble.json`` when it has one that ships (or
    ``ensemble`` is True), None for the single model (always with ``ensemble`` False). FileNotFoundError when
    ``ensemble`` is True and there is none."""
    if ensemble is False:
        return None
    meta = read_ensemble(folder)
    if meta is None and ensemble:
        raise FileNotFoundError(f"{str(folder)!r} holds no ensemble ({FOLDER}/{MARKER}): it ships a single model; "
                                "load it without ensemble=True")
    return meta if meta is not None and (ensemble or meta.get("shipped")) else None


class EnsembleRunner:
    """Runs each member's runner on the same collated batch and averages their calibrated probabilities.
    ``collators`` (one per member, or None): a member whose processors were fitted apart from the first member's
    (a cross-validation fold's tabular statistics and categories) reads its own inputs — its collator's over the
    batch's decoded ``samples`` — for the encoders it names; None reads the batch as it is."""

    def __init__(self, members: Sequence[Tuple[Any, Mapping[str, Any], float]], collators: Optional[Sequence[Any]] = None):
        self.members = list(members)
        self.collators = list(collators) if collators is not None else [None] * len(self.members)
        total = sum(w for _, _, w in self.members)
        self.weights = [w / total for _, _, w in self.members]
        first = self.members[0][0]
        self.name = first.name
        self.output_modality = dict(first.output_modality)
        self.device = first.device

    @property
    def reads_samples(self) -> bool:
        """Whether a member reads the batch's decoded ``samples`` with its own collator (the Predictor's collator
        then keeps them: :attr:`~mmtune.data.collate.Collator.keep_samples`)."""
        return any(c is not None for c in self.collators)

    def proba(self, tasks, batches) -> Dict[str, np.ndarray]:
        out: Dict[str, list] = {t.name: [] for t in tasks}
        for batch in batches:
            calibrated = []
            for (runner, cal, _), own in zip(self.members, self.collators):
                read = batch if own is None else {**batch, "inputs": {**batch["inputs"], **own.inputs(batch["samples"])}}
                p = runner.proba(tasks, [read])
                calibrated.append({t.name: cal[t.name].probabilities(t, p[t.name]) for t in tasks})
            for name, p in mixture(calibrated, self.weights).items():
                out[name].append(p)
        return {t.name: (np.concatenate(out[t.name]) if out[t.name] else np.zeros((0, t.outputs)))
                for t in tasks}

    def vectors(self, batch, kind: str) -> np.ndarray:
        """The first (heaviest) member's vectors: an ensemble has no single representation of its own."""
        return self.members[0][0].vectors(batch, kind)


def member_runners(meta: Mapping[str, Any], make) -> Tuple[List[Tuple[Any, Any, float]], Any, List[Any]]:
    """``[(runner, calibration, weight)]`` for the ensemble's members (heaviest first), ``make(folder)`` giving each
    member's ``(runner, calibration, bundle)``; also the first member's bundle (its model reads the inputs), and per
    member a :class:`~mmtune.data.collate.Collator` over the processors it saved unlike the first member's
    (:func:`processors_differ`), or None when it reads the inputs as the first does."""
    from .bundle import DamagedBundleError
    from .data.collate import Collator
    from .encoders import saved_processors

    members = sorted(meta["members"], key=lambda m: -m["weight"])
    out, first, collators = [], None, []
    for m in members:
        runner, calibration, bundle = make(m["folder"])
        if first is None:
            first = bundle
        elif not _reads_alike(first.config, bundle.config):
            raise DamagedBundleError(f"ensemble member {m['name']!r} reads its inputs differently from "
                                     f"{members[0]['name']!r}; refit the ensemble")
        specs = bundle.config.model.encoders
        own = saved_processors(specs, bundle.run_dir, processors_differ(first.run_dir, bundle.run_dir, sorted(specs)))
        collators.append(Collator(own, bundle.config.modalities) if own else None)
        out.append((runner, calibration, float(m["weight"])))
    return out, first, collators


def processors_differ(a: Path, b: Path, encoders: Sequence[str]) -> List[str]:
    """The encoders whose saved processor (``encoders/<name>/processor``, every file) differs between bundles ``a``
    and ``b``: what each fitted on its own rows (a tabular encoder's statistics and categories), not the tokenizer
    or image settings a checkpoint fixes."""
    def files(folder: Path) -> Dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    if Path(a).resolve() == Path(b).resolve():
        return []
    return [name for name in encoders
            if files(Path(a) / "encoders" / name / "processor") != files(Path(b) / "encoders" / name / "processor")]


__all__ = ["EnsembleError", "EnsembleRunner", "build_ensemble", "greedy_selection", "read_ensemble",
           "shipped_ensemble", "stored_predictions", "task_loss"]
