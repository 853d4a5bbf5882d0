"""Where the per-token time of one-stream generation goes with an exact Flat datastore:
tokens/s of the base LM, the kNN-LM and the kNN-LM with pointers (threshold
16), each with the Flat index's own search and with the float16 scan that
`knnlm.core.index.Searcher` uses for fewer than FEW_QUERIES queries (`scan_few`), then a
cProfile of the pointer run.  4 prompts x 24 greedy tokens, 1 repeat: a quick look, not the
benchmark (that is bench_generate_fewer.py).  Needs the 45,879-entry datastore that
`bench_generate_fewer.py --flat-chars 190000` builds in benchmarks/cache/generate.

    PYTHONPATH=src python benchmarks/profile_knn_step.py
"""
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

from knnlm.core.model import LM
from knnlm.retrieval.pointers import Pointers
from knnlm.run.generate import KNNLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPTS  # noqa: E402

torch.manual_seed(0)
lm = LM.load("smollm2-135m", dtype="bfloat16", device="cpu", key_point="ffn_input")
flat = sorted((Path(__file__).resolve().parent / "cache" / "generate").glob("ds-valid-190000-*"))[0]
knn = KNNLM(lm, lam=0.05, k=1024, knn_temperature=4.0)
knn.add_datastore("flat", flat, index="flat")
s = knn.searchers["flat"]
ptr = Pointers(16)
n = 24
P = PROMPTS[:4]
def run(**kw):
    return [knn.generate(p, n, ignore_eos=True, **kw).ids for p in P]
for name in (None, "flat"):
    knn.generate(PROMPTS[0], 4, datastore=name, ignore_eos=True)
out = {}
for rep in range(1):
    for label, kw in (("base", dict(datastore=None)), ("flat", dict(datastore="flat", pointers=None)), ("flat+ptr", dict(datastore="flat", pointers=ptr))):
        for scan in (False, True):
            s.scan_few = scan
            t = time.perf_counter(); ids = run(**kw); dt = time.perf_counter() - t
            out[(label, scan)] = ids
            print(label, "scan" if scan else "flat-index", f"{n*len(P)/dt:.1f} tok/s", flush=True)
print("same tokens scan vs flat index:", {l: out[(l, True)] == out[(l, False)] for l in ("flat", "flat+ptr")})
s.scan_few = True
for label, kw in (("flat+ptr", dict(datastore="flat", pointers=ptr)),):
    pr = cProfile.Profile(); pr.enable(); run(**kw); pr.disable()
    print("=====", label)
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)
