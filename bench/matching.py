"""Matching: two towers of the offline pretrained encoders, before and after training, on two generated tables.

    .venv/bin/python bench/matching.py [--rows 400] [--image-size 96] [--epochs 8] [--runs frozen,projection,lora]
                                       [--work DIR]

Tables (generated offline, seeded; a row is a positive pair, the other rows of a batch its negatives):
  image_text  a picture of an object in one of eight colours ↔ the name that colour goes by (``this mug``, …):
              EfficientNet-Lite0 ↔ MiniLM; 8 distinct texts, so recall@1 by chance is 1/8
  text_text   a short request naming one of eight items (``honestly this lamp``) ↔ the review written for that item
              (8 distinct reviews): MiniLM ↔ MiniLM, separate weights

Runs: ``frozen`` (the pretrained towers with their fresh projections, no training), ``projection`` (encoders frozen
on the embedding cache, the projections trained), ``lora`` (LoRA in both encoders). The consistency check then swaps
10 % of the image_text test rows' texts and reports the share of the rows it ranks in its top decile that were
swapped. The last line printed is one JSON object with ``image_text_r1_frozen``, ``image_text_r1_tuned`` (the better
of projection and LoRA), ``text_text_r1_tuned``, ``swap_precision_top_decile`` and every run's recall@1/5, MRR and
seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from _scratch import scratch


def text_pairs(out: Path, n: int, seed: int = 0):
    """Requests naming an item ↔ that item's review (8 items, 8 reviews)."""
    import pandas as pd

    from mmtune.demo import ITEMS, KEEP, OPENERS

    rng = random.Random(seed)
    rows = [{"id": f"tt{i:05d}", "request": f"{rng.choice(OPENERS)} this {ITEMS[i % 8]}".strip(),
             "review": KEEP[i % 8]} for i in range(n)]
    rng.shuffle(rows)
    k = n // 4
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows[k:]).to_csv(out / "train.csv", index=False)
    pd.DataFrame(rows[:k]).to_csv(out / "test.csv", index=False)
    return {"train": out / "train.csv", "test": out / "test.csv"}


def config(name, work, tables, query, response, encoders, finetune, epochs):
    return {"name": name, "output_dir": str(work / "runs"),
            "data": {"train": str(tables["train"]), "test": str(tables["test"]), "query": query, "response": response,
                     "id_column": "id"},
            "model": {"encoders": encoders}, "finetune": finetune, "matching": {"dim": 128},
            "optim": {"lr": 2e-3, "weight_decay": 0.0},
            "trainer": {"max_epochs": epochs, "batch_size": 32, "progress_bar": False, "early_stopping_patience": None},
            "evaluation": {"report": False}}


def untrained(cfg_dict):
    """The towers before any training step, evaluated like a fit: recall on the test split."""
    import torch

    from mmtune.config import load_config
    from mmtune.data.datamodule import TableDataModule
    from mmtune.evaluation.matching import evaluate_matching
    from mmtune.finetune import build_strategy
    from mmtune.models import model_for

    cfg = load_config({**cfg_dict, "finetune": {"type": "frozen"}})
    torch.manual_seed(0)
    model = model_for(cfg, [])
    data = TableDataModule(cfg).read()
    data.attach(model, build_strategy(cfg.finetune))
    metrics, _ = evaluate_matching(model, {"test": data.eval_loader("test")}, data.prepared.frames, cfg.data, {"test": {}})
    return metrics["test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--runs", default="frozen,projection,lora", help="which of frozen, projection, lora to run")
    ap.add_argument("--work", default=None, help="folder for data and runs (default: a fresh temporary folder)")
    args = ap.parse_args()

    import numpy as np
    import pandas as pd

    import mmtune
    from mmtune.demo import make_pairs

    from mmtune.memory import keep_freed_memory

    keep_freed_memory()  # as every mmtune command does at start (the untrained towers are evaluated before any fit)
    work = Path(args.work) if args.work else scratch("mmtune-matching-")
    image = {"image": {"modality": "image", "checkpoint": "efficientnet-lite0", "image_size": args.image_size},
             "text": {"modality": "text", "checkpoint": "minilm-l6", "max_length": 16}}
    texts = {"request": {"modality": "text.request", "checkpoint": "minilm-l6", "max_length": 16},
             "review": {"modality": "text.review", "checkpoint": "minilm-l6", "max_length": 16}}
    runs = {"frozen": None, "projection": {"type": "frozen"},
            "lora": {"type": "lora", "r": 8, "encoder_lr": 1e-3}}
    runs = {k: v for k, v in runs.items() if k in args.runs.split(",")}
    if not any(v is not None for v in runs.values()):
        sys.exit("--runs needs projection or lora (a trained run) beside frozen")
    tables = {"image_text": (make_pairs(work / "image_text", n=args.rows, image_size=args.image_size, seed=0),
                             "image", "text", image),
              "text_text": (text_pairs(work / "text_text", args.rows), "request", "review", texts)}
    out = {}
    best_run = {}
    for task, (paths, query, response, encoders) in tables.items():
        for run, finetune in runs.items():
            cfg = config(f"{task}-{run}", work, paths, query, response, encoders, finetune or {"type": "frozen"},
                         args.epochs)
            t0 = time.perf_counter()
            m = untrained(cfg) if finetune is None else mmtune.fit(cfg, overwrite=True).metrics["test"]
            secs = time.perf_counter() - t0
            out.update({f"{task}_{run}_r1": m["recall@1"], f"{task}_{run}_r5": m["recall@5"],
                        f"{task}_{run}_mrr": m["mrr"], f"{task}_{run}_s": round(secs, 1)})
            print(f"{task:<11} {run:<11} recall@1 {m['recall@1']:.3f}  recall@5 {m['recall@5']:.3f}  "
                  f"MRR {m['mrr']:.3f}  ({m['queries']} queries, {m['candidates']} candidates)  {secs:6.1f} s",
                  flush=True)
            if finetune is not None and m["recall@1"] >= best_run.get(task, (None, -1))[1]:
                best_run[task] = (run, m["recall@1"])
    # the consistency check: 10 % of the test rows get another colour's name
    paths = tables["image_text"][0]
    pred = mmtune.load(work / "runs" / f"image_text-{best_run['image_text'][0]}")
    test = pd.read_csv(paths["test"])
    test["image"] = [str(paths["test"].parent / p) for p in test["image"]]
    rng = np.random.default_rng(0)
    swapped = rng.choice(len(test), max(1, len(test) // 10), replace=False)
    names = sorted(set(test["text"]))
    for i in swapped:
        test.loc[i, "text"] = names[(names.index(test.loc[i, "text"]) + 1 + rng.integers(len(names) - 1)) % len(names)]
    checked = pred.check_pairs(test)
    top = set(checked["row"][:len(swapped)])
    precision = len(top & set(swapped)) / len(top)
    print(f"consistency check: {len(swapped)} of {len(test)} pairs swapped; {precision:.2f} of its top decile are them")
    out.update({"image_text_r1_frozen": out.get("image_text_frozen_r1"), "image_text_r1_tuned": best_run["image_text"][1],
                "text_text_r1_tuned": best_run["text_text"][1], "swap_precision_top_decile": round(precision, 3)})
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
