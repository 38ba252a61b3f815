"""report.html: one self-contained page (images inlined, opens offline) per run bundle, and the
same plots as PNG files under ``plots/``. Built from the bundle's files alone, so ``mmtune report``
can regenerate it at any time."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from ..data.images import inline_png
from ..io import atomic_write_bytes, atomic_write_text
from .remedies import read_remedies

SECTIONS = ["Summary", "Linear probe", "Search", "Ensemble", "Distillation", "Training curves", "Confusion matrix", "Predicted vs actual", "ROC and precision-recall curves", "Calibration",
            "Per-class metrics", "Modality contribution", "Worst misclassified test examples", "Configuration"]
OPTIONAL_SECTIONS = ("Search", "Ensemble", "Distillation")
"""Shown only for a bundle made by a search (mmtune tune, preset best), with an ensemble, or by mmtune distill."""


def _img(png: bytes, alt: str) -> str:
    return inline_png(png, alt)


def _table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _signed(v: Optional[float]) -> str:
    return "" if v is None else f"{v:+.3f}"


def _read_ensemble(run_dir: Path):
    from ..ensemble import read_ensemble

    try:
        return read_ensemble(run_dir)
    except ValueError:  # a damaged ensemble file: the report of the run's own model still builds
        return None


def _ensemble_section(meta: Dict[str, Any], tasks) -> str:
    """Each member and the ensemble, per split and task: the weight and the main metrics."""
    metrics = meta.get("metrics") or {}
    rows = []
    keys = ("accuracy", "f1_macro", "log_loss", "f1_micro", "r2", "rmse")
    for split in ("val", "test"):
        for t in tasks:
            for m in meta["members"]:
                got = ((metrics.get(f"members_{split}") or {}).get(m["name"]) or {}).get(t.name)
                if got:
                    rows.append({"split": split, "task": t.name, "model": m["name"], "weight": m["weight"],
                                 **{k: got.get(k) for k in keys if k in got}})
            got = (metrics.get(split) or {}).get(t.name)
            if got:
                rows.append({"split": split, "task": t.name, "model": "ensemble", "weight": 1.0,
                             **{k: got.get(k) for k in keys if k in got}})
    cols = ["split", "task", "model", "weight"] + [k for k in keys if any(k in r for r in rows)]
    how = ("fixed weights (the folds of a cross-validation)" if (meta.get("selection") or {}).get("fixed") else
           f"greedy selection on validation ({(meta.get('selection') or {}).get('rounds')} rounds, with replacement)")
    return (f"<p>What <code>Predictor.load</code> serves for this run: the weighted average of {len(meta['members'])} "
            f"members' calibrated probabilities, weights by {how}; <code>ensemble=False</code> (<code>--single</code>) "
            "loads the run's own model. Validation chose the weights, so the ensemble's validation row flatters it; "
            "the test rows do not.</p>" + _table(rows, cols))


MATCHING_SECTIONS = ["Summary", "Training curves", "Recall at k", "Worst-ranked test queries", "Configuration"]


def _synthesis_part(syn: Dict[str, Any], tasks) -> str:
    """The synthetic rows of a fit (``metrics["synthesis"]``), per class: how many were added and how close the
    generated rows are to the real ones (GAN), or why a class's rows were left out."""
    names = list(tasks[0].classes) if tasks and tasks[0].classes else []

    def name(c: str) -> str:
        return str(names[int(c)]) if c.isdigit() and int(c) < len(names) else c

    fid, refused = syn.get("fidelity") or {}, syn.get("refused") or {}
    classes = sorted(set(syn.get("added_per_class") or {}) | set(fid), key=lambda c: int(c) if c.isdigit() else c)
    rows = [{"class": name(c), "real rows": (fid.get(c) or {}).get("real_rows"),
             "added": (syn.get("added_per_class") or {}).get(c, 0),
             **{k: (fid.get(c) or {}).get(k) for k in ("mean_distance", "spread_ratio", "precision", "recall")},
             "left out": "; ".join(refused.get(c, []))} for c in classes]
    space = syn.get("subspace")
    said = (f" in a whitened subspace of {space['components']} components of {space['of']} "
            f"({100 * space['variance_kept']:.0f} % of the within-class variance"
            + (", each row with a real row's left-out part" if space.get("residuals") else "") + ")") if space else ""
    note = "".join(f"<p>{html.escape(str(syn[k]))}</p>" for k in ("k_neighbors_note", "stopped") if syn.get(k))
    return (f"<h3>Synthetic rows ({html.escape(str(syn.get('method')))}{html.escape(said)})</h3>"
            "<p>Added to the training split only. For the GAN, per class on a fresh draw: the generated centre's "
            "distance from the real one in real spreads (0 is perfect), the spread ratio (1 is perfect), and the "
            "precision and recall of the generated rows against the real class's 3-NN manifold.</p>" + note
            + _table(rows, ["class", "real rows", "added", "mean_distance", "spread_ratio", "precision", "recall",
                            "left out"]))


