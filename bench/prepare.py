"""How much of an image processor's work the decoding threads take off the collating thread (``prepare``).

    .venv/bin/python bench/prepare.py [--photos 32] [--size 640x480] [--side 224] [--rounds 5]

For each image processor kind — mmtune's square resize (EfficientNet-Lite's), a Hugging Face processor resizing to a
height and width (ViT's), and one resizing the shortest edge before a centre crop (CLIP's) — on --photos random
pictures of --size pixels: the batch built from the pictures as decoded (all on the collating thread), the processor's
``prepare`` alone (what the decoding threads do ahead), and the batch built from the prepared pictures (what is left
to the collating thread); medians of --rounds, in milliseconds per batch. ``same`` says whether the two batches are
equal to the bit. And for texts (the demo's MiniLM tokenizer, --texts texts of --words random words, max_length
--max-length), what prediction does since it keeps the tokens it counts to sort the rows by: a batch of --photos of them
tokenised (``raw_ms``), every text counted and its tokens kept (``count_ms``, per --texts texts, against ``count_only_ms``, a
count that keeps nothing), and a batch padded from the kept tokens (``prepared_ms``). The last line printed is one
JSON object: per processor, ``raw_ms``, ``prepare_ms`` (``count_ms`` and ``count_only_ms`` for the text),
``prepared_ms`` and ``same``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def processors(side: int):
    from transformers import CLIPImageProcessor, ViTImageProcessor

    from mmtune.encoders.processors import HFImageProcessor, ResizeNormalizeProcessor

    return {
        "square (ResizeNormalize)": ResizeNormalizeProcessor(side),
        "height x width (ViT)": HFImageProcessor(ViTImageProcessor(size={"height": side, "width": side})),
        "shortest edge + crop (CLIP)": HFImageProcessor(CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side})),
    }


def median_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of each picture")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    from PIL import Image

    from mmtune.logs import quiet_libraries

    quiet_libraries()
    width, height = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(args.photos)]
    out = {}
    print(f"{args.photos} pictures of {width}x{height} into {args.side} px; ms per batch, medians of {args.rounds}")
    for name, proc in processors(args.side).items():
        column = {"image": pictures}
        prepared = {"image": proc.prepare(column)["image"]}
        same = bool(np.array_equal(proc(column)["pixel_values"].numpy(), proc(prepared)["pixel_values"].numpy()))
        figures = {"raw_ms": median_ms(lambda: proc(column), args.rounds),
                   "prepare_ms": median_ms(lambda: proc.prepare(column), args.rounds),
                   "prepared_ms": median_ms(lambda: proc(prepared), args.rounds)}
        out[name] = {k: round(v, 2) for k, v in figures.items()} | {"same": same}
        print(f"{name:30s} collating thread alone {figures['raw_ms']:7.1f}; decoding threads {figures['prepare_ms']:7.1f} "
              f"+ collating thread {figures['prepared_ms']:7.1f}; same batch: {same}")
    out["text (MiniLM tokenizer)"] = texts(args, rng)
    print(json.dumps(out))


def texts(args, rng) -> dict:
    from transformers import AutoTokenizer

    from mmtune.encoders.offline import minilm_path
    from mmtune.encoders.processors import TextProcessor

    proc = TextProcessor(AutoTokenizer.from_pretrained(minilm_path()), max_length=args.max_length)
    vocabulary = ["picture", "colour", "verdict", "bright", "dull", "the", "a", "customer", "returned", "liked",
                  "naïve", "café", "sharp", "blurred", "evening", "light", "order", "arrived", "late", "again"]
    column = {"text": [" ".join(rng.choice(vocabulary, rng.integers(1, args.words + 1))) for _ in range(args.texts)]}
    batch = np.arange(min(args.photos, args.texts))
    first = {"text": [column["text"][i] for i in batch]}
    tokens = proc.tokens(column)
    same = all(np.array_equal(a.numpy(), b.numpy()) and a.dtype == b.dtype
               for a, b in zip(proc.pad(tokens, batch).values(), proc(first).values()))
    figures = {"raw_ms": median_ms(lambda: proc(first), args.rounds),
               "count_ms": median_ms(lambda: proc.tokens(column), args.rounds),
               "count_only_ms": median_ms(lambda: proc.lengths(column), args.rounds),
               "prepared_ms": median_ms(lambda: proc.pad(tokens, batch), args.rounds)}
    print(f"{args.texts} texts of up to {args.words} words, max_length {args.max_length}: counting them "
          f"{figures['count_only_ms']:.1f}, counting and keeping the tokens {figures['count_ms']:.1f}; a batch of "
          f"{len(batch)} tokenised {figures['raw_ms']:.1f}, padded from the kept tokens {figures['prepared_ms']:.2f}; "
          f"same batch: {same}")
    return {k: round(v, 2) for k, v in figures.items()} | {"same": same}


if __name__ == "__main__":
    main()
