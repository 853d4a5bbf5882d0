"""Throughput of `knnlm serve` under concurrent clients, with and without batching.

The server runs in this process on 127.0.0.1 (uvicorn, an ephemeral port) over the default
model and the small WikiText datastore of bench_generate.py (from wiki.valid.raw in --data,
default ../shared/data/wikitext-2-raw, checked by sha256: benchmarks/README.md; cached in
benchmarks/cache/generate/).  `--clients` threads each send `--requests` greedy
completions of `--tokens` tokens, all at once; the same load runs against servers with
`--max-batch 1` (one request at a time) and `--max-batch N`, alternating, `--repeats`
times.  Reported: completion tokens/s over the whole load, median request latency, and
whether both servers gave the same texts.

    python benchmarks/bench_serve.py                  # ~5 min on 2 CPU cores
    python benchmarks/bench_serve.py --clients 16 --max-batch 16

Results: benchmarks/results/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from bench_generate import PROMPTS, add_setup_args, setup
from common import BenchError, data_note, run_main, setup_logging

from knnlm.serve.server import create_app, serve_in_thread

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")


def load(url: str, clients: int, requests: int, tokens: int, body: dict,
         prompts: list[str] = PROMPTS) -> tuple[float, list[float], dict, int]:
    """All clients at once; (seconds, latencies, {(client, i): text}, completion tokens)."""
    latencies, texts, counted, errors = [], {}, [0], []
    lock, start = threading.Lock(), threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            start.wait()
            for i in range(requests):
                prompt = prompts[(c + i) % len(prompts)]
                t = time.perf_counter()
                r = http.post("/v1/completions", json={**body, "prompt": prompt, "max_tokens": tokens})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    texts[(c, i)] = r.json()["choices"][0]["text"]
                    counted[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise BenchError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return seconds, latencies, texts, counted[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="completions per client")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of each completion")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", default=str(HERE / "results" / "serve.md"))
    ap.add_argument("--pointers", type=int, default=0,
                    help="also both servers with RetoMaton pointers at this threshold (per request: pointer_threshold)")
    args = ap.parse_args()
    setup_logging("bench", fmt="bench: %(message)s")
    _, ds, knn = setup(args)
    body = {"temperature": 0, "datastore": "wiki"}
    batches = {"one at a time (--max-batch 1)": 1, f"batched (--max-batch {args.max_batch})": args.max_batch}
    settings = {name: (b, body) for name, b in batches.items()}  # server -> (max_batch, request body)
    if args.pointers:
        settings.update({f"{name}, pointers {args.pointers}": (b, {**body, "pointer_threshold": args.pointers})
                         for name, b in batches.items()})
    apps = {name: create_app(knn, max_queue=args.clients * args.requests, max_tokens=args.tokens, max_batch=b)
            for name, (b, _) in settings.items()}

    with serve_in_thread(apps[next(iter(apps))]) as url:  # warm-up
        load(url, 2, 1, 4, body)
    seconds = {name: [] for name in apps}
    latencies = {name: [] for name in apps}
    texts, tokens = {}, {}
    for rep in range(args.repeats):
        for name, app in apps.items():  # alternating, so machine noise hits every server alike
            with serve_in_thread(app) as url:
                s, lat, texts[name], tokens[name] = load(url, args.clients, args.requests, args.tokens,
                                                         settings[name][1])
            seconds[name].append(s)
            latencies[name] += lat
            LOG.info("repeat %d, %s: %.1f s", rep + 1, name, s)

    names = list(apps)
    base = statistics.median(seconds[names[0]])
    rows = ["| server | completion tokens/s | ratio | median latency (s) |", "|---|---:|---:|---:|"]
    for name in names:
        med = statistics.median(seconds[name])
        rows.append(f"| {name} | {tokens[name] / med:.1f} | {base / med:.2f} | {statistics.median(latencies[name]):.2f} |")
    def same(a: str, b: str) -> int:
        return sum(texts[a][key] == texts[b].get(key) for key in texts[a])

    env = (f"model {args.model} ({args.dtype}, {args.device}); datastore {ds.count} entries (Flat, k={args.k}, "
           f"λ={args.lam}); {args.clients} concurrent clients x {args.requests} greedy completions of "
           f"{args.tokens} tokens; median of {args.repeats} alternating repeats; torch {torch.__version__}, "
           f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    n = len(texts[names[0]])
    agree = f"The two servers without pointers gave the same text for {same(names[0], names[1])}/{n} requests."
    if args.pointers:
        agree += (f" With pointers the two servers agree on {same(names[2], names[3])}/{n}; pointers on and off "
                  f"give the same text for {same(names[0], names[2])}/{n} requests (one at a time) and "
                  f"{same(names[1], names[3])}/{n} (batched).")
    table = "\n".join(rows)
    print(env)
    print(table)
    print(agree)
    Path(args.output).write_text(
        "# Serving throughput: batched vs one request at a time" + (", pointers off and on" if args.pointers else "")
        + "\n\n"
        f"Command: `{' '.join(['python', 'benchmarks/bench_serve.py', *sys.argv[1:]])}`\n\n"
        f"{data_note(['wiki.valid.raw'])}  Folder: `--data` (default `../shared/data`).\n\n"
        f"{env}.\n\n{table}\n\n{agree}\n", encoding="utf-8")
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    run_main(main)