def _page(title: str, parts: Dict[str, List[str]], sections: List[str]) -> str:
    body = "".join(f'<section id="{html.escape(s.lower().replace(" ", "-"))}"><h2>{html.escape(s)}</h2>{"".join(parts[s])}</section>'
                   for s in sections if parts[s] or s not in OPTIONAL_SECTIONS)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mmtune report: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}img{{max-width:100%;margin:4px}}
section{{margin-bottom:2em}}pre{{background:#f6f6f6;padding:1em;font-size:12px}}</style></head>
<body><h1>mmtune report: {html.escape(title)}</h1>{body}</body></html>"""


def _matching_report(run_dir: Path, bundle, plots) -> Path:
    """A matcher's report: retrieval metrics per split, training curves, recall@k, and the test queries whose
    true partner ranked worst, with their images and texts and the response the model picked instead."""
    import yaml

    from ..modalities import modality_of

    config, metrics = bundle.config, bundle.metrics
    parts: Dict[str, List[str]] = {s: [] for s in MATCHING_SECTIONS}
    keys = ["queries", "candidates", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@10",
            "response_to_query_recall@1", "pair_roc_auc"]
    rows = [{"split": s, **{k: metrics[s].get(k) for k in keys}} for s in ("val", "test") if isinstance(metrics.get(s), dict)]
    parts["Summary"].append(f"<p>A matcher of <b>{html.escape(config.data.query)}</b> (query) and "
                            f"<b>{html.escape(config.data.response)}</b> (response): each query ranked against its "
                            "split's distinct responses.</p>" + _table(rows, ["split", *keys]))
    pngs: Dict[str, bytes] = {}
    logs_path = run_dir / "logs" / "metrics.csv"
    if logs_path.is_file():
        pngs["training_curves.png"] = plots.training_curves(pd.read_csv(logs_path))
        parts["Training curves"].append(_img(pngs["training_curves.png"], "training curves"))
    curves = {s: metrics[s]["recall_curve"] for s in ("val", "test") if isinstance(metrics.get(s), dict)
              and metrics[s].get("recall_curve")}
    if curves:
        pngs["recall_at_k.png"] = plots.recall_at_k(curves)
        parts["Recall at k"].append(_img(pngs["recall_at_k.png"], "recall at k"))
    split = "test" if (run_dir / "predictions" / "test.csv").is_file() else "val"
    path = run_dir / "predictions" / f"{split}.csv"
    if path.is_file():
        preds = pd.read_csv(path)
        q_mod = modality_of(next(f for f in config.modalities if config.data.column(f) == config.data.query))
        r_mod = modality_of(next(f for f in config.modalities if config.data.column(f) == config.data.response))
        worst = preds.sort_values(["partner_rank", "score"], ascending=[False, True]).head(config.evaluation.worst_examples)
        cells = []
        for _, r in worst.iterrows():
            picked = preds["response"].iloc[int(r["picked_row"])]
            cells.append(f"<tr><td>{q_mod.render_html(r['query'])}</td><td>{r_mod.render_html(r['response'])}</td>"
                         f"<td>{int(r['partner_rank'])}</td><td>{r['score']:.3f}</td><td>{r_mod.render_html(picked)}</td></tr>")
        parts["Worst-ranked test queries"].append(
            f"<p>The {split} rows whose own response ranked lowest for their query.</p><table><tr><th>query</th>"
            "<th>its response</th><th>rank</th><th>score</th><th>the model's first pick</th></tr>" + "".join(cells)
            + "</table>")
    raw = config.to_dict()
    brief = {k: raw.get(k) for k in ("name", "data", "model", "finetune", "matching", "optim", "trainer")}
    parts["Configuration"].append(f"<pre>{html.escape(yaml.safe_dump(brief, sort_keys=False))}</pre>")
    for name, png in pngs.items():
        atomic_write_bytes(run_dir / "plots" / name, png)
    return atomic_write_text(run_dir / "report.html", _page(config.name, parts, MATCHING_SECTIONS))


def build_report(run_dir: str | Path) -> Path:
    """Write ``plots/*.png`` and ``report.html`` in ``run_dir`` from its config, labels, metrics, logs and
    saved predictions. Returns the report's path. Raises FileNotFoundError naming a missing file."""
    from ..bundle import read_bundle
    from ..extras import require
    from ..modalities import is_field, modality_of

    require("matplotlib", "report", "the report")
    from . import plots

    run_dir = Path(run_dir)
    for f in ("config.yaml", "labels.json", "metrics.json"):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"cannot build the report: {str(run_dir / f)!r} is missing")
    bundle = read_bundle(run_dir, model=False, complete=False)
    if bundle.config.task == "matching":
        return _matching_report(run_dir, bundle, plots)
    config, tasks, metrics = bundle.config, bundle.tasks, bundle.metrics
    logs_path = run_dir / "logs" / "metrics.csv"
    logs = pd.read_csv(logs_path) if logs_path.is_file() else None
    split = "test" if (run_dir / "predictions" / "test.csv").is_file() else "val"
    preds = pd.read_csv(run_dir / "predictions" / f"{split}.csv") if (run_dir / "predictions" / f"{split}.csv").is_file() else None
    bins, n_worst = config.evaluation.calibration_bins, config.evaluation.worst_examples
    shown = [c for c in (preds.columns if preds is not None else []) if ":" not in c and is_field(c)]
    remedies = read_remedies(run_dir)

    pngs: Dict[str, bytes] = {}
    parts: Dict[str, List[str]] = {s: [] for s in SECTIONS}

    # Summary
    rows = []
    for s in ("val", "test"):
        for t in tasks:
            m = (metrics.get(s) or {}).get(t.name)
            if m:
                keys = ["rmse", "mae", "r2"] if t.regression else \
                    ["f1_micro", "f1_macro", "subset_accuracy", "mean_average_precision"] if t.multilabel else \
                    ["accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "pr_auc", "log_loss", "ece"]
                rows.append({"split": s, "task": t.name, "n": m.get("n"), **{k: m.get(k) for k in keys}})
    cols = ["split", "task", "n"] + sorted({k for r in rows for k in r} - {"split", "task", "n"})
    parts["Summary"].append(_table(rows, cols))
    intervals = [{"task": t.name, "metric": b["metric"], "value": metrics["test"][t.name].get(b["metric"]),
                  "low": b["low"], "high": b["high"], "resampled": b.get("resampled", "rows")}
                 for t in tasks for b in [((metrics.get("test") or {}).get(t.name) or {}).get("bootstrap")] if b]
    if intervals:
        parts["Summary"].append(f"<p>{100 * 0.95:.0f} % bootstrap intervals of the test metrics (rows, or whole "
                                "groups of data.group_column, resampled 1,000 times):</p>"
                                + _table(intervals, ["task", "metric", "value", "low", "high", "resampled"]))
    cv = metrics.get("cv")
    if cv:
        rows = [{"task": t, "metric": k, "mean": v, "std": cv["std"][t].get(k),
                 **{f"fold {f['fold']}": f["val"][t].get(k) for f in cv["folds"]}}
                for t, m in cv["mean"].items() for k, v in m.items() if k in ("accuracy", "f1_macro", "r2", "rmse",
                                                                               "f1_micro", "log_loss")]
        cols = ["task", "metric", "mean", "std"] + [f"fold {f['fold']}" for f in cv["folds"]]
        parts["Summary"].append(f"<p>{cv['k']}-fold cross-validation of this config on the training table"
                                + (f", grouped by <code>{html.escape(str(cv['grouped']))}</code>" if cv.get("grouped")
                                   else "") + " (validation metrics of each fold's fit):</p>" + _table(rows, cols))
    for w in metrics.get("warnings") or []:
        parts["Summary"].append(f'<p class="warning"><b>Warning:</b> {html.escape(w)}</p>')

    probe = metrics.get("linear_probe") or {}
    if probe:
        rows = []
        for tname, entry in probe.items():
            for s in ("val", "test"):
                if s in entry and s in metrics and tname in metrics[s]:
                    for who, m in (("linear probe", entry[s]), ("the model", metrics[s][tname])):
                        rows.append({"task": tname, "split": s, "model": who,
                                     **{k: m.get(k) for k in ("accuracy", "f1_macro", "log_loss")}})
        parts["Linear probe"].append(
            "<p>A logistic regression on the frozen pretrained encoders' pooled features (fitted before training; "
            "C chosen on validation): what fine-tuning has to beat.</p>" + _table(rows, ["task", "split", "model",
                                                                                          "accuracy", "f1_macro", "log_loss"]))
        few = [{"task": tname, "split": s, "head": f"{head}, {k} rows a class", **m}
               for tname, entry in probe.items() for k, shot in (entry.get("few_shot") or {}).items()
               for head in ("logistic", "centroid") for s, m in shot[head].items()]
        few += [{"task": tname, "split": s, "head": f"zero-shot ({entry['zero_shot']['template']!r})", **entry["zero_shot"][s]}
                for tname, entry in probe.items() if entry.get("zero_shot") for s in ("val", "test")
                if s in entry["zero_shot"]]
        if few:
            parts["Linear probe"].append(
                "<p>The same frozen features with only a few labelled rows a class (a logistic regression and a "
                "nearest-class-mean head), and — with a joint image–text encoder — zero-shot by the class names:</p>"
                + _table(few, ["task", "split", "head", "accuracy", "f1_macro"]))
    else:
        parts["Linear probe"].append("<p>Off (evaluation.linear_probe), or no single-label task or pretrained encoder.</p>")

    search = metrics.get("search")
    if search:
        pngs["search.png"] = plots.search_trials(search["trials"], search["monitor"], search["direction"])
        refit = search.get("refit_value")
        parts["Search"].append(
            f"<p>{len(search['trials'])} trials (optuna; study in <code>tune/study.db</code>), best trial "
            f"{search['best_trial']}: {html.escape(search['monitor'])} {search['best_value']:.4f}"
            + (f"; this bundle, refitted from its config: {refit:.4f}" if refit is not None else "")
            + (f"; shipped: {html.escape(search['shipped'])}'s own model ({html.escape(search.get('shipped_why', ''))})"
               if search.get("shipped") else "") + ".</p>"
            + _img(pngs["search.png"], "search trials")
            + _table(search["trials"], ["trial", "state", "value", "epochs", "seconds", "params"]))
    ensemble = _read_ensemble(run_dir)
    if ensemble:
        parts["Ensemble"].append(_ensemble_section(ensemble, tasks))
    distill = metrics.get("distillation")
    if distill:
        parts["Distillation"].append(
            f"<p>Trained on the soft targets of <code>{html.escape(str(distill['teacher']))}</code> (temperature "
            f"{distill['temperature']}, weight {distill['alpha']}) and the labels; {distill['unlabelled_rows']} "
            "unlabelled rows.</p>" + _table(distill["comparison"], list(distill["comparison"][0])))

    if logs is not None and len(logs):
        pngs["training_curves.png"] = plots.training_curves(logs)
        parts["Training curves"].append(_img(pngs["training_curves.png"], "training curves"))
    else:
        parts["Training curves"].append("<p>No training log (this fusion is fitted without epochs).</p>")

    for t in tasks:
        prefix = "" if len(tasks) == 1 else f"{t.name}_"
        m = (metrics.get(split) or {}).get(t.name) or {}
        if preds is None:
            continue
        if t.regression:
            y, pred = preds[f"{t.name}:true"].to_numpy(dtype=float), preds[f"{t.name}:pred"].to_numpy(dtype=float)
            pngs[f"{prefix}regression.png"] = plots.regression(y, pred, t.name)
            parts["Predicted vs actual"].append(f"<p>{html.escape(t.name)}: a numeric target (RMSE {m.get('rmse', float('nan')):.4g}, "
                                             f"R² {m.get('r2') if m.get('r2') is not None else float('nan'):.4f}).</p>"
                                             + _img(pngs[f"{prefix}regression.png"], f"regression {t.name}"))
            continue
        pcols = [f"{t.name}:p:{c}" for c in t.classes]
        raw = preds[pcols].to_numpy(dtype=float)
        if t.multilabel:
            y = np.zeros_like(raw, dtype=int)
            for i, v in enumerate(preds[f"{t.name}:true"].fillna("").astype(str)):
                for j in [int(x) for x in v.split("|") if x != ""]:
                    y[i, j] = 1
            parts["Confusion matrix"].append(f"<p>{html.escape(t.name)}: multi-label, see per-label metrics.</p>")
            pngs[f"{prefix}pr.png"] = plots.pr_curves(y, raw, t.classes)
            parts["ROC and precision-recall curves"].append(_img(pngs[f"{prefix}pr.png"], f"PR {t.name}"))
            parts["Calibration"].append(f"<p>{html.escape(t.name)}: multi-label; per-label thresholds "
                                        f"{html.escape(str([round(x, 3) for x in (bundle.calibration[t.name].thresholds or [])]))}.</p>")
            continue
        y = preds[f"{t.name}:true"].to_numpy(dtype=int)
        calib = bundle.calibration[t.name]
        cal = calib.probabilities(t, raw)
        if "confusion_matrix" in m:
            pngs[f"{prefix}confusion_matrix.png"] = plots.confusion_matrix(m["confusion_matrix"], t.classes)
            parts["Confusion matrix"].append(_img(pngs[f"{prefix}confusion_matrix.png"], f"confusion {t.name}"))
        pngs[f"{prefix}roc.png"] = plots.roc_curves(y, cal, t.classes)
        pngs[f"{prefix}pr.png"] = plots.pr_curves(y, cal, t.classes)
        parts["ROC and precision-recall curves"].append(_img(pngs[f"{prefix}roc.png"], f"ROC {t.name}")
                                                        + _img(pngs[f"{prefix}pr.png"], f"PR {t.name}"))
        pngs[f"{prefix}reliability.png"] = plots.reliability(y, raw, cal if calib.temperature else None, bins)
        c = (metrics.get("calibration") or {}).get(t.name, {})
        note = f"temperature {calib.temperature:.3f}" if calib.temperature else "no temperature scaling"
        if calib.threshold is not None:
            note += f"; decision threshold on p({t.classes[1]}) = {calib.threshold:.3f}"
        parts["Calibration"].append(f"<p>{html.escape(t.name)}: {html.escape(note)}; ECE on {split} "
                                    f"{c.get(f'ece_{split}_before', float('nan')):.4f} before, "
                                    f"{c.get(f'ece_{split}_after', float('nan')):.4f} after.</p>"
                                    + _img(pngs[f"{prefix}reliability.png"], f"reliability {t.name}"))
        if m.get("per_class"):
            counts = (metrics.get("train_class_counts") or {}).get(t.name)
            by_class = {str(c): n for c, n in zip(t.classes, counts or [])}
            rows = [{**r, "training rows": by_class.get(str(r.get("class")))} for r in m["per_class"]]
            changed = ((remedies or {}).get("tasks") or {}).get(t.name) or {}
            cols = ["class", "training rows", "precision", "recall", "f1", "support"]
            for name, per in changed.items():  # how much each remedy changed each class (mmtune report --compare)
                for r in rows:
                    got = per.get(str(r.get("class"))) or {}
                    r[f"recall: {name}"] = _signed(got.get("recall_change"))
                    r[f"precision: {name}"] = _signed(got.get("precision_change"))
            parts["Per-class metrics"].append(f"<h3>{html.escape(t.name)}</h3>" + _table(rows, cols))
            if changed:
                parts["Per-class metrics"].append(
                    f"<p>Change of each class's recall and precision by each remedy, on the "
                    f"{html.escape(str(remedies.get('split')))} rows ("
                    f"{html.escape(str(remedies.get('note') or 'other runs of the same task against this one'))}):</p>"
                    + _table(rows, ["class", "training rows", "recall"] + [f"recall: {n}" for n in changed])
                    + _table(rows, ["class", "precision"] + [f"precision: {n}" for n in changed]))
        # Worst misclassified: wrong and most confident.
        pred = cal.argmax(1) if calib.threshold is None else (cal[:, 1] >= calib.threshold).astype(int)
        wrong = np.where(pred != y)[0]
        order = wrong[np.argsort(-cal[wrong, pred[wrong]])][:n_worst]
        rows = []
        for i in order:
            r = preds.iloc[i]
            rows.append("<tr>" + "".join(f"<td>{modality_of(m).render_html(r.get(m))}</td>" for m in shown)
                        + f"<td>{html.escape(str(r.get('id', r['row'])))}</td>"
                        + f"<td>{html.escape(str(t.classes[y[i]]))}</td><td>{html.escape(str(t.classes[pred[i]]))}</td>"
                        + f"<td>{cal[i, pred[i]]:.3f}</td></tr>")
        explained = metrics.get("explanations") or {}
        if explained.get("page") and (Path(run_dir) / explained["page"]).is_file():
            parts["Worst misclassified test examples"].append(
                f"<p><a href='{html.escape(explained['page'])}'>Why: explanations of the {explained['rows']} most "
                f"confidently misclassified {explained['split']} rows</a> (attributions per modality, words, heatmaps).</p>")
        parts["Worst misclassified test examples"].append(
            f"<h3>{html.escape(t.name)}</h3>" + (
                "<table><tr>" + "".join(f"<th>{html.escape(m)}</th>" for m in shown)
                + "<th>id</th><th>true</th><th>predicted</th><th>confidence</th></tr>"
                + "".join(rows) + "</table>" if rows else "<p>No misclassified examples.</p>"))

    if metrics.get("synthesis"):
        parts["Per-class metrics"].append(_synthesis_part(metrics["synthesis"], tasks))

    mc = metrics.get("modality_contribution")
    if mc:
        entries = {k: v for k, v in mc.items() if k != "split"}
        rows = []
        for name, e in entries.items():
            for tname, mm in e["metrics"].items():
                rows.append({"setting": name, "task": tname, **mm,
                             **{f"change {k}": v for k, v in e["change_vs_all"][tname].items()}})
        parts["Modality contribution"].append(
            f"<p>Metrics on the {html.escape(mc.get('split', split))} split with modalities hidden through the "
            "present-mask (no retraining).</p>" + _table(rows, list(rows[0].keys())))
        for t in tasks:
            metric = "r2" if t.regression else "f1_micro" if t.multilabel else "accuracy"
            name = f"{t.name}_contribution.png" if len(tasks) > 1 else "modality_contribution.png"
            pngs[name] = plots.contribution(entries, t.name, metric)
            parts["Modality contribution"].append(_img(pngs[name], f"contribution {t.name}"))
    else:
        parts["Modality contribution"].append("<p>One modality only, or disabled (evaluation.modality_contribution).</p>")
    if metrics.get("baselines"):
        b = metrics["baselines"]
        parts["Modality contribution"].append("<h3>Unimodal baselines (retrained)</h3>" + _table(
            [{"model": k, **v} for k, v in b["models"].items()], ["model", "accuracy", "f1_macro"])
            + f"<p>Fusion gain over the best single modality: {b['fusion_gain']:+.4f} accuracy.</p>")

    import yaml

    raw = config.to_dict()
    brief = {k: raw.get(k) for k in ("name", "model", "finetune", "loss", "optim", "schedule", "trainer")}
    parts["Configuration"].append(f"<pre>{html.escape(yaml.safe_dump(brief, sort_keys=False))}</pre>")

    if not parts["Predicted vs actual"]:
        parts["Predicted vs actual"].append("<p>No numeric (regression) target.</p>")
    for name, png in pngs.items():
        atomic_write_bytes(run_dir / "plots" / name, png)
    return atomic_write_text(run_dir / "report.html", _page(config.name, parts, SECTIONS))
