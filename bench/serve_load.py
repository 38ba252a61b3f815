"""The HTTP server under load: N concurrent clients for a fixed time, with micro-batching on and off.

    .venv/bin/python bench/serve_load.py [--run runs/demo-fused] [--backend onnx-int8] [--clients 50] [--seconds 20]

Starts `mmtune serve` on loopback (a free port) in a child process, waits for /health, then runs --clients
threads, each posting one row at a time to /predict (the test rows' image as base64 and text, in turn) until
--seconds have passed; then the same with --no-batching. Clients and server share this machine's cores. With
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


def load(url: str, rows, clients: int, seconds: float):
    import httpx

    latencies, errors = [], [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop = [0.0]

    def client(k: int):
        with httpx.Client(timeout=60.0) as c:
            start.wait()
            i = k
            while time.perf_counter() < stop[0]:
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
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors[0], "requests": len(latencies)}


def serve_and_load(run: Path, backend: str, batching: bool, rows, clients: int, seconds: float):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "mmtune.cli", "serve", "--run", str(run), "--port", str(port), "--backend", backend]
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
        out = load(url, rows, clients, seconds)
        out["server_cores_used"] = (sum(server.cpu_times()[:2]) - before) / (time.perf_counter() - t)
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
        r = serve_and_load(target, args.backend, batching, rows, args.clients, args.seconds)
        results[batching] = r
        print(f"micro-batching {'on ' if batching else 'off'}: {r['requests_per_s']:.1f} requests/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}; the server used {r['server_cores_used']:.2f} cores "
              f"({r['requests']} requests, {args.clients} clients, "
              f"{args.seconds:g} s, backend {args.backend})", flush=True)
    on, off = results[True], results[False]
    print(json.dumps({"clients": args.clients, "requests_per_s": round(on["requests_per_s"], 1), "p50_ms": round(on["p50_ms"], 1),
                      "p99_ms": round(on["p99_ms"], 1), "errors": on["errors"] + off["errors"],
                      "batched_speedup": round(on["requests_per_s"] / off["requests_per_s"], 2) if off["requests_per_s"] else None,
                      "unbatched_requests_per_s": round(off["requests_per_s"], 1), "backend": args.backend,
                      "server_cores_used": round(on["server_cores_used"], 2)}))


if __name__ == "__main__":
    main()
