"""A table and a label, nothing else: each preset, the search at two budgets and the linear probe on generated
tasks of different shapes — test metric and wall time.

    .venv/bin/python bench/automl.py [--rows 400] [--budgets 120,300] [--tasks pairs,audio,orders]
                                     [--presets fast,balanced,best] [--image-size 224]

``--presets`` also takes ``balanced_lpft``: ``balanced`` with LP-FT's two head-first epochs
(``finetune.probe_epochs=2``), and ``fast_long``: ``fast`` with 60 epochs and patience 20 — to measure whether the
presets should set them (``fast`` now does, on tables under 2,000 rows).

Tasks (generated offline, seeded; every fit is ``mmtune.fit(train.csv, label="label", test=test.csv, ...)``, the
columns' kinds inferred):
  pairs   a picture's colour family and a note that names one: ``match`` or ``mismatch`` — neither column alone
          says anything, only the pair does (EfficientNet-Lite0 + MiniLM)
  audio   a recording's pitch x a note's verdict, 4 classes (EfficientNet-Lite0 over log-mel spectrograms + MiniLM)
  orders  a note's verdict x whether the order was late (a number among other numbers and a category), 4 classes
          (MiniLM + the tabular encoder)
  speech  a spoken vowel (synthesised: a different speaker's pitch and vocal tract each row) and a picture: ``match``
          when the vowel — /a/ for warm, /i/ for cool — names the picture's colour family; only the pair decides
          (EfficientNet-Lite0 over the picture and over the clip's log-mel spectrogram). Not run by default
          (``--tasks pairs,audio,orders,speech``)

``best`` runs once per budget (``--time-limit``); ``fast`` and ``balanced`` run without one. The linear probe is the
one every fit computes before training (from the ``fast`` run). Each fit runs in its own folder (its own embedding
cache). The last line printed is one JSON object with ``<task>_<run>`` (test accuracy of what the run ships: a
``best`` run's ensemble when its search chose one) and ``<task>_<run>_s`` (seconds) for every run (``best`` runs are
named ``best<budget>``, with ``_single`` — the refitted or shipped trial alone — and ``_ensemble``, None when the
selection kept a single model), and ``best_not_below_balanced`` and ``within_budget`` (every best run within its
budget + 10 %).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from _scratch import scratch

WARM_WORDS = ["warm", "red", "orange", "sunny"]
COOL_WORDS = ["cool", "blue", "green", "icy"]


def make_pairs(out: Path, n: int, seed: int = 0):
    """Picture family x named family: the label says whether they agree."""
    from mmtune.demo import COOL, ITEMS, WARM, _draw

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        family = "warm" if i % 2 == 0 else "cool"
        said = family if (i // 2) % 2 == 0 else ("cool" if family == "warm" else "warm")
        name = f"images/{i:05d}.png"
        _draw(rng, rng.choice(WARM if family == "warm" else COOL), 96).save(out / name)
        word = rng.choice(WARM_WORDS if said == "warm" else COOL_WORDS)
        rows.append({"id": f"p{i:05d}", "image": name, "text": f"this {rng.choice(ITEMS)} looks {word} to me",
                     "label": "match" if said == family else "mismatch"})
    return _splits(out, rows, rng)


VOWELS = {"warm": (730, 1090, 2440), "cool": (270, 2290, 3010)}
"""Formants (Hz) of a spoken /a/ (said of a warm picture) and /i/ (of a cool one)."""


def vowel(rng: random.Random, formants, rate: int = 16000):
    """A synthetic spoken vowel: a glottal pulse train at a speaker's pitch (90-260 Hz, with vibrato and jitter)
    through three formant resonators, an onset and decay, and breath noise — a different speaker every row."""
    import numpy as np
    from scipy.signal import lfilter

    n = int(rate * rng.uniform(0.5, 1.1))
    t = np.arange(n) / rate
    f0 = rng.uniform(90, 260) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = np.cumsum(f0 / rate) + rng.random()
    source = (np.diff(np.floor(phase), prepend=np.floor(phase[0])) > 0).astype(float)
    source += 0.02 * np.random.default_rng(rng.randrange(2**31)).standard_normal(n)
    out = source
    for f in formants:
        f = f * rng.uniform(0.9, 1.1)  # speakers' vocal tracts differ
        r = np.exp(-np.pi * rng.uniform(60, 120) / rate)
        a1, a2 = -2 * r * np.cos(2 * np.pi * f / rate), r * r
        out = lfilter([1.0], [1.0, a1, a2], out)  # a two-pole resonator
    env = np.minimum(1, t / 0.05) * np.minimum(1, (t[-1] - t) / 0.1)
    out = out * env
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def make_speech(out: Path, n: int, seed: int = 0):
    """A spoken vowel and a picture: ``match`` when the vowel (/a/ for warm, /i/ for cool) names the picture's colour
    family — neither column alone says anything."""
    import soundfile as sf

    from mmtune.demo import COOL, WARM, _draw

    rng = random.Random(seed)
    for d in ("images", "audio"):
        (out / d).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        family = "warm" if i % 2 == 0 else "cool"
        said = family if (i // 2) % 2 == 0 else ("cool" if family == "warm" else "warm")
        image, clip = f"images/{i:05d}.png", f"audio/{i:05d}.wav"
        _draw(rng, rng.choice(WARM if family == "warm" else COOL), 96).save(out / image)
        sf.write(str(out / clip), vowel(rng, VOWELS[said]), 16000)
        rows.append({"id": f"s{i:05d}", "image": image, "clip": clip, "label": "match" if said == family else "mismatch"})
    return _splits(out, rows, rng)


def _splits(out: Path, rows, rng):
    import pandas as pd

    rng.shuffle(rows)
    n_test = len(rows) // 4
    paths = {"train": out / "train.csv", "test": out / "test.csv"}
    pd.DataFrame(rows[n_test:]).to_csv(paths["train"], index=False)
    pd.DataFrame(rows[:n_test]).to_csv(paths["test"], index=False)
    return paths


def make_tasks(work: Path, rows: int, names):
    from mmtune.demo import make_audio_dataset

    sys.path.insert(0, str(Path(__file__).parent))
    from presets import make_orders

    makers = {"pairs": lambda: make_pairs(work / "pairs-data", rows),
              "audio": lambda: make_audio_dataset(work / "audio-data", n=rows, seed=0),
              "orders": lambda: make_orders(work / "orders-data", rows),
              "speech": lambda: make_speech(work / "speech-data", rows)}
    return {name: makers[name]() for name in names}


VARIANTS = {"balanced_lpft": ("balanced", ["finetune.probe_epochs=2"]),
            "fast_long": ("fast", ["trainer.max_epochs=60", "trainer.early_stopping_patience=20"])}
"""Runs beside the presets: a preset with settings added (``--presets ...,balanced_lpft``)."""


def run(paths, work: Path, name: str, preset: str, budget, image_size: int):
    import mmtune

    run_name, (preset, extra) = f"{preset}{budget or ''}", VARIANTS.get(preset, (preset, []))
    overrides = extra + [f"output_dir={work / name}", f"name={run_name}", "evaluation.report=false", "evaluation.explain=0",
                 "evaluation.modality_contribution=false", "trainer.progress_bar=false"]
    t0 = time.perf_counter()
    res = mmtune.fit(str(paths["train"]), label="label", test=str(paths["test"]), preset=preset, time_limit=budget,
                     overrides=overrides + ([f"model.encoders.image.image_size={image_size}"] if name in ("pairs", "speech") else []))
    seconds = time.perf_counter() - t0
    from mmtune.ensemble import read_ensemble

    ens = read_ensemble(res.run_dir)
    return res.metrics, seconds, (ens["metrics"]["test"]["label"]["accuracy"] if ens else None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--budgets", default="120,300")
    ap.add_argument("--tasks", default="pairs,audio,orders")
    ap.add_argument("--presets", default="fast,balanced,best")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--work", help="folder for the data and runs (default: a temporary one)")
    args = ap.parse_args()

    from mmtune.logs import quiet_libraries

    quiet_libraries()
    work = Path(args.work) if args.work else scratch("mmtune-bench-automl-")
    tasks = make_tasks(work, args.rows, args.tasks.split(","))
    budgets = [int(b) for b in args.budgets.split(",") if b]
    out, within, fair = {}, True, True
    print(f"{'task':<8} {'run':<10} {'test acc':>8} {'seconds':>8}", flush=True)
    for name, paths in tasks.items():
        for preset in args.presets.split(","):
            for budget in (budgets if preset == "best" else [None]):
                key = f"{name}_{preset}{budget or ''}"
                metrics, seconds, ensemble = run(paths, work, name, preset, budget, args.image_size)
                single = round(metrics["test"]["label"]["accuracy"], 4)
                # what the run ships: its ensemble when the search chose one, else its single model
                out[key], out[f"{key}_s"] = (round(ensemble, 4) if ensemble is not None else single), round(seconds, 1)
                if preset == "best":
                    out[f"{key}_single"] = single
                    out[f"{key}_ensemble"] = round(ensemble, 4) if ensemble is not None else None
                if budget is not None:
                    within &= seconds <= budget * 1.1
                said = "" if preset != "best" else f"  (single model {single:.3f}; " + (
                    f"ensemble {ensemble:.3f})" if ensemble is not None else "no ensemble chosen)")
                print(f"{name:<8} {preset + str(budget or ''):<10} {out[key]:>8.3f} {seconds:>8.1f}{said}", flush=True)
                if preset == "fast" and "linear_probe" in metrics:
                    out[f"{name}_linear_probe"] = round(metrics["linear_probe"]["label"]["test"]["accuracy"], 4)
                    out[f"{name}_linear_probe_s"] = round(metrics.get("linear_probe_seconds", 0.0), 1)
                    print(f"{name:<8} {'probe':<10} {out[f'{name}_linear_probe']:>8.3f} "
                          f"{out[f'{name}_linear_probe_s']:>8.1f}", flush=True)
        if f"{name}_balanced" in out:
            fair &= all(out[f"{name}_best{b}"] >= out[f"{name}_balanced"] - 0.01 for b in budgets
                        if f"{name}_best{b}" in out)
    out.update(best_not_below_balanced=fair, within_budget=within, rows=args.rows, image_size=args.image_size)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
