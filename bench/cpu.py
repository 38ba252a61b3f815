"""Kernel time in training at a realistic input size, with and without the allocator settings of
``mmtune.memory`` (freed memory kept for reuse instead of unmapped).

    .venv/bin/python bench/cpu.py [--rows 160] [--steps 6] [--image-size 224] [--repeats 3]

Fits the demo model (EfficientNet-Lite0 + MiniLM, the demo's partial unfreezing, batch 32) at --image-size for
--steps optimizer steps, in a fresh process each time: without the settings (``MMTUNE_KEEP_FREED_MEMORY=0``,
"before") and with them ("after"), alternated, --repeats times each. Each process reports the user and system
seconds, minor page faults and peak resident memory of its fit (from ``getrusage``, around the fit only) and the
SHA-256 of the bundle's weights. The last line printed is one JSON object: ``sys_share_before``,
``sys_share_after`` (system / (user + system), medians), ``wall_ratio`` (median wall after / before),
``same_weights`` (every run's weights identical, to the bit) and the figures behind them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _scratch import scratch


def child(args) -> None:
    import resource

    import mmtune
    from mmtune.config import load_config
    from mmtune.demo import demo_config_path
    from mmtune.io import sha256_of
    from mmtune.memory import keep_freed_memory

    applied = keep_freed_memory()
    overrides = [f"data.train={args.data}", f"output_dir={args.work}", f"name=run-{args.tag}",
                 f"model.encoders.image.image_size={args.image_size}", f"trainer.max_steps={args.steps}",
                 "trainer.max_epochs=100", "trainer.early_stopping_patience=null", "trainer.progress_bar=false",
                 "evaluation.report=false", "evaluation.linear_probe=false", "evaluation.explain=0",
                 "evaluation.modality_contribution=false", "evaluation.worst_examples=0"]
    cfg = load_config(demo_config_path(), overrides)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = mmtune.fit(cfg)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"applied": applied, "wall": wall, "user": r1.ru_utime - r0.ru_utime,
                      "sys": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
                      "peak_mb": r1.ru_maxrss / 1024, "weights": sha256_of(res.run_dir / "model.safetensors")}))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from mmtune.demo import make_dataset

    work = scratch("mmtune-bench-cpu-")
    data = make_dataset(work / "data", n=args.rows, image_size=96, seed=0)["train"]
    runs = {"before": [], "after": []}
    for i in range(args.repeats):
        for mode in ("before", "after"):
            env = {**os.environ, "MMTUNE_KEEP_FREED_MEMORY": "0" if mode == "before" else "1"}
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data), "--work", str(work),
                                  "--tag", f"{mode}-{i}", "--steps", str(args.steps), "--image-size", str(args.image_size)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"the {mode} run failed: {out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if r["applied"] != (mode == "after") and sys.platform.startswith("linux"):
                sys.exit(f"the {mode} run had the settings {'off' if mode == 'after' else 'on'}: not glibc?")
            runs[mode].append(r)
            print(f"{mode:<6} run {i + 1}: wall {r['wall']:6.1f} s  user {r['user']:6.1f} s  sys {r['sys']:6.1f} s  "
                  f"minor faults {r['minor_faults']:>9,}  peak {r['peak_mb']:6.0f} MB", flush=True)
    share = {m: median([r["sys"] / (r["user"] + r["sys"]) for r in rs]) for m, rs in runs.items()}
    wall = {m: median([r["wall"] for r in rs]) for m, rs in runs.items()}
    faults = {m: median([r["minor_faults"] for r in rs]) for m, rs in runs.items()}
    peak = {m: median([r["peak_mb"] for r in rs]) for m, rs in runs.items()}
    same = len({r["weights"] for rs in runs.values() for r in rs}) == 1
    print(f"median: system share {share['before']:.3f} -> {share['after']:.3f}, wall {wall['before']:.1f} -> "
          f"{wall['after']:.1f} s, minor faults {faults['before']:,.0f} -> {faults['after']:,.0f}, peak "
          f"{peak['before']:.0f} -> {peak['after']:.0f} MB; weights identical: {same} "
          f"({args.steps} steps at {args.image_size} px, batch 32, {args.repeats} runs each)")
    print(json.dumps({"sys_share_before": round(share["before"], 4), "sys_share_after": round(share["after"], 4),
                      "wall_ratio": round(wall["after"] / wall["before"], 3), "same_weights": same,
                      "wall_before_s": round(wall["before"], 2), "wall_after_s": round(wall["after"], 2),
                      "minor_faults_before": int(faults["before"]), "minor_faults_after": int(faults["after"]),
                      "peak_mb_before": round(peak["before"]), "peak_mb_after": round(peak["after"]),
                      "steps": args.steps, "image_size": args.image_size}))


if __name__ == "__main__":
    main()
