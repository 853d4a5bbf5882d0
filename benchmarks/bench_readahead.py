"""Re-ranking from keys not in the page cache: read-ahead (the default) vs madvise(MADV_RANDOM).

Opens a synthetic sharded datastore made by bench_outofcore.py (`--phases make,index --keep`),
drops its keys files from the page cache (posix_fadvise DONTNEED: these files only), then
searches 128 queries at k = 1024 with the merged top k re-ranked from the keys memmaps, the
keys mapped with the kernel's default read-ahead (`normal`) or advised random (`random`).
It prints the re-ranking's extra time per query (over the same search without re-ranking),
the bytes this process read from disk (/proc/self/io read_bytes) and the growth of its
file-backed RSS.  One mode per process, so no pages are left mapped from the other:

    W=/work/ooc-readahead
    python benchmarks/bench_outofcore.py --work $W --entries 2000000 --shards 2 \\
        --factory IVF512,PQ72x4 --train-size 20000 --nprobe 32 --phases make,index --keep
    python benchmarks/bench_readahead.py $W normal
    python benchmarks/bench_readahead.py $W random
    rm -rf $W

(bench_outofcore.py also writes its make/index numbers into results/outofcore.json: restore
that file afterwards.)  Results: benchmarks/results/outofcore.md, "Read-ahead".
"""
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_outofcore import _centres, _noise_pool, draw  # noqa: E402

from knnlm.scale import open_datastore, open_searcher  # noqa: E402

work = sys.argv[1]
ds = open_datastore(work + "/ds")
name = json.loads(open(work + "/index.json").read())["index"]
q = draw(np.random.default_rng(7), _centres(), _noise_pool(seed=2, rows=4096), 256).astype(np.float32)


def io():
    r = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/io")}
    st = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
          if line.startswith("Rss")}
    return r["read_bytes"], st["RssFile"]


def drop():
    for s in ds.shards:
        fd = os.open(s.path / "keys.npy", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


out = {}
plain = open_searcher(ds, name, nprobe=32, rerank=False)
rr = open_searcher(ds, name, nprobe=32, rerank=True)
plain.search(q[:32], 1024)
mode = sys.argv[2]
for qs in (q[:128],):
    for s in ds.shards:
        s.keys._mmap.madvise(mmap.MADV_RANDOM if mode == "random" else mmap.MADV_NORMAL)
    t0 = time.perf_counter()
    plain.search(qs, 1024)
    t_plain = time.perf_counter() - t0
    drop()
    b0, f0 = io()
    t0 = time.perf_counter()
    d, i = rr.search(qs, 1024)
    t = time.perf_counter() - t0
    b1, f1 = io()
    rows = len(qs) * 1024
    out[mode] = {"queries": len(qs), "pq_only_s": round(t_plain, 2), "rerank_s": round(t, 2),
                 "rerank_extra_ms_per_query": round(1000 * (t - t_plain) / len(qs), 2),
                 "read_bytes": b1 - b0, "read_bytes_per_row": round((b1 - b0) / rows), "rss_file_growth": f1 - f0}
print(json.dumps(out))
