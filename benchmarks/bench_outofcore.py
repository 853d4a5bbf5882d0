"""An index larger than RAM: a synthetic sharded datastore searched from disk.

This measures search cost and memory, not perplexity: the keys are clustered random
vectors (4096 centres + noise), d = 576 float16 like SmolLM2-135M's, written shard by
shard in chunks (never all in memory).  One IVF-PQ training for all shards
(knnlm.scale.index), each shard's codes in its own index file; the search process
memory-maps the shard indexes (FAISS IO_FLAG_MMAP) and re-ranks from the keys memmaps,
so its anonymous memory holds only the coarse quantizer, the codebooks and one batch's
buffers.  It reports build time, queries/s at k = 1024 with and without re-ranking, and
the search process's peak anonymous RSS (RssAnon sampled every 10 ms, with VmHWM and
smaps_rollup at the end).

    flock /tmp/knnlm-cpu.lock python benchmarks/bench_outofcore.py --work /work/ooc \
        --entries 20000000 --shards 4 --factory IVF512,PQ72x4
    (add --keep to keep the files; they are deleted at the end otherwise)

Results: benchmarks/results/outofcore.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "outofcore.json"
LOG = logging.getLogger("bench")
DIM = 576
CENTRES = 4096


def _centres(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((CENTRES, DIM), dtype=np.float32)  # (C, d)


def _noise_pool(seed: int = 1, rows: int = 1 << 18) -> np.ndarray:
    return (0.5 * np.random.default_rng(seed).standard_normal((rows, DIM), dtype=np.float32)).astype(np.float16)


def draw(rng, centres, pool, n: int) -> np.ndarray:
    """n keys (n, d) float16: a random centre plus a random noise row of the pool."""
    x = centres[rng.integers(0, CENTRES, n)]  # (n, d) float32
    x += pool[rng.integers(0, len(pool), n)]
    return x.astype(np.float16)


def write_shard(path: Path, n: int, seed: int, centres, pool, chunk: int = 1 << 16) -> None:
    """One shard in the datastore format, keys written chunk by chunk with their sha256."""
    from knnlm.core.corpus import file_sha256

    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": (n, DIM)})
    with open(path / "keys.npy", "wb") as f:
        f.write(header.getvalue())
        h.update(header.getvalue())
        for a in range(0, n, chunk):
            block = draw(rng, centres, pool, min(chunk, n - a)).tobytes()
            f.write(block)
            h.update(block)
    tokens = rng.integers(0, 49152, n + 1).astype(np.int32)  # one document; vals are its next tokens
    np.save(path / "tokens.npy", tokens)
    np.save(path / "vals.npy", tokens[1:])
    np.save(path / "docs.npy", np.array([[0, n + 1, 0]], dtype=np.int64))
    (path / "docs.jsonl").write_text(json.dumps({"source": "synthetic", "line": 0, "title": path.name}) + "\n")
    sha = {"keys.npy": h.hexdigest(), **{f: file_sha256(path / f) for f in
                                           ("vals.npy", "tokens.npy", "docs.npy", "docs.jsonl")}}
    meta = {"format_version": 1, "id": f"synthetic-{seed}-{n}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "identity": {"model": "synthetic (clustered random keys)", "model_fingerprint": "synthetic",
                         "weights_sample": [], "tokenizer_fingerprint": "synthetic", "key_point": "ffn_input"},
            "key_point": "ffn_input", "model_dtype": "none", "dim": DIM, "count": n, "documents": 1,
            "window": 1024, "stride": 512, "corpora": [], "sha256": sha}
    (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def phase_make(args) -> dict:
    from knnlm.scale.manifest import write_manifest

    root = args.work / "ds"
    if root.exists():
        shutil.rmtree(root)
    centres, pool = _centres(), _noise_pool()
    per = args.entries // args.shards
    t0 = time.perf_counter()
    paths = []
    for s in range(args.shards):
        p = root / "shards" / f"{s:05d}"
        write_shard(p, per, 100 + s, centres, pool)
        paths.append(p)
        LOG.info("shard %d written (%.0f s)", s, time.perf_counter() - t0)
    write_manifest(root, paths)
    keys_bytes = sum((p / "keys.npy").stat().st_size for p in paths)
    return {"entries": per * args.shards, "shards": args.shards, "dim": DIM, "keys_bytes": keys_bytes,
            "write_seconds": round(time.perf_counter() - t0, 1)}


def phase_index(args) -> dict:
    from knnlm.scale import open_datastore
    from knnlm.scale.index import build_sharded_index

    ds = open_datastore(args.work / "ds")
    t0 = time.perf_counter()
    path = build_sharded_index(ds, args.factory, train_size=args.train_size, nprobe=args.nprobe, overwrite=True,
                               progress=False)
    info = json.loads((path / "index.json").read_text())
    index_bytes = sum(f.stat().st_size for s in ds.shards for f in (s.path / "indexes" / path.name).glob("*"))
    return {"factory": args.factory, "index": path.name, "train_size": args.train_size,
            "train_seconds": info["train_seconds"], "build_seconds": round(time.perf_counter() - t0, 1),
            "index_bytes": index_bytes}


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.split(":")[0] in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def search_child(args) -> dict:
    """Runs in its own process: the memory it reports is the search's alone."""
    from knnlm.scale import open_datastore, open_searcher

    peak = {"RssAnon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], _status().get("RssAnon", 0))
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    ds = open_datastore(args.work / "ds")
    name = json.loads((args.work / "index.json").read_text())["index"] if (args.work / "index.json").exists() \
        else None
    rng = np.random.default_rng(7)
    queries = draw(rng, _centres(), _noise_pool(seed=2, rows=4096), args.queries).astype(np.float32)  # (m, d)
    after_open = {}
    out = {"k": args.k, "nprobe": args.nprobe, "queries": args.queries, "batch": args.batch}
    for rerank, m in ((False, args.queries), (True, args.rerank_queries)):
        s = open_searcher(ds, name, nprobe=args.nprobe, rerank=rerank)
        after_open = after_open or _status()
        s.search(queries[: args.batch], args.k)  # warm-up batch (not timed)
        t0 = time.perf_counter()
        for a in range(0, m, args.batch):
            d, i = s.search(queries[a : a + args.batch], args.k)
            assert (i >= 0).all() and np.isfinite(d).all()
        secs = time.perf_counter() - t0
        out["rerank" if rerank else "no_rerank"] = {"queries": m, "seconds": round(secs, 2),
                                                    "queries_per_s": round(m / secs, 2),
                                                    "ms_per_query_per_shard": round(1000 * secs / m / len(ds.shards),
                                                                                    3)}
    stop.set()
    st = _status()
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, val = line.split(":")[0], line.split()[1]
        if key in ("Rss", "Anonymous", "Private_Dirty", "Shared_Clean", "Private_Clean"):
            rollup[key] = int(val) * 1024
    out.update(peak_rss_anon=peak["RssAnon"], status_at_end=st, status_after_open=after_open, smaps_rollup=rollup,
               shards=len(ds.shards), entries=ds.count)
    return out


def phase_search(args) -> dict:
    cmd = [sys.executable, __file__, "--phases", "child", "--work", str(args.work), "-k", str(args.k),
           "--nprobe", str(args.nprobe), "--queries", str(args.queries), "--rerank-queries", str(args.rerank_queries),
           "--batch", str(args.batch)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="make,index,search,clean")
    p.add_argument("--work", type=Path, default=HERE / "cache" / "outofcore")
    p.add_argument("--entries", type=int, default=20_000_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--factory", default="IVF512,PQ72x4")
    p.add_argument("--train-size", type=int, default=65_536)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("-k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--rerank-queries", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = p.parse_args()
    if args.phases == "child":
        print(json.dumps(search_child(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    from common import command_line

    results.update(command=command_line(__file__),
                   machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    for phase in args.phases.split(","):
        if phase == "clean":
            if not args.keep:
                shutil.rmtree(args.work / "ds", ignore_errors=True)
                results["deleted"] = True
            continue
        t0 = time.time()
        res = {"make": phase_make, "index": phase_index, "search": phase_search}[phase](args)
        res["wall_seconds"] = round(time.time() - t0, 1)
        if phase == "index":
            (args.work / "index.json").write_text(json.dumps(res))
        results[phase] = res
        LOG.info("%s: %s", phase, res)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
