"""Two-level k-means for large IVF indexes against FAISS's own (flat) k-means: training
seconds and recall@10 at nprobe 32, on clustered synthetic keys (600 blobs in 64-d, 40
keys per list), for a flat and an HNSW coarse quantizer.

    python benchmarks/bench_two_level.py        # ~6 CPU-minutes on 2 cores

Prints one line per index and training; the numbers are in docs/scale.md.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
from common import run_main

from knnlm.core.index import train_index

NLIST, DIM = 8192, 64


def main() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(600, DIM)).astype(np.float32) * 4
    x = (centres[rng.integers(0, 600, NLIST * 40)] + rng.normal(size=(NLIST * 40, DIM))).astype(np.float32)
    q = (centres[rng.integers(0, 600, 200)] + rng.normal(size=(200, DIM))).astype(np.float32)
    exact = faiss.IndexFlatL2(DIM)
    exact.add(x)
    _, truth = exact.search(q, 10)
    for factory in (f"IVF{NLIST},PQ16", f"IVF{NLIST}_HNSW32,PQ16"):
        for two_level in (True, False):
            index = faiss.index_factory(DIM, factory)
            t0 = time.time()
            if two_level:
                train_index(index, x, factory)  # NLIST >= TWO_LEVEL_FROM: two levels
            else:
                index.train(x)
            seconds = time.time() - t0
            index.add(x)
            faiss.extract_index_ivf(index).nprobe = 32
            _, ids = index.search(q, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
            print(f"{factory}  {'two-level' if two_level else 'flat k-means'}:  train {seconds:.1f} s,  "
                  f"recall@10 {recall:.3f}")


if __name__ == "__main__":
    run_main(main)
