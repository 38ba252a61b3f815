"""``mmtune fit | tune | distill | evaluate | predict | embed | explain | prune | export | serve | report | parts | align | demo``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)
_WRITERS = {
    ".csv": lambda table, tmp: table.to_csv(tmp, index=False),
    ".jsonl": lambda table, tmp: table.to_json(tmp, orient="records", lines=True),
    ".parquet": lambda table, tmp: table.to_parquet(tmp, index=False),
}


def parts_table() -> str:
    """The names each table of parts holds — the config accepts exactly these."""
    from .encoders import offline
    from .finetune import STRATEGIES
    from .fusion import FUSIONS
    from .losses import LOSSES
    from .modalities import JOINT, MODALITIES
    from .optim import OPTIMIZERS, SCHEDULES
    from .presets import PRESETS

    rows = [("modalities (data.columns, encoder modality)", MODALITIES.names() + JOINT.names()),
            ("encoder presets (encoder checkpoint)", offline.OFFLINE_ENCODERS.names()),
            ("fusions (model.fusion.type)", FUSIONS.names()), ("strategies (finetune.type)", STRATEGIES.names()),
            ("losses (loss.type)", LOSSES.names()), ("optimizers (optim.name)", OPTIMIZERS.names()),
            ("schedules (schedule.name)", SCHEDULES.names()), ("presets (preset, --preset)", PRESETS.names())]
    return "\n".join(f"  {kind}: {', '.join(names)}" for kind, names in rows)


def _parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The command line; ``fit --help`` lists the parts a config can name (built only then: listing them imports
    every table of parts, seconds that no other command needs)."""
    argv = sys.argv[1:] if argv is None else argv
    fit_help = bool(argv) and argv[0] == "fit" and any(a in ("-h", "--help") for a in argv[1:])
    p = argparse.ArgumentParser(prog="mmtune", description="Fine-tune multimodal classifiers and ship them.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fine-tune the model a YAML config describes, or a table and its label column",
                       epilog="parts a config can name:\n" + parts_table() if fit_help else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("config", help="YAML config file; or, with --label, the training table (CSV, TSV, JSONL, Parquet)")
    f.add_argument("--label", help="the label column of the table: no config needed, each column's kind is inferred "
                                   "and printed (see --column)")
    f.add_argument("--test", help="with --label: a labelled test table")
    f.add_argument("--column", dest="columns", action="append", default=[], metavar="NAME=KIND",
                   help="with --label: set a column's kind (image, audio, text, category, number, ignore; repeatable)")
    f.add_argument("--group", help="with --label: the column whose rows share a source (data.group_column): every "
                                   "split keeps each group on one side")
    f.add_argument("--name", help="with --label: the run's name (default: the table's file name)")
    f.add_argument("--output-dir", default="runs", help="with --label: where the run folder goes (default runs)")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.max_epochs=3 (repeatable)")
    f.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    f.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    f.add_argument("--baselines", action="store_true",
                   help="also train each modality alone with the same settings and report the fusion gain")
    f.add_argument("--cv", type=int, metavar="K", help="K-fold cross-validation first (grouped by data.group_column): "
                   "the folds' validation metrics, mean and spread in metrics.json and the report")
    _preset_args(f)

    tu = sub.add_parser("tune", help="hyper-parameter search (optuna), then the best trial refitted into the run bundle")
    tu.add_argument("config", help="YAML config file (the first trial, and the settings the search does not change)")
    tu.add_argument("--trials", type=int, default=None, help="trials the study should hold (default 10); a study "
                    "already in RUN/tune continues up to this count")
    tu.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="budget for search and refit (default trainer.max_time)")
    tu.add_argument("--space", help="YAML search space narrowing or extending the default (see docs/guides/presets-and-search.md)")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    tu.add_argument("--overwrite", action="store_true", help="let the refit replace a run of the same name")
    tu.add_argument("--ensemble", type=int, default=None, metavar="N",
                    help="keep the N best trials and ship an ensemble of them and the refit when greedy selection "
                         "on validation prefers one (default: the preset's, 5 for best; 0 off)")

    di = sub.add_parser("distill", help="train a smaller student on a teacher bundle's soft targets and the labels")
    di.add_argument("--teacher", required=True, help="the teacher's run bundle")
    di.add_argument("--student", required=True, help="the student's YAML config (its data, encoders, training)")
    di.add_argument("--unlabelled", help="more rows without labels (CSV, JSONL, Parquet): taught by the teacher alone")
    di.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the soft targets (default 2)")
    di.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target loss, 0-1 (default 0.5)")
    di.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the student config (repeatable)")
    di.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")

    e = sub.add_parser("evaluate", help="metrics of a run bundle on a labelled manifest")
    e.add_argument("--run", required=True, help="run bundle folder")
    e.add_argument("--data", required=True, help="labelled manifest (CSV, JSONL, Parquet)")
    e.add_argument("--out", help="where to write the metrics JSON (default: RUN/evaluations/<data name>.json)")
    e.add_argument("--contribution", action="store_true", help="also the metrics with each modality hidden")
    _model_args(e)

    r = sub.add_parser("report", help="(re)build RUN/report.html and RUN/plots/*.png")
    r.add_argument("--run", required=True, help="run bundle folder")
    r.add_argument("--compare", action="append", default=[], metavar="NAME=RUN",
                   help="another run of the same task (a remedy: another loss, sampler, synthesis, ...): the per-class "
                        "table shows how much it changed each class's recall and precision (repeatable)")

    pr = sub.add_parser("predict", help="predicted label and class probabilities per row")
    pr.add_argument("--run", required=True, help="run bundle folder")
    pr.add_argument("--data", required=True, help="manifest of rows to predict")
    pr.add_argument("--out", required=True, help="output file (.csv, .jsonl or .parquet)")
    pr.add_argument("--batch-size", type=int, default=None)
    _model_args(pr)

    em = sub.add_parser("embed", help="one vector per row: the fused representation or an encoder's pooled output")
    em.add_argument("--run", required=True, help="run bundle folder")
    em.add_argument("--data", required=True, help="manifest of rows to embed")
    em.add_argument("--out", required=True, help="output file (.parquet, .csv or .jsonl): the id column, then e0 … e{d-1}")
    em.add_argument("--kind", default="fused", help="fused (default) or an encoder's name (see the error for the list)")
    em.add_argument("--batch-size", type=int, default=None)
    _model_args(em)

    se = sub.add_parser("search", help="a matcher's nearest corpus rows for each query (top k, by cosine)")
    se.add_argument("--run", required=True, help="run bundle of a matcher (data.query / data.response)")
    se.add_argument("--queries", required=True, help="manifest of queries (the run's query column)")
    corpus = se.add_mutually_exclusive_group(required=True)
    corpus.add_argument("--corpus", help="manifest of the corpus (the run's response column)")
    corpus.add_argument("--index", help="a search index saved by --save-index")
    se.add_argument("--top-k", type=int, default=10, help="hits per query (default 10)")
    se.add_argument("--out", required=True, help="output file (.csv, .jsonl or .parquet): query_row, rank, id, score, value")
    se.add_argument("--save-index", default=None, help="also save the corpus's index into this folder (reused with --index)")
    se.add_argument("--faiss", action="store_true", help="search on a FAISS flat index (the same hits; needs mmtune[faiss])")
    se.add_argument("--batch-size", type=int, default=None)
    se.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")

    cp = sub.add_parser("check-pairs", help="the rows of a table whose columns do not belong together (a matcher's pair "
                        "scores, or a classifier's modalities predicting apart)")
    cp.add_argument("--run", required=True, help="run bundle of a matcher, or of a classifier of several modalities")
    cp.add_argument("--data", required=True, help="manifest with the run's columns")
    cp.add_argument("--out", required=True, help="output file (.csv, .jsonl or .parquet), least likely pairs first")
    cp.add_argument("--html", default=None, help="also an HTML page of the worst pairs, with their images and texts")
    cp.add_argument("--show", type=int, default=50, help="rows on the HTML page (default 50)")
    cp.add_argument("--batch-size", type=int, default=None)
    cp.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")

    xp = sub.add_parser("explain", help="why each row got its prediction: explanations.html, attributions.jsonl, PNGs")
    xp.add_argument("--run", required=True, help="run bundle folder")
    xp.add_argument("--data", required=True, help="manifest of rows to explain")
    xp.add_argument("--out", required=True, help="folder for explanations.html, attributions.jsonl, summary.json, plots/")
    xp.add_argument("--rows", type=int, default=None, help="explain only the first N rows")
    xp.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps")
    xp.add_argument("--task", default=None, help="the task to explain (default: the first)")
    xp.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, mps …")

    pn = sub.add_parser("prune", help="smaller models: global magnitude pruning, or attention heads removed (--structured)")
    pn.add_argument("--run", required=True, help="run bundle folder")
    pn.add_argument("--sparsity", required=True, help="comma-separated shares, e.g. 0.3,0.5,0.7 (of the weights, or of the heads)")
    pn.add_argument("--structured", action="store_true", help="remove whole attention heads of transformer encoders")
    pn.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each pruned model this many epochs")
    pn.add_argument("--data", required=True, help="labelled rows to measure each model on (e.g. the validation split)")
    pn.add_argument("--out", help="folder for the pruned bundles (default: beside the run)")

    ex = sub.add_parser("export", help="export a run bundle as ONNX (optionally int8), checked against the model")
    ex.add_argument("--run", required=True, help="run bundle folder")
    ex.add_argument("--format", default="onnx", choices=["onnx"])
    ex.add_argument("--quantize", choices=["int8"], help="also write an int8 model (matrix products dynamic, "
                    "convolutions static: see --int8-convolutions)")
    ex.add_argument("--int8-convolutions", choices=["static", "float"], default="static",
                    help="static: int8, calibrated on the check rows and kept only if the main metric loses at most "
                    "0.01 on them (the default); float: leave them float (CPUs without VNNI may run them faster)")
    ex.add_argument("--data", help="rows to check parity (and int8 accuracy) on (default: the run's validation split)")
    ex.add_argument("--out", help="export bundle folder (default: RUN/export)")
    ex.add_argument("--single", action="store_true", help="a run that ships an ensemble: export its own model only")

    sv = sub.add_parser("serve", help="serve a bundle over HTTP (FastAPI + uvicorn); docs at /docs")
    sv.add_argument("--run", required=True, help="run bundle or export bundle folder")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model")
    sv.add_argument("--allow-paths", metavar="DIR", help='accept {"path": ...} for file columns, for files under DIR '
                    "only (symlinks resolved); without it no request value ever names a file on this machine")
    sv.add_argument("--index", metavar="DIR", default=None,
                    help="a matcher: the search index /search answers from (saved by mmtune search --save-index)")
    sv.add_argument("--no-batching", action="store_true", help="run each request alone (no micro-batching)")
    sv.add_argument("--batch-window-ms", type=float, default=4.0, help="how long a request waits for others to batch with")
    sv.add_argument("--max-batch-rows", type=int, default=64, help="rows per model call when batching")
    sv.add_argument("--max-request-rows", type=int, default=256, help="rows one request may hold")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body")
    sv.add_argument("--max-request-mpixels", type=float, default=64.0,
                    help="megapixels the images of one request (and of one micro-batch) may hold together")
    _model_args(sv)

    sub.add_parser("parts", help="list the parts a config can name (fusions, strategies, losses, …)")

    al = sub.add_parser("align", help="join tables recorded apart into one manifest (key, then nearest time)")
    al.add_argument("tables", nargs="+", help="manifests; each row of the first is an example")
    al.add_argument("--on", help="key column every table has (rows join only on equal keys)")
    al.add_argument("--time", help="time column (numbers or dates): the nearest row within --tolerance")
    al.add_argument("--tolerance", help="largest time difference that still matches, e.g. 2s, 500ms")
    al.add_argument("--direction", default="nearest", choices=["nearest", "backward", "forward"])
    al.add_argument("--paths", action="append", default=[], metavar="COLUMN",
                    help="a column of file paths, made absolute (repeatable)")
    al.add_argument("--out", required=True, help="the joined manifest (.csv, .jsonl or .parquet); the report goes "
                                                 "beside it as <out>.alignment.json")

    d = sub.add_parser("demo", help="fine-tune the embedded image+text demo and compare with each modality alone")
    d.add_argument("--output-dir", default="runs", help="where the data and the three run bundles go")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the demo config (repeatable)")
    d.add_argument("--rows", type=int, default=None, help="examples to generate (default 800; 400 with --audio)")
    d.add_argument("--audio", action="store_true", help="the audio + text variant (a tone's pitch and a note's verdict)")
    return p


