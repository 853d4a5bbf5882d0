"""Should RetoMaton pointers be on by default?  Perplexity and searches per
token with pointers at several thresholds against searching every token and against the
LM alone, on datastores other than the WikiText-2 benchmark's: each datastore's own
self-tuned k, λ and T (a fixed λ, not the adaptive λ), its own index, and cached held-out
query keys (`queries-test.npz`: keys, lm = log p_LM(target), targets, doc_first, as the
demo writes them).  The replay is `knnlm.retrieval.pointers.simulate`, exact: query keys
do not depend on retrieval.

    python benchmarks/bench_pointer_default.py --domain /work/cache/demo/en-us --domain /work/cache/demo/es-es

Each --domain folder holds datastore-300/ and queries-test.npz.  Results:
benchmarks/results/pointer-default.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher
from knnlm.core.scoring import perplexity
from knnlm.core.settings import resolve
from knnlm.retrieval.adaptive import mix_where_searched
from knnlm.retrieval.pointers import Pointers, simulate

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")


def rows_of(domain: Path, thresholds: list[int]) -> list[str]:
    ds = Datastore(domain / "datastore-300")
    q = np.load(domain / "queries-test.npz")
    r = resolve(ds.meta, ds.count)  # the datastore's own (self-tuned) settings
    s = Searcher(ds)
    vals = np.asarray(ds.vals)
    lm = q["lm"].astype(np.float64)
    keys = q["keys"].astype(np.float32)
    out = []
    plain_ppl = None
    for p in [None] + [Pointers(t) for t in thresholds]:
        run = simulate(keys, q["targets"], q["doc_first"], vals, ds, lambda pos, x, k: s.search(x, k), s.exact,
                       r.k, p, (r.temperature,))
        ppl = perplexity(mix_where_searched(lm, run.knn[:, 0], r.lam))
        plain_ppl = ppl if p is None else plain_ppl
        name = "every token" if p is None else f"pointers, threshold {p.threshold}"
        out.append(f"| {domain.name} ({ds.count} entries) | {name} | {run.search_rate:.3f} | "
                   f"{100 * (1 - run.search_rate):.1f}% | {perplexity(lm):.3f} | {ppl:.3f} | "
                   f"{100 * (ppl / plain_ppl - 1):+.2f}% | {100 * (ppl / perplexity(lm) - 1):+.2f}% |")
        LOG.info(out[-1])
    head = (f"{domain.name}: {len(lm)} held-out positions in {len(q['doc_first'])} documents; "
            f"k={r.k}, λ={r.lam}, T={r.temperature} ({r.source}), index {s.info['factory']}")
    return [head] + out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", action="append", required=True, help="folder with datastore-300/ and queries-test.npz")
    ap.add_argument("--thresholds", default="1,4,16,64,256")
    ap.add_argument("--output", default=str(HERE / "results" / "pointer-default.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    thresholds = [int(t) for t in args.thresholds.split(",")]
    heads, rows = [], []
    for d in args.domain:
        got = rows_of(Path(d), thresholds)
        heads.append(got[0])
        rows += got[1:]
    table = "\n".join(["| datastore | setting | searches per token | searches saved | LM ppl | kNN-LM ppl | "
                       "vs every token | vs LM alone |", "|---|---|---:|---:|---:|---:|---:|---:|", *rows])
    from common import PLACEHOLDERS, command_line

    cmd = command_line(__file__)
    text = (f"# Pointers by default? Other datastores than WikiText-2's\n\nCommand: `{cmd}`\n({PLACEHOLDERS}.)\n\n"
            + "\n".join(f"- {h}" for h in heads) + f"\n\n{table}\n")
    print(text)
    Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from common import run_main

    run_main(main)
