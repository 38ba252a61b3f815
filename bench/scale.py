"""Memory as the table grows: peak resident memory of reading + validating a manifest and one frozen epoch over
it (embedding cache built, then one training epoch), for generated tables of 10k, 100k and 1M rows.

    .venv/bin/python bench/scale.py [--rows 10000,100000,1000000] [--work DIR]

The rows are short texts and tiny images (32 px PNGs; 256 distinct files shared by the rows, so that the disk
holds the table, not a million files); the encoders are tiny random Hugging Face models (a ViT and a BERT,
saved with save_pretrained), because the figure is about the data path, not the encoders. Each size runs in its
own process, so its peak (``ru_maxrss``) is its own. ``rss_growth_per_10x`` is the geometric mean of the peak's
growth per 10x rows (the aim: under 1.5). The last line is one JSON object with ``rss_mb_by_rows`` and
``rss_growth_per_10x``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import resource
import sys
import time
from pathlib import Path

from _scratch import scratch

WORDS = ("good bad fine broken lovely awful great poor solid cheap sturdy flimsy bright dull quick slow "
         "neat messy soft hard").split()


def make_encoders(folder: Path):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTImageProcessor, ViTModel

    vit, bert = folder / "vit", folder / "bert"
    if not (vit / "config.json").is_file():
        torch.manual_seed(0)
        ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)).save_pretrained(str(vit))
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(vit))
        bert.mkdir(parents=True, exist_ok=True)
        (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        BertTokenizerFast(vocab_file=str(bert / "vocab.txt"), do_lower_case=True).save_pretrained(str(bert))
        BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(bert))
    return str(vit), str(bert)


def make_table(folder: Path, rows: int) -> Path:
    """``rows`` rows (id, image, text, label) as Parquet; images from a pool of 256 tiny PNGs."""
    import pandas as pd
    from PIL import Image

    images = folder / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        rng = random.Random(0)
        for i in range(256):
            Image.new("RGB", (32, 32), tuple(rng.randint(0, 255) for _ in range(3))).save(images / f"{i}.png")
    path = folder / f"rows-{rows}.parquet"
    if not path.is_file():
        rng = random.Random(rows)
        labels = ("a", "b", "c", "d")
        pd.DataFrame({"id": [f"r{i}" for i in range(rows)],
                      "image": [f"images/{rng.randrange(256)}.png" for _ in range(rows)],
                      "text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rows)],
                      "label": [labels[i % 4] for i in range(rows)]}).to_parquet(path, index=False)
    return path


def run_one(rows: int, table: str, vit: str, bert: str, out: str, queue) -> None:
    import mmtune
    from mmtune.logs import quiet_libraries

    quiet_libraries()
    cfg = {"name": f"scale-{rows}", "output_dir": out, "data": {"train": table, "id_column": "id", "val_fraction": 0.05},
           "model": {"encoders": {"image": {"modality": "image", "checkpoint": vit},
                                  "text": {"modality": "text", "checkpoint": bert, "max_length": 16}},
                     "fusion": {"hidden_dims": [32]}},
           "finetune": {"type": "frozen"},
           "trainer": {"max_epochs": 1, "batch_size": 256, "eval_batch_size": 1024, "progress_bar": False},
           "evaluation": {"report": False, "explain": 0, "linear_probe": False, "modality_contribution": False,
                          "worst_examples": 0}}
    t0 = time.perf_counter()
    mmtune.fit(cfg, overwrite=True)
    queue.put({"rows": rows, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "seconds": round(time.perf_counter() - t0, 1)})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="10000,100000,1000000")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or scratch("mmtune-scale-"))
    vit, bert = make_encoders(work / "encoders")
    sizes = [int(x) for x in args.rows.split(",")]
    ctx = mp.get_context("spawn")
    results = []
    for rows in sizes:
        table = make_table(work, rows)
        q = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(rows, str(table), vit, bert, str(work / "runs"), q))
        proc.start()
        r = q.get()
        proc.join()
        results.append(r)
        print(f"{rows:>9,} rows: peak {r['peak_rss_mb']:>8.0f} MB in {r['seconds']:.0f} s", flush=True)
    growth = None
    if len(results) > 1:
        a, b = results[0], results[-1]
        decades = math.log10(b["rows"] / a["rows"])
        growth = round((b["peak_rss_mb"] / a["peak_rss_mb"]) ** (1 / decades), 3)
        print(f"peak memory grows {growth}x per 10x rows (aim: under 1.5)")
    print(json.dumps({"rss_mb_by_rows": {str(r["rows"]): r["peak_rss_mb"] for r in results},
                      "rss_growth_per_10x": growth, "seconds_by_rows": {str(r["rows"]): r["seconds"] for r in results}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
