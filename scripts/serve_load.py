"""Load on `finetune serve`: throughput and latency at a few client counts against the model's own predict.

    python3 scripts/serve_load.py RUN_DIR [--clients 1 8 32] [--requests 600] [--total 10000]
                                  [--client-processes 1] [--out rows.jsonl]

Starts ``finetune serve RUN_DIR`` on a free 127.0.0.1 port, then:

1. sends 100 requests and reads the server's RSS;
2. for each client count C: C threads, each on its own keep-alive connection, send ``--requests`` requests
   in all, one image each in TF Serving's JSON (``{"instances": [nested uint8 list]}``): requests/s and the
   p50/p99 latency;
3. tops up to ``--total`` requests and reads the RSS again;
4. stops the server and loads the same model in this process: ``predict`` on batches of C images (the
   limit that dynamic batching approaches) and on one image.

The images are random uint8 arrays of the model's stored shape: the model's time does not depend on
what they show. Clients and server share this machine's cores, as they would on one host. Every
request is bounded; the script stops the server when it ends.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


def start_server(run_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str, int, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "serve", str(run_dir), "--port", "0", "--max-batch", str(max_batch)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise SystemExit(f"the server stopped before it listened (exit {process.wait()})")
        found = re.search(r"serving (\S+) .* at http://(127\.0\.0\.1):(\d+)/", line)
        if found:
            # The server's later lines go nowhere: nothing is refused in a load test, and a full pipe would block it.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, found.group(2), int(found.group(3)), found.group(1)
    process.kill()
    raise SystemExit("the server did not listen within 300 s")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _latencies(host: str, port: int, path: str, bodies: list[bytes], clients: int, requests: int) -> list[float]:
    """Each request's seconds, ``requests`` of them from ``clients`` threads on one connection each."""
    latencies: list[float] = []
    lock = threading.Lock()
    share = [requests // clients + (1 if worker < requests % clients else 0) for worker in range(clients)]

    def client(worker: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        mine = []
        for sent in range(share[worker]):
            body = bodies[(worker * 7919 + sent) % len(bodies)]
            started = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"the server answered {response.status}")
        connection.close()
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies


def load(host: str, port: int, path: str, bodies: list[bytes], clients: int, requests: int, processes: int = 1) -> dict:
    """``requests`` requests from ``clients`` clients (threads, spread over ``processes`` processes)."""
    started = time.perf_counter()
    if processes <= 1:
        latencies = _latencies(host, port, path, bodies, clients, requests)
    else:
        from multiprocessing import Pool

        parts = [(host, port, path, bodies, max(clients // processes, 1), requests // processes)] * processes
        with Pool(processes) as pool:
            latencies = [value for part in pool.starmap(_latencies, parts) for value in part]
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "client_processes": processes,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
    }


def model_limit(run_dir: Path, shape: tuple, sizes: list[int]) -> dict[int, float]:
    """Seconds per call of the model's own predict on a batch of each size (median of repeated calls)."""
    from finetune.inference import load_predictor

    predictor = load_predictor(run_dir)
    rng = np.random.default_rng(1)
    seconds = {}
    for size in sizes:
        batch = rng.integers(0, 256, (size, *shape), dtype=np.uint8)
        for _ in range(3):
            predictor.predict(batch)  # warm-up
        calls = max(10, 400 // size)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            predictor.predict(batch)
            times.append(time.perf_counter() - started)
        seconds[size] = statistics.median(times)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=600, help="requests per client count")
    parser.add_argument("--total", type=int, default=10_000, help="requests before the second memory reading")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--client-processes", type=int, default=1, help="spread the clients over processes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    spec = json.loads((args.run_dir / "input.json").read_text())
    shape = tuple(spec["shape"])
    rng = np.random.default_rng(0)
    bodies = [
        json.dumps({"instances": [rng.integers(0, 256, shape, dtype=np.uint8).tolist()]}).encode() for _ in range(64)
    ]
    process, host, port, name = start_server(args.run_dir, args.max_batch)
    path = f"/v1/models/{name}:predict"
    rows = []
    try:
        sent = load(host, port, path, bodies, 4, 100)["requests"]
        rss_100 = rss_mb(process.pid)
        for clients in args.clients:
            row = load(host, port, path, bodies, clients, args.requests, min(args.client_processes, clients))
            sent += row["requests"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.total > sent:
            load(host, port, path, bodies, 8, args.total - sent)
            sent = args.total
        rss_total = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    limits = model_limit(args.run_dir, shape, sorted({1, *args.clients}))
    memory = {"rss_mb_after_100": round(rss_100, 1), f"rss_mb_after_{sent}": round(rss_total, 1)}
    memory["growth"] = round(rss_total / rss_100 - 1, 3)
    print(json.dumps(memory), flush=True)
    one_image_ms = 1000 * limits[1]
    print(f"\nmodel {args.run_dir} {shape}, --max-batch {args.max_batch}; one image's predict {one_image_ms:.2f} ms")
    print("clients  requests/s  p50 ms  p99 ms  model's predict on batches of that size, images/s  share of it")
    for row in rows:
        limit = row["clients"] / limits[row["clients"]]
        row["model_images_per_s"] = round(limit, 1)
        row["share_of_model"] = round(row["requests_per_s"] / limit, 3)
        row["p50_over_one_predict"] = round(row["p50_ms"] / one_image_ms, 2)
        print(
            f"{row['clients']:>7}  {row['requests_per_s']:>10.1f}  {row['p50_ms']:>6.2f}  {row['p99_ms']:>6.2f}  "
            f"{limit:>49.1f}  {row['share_of_model']:>10.0%}"
        )
    growth = f"{memory['growth']:+.1%}"
    print(f"RSS {memory['rss_mb_after_100']} MB after 100 requests, {rss_total:.1f} MB after {sent} ({growth})")
    if args.out is not None:
        with args.out.open("a") as handle:
            for row in [*rows, memory]:
                handle.write(json.dumps({"run_dir": str(args.run_dir), **row}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