def _preset_args(p) -> None:
    from .presets import PRESETS

    p.add_argument("--preset", choices=PRESETS.names(),
                   help="a named recipe for the settings the config leaves open (see docs/guides/presets-and-search.md)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget of the training (trainer.max_time); preset best: of search and refit")


def _preset_overrides(args) -> List[str]:
    out = [f"preset={args.preset}"] if args.preset else []
    if args.time_limit is not None:
        if args.time_limit <= 0:
            raise ValueError(f"--time-limit must be a positive number of seconds (got {args.time_limit})")
        out.append("trainer.max_time={seconds: %d}" % max(1, round(args.time_limit)))
    return out


def _model_args(p) -> None:
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, mps …")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"],
                   help="torch (a run bundle's default), onnx or onnx-int8 (an export bundle's default is onnx)")
    p.add_argument("--single", action="store_true",
                   help="a run that ships an ensemble (RUN/ensemble): use the run's own single model instead")


def _load(args):
    from .serving.matching import classifier_only
    from .serving.predictor import Predictor

    return classifier_only(Predictor.load(args.run, device=_device(args.device), backend=args.backend,
                                          ensemble=False if args.single else None), f"mmtune {args.command}")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser(argv).parse_args(argv)
    from .memory import keep_freed_memory

    keep_freed_memory()
    from .config import ConfigError
    from .data.manifest import BadRowsError
    from .extras import MissingExtraError

    try:
        return {"fit": _fit, "evaluate": _evaluate, "predict": _predict, "demo": _demo, "report": _report,
                "parts": _parts, "align": _align, "embed": _embed, "export": _export, "serve": _serve, "explain": _explain, "prune": _prune,
                "tune": _tune, "distill": _distill, "search": _search, "check-pairs": _check_pairs}[args.command](args)
    except (ConfigError, BadRowsError, MissingExtraError) + EXPECTED_ERRORS as exc:
        print(f"mmtune {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _fit(args) -> int:
    from .recipe.fit import fit

    overrides = list(args.overrides) + (["evaluation.baselines=true"] if args.baselines else []) + _preset_overrides(args)
    if args.cv is not None:
        overrides.append(f"evaluation.cv={args.cv}")
    if args.label is None:
        for flag in ("test", "name", "group"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} goes with --label (a table and its label column); a config names it itself")
        if args.columns:
            raise ValueError("--column goes with --label (a table and its label column); a config sets data.columns")
        return _fit_summary(fit(args.config, overrides=overrides, resume=args.resume, overwrite=args.overwrite))
    if Path(args.config).suffix.lower() in (".yaml", ".yml"):
        raise ValueError(f"--label takes a table, not a config ({args.config!r}); a config names its label column "
                         "itself (data.label_column)")
    columns = {}
    for item in args.columns:
        name, eq, kind = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--column {item!r}: expected NAME=KIND, e.g. --column notes=text")
        columns[name] = kind.strip()
    overrides = [f"name={args.name}" if args.name else None, f"output_dir={args.output_dir}", *overrides]
    if not args.preset:
        overrides.append("preset=balanced")
    return _fit_summary(fit(args.config, label=args.label, test=args.test, columns=columns, group=args.group,
                            overrides=[o for o in overrides if o], resume=args.resume, overwrite=args.overwrite))


def _fit_summary(res) -> int:
    if not res.main:  # another process of a distributed run: the main one reports
        return 0
    if res.metrics.get("task") == "matching":
        keep = ("queries", "candidates", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@10", "pair_roc_auc")
        print(json.dumps({s: {k: res.metrics[s][k] for k in keep if k in res.metrics[s]}
                          for s in ("val", "test") if s in res.metrics}, indent=2))
        print(f"run bundle: {res.run_dir}")
        return 0
    print(json.dumps(_brief(res.metrics), indent=2))
    for task, diff in (res.metrics.get("model_minus_probe") or {}).items():
        probe = res.metrics["linear_probe"][task][diff["split"]]
        model = res.metrics[diff["split"]][task]
        print(f"linear probe (logistic regression on the frozen encoders' features), {task}, {diff['split']}: "
              f"accuracy {probe['accuracy']:.3f}; the model {model['accuracy']:.3f} ({diff['accuracy']:+.3f}), "
              f"macro F1 {probe['f1_macro']:.3f} vs {model['f1_macro']:.3f} ({diff['f1_macro']:+.3f})")
    if "baselines" in res.metrics:
        print(json.dumps(res.metrics["baselines"], indent=2))
    from .ensemble import read_ensemble

    ens = read_ensemble(res.run_dir)
    if ens:
        from .evaluation.metrics import main_metric

        split = "test" if "test" in ens["metrics"] else "val"
        said = "; ".join(f"{t.name} {main_metric(t)} {ens['metrics'][split][t.name][main_metric(t)]:.4f}"
                         for t in res.tasks if t.name in ens["metrics"].get(split, {}))
        weights = ", ".join(f"{m['name']} {m['weight']:.2f}" for m in ens["members"])
        print(f"ensemble of {len(ens['members'])} ({weights}), "
              f"what the run serves ({split}): {said}; --single uses the run's own model")
    search = res.metrics.get("search")
    if search:
        print(f"search: {len(search['trials'])} trials, best trial {search['best_trial']} "
              f"({search['monitor']} {search['best_value']:.4f}; refit {search.get('refit_value')}); "
              f"study and trials.csv in {res.run_dir / 'tune'}")
    print(f"run bundle: {res.run_dir}")
    return 0


def _tune(args) -> int:
    from .search import tune

    overrides = list(args.overrides)
    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError(f"--time-limit must be a positive number of seconds (got {args.time_limit})")
    out = tune(args.config, trials=args.trials, time_limit=args.time_limit, space=args.space, overrides=overrides,
               overwrite=args.overwrite, ensemble=args.ensemble)
    for t in out.trials:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        print(f"  trial {t['trial']:>3}  {t['state']:<9} {value:>8}  {t['seconds'] or 0:>7.1f}s  {t['params']}")
    return _fit_summary(out.refit) if out.refit is not None else 0


def _distill(args) -> int:
    from .distill import distill

    res = distill(args.teacher, args.student, unlabelled=args.unlabelled, temperature=args.temperature,
                  alpha=args.alpha, overrides=args.overrides, overwrite=args.overwrite)
    if not res.main:
        return 0
    rows = res.metrics["distillation"]["comparison"]
    print(f"{'':8} {'accuracy':>9} {'parameters':>12} {'model MB':>9} {'p50 ms (1 row)':>15}   ({rows[0]['split']} split)")
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        print(f"{r['model']:8} {acc:>9} {r['parameters']:>12,} {r['model_mb'] or 0:>9.2f} {r['p50_ms_one_row']:>15.2f}")
    print(f"run bundle: {res.run_dir}")
    return 0


def _evaluate(args) -> int:
    from .io import atomic_write_json

    from .io import check_output

    out = Path(args.out) if args.out else Path(args.run) / "evaluations" / f"{Path(args.data).stem}.json"
    if args.out:  # checked before any work is done
        check_output(out, inputs={"--data file": [args.data], "run bundle's file": _bundle_files(args.run)},
                     example="metrics.json")
    pred = _load(args)
    metrics = pred.evaluate(args.data, contribution=args.contribution)
    atomic_write_json(out, {"data": str(args.data), **metrics})
    print(json.dumps(_brief({"data": metrics}), indent=2))
    print(f"metrics written to {out}")
    return 0


def _predict(args) -> int:
    from .io import atomic_write_with

    path = Path(args.out)
    write = _table_writer(path, {"--data file": [args.data], "run bundle's file": _bundle_files(args.run)},
                          "predictions.csv")
    out = _load(args).predict_table(args.data, batch_size=args.batch_size)
    atomic_write_with(path, lambda tmp: write(out, tmp))
    print(f"{len(out)} predictions written to {path}")
    return 0


def _matcher(args):
    from .serving.matching import MatchPredictor
    from .serving.predictor import Predictor

    pred = Predictor.load(args.run, device=_device(args.device))
    if not isinstance(pred, MatchPredictor):
        raise ValueError(f"{args.run!r} is a classifier run: `mmtune {args.command}` needs a matcher (a run with "
                         "data.query and data.response)")
    return pred


def _search(args) -> int:
    from .io import atomic_write_with, check_output
    from .serving.matching import SearchIndex

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1 (got {args.top_k})")
    path = Path(args.out)
    inputs = {"--queries file": [args.queries], "--corpus file": [args.corpus] if args.corpus else [],
              "run bundle's file": _bundle_files(args.run)}
    write = _table_writer(path, inputs, "hits.csv")
    if args.save_index:
        check_output(args.save_index, inputs=inputs, kind="folder", example="corpus-index")
    pred = _matcher(args)
    index = SearchIndex.load(args.index, faiss=args.faiss) if args.index else \
        pred.index(args.corpus, batch_size=args.batch_size, faiss=args.faiss)
    if args.save_index:
        index.save(args.save_index)
        print(f"index of {len(index)} rows saved to {args.save_index}")
    hits = pred.search(args.queries, index, top_k=args.top_k, batch_size=args.batch_size)
    atomic_write_with(path, lambda tmp: write(hits, tmp))
    print(f"{len(hits)} hits ({args.top_k} per query) written to {path}")
    return 0


def _check_pairs(args) -> int:
    from .io import atomic_write_text, atomic_write_with

    path = Path(args.out)
    inputs = {"--data file": [args.data], "run bundle's file": _bundle_files(args.run)}
    write = _table_writer(path, inputs, "pairs.csv")
    if args.html:
        from .io import check_output

        check_output(args.html, inputs=inputs, example="pairs.html")
    from .serving.matching import MatchPredictor, disagreement_page, pairs_page
    from .serving.predictor import Predictor

    pred = Predictor.load(args.run, device=_device(args.device))
    if isinstance(pred, MatchPredictor):
        out = pred.check_pairs(args.data, batch_size=args.batch_size)
        said = f"{(out['partner_rank'] > 1).sum()} whose own partner is not the model's first pick"
        page = pairs_page
    else:  # a classifier: the rows whose modalities, each alone, predict different classes
        out = pred.disagreement(args.data, batch_size=args.batch_size)
        said = f"{(out['disagreement'] > 0.5).sum()} whose modalities alone disagree by more than 0.5"
        page = disagreement_page
    atomic_write_with(path, lambda tmp: write(out, tmp))
    if args.html:
        atomic_write_text(Path(args.html), page(out.head(args.show), pred))
    print(f"{len(out)} rows checked; {said}; least consistent first in {path}")
    return 0


def _table_writer(path: Path, inputs, example: str):
    """The writer for ``--out`` (by its suffix), after the checks made before any work (:func:`io.check_output`)."""
    from .io import check_output

    write = _WRITERS.get(path.suffix.lower())
    if write is None:
        raise ValueError(f"--out {str(path)!r}: unknown format {path.suffix!r}; valid: {', '.join(_WRITERS)}")
    check_output(path, inputs=inputs, example=example)
    return write


def _bundle_files(run) -> List[Path]:
    """The files of a run or export bundle that an output must never replace (its marker and what it lists)."""
    from .bundle import MARKER
    from .serving.export import EXPORT_MARKER

    run = Path(run)
    out = [run / MARKER, run / EXPORT_MARKER]
    for marker in out[:]:
        try:
            files = json.loads(marker.read_text()).get("files") or []
        except (OSError, ValueError, AttributeError):
            continue
        out += [run / f for f in files] if isinstance(files, (list, dict)) else []
    return out


def _device(name: str):
    """A torch device the machine has (ValueError naming what it has otherwise)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r}: MPS is not available here")
    return device


def _brief(metrics):
    """The headline numbers per split and task (metrics.json has everything)."""
    keep = ("n", "accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "pr_auc", "log_loss", "ece",
            "f1_micro", "subset_accuracy", "mean_average_precision")
    out = {}
    for split in ("val", "test", "data"):
        for task, m in (metrics.get(split) or {}).items():
            if isinstance(m, dict) and "n" in m:
                out.setdefault(split, {})[task] = {k: m[k] for k in keep if k in m}
    return out


def _report(args) -> int:
    from .bundle import check_bundle
    from .evaluation.report import build_report

    check_bundle(args.run)
    if args.compare:
        from .evaluation.remedies import compare_runs

        others = {}
        for item in args.compare:
            name, sep, run = item.partition("=")
            if not sep or not name.strip() or not run:
                raise ValueError(f"--compare {item!r}: expected NAME=RUN (a remedy's name and its run folder)")
            check_bundle(run)
            others[name.strip()] = run
        print(f"remedies compared in {compare_runs(args.run, others)}")
    print(f"report written to {build_report(args.run)}")
    return 0


def _embed(args) -> int:
    from .io import atomic_write_with

    path = Path(args.out)
    write = _table_writer(path, {"--data file": [args.data], "run bundle's file": _bundle_files(args.run)},
                          "embeddings.parquet")
    pred = _load(args)
    if args.kind not in pred.embedding_kinds:
        raise ValueError(f"--kind {args.kind!r}; valid: {', '.join(pred.embedding_kinds)}")
    out = pred.embed(args.data, kind=args.kind, batch_size=args.batch_size)
    atomic_write_with(path, lambda tmp: write(out, tmp))
    print(f"{len(out)} embeddings ({args.kind}, {out.shape[1] - (1 if pred.spec.id_column else 0)} values each) written to {path}")
    return 0


def _explain(args) -> int:
    from .data.manifest import absolute_paths, read_table
    from .serving.predictor import Predictor

    from .io import check_output

    out = check_output(args.out, inputs={"run bundle": [args.run], "--data file": [args.data]}, kind="folder")
    from .serving.matching import classifier_only

    pred = classifier_only(Predictor.load(args.run, device=_device(args.device), ensemble=False),
                           "mmtune explain")  # explained: the run's own model
    df, base = read_table(args.data)
    if args.rows is not None:
        df = df.head(args.rows)
    absolute_paths(df, pred.config, base)
    written = pred.explain(df, steps=args.steps, task=args.task).write(out, f"Explanations: {args.run}")
    print(f"{len(df)} rows explained: {written['html']} ({written['jsonl'].name}, plots/)")
    return 0


def _prune(args) -> int:
    from .prune import prune_run

    try:
        sparsities = [float(x) for x in args.sparsity.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sparsity {args.sparsity!r}: give numbers between 0 and 1, e.g. 0.3,0.5") from None
    results = prune_run(args.run, sparsities, args.data, args.structured, args.finetune_epochs, args.out)
    for r in results[1:]:
        print(f"pruned bundle: {r['bundle']}")
    return 0


def _export(args) -> int:
    from .serving.export import export_onnx

    export_onnx(args.run, args.out, args.data, args.quantize, ensemble=False if args.single else None,
                convolutions=args.int8_convolutions)
    return 0


def _serve(args) -> int:
    from .serving.server import ServeSettings, serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: give a port number from 1 to 65535")
    if args.allow_paths is not None and not Path(args.allow_paths).is_dir():
        raise ValueError(f"--allow-paths {args.allow_paths!r} is not a folder; name the folder whose files requests "
                         "may read")
    for name in ("max_request_rows", "max_body_mb", "max_request_mpixels", "max_batch_rows", "workers"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    settings = ServeSettings(max_request_rows=args.max_request_rows, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                             max_request_pixels=int(args.max_request_mpixels * 1e6),
                             allow_paths=None if args.allow_paths is None else str(Path(args.allow_paths).resolve()),
                             batching=not args.no_batching,
                             batch_window_ms=args.batch_window_ms, max_batch_rows=args.max_batch_rows,
                             search_index=args.index)
    if args.index is not None:
        from .serving.matching import SearchIndex

        SearchIndex.load(args.index)  # a missing or damaged index is refused before the server starts
    print(f"serving {args.run} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    serve(args.run, args.host, args.port, args.workers, args.backend, str(_device(args.device)), settings,
          ensemble=False if args.single else None)
    return 0


def _align(args) -> int:
    from .data.align import align_tables
    from .io import atomic_write_json, atomic_write_with

    path = Path(args.out)
    write = _table_writer(path, {"one of the input tables": args.tables}, "joined.csv")
    joined, report = align_tables(args.tables, args.on, args.time, args.tolerance, args.direction, args.paths)
    atomic_write_with(path, lambda tmp: write(joined, tmp))
    atomic_write_json(path.with_name(path.name + ".alignment.json"), report.to_json())
    print(report)
    print(f"{len(joined)} rows written to {path}")
    return 0


def _parts(args) -> int:
    print(parts_table())
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.output_dir), args.rows or (400 if args.audio else 800), args.overrides, audio=args.audio)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
