"""What an IVF index's coarse quantizer costs when the keys are added: seconds per 10^6 keys
for a flat (exact) and an HNSW32 quantizer, at 4,096 to 65,536 lists, on real keys of a
datastore (the novels' 576-d keys of SmolLM2-135M).

    python benchmarks/bench_quantizer.py --datastore DS [--keys 20000]   # ~2 CPU-minutes

Adding a key assigns it to its nearest list (a flat quantizer: a distance to every centroid,
nlist x dim multiply-adds; HNSW: a graph walk of a few hundred distances) and encodes its
residual with the product quantizer (the same for both).  The centroids are keys drawn at
random (adding costs the same whichever centroids k-means would give), the PQ is trained on
16,384 keys.  At 10^7 keys the per-key cost decides whether the add takes minutes or hours.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
from common import run_main

from knnlm.core.datastore import Datastore


def add_seconds(keys: np.ndarray, nlist: int, hnsw: bool, pool: np.ndarray, rng) -> float:
    """Seconds to add `keys` to an IVF`nlist`,PQ64 index whose centroids are random keys of `pool`."""
    d = keys.shape[1]
    factory = f"IVF{nlist}{'_HNSW32' if hnsw else ''},PQ64"
    index = faiss.index_factory(d, factory)
    ivf = faiss.downcast_index(index)  # IndexIVFPQ
    centroids = pool[rng.choice(len(pool), nlist, replace=False)]
    ivf.quantizer.add(centroids)  # flat or HNSW quantizer, filled with the centroids
    ivf.pq.train(pool[:16384])
    ivf.is_trained = True
    index.is_trained = True
    t0 = time.perf_counter()
    index.add(keys)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", required=True, help="a datastore with at least 65,536 + --keys entries")
    ap.add_argument("--keys", type=int, default=20_000, help="keys added per measurement (default: 20000)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    ds = Datastore(args.datastore)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(ds.count, 65_536 + args.keys, replace=False))
    x = ds.read_keys(ids).astype(np.float32)
    pool, keys = x[:65_536], x[65_536:]
    rows = []
    for nlist in (4096, 16384, 65536):
        for hnsw in (False, True):
            s = add_seconds(keys, nlist, hnsw, pool, rng)
            rows.append({"nlist": nlist, "quantizer": "HNSW32" if hnsw else "flat", "keys": len(keys),
                         "seconds": round(s, 2), "seconds_per_million": round(s * 1e6 / len(keys), 1)})
            print(f"IVF{nlist} {rows[-1]['quantizer']:>6} quantizer: {rows[-1]['seconds_per_million']:8.1f} s per 10^6 keys "
                  f"({s:.2f} s for {len(keys):,}; 10^7 keys: {s * 1e7 / len(keys) / 60:.0f} min)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", "utf-8")


if __name__ == "__main__":
    run_main(main)
