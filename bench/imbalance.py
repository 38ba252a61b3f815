"""Class-imbalance remedies side by side on an imbalanced variant of the demo task.

    .venv/bin/python bench/imbalance.py [--seeds 3] [--epochs 30]

The demo task (4 classes: colour family from the image x verdict from the text) with one class made
20 times rarer than each of the others in the training data (majority:minority 20:1); the test set
stays balanced so that minority recall is measured on enough rows. Every method uses the same frozen
encoders (EfficientNet-Lite0 + MiniLM, embedding cache), concat fusion, data and epochs; only the
remedy differs. Prints macro-F1 and minority recall on the test set, mean (and spread) over the
seeds, then each class's training rows, recall under ``none`` and how much each remedy changed it (means over
the seeds; ``--report FILE`` also writes the report of ``none``'s first run with those changes in its per-class
table); the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from _scratch import scratch

METHODS = {
    "none": [],
    "class weights": ["imbalance.class_weights=inverse"],
    "sampler": ["imbalance.sampler=true"],
    "focal": ["loss.type=focal", "loss.gamma=2.0"],
    "SMOTE": ["synthesis.method=smote", "synthesis.target_ratio=1.0"],
    "GAN": ["synthesis.method=gan", "synthesis.target_ratio=1.0", "synthesis.gan.epochs=200"],
    "SMOTE subspace": ["synthesis.method=smote", "synthesis.target_ratio=1.0", "synthesis.subspace=0.8"],
    "GAN subspace": ["synthesis.method=gan", "synthesis.target_ratio=1.0", "synthesis.gan.epochs=200",
                     "synthesis.subspace=0.8"],
    "logit-adjusted": ["loss.type=logit_adjusted", "loss.tau=1.0"],
    "balanced softmax": ["loss.type=balanced_softmax"],
    "post-hoc adjust": ["evaluation.logit_adjustment=true"],
    "deferred weights": ["imbalance.class_weights=inverse", "imbalance.reweight_last=10"],
}
MINORITY = "cool-return"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--majority", type=int, default=200, help="training rows per majority class")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--report", help="write the report of none's first run, with each remedy's change per class, here")
    args = ap.parse_args()
    chosen = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")

    import mmtune
    from mmtune.config import load_config
    from mmtune.demo import demo_config_path, make_dataset
    from mmtune.logs import quiet_libraries

    quiet_libraries()
    work = scratch("mmtune-imbalance-")
    n_min = max(2, args.majority // 20)
    paths = make_dataset(work / "data", n=4 * args.majority + 400, image_size=96, seed=0, test_fraction=0.0)
    full = pd.read_csv(paths["train"])
    full["image"] = [str(work / "data" / p) for p in full["image"]]
    test = full.groupby("label").head(100)
    rest = full.drop(index=test.index)
    train = pd.concat([g.head(n_min if name == MINORITY else args.majority) for name, g in rest.groupby("label")])
    counts = train["label"].value_counts().to_dict()
    print(f"training rows per class: {counts}; test rows per class: {test['label'].value_counts().to_dict()}", flush=True)

    from mmtune.evaluation.remedies import changes, mean_per_class, per_class, write_remedies

    results, classes, first_runs = {}, {}, {}
    for method, extra in METHODS.items():
        if method not in chosen:
            continue
        f1s, recalls, fidelity = [], [], []
        for seed in range(args.seeds):
            cfg = load_config(demo_config_path(), [
                f"output_dir={work / 'runs'}", f"name=imb-{method.replace(' ', '_')}-{seed}",
                "finetune.type=frozen", f"trainer.max_epochs={args.epochs}", f"trainer.seed={seed}",
                "trainer.early_stopping_patience=null", "trainer.monitor=val_f1_macro", "trainer.progress_bar=false",
                "optim.lr=0.003", "schedule.name=constant", "data.val_fraction=0.2", f"data.split_seed={seed}",
                "evaluation.report=false", "evaluation.modality_contribution=false", "evaluation.explain=0", *extra])
            res = mmtune.fit(cfg, train=train, test=test, overwrite=True)
            classes.setdefault(method, []).append(per_class(res.metrics))
            first_runs.setdefault(method, res.run_dir)
            m = res.metrics["test"]["label"]
            f1s.append(m["f1_macro"])
            recalls.append(next(r["recall"] for r in m["per_class"] if r["class"] == MINORITY))
            fid = ((res.metrics.get("synthesis") or {}).get("fidelity") or {})
            if fid:  # the minority class's generated rows against its real ones
                idx = str(res.tasks[0].classes.index(MINORITY))
                fidelity.append(fid.get(idx, {}))
        results[method] = {"macro_f1": float(np.mean(f1s)), "macro_f1_std": float(np.std(f1s)),
                           "minority_recall": float(np.mean(recalls)), "minority_recall_std": float(np.std(recalls))}
        for key in ("mean_distance", "spread_ratio", "precision", "recall"):
            values = [f[key] for f in fidelity if key in f]
            if values:
                results[method][f"gan_minority_{key}"] = float(np.mean(values))
        r = results[method]
        said = "" if "gan_minority_spread_ratio" not in r else (
            f"   minority fidelity: distance {r['gan_minority_mean_distance']:.2f}, spread {r['gan_minority_spread_ratio']:.2f}"
            + (f", precision {r['gan_minority_precision']:.2f}, recall {r['gan_minority_recall']:.2f}"
               if "gan_minority_precision" in r else ""))
        print(f"{method:<16} macro-F1 {r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f}   "
              f"minority recall {r['minority_recall']:.3f} ± {r['minority_recall_std']:.3f}{said}", flush=True)
    if "none" in classes:
        table = changes(mean_per_class(classes["none"]), {k: mean_per_class(v) for k, v in classes.items() if k != "none"})
        table["note"] = f"bench/imbalance.py: each method's mean over {args.seeds} seeds against none's"
        names = [k for k in classes if k != "none"]
        print(f"\n{'class':<14} {'train':>5} {'none':>6} " + " ".join(f"{n[:10]:>10}" for n in names))
        for c, v in table["base"]["label"].items():
            print(f"{c:<14} {counts.get(c, 0):>5} {v['recall']:>6.3f} "
                  + " ".join(f"{table['tasks']['label'][n][c]['recall_change']:>+10.3f}" for n in names))
        print("(recall under none, then each remedy's change of it)", flush=True)
        if args.report:
            import shutil

            from mmtune.evaluation.report import build_report

            write_remedies(first_runs["none"], table)
            shutil.copyfile(build_report(first_runs["none"]), args.report)
        for n in names:
            results[n]["recall_change_per_class"] = {c: round(v["recall_change"], 4)
                                                     for c, v in table["tasks"]["label"][n].items()}
    flat = {}
    for name, r in results.items():  # <method>_macro_f1, <method>_minority_recall (spaces and dashes as _)
        key = name.replace(" ", "_").replace("-", "_")
        flat[f"{key}_macro_f1"], flat[f"{key}_minority_recall"] = r["macro_f1"], r["minority_recall"]
    if "gan_minority_spread_ratio" in results.get("GAN subspace", {}):
        flat["gan_spread_ratio"] = results["GAN subspace"]["gan_minority_spread_ratio"]
    print(json.dumps({**flat, "ratio": "20:1", "train_counts": counts, "seeds": args.seeds, "epochs": args.epochs,
                      "methods": results}))


if __name__ == "__main__":
    sys.exit(main())
