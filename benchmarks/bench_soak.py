"""Soak: `knnlm serve` on the default model and the demo's datastores under mixed concurrent
load for a bounded time; latency percentiles, throughput, resident memory over time,
answers by status.

The server runs as its own process (`python -m knnlm serve`, 127.0.0.1, a free port) with
the demo's English and Spanish datastores (`knnlm demo` writes them; --demo, default
knnlm-demo/).  `--clients` threads send, for `--minutes`, a seeded mix: scoring (40%),
streamed completions read to the end (25%), streams the client drops after two chunks
(15%), bad requests from tests/fuzz.py's hand-made set (20%).  The server's resident memory
is sampled every `--sample` seconds; the first `--warmup` fraction of the run is warm-up.
Reported: requests and tokens per second, p50/p95/p99 latency per kind, answers by status
(a 5xx or a dropped connection is an error), the server's resident memory after warm-up
(growth: the median of the last quarter of the samples over the median of the first
quarter, so that one large request's passing peak is not taken for a leak; the peak is
shown beside it), and every line the server wrote to stderr (a traceback is an error).

    python benchmarks/bench_soak.py --demo /work/cache/demo --minutes 30
    python benchmarks/bench_soak.py --demo /work/cache/demo --minutes 5     # a short run

Results: benchmarks/results/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil
from common import ROOT, BenchError, run_main

sys.path.insert(0, str(ROOT / "tests"))
from fuzz import hostile_requests  # noqa: E402

TEXTS = ["The history of the city begins in the Roman period, when a small settlement grew along the river.",
         "La historia de la ciudad comienza en la época romana, cuando un pequeño asentamiento creció junto al río.",
         "In 1998 the band released its second album, which reached the top ten in several countries.",
         "El río atraviesa la provincia de norte a sur y desemboca en el mar Mediterráneo."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(demo: Path, port: int, log) -> subprocess.Popen:
    ds = {"en": demo / "en-us" / "datastore-300", "es": demo / "es-es" / "datastore-300"}
    for p in ds.values():
        if not (p / "meta.json").exists():
            raise BenchError(f"{p} is not a datastore: give the folder `knnlm demo` wrote with --demo")
    cmd = [sys.executable, "-m", "knnlm", "-q", "serve", "--port", str(port), "--max-tokens", "64",
           *[a for n, p in ds.items() for a in ("--datastore", f"{n}={p}")]]
    # stderr to a file: a pipe nobody reads blocks the server once 64 KiB are written
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited: {Path(log.name).read_text()[-500:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise BenchError("the server did not start in 10 minutes")


def client(url: str, seed: int, until: float, bad: list, out: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=300) as http:
        while time.monotonic() < until:
            r = rng.random()
            kind = "score" if r < 0.4 else "stream" if r < 0.65 else "cancelled" if r < 0.8 else "bad"
            text = rng.choice(TEXTS)
            ds = rng.choice(["en", "es"])
            t = time.perf_counter()
            tokens = 0
            try:
                if kind == "score":
                    resp = http.post("/v1/score", json={"text": text, "datastore": ds})
                    status = resp.status_code
                elif kind == "bad":
                    method, path, body = rng.choice(bad)
                    status = http.request(method, path, content=body,
                                          headers={"content-type": "application/json"}).status_code
                else:
                    body = {"prompt": text[:40], "max_tokens": 24, "stream": True, "datastore": ds,
                            "temperature": 0.8, "seed": rng.randrange(1 << 30)}
                    with http.stream("POST", "/v1/completions", json=body) as resp:
                        status = resp.status_code
                        for line in resp.iter_lines():
                            if line.startswith("data: {"):
                                tokens += 1
                                if '"server_error"' in line:
                                    status = 599
                            if kind == "cancelled" and tokens >= 2:
                                break
            except httpx.HTTPError as e:
                status = f"no answer ({type(e).__name__})"
            except Exception as e:  # noqa: BLE001 (an answer the client cannot read: counted, not fatal)
                status = f"unreadable answer ({type(e).__name__})"
            dt = time.perf_counter() - t
            with lock:
                out["status"][(kind, status)] += 1
                if isinstance(status, int) and status < 500:
                    out["latency"][kind].append(dt)
                out["tokens"] += tokens


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="knnlm-demo", help="the folder `knnlm demo` wrote (en-us/, es-es/)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run that is warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t_start = time.monotonic()
    log = tempfile.NamedTemporaryFile("w+", prefix="knnlm-soak-", suffix=".log")
    proc = start_server(Path(args.demo), port, log)
    print(f"server up in {time.monotonic() - t_start:.0f} s")
    bad = [r for r in hostile_requests([], 49152) if len(r[2]) < 20_000]
    out = {"status": Counter(), "latency": defaultdict(list), "tokens": 0}
    lock = threading.Lock()
    server = psutil.Process(proc.pid)
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    threads = [threading.Thread(target=client, args=(url, args.seed + i, until, bad, out, lock), daemon=True)
               for i in range(args.clients)]
    for th in threads:
        th.start()
    rss = []
    healthy = "the server died"
    try:
        while time.monotonic() < until and proc.poll() is None:
            rss.append((time.monotonic() - t0, server.memory_info().rss))
            time.sleep(args.sample)
        for th in threads:
            th.join(timeout=600)
        if proc.poll() is None:
            rss.append((time.monotonic() - t0, server.memory_info().rss))
            healthy = httpx.get(url + "/health", timeout=30).json()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    secs = time.monotonic() - t0
    n = sum(out["status"].values())
    errors = {k: v for k, v in out["status"].items() if not isinstance(k[1], int) or k[1] >= 500}
    print(f"\n{args.minutes:g} minutes, {args.clients} clients: {n} requests ({n / secs:.2f}/s), "
          f"{out['tokens']} streamed tokens ({out['tokens'] / secs:.1f}/s), errors (5xx or no answer): "
          f"{sum(errors.values())} {errors or ''}")
    print("\n| kind | requests | p50 (s) | p95 (s) | p99 (s) |\n| --- | ---: | ---: | ---: | ---: |")
    for kind, xs in sorted(out["latency"].items()):
        print(f"| {kind} | {len(xs)} | {pct(xs, 50):.2f} | {pct(xs, 95):.2f} | {pct(xs, 99):.2f} |")
    print(f"\nanswers by kind and status: {json.dumps({f'{k} {s}': v for (k, s), v in sorted(out['status'].items(), key=str)})}")
    warm = [m for t, m in rss if t >= args.warmup * secs]
    if len(warm) >= 4:
        q = len(warm) // 4
        a, b = statistics.median(warm[:q]), statistics.median(warm[-q:])
        print(f"resident memory after warm-up (MiB): median of the first quarter {a / 2**20:.0f}, of the last "
              f"quarter {b / 2**20:.0f}: growth {b / a - 1:+.1%}; first {warm[0] / 2**20:.0f}, last "
              f"{warm[-1] / 2**20:.0f}, peak {max(warm) / 2**20:.0f} ({max(warm) / a - 1:+.1%}); {len(warm)} samples")
        print(f"all samples (s MiB): {', '.join(f'{t:.0f} {m / 2**20:.0f}' for t, m in rss)}")
    log.seek(0)
    lines = log.read().splitlines()
    print(f"server stderr: {len(lines)} lines, {sum('Traceback' in x for x in lines)} tracebacks"
          + "".join(f"\n  {x[:300]}" for x in lines[-20:]))
    print(f"health after: {healthy}")


if __name__ == "__main__":
    run_main(main)
