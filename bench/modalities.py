"""Every kind of column on generated data, offline: fused against each modality (or column) alone.

    .venv/bin/python bench/modalities.py [--rows 400] [--epochs 15] [--seed 0]

Scenarios (the pretrained encoders are the offline presets, frozen):
- audio + text: a tone's pitch (low / high) and a note's verdict (keep / return), 4 classes
  (EfficientNet-Lite0 on log-mel spectrograms, MiniLM; embedding cache); the same with the resemblyzer speaker
  encoder in place of the EfficientNet, when its weights are installed (``pip install --no-deps resemblyzer``);
- tabular + text: an amount above or below 5 and the note's verdict, 4 classes (the tabular encoder trains
  from scratch, MiniLM frozen);
- regression: a price of 100 + 3 * amount + 20 * keep + N(0, 2) from a numeric column and a note (R²);
- two text columns: a title that carries nothing and a body that carries the verdict.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd

import mmtune
from mmtune.config import load_config
from mmtune.demo import ITEMS, KEEP, OPENERS, RETURN, make_audio_dataset
from mmtune.logs import quiet_libraries

from _scratch import scratch

TEXT = {"modality": "text", "checkpoint": "minilm-l6", "max_length": 32}


def base(work: Path, name: str, encoders, epochs: int, seed: int, **sections):
    cfg = {"name": name, "output_dir": str(work / "runs"),
           "data": {"id_column": "id"}, "model": {"encoders": encoders, "fusion": {"type": "concat", "hidden_dims": [64]}},
           "finetune": {"type": "frozen"}, "optim": {"lr": 2e-3},
           "trainer": {"max_epochs": epochs, "batch_size": 32, "progress_bar": False, "seed": seed,
                       "early_stopping_patience": None},
           "evaluation": {"report": False, "modality_contribution": False, "explain": 0}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return load_config(cfg)


def compare(cfg, train, test, metric="accuracy", task="label"):
    """Test ``metric`` of the fused model and of each modality (column) alone, same settings."""
    out = {}
    variants = {"fused": cfg}
    for m in cfg.modalities:
        try:
            variants[f"{m} only"] = cfg.only_modality(m, f"{cfg.name}-{m}")
        except ValueError:
            pass
    for variant, c in variants.items():
        t = time.time()
        res = mmtune.fit(c, train=train, test=test, overwrite=True)
        out[variant] = round(res.metrics["test"][task][metric], 4)
        print(f"  {variant:<18} {metric} {out[variant]:.4f}  ({time.time() - t:.0f} s)", flush=True)
    return out


def notes(rng, verdict):
    return f"{rng.choice(OPENERS)} this {rng.choice(ITEMS)}: {rng.choice(KEEP if verdict == 'keep' else RETURN)}".strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quiet_libraries()
    work = scratch("mmtune-modalities-")
    results = {}

    print("audio + text", flush=True)
    paths = make_audio_dataset(work / "audio", n=args.rows, seed=args.seed)
    cfg = base(work, "audio", {"audio": {"modality": "audio", "checkpoint": "efficientnet-lite0-audio", "max_seconds": 2.0},
                               "text": TEXT}, args.epochs, args.seed)
    results["audio"] = compare(cfg, str(paths["train"]), str(paths["test"]))

    print("the two offline audio encoders, audio alone and fused with the text", flush=True)
    try:
        from mmtune.encoders.speaker import weights_path

        weights_path()
        cfg = base(work, "speaker", {"audio": {"modality": "audio", "checkpoint": "resemblyzer-speaker", "max_seconds": 2.0},
                                     "text": TEXT}, args.epochs, args.seed)
        results["speaker"] = compare(cfg, str(paths["train"]), str(paths["test"]))
    except ImportError as exc:
        print(f"  resemblyzer-speaker skipped: {exc}", flush=True)
        results["speaker"] = {"fused": None, "audio only": None}

    print("tabular + text", flush=True)
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.rows):
        amount, verdict = rng.uniform(0, 10), rng.choice(["keep", "return"])
        rows.append({"id": f"t{i}", "text": notes(rng, verdict), "amount": round(amount, 2),
                     "brand": rng.choice(["acme", "globex", "initech"]),
                     "label": f"{'high' if amount > 5 else 'low'}-{verdict}"})
    table = pd.DataFrame(rows)
    n_test = args.rows // 4
    cfg = base(work, "tabular", {"table": {"modality": "tabular", "checkpoint": "tabular"}, "text": TEXT}, args.epochs,
               args.seed, data={"columns": {"tabular": ["amount", "brand"]}}, finetune={"type": "frozen", "cache": False})
    results["tabular"] = compare(cfg, table.iloc[n_test:], table.iloc[:n_test])

    print("regression (tabular + text)", flush=True)
    rng = random.Random(args.seed + 2)
    rows = []
    for i in range(args.rows):
        amount, verdict = rng.uniform(0, 10), rng.choice(["keep", "return"])
        price = 100 + 3 * amount + 20 * (verdict == "keep") + rng.gauss(0, 2.0)  # a planted linear rule
        rows.append({"id": f"p{i}", "text": notes(rng, verdict), "amount": round(amount, 2), "price": price})
    table = pd.DataFrame(rows)
    cfg = base(work, "regression", {"table": {"modality": "tabular", "checkpoint": "tabular"}, "text": TEXT}, args.epochs,
               args.seed, data={"columns": {"tabular": ["amount"]}, "tasks": {"price": {"column": "price", "regression": True}}},
               finetune={"type": "frozen", "cache": False}, trainer={"monitor": "val_rmse"})
    results["regression"] = compare(cfg, table.iloc[n_test:], table.iloc[:n_test], metric="r2", task="price")

    print("two text columns", flush=True)
    rng = random.Random(args.seed + 1)
    rows = [{"id": f"n{i}", "title": notes(rng, rng.choice(["keep", "return"])), "body": notes(rng, v), "label": v}
            for i, v in enumerate(rng.choice(["keep", "return"]) for _ in range(args.rows))]
    table = pd.DataFrame(rows)
    cfg = base(work, "columns", {"title": TEXT, "body": {**TEXT, "modality": "text.body"}}, args.epochs, args.seed,
               data={"columns": {"text": "title"}})
    results["two_text_columns"] = compare(cfg, table.iloc[n_test:], table.iloc[:n_test])

    summary = {
        "audio_text_acc": results["audio"]["fused"], "audio_only_acc": results["audio"]["audio only"],
        "text_only_acc_audio_task": results["audio"]["text only"],
        "speaker_audio_text_acc": results["speaker"]["fused"], "speaker_audio_only_acc": results["speaker"]["audio only"],
        "tabular_text_acc": results["tabular"]["fused"], "tabular_only_acc": results["tabular"]["tabular only"],
        "regression_r2": results["regression"]["fused"], "regression_tabular_only_r2": results["regression"]["tabular only"],
        "regression_text_only_r2": results["regression"]["text only"],
        "two_text_columns_acc": results["two_text_columns"]["fused"],
        "title_only_acc": results["two_text_columns"]["text only"],
        "body_only_acc": results["two_text_columns"]["text.body only"],
        "rows": args.rows, "epochs": args.epochs, "seed": args.seed,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
