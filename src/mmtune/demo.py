"""The embedded demo: a task whose label needs both the image and the text.

Each example is a picture of one object and a short note from a customer. The label combines
the object's colour family, visible only in the picture (``warm``: red/orange/yellow, ``cool``:
blue/green/purple), with the note's verdict, readable only in the text (``keep`` or ``return``):
four classes. An image-only model can reach about 50 % accuracy, a text-only one about 50 %,
a model that fuses both close to 100 %. Everything is generated offline and seeded.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List

import pandas as pd

WARM = [(220, 40, 30), (235, 120, 20), (230, 200, 30), (200, 30, 90)]
COOL = [(30, 80, 220), (30, 170, 80), (120, 50, 200), (20, 170, 190)]
SHAPES = ["circle", "square", "triangle", "diamond"]
KEEP = [
    "I love it, exactly what I wanted", "works perfectly and feels solid", "great value, very happy with it",
    "fits well and looks lovely", "excellent quality, would buy again", "my kids adore it",
    "better than I expected", "arrived quickly and it is perfect",
]
RETURN = [
    "it broke after one day", "not what I ordered, sending it back", "poor quality and too small",
    "it arrived damaged", "disappointing, does not work", "the smell is awful",
    "much worse than the pictures", "stopped working after a week",
]
OPENERS = ["", "honestly", "well", "so", "update:", "in short", "after a week"]
ITEMS = ["mug", "lamp", "toy", "bag", "vase", "cap", "box", "chair"]


def vocabulary() -> List[str]:
    """Every word the generated notes can contain (used to build small test tokenizers)."""
    words = set()
    for s in KEEP + RETURN + OPENERS + ITEMS + ["the", "is", "this"]:
        words.update(s.replace(",", " ,").replace(":", " :").lower().split())
    return sorted(words)


def _draw(rng: random.Random, colour, size: int):
    from PIL import Image, ImageDraw

    bg = tuple(int(v) for v in (rng.randint(150, 235),) * 3)
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 5)):  # neutral clutter
        g = rng.randint(90, 200)
        x, y = rng.randint(0, size), rng.randint(0, size)
        d.line([x, y, rng.randint(0, size), rng.randint(0, size)], fill=(g, g, g), width=max(1, size // 40))
    r = rng.uniform(0.18, 0.34) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
    shape = rng.choice(SHAPES)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=jitter)
    return im


def make_dataset(out_dir: str | Path, n: int = 600, image_size: int = 96, seed: int = 0,
                 test_fraction: float = 0.25) -> Dict[str, Path]:
    """Write ``images/*.png`` plus ``train.csv`` and ``test.csv`` (columns id, image, text, label)
    under ``out_dir``. Classes are balanced. Returns the manifest paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: List[Dict[str, Any]] = []
    for i in range(n):
        family = "warm" if i % 2 == 0 else "cool"
        verdict = "keep" if (i // 2) % 2 == 0 else "return"
        colour = rng.choice(WARM if family == "warm" else COOL)
        im = _draw(rng, colour, image_size)
        name = f"images/{i:05d}.png"
        im.save(out / name)
        rows.append({"id": f"ex{i:05d}", "image": name, "text": _note(rng, verdict), "label": f"{family}-{verdict}"})
    return _write_splits(out, rows, rng, test_fraction)


def make_pairs(out_dir: str | Path, n: int = 400, image_size: int = 96, seed: int = 0, test_fraction: float = 0.25,
               negatives: float = 0.0) -> Dict[str, Path]:
    """A matching table: a picture of an object in one of eight colours, and the name its colour goes by
    (``this mug`` for the first, ``this lamp`` for the second, …) — a pairing only a model of both columns can
    learn (eight distinct texts: recall@1 by chance is 1/8). With ``negatives`` > 0 that share of the rows pairs a
    picture with another colour's name and column ``match`` holds 1/0. Writes ``images/*.png``, ``train.csv`` and
    ``test.csv`` (columns id, image, text[, match]); returns their paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = WARM + COOL
    rows: List[Dict[str, Any]] = []
    for i in range(n):
        c = i % len(colours)
        name = f"images/p{i:05d}.png"
        _draw(rng, colours[c], image_size).save(out / name)
        match = 1 if negatives <= 0 or rng.random() >= negatives else 0
        word = ITEMS[c] if match else ITEMS[(c + rng.randint(1, len(colours) - 1)) % len(colours)]
        rows.append({"id": f"pr{i:05d}", "image": name, "text": f"this {word}",
                     **({"match": match} if negatives > 0 else {})})
    return _write_splits(out, rows, rng, test_fraction)


def _note(rng: random.Random, verdict: str) -> str:
    """A customer's note whose verdict is ``keep`` or ``return``."""
    note = rng.choice(KEEP if verdict == "keep" else RETURN)
    opener = rng.choice(OPENERS)
    return f"{opener} this {rng.choice(ITEMS)}: {note}".strip()


def _write_splits(out: Path, rows: List[Dict[str, Any]], rng: random.Random, test_fraction: float) -> Dict[str, Path]:
    """Shuffle the rows and write ``train.csv`` and ``test.csv`` under ``out``; returns their paths."""
    rng.shuffle(rows)
    n_test = int(round(len(rows) * test_fraction))
    paths = {"train": out / "train.csv", "test": out / "test.csv"}
    pd.DataFrame(rows[n_test:]).to_csv(paths["train"], index=False)
    pd.DataFrame(rows[:n_test]).to_csv(paths["test"], index=False)
    return paths


def tone(rng: random.Random, pitch: str, rate: int, seconds: float):
    """A noisy tone: a fundamental near 220 Hz (``low``) or 880 Hz (``high``) with two harmonics, a random
    envelope and level, and background noise."""
    import numpy as np

    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = (220.0 if pitch == "low" else 880.0) * rng.uniform(0.9, 1.1)
    x = sum(a * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
    env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.05)  # 50 ms fades
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 0.05, n)
    return (rng.uniform(0.2, 0.6) * x / 1.6 * env + noise).astype("float32")


def make_audio_dataset(out_dir: str | Path, n: int = 400, seed: int = 0, rate: int = 22050,
                       test_fraction: float = 0.25) -> Dict[str, Path]:
    """The audio variant of the demo: a recording (a ``low`` or ``high`` tone, 0.6-2.0 s, recorded at ``rate``)
    and a customer's note; the label is pitch x verdict, so it needs both. Writes ``audio/*.wav``,
    ``train.csv`` and ``test.csv`` (columns id, audio, text, label)."""
    import soundfile as sf

    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: List[Dict[str, Any]] = []
    for i in range(n):
        pitch = "high" if i % 2 == 0 else "low"
        verdict = "keep" if (i // 2) % 2 == 0 else "return"
        name = f"audio/{i:05d}.wav"
        sf.write(str(out / name), tone(rng, pitch, rate, rng.uniform(0.6, 2.0)), rate)
        rows.append({"id": f"au{i:05d}", "audio": name, "text": _note(rng, verdict), "label": f"{pitch}-{verdict}"})
    return _write_splits(out, rows, rng, test_fraction)


def demo_config_path(audio: bool = False) -> Path:
    return Path(__file__).parent / "configs" / ("demo-audio.yaml" if audio else "demo.yaml")


def run_demo(output_dir: Path, rows: int = 800, overrides=(), verbose: bool = True,
             audio: bool = False) -> Dict[str, Dict[str, Any]]:
    """Generate the data, fine-tune the fused model and each modality alone with the same settings,
    print their test metrics side by side. Returns ``{variant: metrics}``; leaves three run bundles.
    ``audio``: the audio + text variant (a tone's pitch and the note's verdict)."""
    import time

    from .config import load_config
    from .recipe.fit import fit

    output_dir = Path(output_dir)
    data_dir = output_dir / ("demo-audio-data" if audio else "demo-data")
    marker = data_dir / f".rows-{rows}"
    if not marker.exists():
        make_audio_dataset(data_dir, n=rows, seed=0) if audio else make_dataset(data_dir, n=rows, image_size=96, seed=0)
        marker.touch()
    base = load_config(demo_config_path(audio), [f"output_dir={output_dir}", f"data.train={data_dir / 'train.csv'}",
                                             f"data.test={data_dir / 'test.csv'}", *overrides])
    stem = base.name.rsplit("-", 1)[0]
    variants = {"fused": base, **{f"{m} only": base.only_modality(m, f"{stem}-{m}") for m in base.modalities}}
    results: Dict[str, Dict[str, Any]] = {}
    for variant, cfg in variants.items():
        if verbose:
            print(f"\n== {variant}: encoders {', '.join(sorted(cfg.model.encoders))} -> {cfg.run_dir}", flush=True)
        t0 = time.time()
        res = fit(cfg, overwrite=True)
        results[variant] = {**res.metrics["test"][cfg.data.label_column], "seconds": time.time() - t0,
                            "run_dir": str(res.run_dir)}
    if verbose:
        print("\nTest set (%d rows), same data, settings and budget for every variant:" % results["fused"]["n"])
        print(f"{'model':<12} {'accuracy':>9} {'macro F1':>9} {'ROC-AUC':>8} {'seconds':>8}  bundle")
        for variant, m in results.items():
            auc = f"{m['roc_auc']:.3f}" if m.get("roc_auc") is not None else "n/a"
            print(f"{variant:<12} {m['accuracy']:>9.3f} {m['f1_macro']:>9.3f} {auc:>8} {m['seconds']:>8.0f}  {m['run_dir']}")
    return results
