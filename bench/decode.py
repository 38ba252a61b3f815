"""Decoding large JPEGs at a reduced scale (``data.jpeg_draft``) against decoding them in full.

    .venv/bin/python bench/decode.py [--photos 24] [--size 4032x3024] [--side 224] [--run runs/demo-fused]

Writes --photos synthetic photographs (gradients, discs and fine noise, JPEG quality 90) of --size pixels into a
temporary folder. Per photograph, median of --rounds: a full decode; the image modality's read for an encoder of
--side pixels (a JPEG decoded at the smallest of 1/1 .. 1/8 of its size that keeps twice that side); the validation
check (a full decode before, the smallest scale now); and each read followed by the resize to --side, whose pixels
are compared (mean and largest difference, in 0-255 units). With --run (a bundle), prediction too: predict_proba on
the photographs, the sides its processors resize to against decoding in full, taking turns for --rounds rounds. The last line
printed is one JSON object with keys ``full_ms``, ``draft_ms``, ``decode_speedup``, ``check_speedup``,
``mean_pixel_diff``, ``max_pixel_diff`` and, with --run, ``predict_rows_per_s`` ({draft, full}) and
``predict_speedup``; with --fit-rows, ``fit_seconds`` ({draft, full}), ``fit_speedup`` and ``fit_accuracy``.

--fit-rows N also fits the demo model (its config, at --side, --fit-epochs epochs, no early stopping) on N demo rows
whose pictures are enlarged to --size JPEGs with fine noise, with ``data.jpeg_draft`` and without, twice each (on, off,
off, on), and times each whole fit (validation, training, evaluation): the mean of each setting's two.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from _scratch import scratch


def photograph(path: Path, width: int, height: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.02, 0.2) * width
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def per_photo_ms(fn, paths, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        times.append((time.perf_counter() - start) / len(paths))
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--size", default="4032x3024", help="WIDTHxHEIGHT of the photographs")
    ap.add_argument("--side", type=int, default=224, help="the encoder's input side")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run", default=None, help="a bundle: also time its prediction on the photographs")
    ap.add_argument("--fit-rows", type=int, default=0,
                    help="also fit the demo model at --side on this many demo rows whose pictures are --size JPEGs, "
                         "with data.jpeg_draft on and off (0: no fit)")
    ap.add_argument("--fit-epochs", type=int, default=2)
    args = ap.parse_args()

    from PIL import Image

    from mmtune.data.images import load_image
    from mmtune.modalities import DRAFT_MARGIN, Image as ImageEntry

    width, height = (int(v) for v in args.size.lower().split("x"))
    folder = scratch("mmtune-decode-")
    paths = [photograph(folder / f"{i:03d}.jpg", width, height, i) for i in range(args.photos)]
    entry, side = ImageEntry(), args.side
    drafted = entry.read(str(paths[0]), None, side=side)
    print(f"{args.photos} photographs of {width}x{height}; an encoder of {side} px reads them at "
          f"{drafted.size[0]}x{drafted.size[1]} (at least {DRAFT_MARGIN} x {side} a side)")

    full_ms = per_photo_ms(load_image, paths, args.rounds)
    draft_ms = per_photo_ms(lambda p: entry.read(str(p), None, side=side), paths, args.rounds)
    check_ms = per_photo_ms(entry.check_file, paths, args.rounds)
    resize = {"full": lambda p: load_image(p).resize((side, side), Image.BILINEAR),
              "draft": lambda p: entry.read(str(p), None, side=side).resize((side, side), Image.BILINEAR)}
    resized_ms = {k: per_photo_ms(fn, paths, args.rounds) for k, fn in resize.items()}
    diffs = [np.abs(np.asarray(resize["full"](p), np.int16) - np.asarray(resize["draft"](p), np.int16)) for p in paths]
    mean_diff = float(np.mean([d.mean() for d in diffs]))
    max_diff = int(max(d.max() for d in diffs))
    print(f"decode per photograph: full {full_ms:.1f} ms, drafted {draft_ms:.1f} ms ({full_ms / draft_ms:.2f}x); "
          f"the validation check {check_ms:.1f} ms ({full_ms / check_ms:.2f}x the full decode's speed)")
    print(f"decode + resize to {side}: full {resized_ms['full']:.1f} ms, drafted {resized_ms['draft']:.1f} ms; "
          f"resized pixels differ by {mean_diff:.3f} on average, at most {max_diff} (0-255)")
    out = {"full_ms": round(full_ms, 2), "draft_ms": round(draft_ms, 2), "decode_speedup": round(full_ms / draft_ms, 2),
           "check_speedup": round(full_ms / check_ms, 2), "mean_pixel_diff": round(mean_diff, 4),
           "max_pixel_diff": max_diff}

    if args.run:
        import pandas as pd

        import mmtune
        from mmtune.modalities import modality_of

        pred = mmtune.load(args.run)
        sides = pred.collator.sides()  # the bundle's processors' sides, also for a bundle written before the setting
        columns = dict(pred.spec.modality_columns)
        if not sides or "image" not in columns:
            raise SystemExit(f"{args.run}: the bundle reads no image column at a known side (sides: {sides})")
        rows = pd.DataFrame({columns["image"]: [str(p) for p in paths]})
        for m, c in pred.spec.modality_columns:
            if m == "image":
                continue
            if not modality_of(m).free_text:
                raise SystemExit(f"{args.run}: this bench fills image and text columns only, not {m!r}")
            rows[c] = "a photograph"
        if pred.spec.id_column:
            rows[pred.spec.id_column] = range(len(rows))
        pred.predict_proba(rows.head(2))
        times = {"draft": [], "full": []}
        for r in range(args.rounds):
            for kind in (("draft", "full") if r % 2 else ("full", "draft")):
                # both turned upright as their EXIF says (these have no tag): only the scale differs
                pred.reads = {m: ({"side": v, "orient": True} if kind == "draft" else {"orient": True})
                              for m, v in sides.items()}
                start = time.perf_counter()
                pred.predict_proba(rows)
                times[kind].append(time.perf_counter() - start)
        rate = {k: len(rows) / statistics.median(v) for k, v in times.items()}
        print(f"prediction on the photographs ({pred.backend}, sides {sides}): drafted {rate['draft']:.1f} rows/s, "
              f"in full {rate['full']:.1f} rows/s")
        out.update(predict_rows_per_s={k: round(v, 1) for k, v in rate.items()},
                   predict_speedup=round(rate["draft"] / rate["full"], 2))
    if args.fit_rows:
        out.update(fit_seconds(folder, args.fit_rows, args.fit_epochs, width, height, side))
    print(json.dumps(out))


def fit_seconds(folder: Path, rows: int, epochs: int, width: int, height: int, side: int) -> dict:
    """The demo model fitted on ``rows`` demo rows whose pictures are enlarged to JPEGs of ``width`` x ``height`` (with
    fine noise, as a photograph has), with ``data.jpeg_draft`` and without, twice each in turn; the mean seconds of
    each setting's whole fits (validation, training, evaluation) and its test accuracy."""
    import pandas as pd
    from PIL import Image

    from mmtune.config import load_config
    from mmtune.demo import demo_config_path, make_dataset
    from mmtune.recipe.fit import fit

    data = make_dataset(folder / "demo", n=rows, seed=0)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        df = pd.read_csv(data[split])
        for i, rel in enumerate(df["image"]):
            small = Image.open(data[split].parent / rel).convert("RGB").resize((width, height), Image.BILINEAR)
            noisy = np.asarray(small, np.int16) + rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
            photo = Path(rel).with_suffix(".jpg")
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(data[split].parent / photo, quality=90)
            df.loc[i, "image"] = str(photo)
        df.to_csv(data[split], index=False)
    seconds, accuracy = {True: [], False: []}, {}
    for k, draft in enumerate((True, False, False, True)):  # each setting once before and once after the other
        cfg = load_config(demo_config_path(), [
            f"output_dir={folder / 'runs'}", f"name=draft-{draft}-{k}", f"data.train={data['train']}",
            f"data.test={data['test']}", f"data.jpeg_draft={str(draft).lower()}", f"trainer.max_epochs={epochs}",
            f"model.encoders.image.image_size={side}", "trainer.progress_bar=false", "trainer.early_stopping_patience=null",
            "evaluation.linear_probe=false", "evaluation.explain=0", "evaluation.modality_contribution=false",
            "evaluation.report=false"])
        start = time.perf_counter()
        res = fit(cfg)
        seconds[draft].append(time.perf_counter() - start)
        accuracy[draft] = res.metrics["test"]["label"]["accuracy"]
        print(f"fit of {rows} rows ({epochs} epochs, {side} px) with data.jpeg_draft={str(draft).lower()}: "
              f"{seconds[draft][-1]:.1f} s, test accuracy {accuracy[draft]:.3f}", flush=True)
    mean = {k: statistics.mean(v) for k, v in seconds.items()}
    return {"fit_seconds": {"draft": round(mean[True], 1), "full": round(mean[False], 1)},
            "fit_speedup": round(mean[False] / mean[True], 2),
            "fit_accuracy": {"draft": round(accuracy[True], 3), "full": round(accuracy[False], 3)}}


if __name__ == "__main__":
    main()
