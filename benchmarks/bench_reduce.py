"""Datastore size vs perplexity: the WikiText-2 datastore with its keys at d = 576
(as built), PCA-reduced to 288 and 144, and pruned (same-value keys within a radius merged,
counted in p_kNN): bytes per entry, test perplexity and exact-search speed of each.

    python benchmarks/bench_reduce.py --cache /work/cache/wikitext2

Needs the query cache of bench_fewer_searches.py (`queries-heldout.npz`, `queries-test.npz`
in --cache; that script builds them).  Every datastore is searched exactly (torch, CPU:
`knnlm.retrieval.device.DeviceSearcher`) so the table shows what the reduction itself costs;
λ and T are tuned per datastore on the first `--heldout` held-out positions (k fixed),
perplexity is measured on the first `--test` test positions.  Reduced copies go to --work
(the source datastore is only read).  Results: benchmarks/results/datastore-size.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from knnlm.core.datastore import Datastore
from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
from knnlm.retrieval.device import DeviceSearcher
from knnlm.retrieval.reduce import bytes_per_entry, prune_datastore, reduce_datastore

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")
LAMBDAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0)


def neighbours(s: DeviceSearcher, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    d, i = s.search(keys, k)
    return d, i, time.perf_counter() - t0


def radius_for(ds: Datastore, share: float, sample: int = 4000, seed: int = 0) -> float:
    """A squared-L2 radius within which about `share` of entries have another entry (exact
    nearest neighbour of a random sample of keys, itself left out)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ds.count, size=sample, replace=False))
    d, _ = DeviceSearcher(ds).search(np.asarray(ds.keys[rows], dtype=np.float32), 2)
    return float(np.quantile(d[:, 1], share))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(HERE / "cache" / "wikitext2"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", default=str(HERE / "cache" / "datastore-size"))
    ap.add_argument("--dims", default="288,144")
    ap.add_argument("--prune-share", type=float, default=0.3, help="pruning radius: this quantile of NN distances")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--heldout", type=int, default=5000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--output", default=str(HERE / "results" / "datastore-size"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    torch.set_grad_enabled(False)
    cache, work = Path(args.cache), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = Datastore(cache / f"ds-{args.dtype}")
    q = {sp: dict(np.load(cache / f"queries-{sp}.npz")) for sp in ("heldout", "test")}
    q = {sp: {key: v[:n] for key, v in q[sp].items() if key != "doc_first"}
         for sp, n in (("heldout", args.heldout), ("test", args.test))}
    stores = [("d=576 (as built)", src)]
    for dim in [int(x) for x in args.dims.split(",")]:
        out = work / f"pca{dim}"
        if not (out / "meta.json").exists():
            reduce_datastore(src, out, dim, overwrite=True)
        stores.append((f"PCA d={dim}", Datastore(out)))
    radius = radius_for(src, args.prune_share)
    out = work / f"pruned-{args.prune_share}"
    if not (out / "meta.json").exists():
        prune_datastore(src, out, radius, overwrite=True)
    stores.append((f"pruned (radius {radius:.3g}), d=576", Datastore(out)))
    rows = []
    for label, ds in stores:
        s = DeviceSearcher(ds)
        got = {}
        for sp in ("heldout", "test"):
            d, i, sec = neighbours(s, q[sp]["keys"].astype(np.float32), args.k)
            got[sp] = (d, ds.vals[i], ds.counts_of(i), sec)
        d, v, c, _ = got["heldout"]
        grid = [(perplexity(interpolate(q["heldout"]["lm"], knn_target_logprobs(d, v, q["heldout"]["targets"], t,
                                                                                 counts=c), lam)), lam, t)
                for t in TEMPERATURES for lam in LAMBDAS]
        _, lam, t = min(grid)
        d, v, c, sec = got["test"]
        ppl = perplexity(interpolate(q["test"]["lm"], knn_target_logprobs(d, v, q["test"]["targets"], t, counts=c),
                                     lam))
        per = bytes_per_entry(ds)
        rows.append({"datastore": label, "entries": ds.count, "dim": ds.dim, "bytes_per_entry": per["total"],
                     "bytes_per_original_entry": per["total"] * ds.count / src.count,
                     "lambda": lam, "temperature": t, "ppl": ppl, "ppl_lm": perplexity(q["test"]["lm"]),
                     "queries_per_second": len(q["test"]["lm"]) / sec,
                     "variance_kept": (ds.reduction or {}).get("variance_kept")})
        LOG.info("%s: %.1f B/entry, ppl %.3f, %.0f queries/s", label, per["total"], ppl, rows[-1]["queries_per_second"])
        del s
    out = Path(args.output)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    base = rows[0]
    lines = ["| datastore | entries | bytes/entry (keys + values + counts) | per original entry | test ppl | "
             "vs d=576 | exact search queries/s | vs d=576 | λ, T (tuned on held-out) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['datastore']} | {r['entries']} | {r['bytes_per_entry']:.0f} | "
                     f"{r['bytes_per_original_entry']:.0f} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% |"
                     f" {r['queries_per_second']:.0f} | {r['queries_per_second'] / base['queries_per_second']:.2f}x |"
                     f" {r['lambda']}, {r['temperature']} |")
    from common import PLACEHOLDERS, command_line

    cmd = command_line(__file__)
    text = ("# Datastore size vs perplexity (WikiText-2, smollm2-135m bf16)\n\n"
            f"Command: `{cmd}`\n({PLACEHOLDERS}.)\n\n"
            f"Source: {src.count} entries, d={src.dim}. Exact search (torch on the CPU, k={args.k}) for every "
            f"datastore; λ/T tuned on the first {args.heldout} held-out positions, perplexity on the first "
            f"{args.test} test positions (base LM there: {base['ppl_lm']:.3f}). Bytes per entry count the keys "
            "(float16), values (int32) and, when pruned, counts and origin ids; an IVF-PQ index adds its codes "
            "(64 bytes + 8 id bytes at PQ64). PCA variance kept: "
            + ", ".join(f"d={r['dim']}: {100 * r['variance_kept']:.1f}%" for r in rows if r["variance_kept"])
            + ".\n\n" + "\n".join(lines) + "\n")
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
