"""The HTTP server under load: N concurrent clients for a fixed time, with micro-batching on and off.

    .venv/bin/python bench/serve_load.py [--run runs/demo-fused] [--backend onnx-int8] [--clients 50] [--seconds 20]
                                         [--bad-share 0.1]

Starts `mmtune serve` on loopback (a free port) in a child process, waits for /health, then runs --clients
threads, each posting one row at a time to /predict (the test rows' image as base64 and text, in turn) until
--seconds have passed; then the same with --no-batching. A share of the requests (--bad-share, default 10 %)
are bad in turn: malformed JSON, a body over the server's limit (it runs with --max-body-mb 2), an image whose
header promises 10,000 × 10,000 pixels, a lone surrogate in a text, 100,000 nested brackets. Good requests must
all be answered 200 and bad ones 4xx; p50/p99 are of the good ones, and the server's peak memory is reported. Clients and server share this machine's cores. With
an ONNX backend and no export in the bundle, it is exported into a temporary folder first. The last line printed
is one JSON object.
"""
from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from _scratch import scratch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies(run: Path, n: int = 64):
    sys.path.insert(0, str(Path(__file__).parent))
    from predict import test_rows

    from mmtune.bundle import read_bundle
    from mmtune.modalities import modality_of

    cfg = read_bundle(run, model=False, complete=False).config
    rows = test_rows(run).head(n)
    out = []
    for _, r in rows.iterrows():
        body = {}
        for field in cfg.modalities:
            col = cfg.data.column(field)
            for c in col if isinstance(col, list) else [col]:
                v = r[c]
                body[c] = base64.b64encode(Path(v).read_bytes()).decode() if modality_of(field).files else (
                    None if isinstance(v, float) and v != v else v.item() if hasattr(v, "item") else v)
        out.append(body)
    return out


def bad_bodies(rows):
    """Bad requests a careless or hostile client sends: (what, body bytes)."""
    import io

    from PIL import Image

    row = dict(rows[0])
    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG")  # 100 Mpixels in about 100 kB
    image_col = next((k for k, v in row.items() if isinstance(v, str) and len(v) > 1000), None)
    text_col = next((k for k, v in row.items() if k != image_col and isinstance(v, str)), None)
    out = [("malformed", b'{"text": '), ("oversized", b'{"x": "' + b"a" * (3 << 20) + b'"}'), ("nested", b"[" * 100_000)]
    if image_col:
        out.append(("pixel bomb", json.dumps({**row, image_col: base64.b64encode(buf.getvalue()).decode()}).encode()))
    if text_col:
        out.append(("surrogate", json.dumps({**row, text_col: "\ud800"}).encode()))
    return out


def load(url: str, rows, clients: int, seconds: float, bad_share: float = 0.0):
    import httpx

    bad = bad_bodies(rows) if bad_share > 0 else []
    every = max(1, round(1 / bad_share)) if bad_share > 0 else 0
    bad_seen, bad_wrong = [0], [0]
    latencies, errors = [], [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop = [0.0]

    def client(k: int):
        with httpx.Client(timeout=60.0) as c:
            start.wait()
            i, sent = k, k
            while time.perf_counter() < stop[0]:
                sent += 1
                if every and sent % every == 0:  # a bad request: it must get a 4xx, and cost the others nothing
                    what, body = bad[(sent // every) % len(bad)]
                    try:
                        status = c.post(url + "/predict", content=body, headers={"content-type": "application/json"}).status_code
                    except httpx.HTTPError:
                        status = 0
                    with lock:
                        bad_seen[0] += 1
                        bad_wrong[0] += not 400 <= status < 500
                    i += clients
                    continue
                t = time.perf_counter()
                try:
                    ok = c.post(url + "/predict", json=rows[i % len(rows)]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors[0] += 1
                i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors[0], "requests": len(latencies),
            "bad_requests": bad_seen[0], "bad_not_4xx": bad_wrong[0]}


def serve_and_load(run: Path, backend: str, batching: bool, rows, clients: int, seconds: float, bad_share: float = 0.0):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "mmtune.cli", "serve", "--run", str(run), "--port", str(port), "--backend", backend,
           "--max-body-mb", "2"]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server stopped: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not answer /health within 180 s")
            time.sleep(0.2)
        for r in rows[:4]:  # warm-up
            httpx.post(url + "/predict", json=r, timeout=60.0)
        import psutil

        server = psutil.Process(proc.pid)
        before, t = sum(server.cpu_times()[:2]), time.perf_counter()
        peak = [server.memory_info().rss]
        watching = [True]

        def watch():
            while watching[0]:
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rss_before = peak[0]
        out = load(url, rows, clients, seconds, bad_share)
        watching[0] = False
        watcher.join()
        out["server_cores_used"] = (sum(server.cpu_times()[:2]) - before) / (time.perf_counter() - t)
        out["server_peak_mb"], out["server_start_mb"] = peak[0] / 2 ** 20, rss_before / 2 ** 20
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-fused")
    ap.add_argument("--backend", default="onnx-int8", choices=["torch", "onnx", "onnx-int8"])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--bad-share", type=float, default=0.1, help="share of bad requests (malformed, oversized, bombs)")
    args = ap.parse_args()

    from mmtune.logs import quiet_libraries

    quiet_libraries()
    run = Path(args.run)
    if not (run / "bundle.json").is_file():
        sys.exit(f"no bundle at {run}: run `mmtune demo` (or bench/predict.py) first")
    target = run
    if args.backend != "torch":
        from mmtune.serving.export import export_onnx

        meta = run / "export" / "export.json"
        if not meta.is_file() or (args.backend == "onnx-int8" and "onnx-int8" not in json.loads(meta.read_text())["onnx_files"]):
            target = scratch("mmtune-bench-serve-") / "export"
            sys.path.insert(0, str(Path(__file__).parent))
            from predict import test_rows

            export_onnx(run, target, data=test_rows(run), quantize="int8" if args.backend == "onnx-int8" else None)
    rows = bodies(run)
    results = {}
    for batching in (True, False):
        r = serve_and_load(target, args.backend, batching, rows, args.clients, args.seconds, args.bad_share)
        results[batching] = r
        print(f"micro-batching {'on ' if batching else 'off'}: {r['requests_per_s']:.1f} good requests/s, p50 "
              f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors on good requests {r['errors']}; "
              f"{r['bad_requests']} bad requests, {r['bad_not_4xx']} not answered 4xx; the server used "
              f"{r['server_cores_used']:.2f} cores, memory {r['server_start_mb']:.0f} -> peak {r['server_peak_mb']:.0f} MB "
              f"({r['requests']} good requests, {args.clients} clients, {args.seconds:g} s, backend {args.backend})",
              flush=True)
    on, off = results[True], results[False]
    print(json.dumps({"clients": args.clients, "requests_per_s": round(on["requests_per_s"], 1), "p50_ms": round(on["p50_ms"], 1),
                      "p99_ms": round(on["p99_ms"], 1), "errors": on["errors"] + off["errors"],
                      "batched_speedup": round(on["requests_per_s"] / off["requests_per_s"], 2) if off["requests_per_s"] else None,
                      "unbatched_requests_per_s": round(off["requests_per_s"], 1), "backend": args.backend,
                      "server_cores_used": round(on["server_cores_used"], 2),
                      "bad_share": args.bad_share, "bad_requests": on["bad_requests"] + off["bad_requests"],
                      "bad_not_4xx": on["bad_not_4xx"] + off["bad_not_4xx"],
                      "server_peak_mb": round(max(on["server_peak_mb"], off["server_peak_mb"]), 1)}))


if __name__ == "__main__":
    main()
