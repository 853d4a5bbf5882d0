"""The kNN-LM paper's experiments (Khandelwal et al., ICLR 2020) on WikiText-2 with the
default model, plus the continuous cache.  Writes docs/results.md and
docs/img/*.png.

    .venv/bin/python benchmarks/paper_experiments.py                 # everything (cached, resumable)
    .venv/bin/python benchmarks/paper_experiments.py --only k,lambda # some experiments
    .venv/bin/python benchmarks/paper_experiments.py --render        # page + plots from the cache only

Splits (as benchmarks/bench_wikitext.py): datastore = wiki.valid.raw without its last
~25k tokens of whole articles; tuning = those held-out articles; test = the first ~30k
tokens of wiki.test.raw as whole articles.  Windows W=1024/S=512 everywhere.

Compute is shared: one forward pass per split reads every key point (and the final
hidden state, the cache's key); one retrieval of k=1024 neighbours per (datastore, split)
serves every k, lambda and temperature; datastores with several key points are written in
one pass.  Everything heavy is cached under benchmarks/cache/paper/ (git-ignored); the
full WikiText datastore of bench_wikitext.py (benchmarks/cache/wikitext2/ds-bfloat16) is
reused read-only when it was built from the same split, else built here.

One module per experiment in benchmarks/paper/ (compute, claim, page section, plot) over a
shared runner (benchmarks/paper/runner.py); this script only parses options and runs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import BenchError, add_data_arg, check_wikitext, run_main, setup_logging  # noqa: E402
from paper import EXPERIMENTS, RUN_ORDER  # noqa: E402
from paper.page import publish  # noqa: E402
from paper.runner import B, Run, S, W, save_json  # noqa: E402

LOG = logging.getLogger("paper")
COMMAND_CODE_DIR = sysconfig.get_paths()["stdlib"]  # the running Python's standard library


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(EXPERIMENTS)}")
    ap.add_argument("--render", action="store_true", help="only rewrite the page and plots from cached results")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heldout-tokens", type=int, default=25_000)
    ap.add_argument("--subset-tokens", type=int, default=30_000, help="test tokens (whole articles)")
    ap.add_argument("--size-points", type=int, default=6, help="datastore sizes full/2^i, i < this")
    ap.add_argument("--leads-tokens", type=int, default=100_000, help="Wikipedia lead tokens for the largest point")
    ap.add_argument("--kp-tokens", type=int, default=60_000, help="datastore tokens for the key-point experiment")
    ap.add_argument("--code-dir", default=COMMAND_CODE_DIR)
    ap.add_argument("--code-max-chars", type=int, default=40_000, help="skip longer source files")
    ap.add_argument("--code-ds-tokens", type=int, default=100_000)
    ap.add_argument("--code-tune-tokens", type=int, default=15_000)
    ap.add_argument("--code-test-tokens", type=int, default=20_000)
    ap.add_argument("--examples", type=int, default=5, help="best examples shown with their neighbours")
    ap.add_argument("--device", default="cpu", help="where the LM runs: cpu or cuda (FAISS searches on the CPU)")
    ap.add_argument("--batch-tokens", type=int, default=B, help="padded tokens per forward pass")
    ap.add_argument("--window", type=int, default=W)
    ap.add_argument("--stride", type=int, default=S)
    add_data_arg(ap)
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="results.md and img/ go here")
    ap.add_argument("--ivf-factory", default="IVF2048,PQ64", help="when the WikiText datastore is built here")
    ap.add_argument("--ivf-index", default="ivf2048-pq64")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--bench-datastore", default=str(HERE / "cache" / "wikitext2" / "ds-bfloat16"))
    ap.add_argument("--cache", default=str(HERE / "cache" / "paper"))
    args = ap.parse_args()
    setup_logging("paper")
    todo = args.only.split(",") if args.only else list(RUN_ORDER)
    unknown = set(todo) - set(EXPERIMENTS)
    if unknown:
        raise BenchError(f"unknown experiment(s) {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    if not args.render:
        args.wikitext = check_wikitext(args.data)  # before anything long
    run = Run(args)
    if not args.render:
        for e in todo:
            LOG.info("experiment %s", e)
            t0 = time.perf_counter()
            save_json(run.cache / "results" / f"{e}.json", EXPERIMENTS[e].compute(run))
            LOG.info("experiment %s done in %.0f s", e, time.perf_counter() - t0)
            publish(run, args)  # the page so far: a partial run still publishes what it has
    publish(run, args)


if __name__ == "__main__":
    run_main(main)
