"""Perplexity vs searches per token on WikiText-2: RetoMaton pointers and
adaptive retrieval against searching every token.

The query keys of an evaluation do not depend on retrieval, so the curves need no LM
forward pass: each split's query keys, log p_LM(target) and targets are computed once
(`queries-<split>.npz`, as `knnlm eval` would read them), every position is searched once
with the benchmark index (IVF-PQ + exact re-ranking, k neighbours, cached as memmaps),
and each setting is replayed left to right with `knnlm.retrieval.pointers.simulate`: a
pointer step ranks its candidates by exact distance, a search step reads the cached
search result (the same search `knnlm eval` runs).  λ and T are tuned on the held-out
articles with every token searched, the adaptive thresholds are quantiles of the held-out
signal; everything is reported on wiki.test.raw.  Adaptive retrieval needs the LM's own
max probability / entropy at each position (not in the cache): one forward pass over the
held-out split and the first `--adaptive-tokens` positions of test (the same windows).

    python benchmarks/bench_fewer_searches.py --cache /work/cache/wikitext2
    python benchmarks/bench_fewer_searches.py            # builds everything into benchmarks/cache/wikitext2

Results: benchmarks/results/fewer-searches.{md,json} and docs/img/searches-saved.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from knnlm.core.batching import plan_files
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index, list_indexes
from knnlm.core.scoring import knn_target_logprobs, perplexity
from knnlm.retrieval.adaptive import Adaptive, mix_where_searched
from knnlm.retrieval.pointers import Pointers, simulate
from knnlm.run.tune import sweep

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import PLACEHOLDERS, command_line, placeholders  # noqa: E402
LOG = logging.getLogger("bench")
WINDOW, STRIDE, BATCH = 1024, 512, 4096


def lm_once(args, _cache={}):
    if "lm" not in _cache:
        from knnlm.core.model import LM

        _cache["lm"] = LM.load(args.model, dtype=args.dtype, device="cpu")
    return _cache["lm"]


def text_of(args, split: str) -> Path:
    from bench_wikitext import DATA, split_valid

    if split == "test":  # the session's shared cache holds the first ~100k tokens of test (whole articles)
        sub = Path(args.cache) / "test_100k.txt"
        return sub if sub.exists() else Path(args.data or DATA) / "wiki.test.raw"
    return split_valid(lm_once(args), Path(args.cache), 25_000)[1]


def assets(args) -> Datastore:
    """The benchmark datastore (wiki.valid.raw minus held-out articles) with its indexes,
    and each split's query keys; built here when --cache does not hold them."""
    from common import query_cache

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"ds-{args.dtype}"
    if not (path / "meta.json").exists():
        from bench_wikitext import split_valid

        ds_txt, _ = split_valid(lm_once(args), cache, 25_000)
        build_datastore(lm_once(args), [ds_txt], path, window=WINDOW, stride=STRIDE, batch_tokens=BATCH,
                        progress=False)
    ds = Datastore(path)
    for factory, name in (("Flat", "flat"), ("IVF2048,PQ64", "ivf2048-pq64")):
        if name not in list_indexes(ds):
            build_index(ds, factory, nprobe=32, progress=False)
    for split in ("heldout", "test"):
        query_cache(lambda: lm_once(args), text_of(args, split), cache / f"queries-{split}.npz", BATCH)
    return ds


def neighbours(args, searcher: Searcher, split: str, q: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every position searched once: dists (n, k) float32 and ids (n, k) int32 memmaps."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    n, k = len(q["targets"]), args.k
    tag = f"{split}-{searcher.name}-k{k}-n{n}"
    fd, fi = work / f"{tag}-dists.npy", work / f"{tag}-ids.npy"
    if not (fd.exists() and fi.exists()):
        t0 = time.perf_counter()
        d = np.lib.format.open_memmap(str(fd) + ".partial.npy", "w+", np.float32, (n, k))
        i = np.lib.format.open_memmap(str(fi) + ".partial.npy", "w+", np.int32, (n, k))  # ids < 2**31
        for a in range(0, n, 4096):
            dd, ii = searcher.search(q["keys"][a : a + 4096].astype(np.float32), k)
            d[a : a + 4096], i[a : a + 4096] = dd, ii
        d.flush(), i.flush()
        del d, i
        Path(str(fd) + ".partial.npy").rename(fd)
        Path(str(fi) + ".partial.npy").rename(fi)
        LOG.info("%s: %d positions searched in %.1f s", tag, n, time.perf_counter() - t0)
    return np.load(fd, mmap_mode="r"), np.load(fi, mmap_mode="r")


def confidence_of(args, split: str, limit: int | None) -> dict:
    """The LM's log max p and entropy at the first `limit` positions of a split (same
    windows as the query cache; log p_LM(target) kept to check the alignment)."""
    import torch

    from knnlm.core.model import target_logprobs
    from knnlm.retrieval.adaptive import confidence

    out = Path(args.work) / f"confidence-{split}-{limit or 'all'}.npz"
    if out.exists():
        return dict(np.load(out))
    lm = lm_once(args)
    plan = plan_files(lm, [text_of(args, split)], WINDOW, STRIDE, BATCH)
    targets = plan.targets().astype(np.int64)
    n = min(limit or plan.count, plan.count)
    max_lp, ent, lp = (np.full(plan.count, np.nan, np.float32) for _ in range(3))
    t0 = time.perf_counter()
    for b in range(len(plan.batches)):
        windows = list(plan.scored(b))
        if min(t for *_, t in windows) >= n:
            break
        first = min(c0 for _, c0, _, _ in windows)
        _, logits = lm.forward(plan.batch_input(b), [], logits=True, logits_from=first)
        for row, c0, c1, t in windows:
            lg = logits[row, c0 - first : c1 - first]
            m, e = confidence(lg)
            max_lp[t : t + c1 - c0], ent[t : t + c1 - c0] = m.numpy(), e.numpy()
            lp[t : t + c1 - c0] = target_logprobs(lg, torch.from_numpy(targets[t : t + c1 - c0])).numpy()
    n = int(np.argmax(np.isnan(max_lp))) if np.isnan(max_lp).any() else plan.count  # positions covered
    res = {"max_lp": max_lp[:n], "entropy": ent[:n], "lm": lp[:n], "seconds": time.perf_counter() - t0}
    np.savez(out, **res)
    return res


def replay(q, vals, ds, dists, ids, exact, k, temperature, pointers=None, skip=None, n=None):
    """ppl-ready log p_kNN (n,) and the searched mask of one setting, over the first n positions."""
    n = n or len(q["targets"])
    run = simulate(q["keys"][:n], q["targets"][:n], q["doc_first"][q["doc_first"] < n], vals, ds,
                   lambda pos, x, kk: (dists[pos], ids[pos].astype(np.int64)), exact, k, pointers, (temperature,),
                   skip=skip)
    return run.knn[:, 0], run.searched


def pointer_settings(text: str) -> list[Pointers]:
    out = []
    for part in text.split(","):
        th, _, every = part.partition("/")
        out.append(Pointers(int(th), int(every or 0)))
    return out


def method(p: Pointers) -> str:
    return "pointers" + (f" + a search every {p.every}" if p.every else "")


def describe(p: Pointers) -> str:
    return f"threshold {p.threshold}" + (f", search every {p.every}" if p.every else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache", default=str(HERE / "cache" / "wikitext2"), help="datastore + query keys")
    ap.add_argument("--data", default=None, help="folder with wiki.test.raw (default ../shared/data/wikitext-2-raw)")
    ap.add_argument("--work", default=str(HERE / "cache" / "fewer-searches"), help="cached search results")
    ap.add_argument("--index", default="ivf2048-pq64")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--thresholds", default="1,4,16,64,256,1/2,16/2,1/3",
                    help="pointer settings: THRESHOLD or THRESHOLD/EVERY (also search every EVERY tokens)")
    ap.add_argument("--skip-rates", default="0.1,0.25,0.4,0.5,0.6,0.75",
                    help="adaptive: thresholds at these quantiles of the held-out signal")
    ap.add_argument("--adaptive-tokens", type=int, default=30_000,
                    help="positions of each split that get the LM's confidence (a forward pass)")
    ap.add_argument("--output", default=str(HERE / "results" / "fewer-searches"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N positions of each split (smoke tests)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    ds = assets(args)
    s = Searcher(ds, args.index)
    q = {sp: dict(np.load(Path(args.cache) / f"queries-{sp}.npz")) for sp in ("heldout", "test")}
    for sp in q:
        if args.limit:
            q[sp] = {key: (v[: args.limit] if key != "doc_first" else v[v < args.limit]) for key, v in q[sp].items()}
        q[sp]["keys"] = q[sp]["keys"].astype(np.float32)
    nb = {sp: neighbours(args, s, sp, q[sp]) for sp in q}
    vals = np.asarray(ds.vals)
    res: dict = {"datastore": {"path": placeholders(str(ds.path)), "entries": ds.count, "dim": ds.dim, **s.settings()},
                 "k": args.k, "tokens": {sp: int(len(q[sp]["targets"])) for sp in q}}

    # ---- tune λ, T on held-out with every token searched
    d, i = nb["heldout"]
    t = sweep(q["heldout"]["lm"], np.asarray(d), vals[np.asarray(i)], q["heldout"]["targets"],
              temperatures=(1.0, 2.0, 4.0, 8.0), ks=[args.k])
    lam, temp = t["best"]["lambda"], t["best"]["temperature"]
    res["tuned"] = t["best"]
    LOG.info("tuned on held-out: lambda=%s T=%s ppl %.3f (LM %.3f)", lam, temp, t["best"]["ppl"], t["ppl_lm"])

    def ppl(lm_lp, knn):
        return perplexity(mix_where_searched(lm_lp, knn, lam))

    # ---- pointers on all of test (and held-out, to show the choice is not test-fitted)
    rows = []
    for sp in ("heldout", "test"):
        d, i = nb[sp]
        full = knn_target_logprobs(np.asarray(d), vals[np.asarray(i)], q[sp]["targets"], temp)
        base = ppl(q[sp]["lm"], full)
        rows.append({"split": sp, "method": "every token", "setting": "-", "search_rate": 1.0, "ppl": base,
                     "ppl_lm": perplexity(q[sp]["lm"])})
        for ptr in pointer_settings(args.thresholds):
            t0 = time.perf_counter()
            knn, searched = replay(q[sp], vals, ds, d, i, s.exact, args.k, temp, ptr)
            rows.append({"split": sp, "method": method(ptr), "setting": describe(ptr),
                         "search_rate": float(searched.mean()), "ppl": ppl(q[sp]["lm"], knn),
                         "seconds": round(time.perf_counter() - t0, 1)})
            LOG.info("%s pointers %s: %.3f searched, ppl %.3f (every token %.3f)", sp, describe(ptr), searched.mean(),
                     rows[-1]["ppl"], base)

    # ---- adaptive retrieval (and pointers, for the same positions) on the first test positions
    conf = {sp: confidence_of(args, sp, args.adaptive_tokens) for sp in ("heldout", "test")}
    for sp, c in conf.items():
        m = min(len(c["lm"]), len(q[sp]["lm"]))
        c.update({key: c[key][:m] for key in ("max_lp", "entropy", "lm")})
        gap = float(np.abs(c["lm"] - q[sp]["lm"][:m]).max())
        assert gap < 5e-2, f"{sp}: the confidence pass does not line up with the query cache ({gap})"
    m = len(conf["test"]["lm"])
    d, i = nb["test"]
    lm_sub = q["test"]["lm"][:m]
    full = knn_target_logprobs(np.asarray(d[:m]), vals[np.asarray(i[:m])], q["test"]["targets"][:m], temp)
    base = ppl(lm_sub, full)
    sub = [{"split": f"test[:{m}]", "method": "every token", "setting": "-", "search_rate": 1.0, "ppl": base,
            "ppl_lm": perplexity(lm_sub)}]
    for signal, key, sign in (("max_prob", "max_lp", 1), ("entropy", "entropy", -1)):
        for rate in [float(x) for x in args.skip_rates.split(",")]:
            h = conf["heldout"][key]
            cut = float(np.quantile(h, 1 - rate)) if sign > 0 else float(np.quantile(h, rate))
            a = Adaptive(signal, float(np.exp(cut)) if signal == "max_prob" else cut)
            skip = a.skip(conf["test"]["max_lp"], conf["test"]["entropy"])
            knn = np.where(skip, np.nan, full)
            sub.append({"split": f"test[:{m}]", "method": f"adaptive ({signal})",
                        "setting": f"threshold {a.threshold:.4g}", "search_rate": float(1 - skip.mean()),
                        "ppl": ppl(lm_sub, knn)})
    for ptr in pointer_settings(args.thresholds):
        knn, searched = replay(q["test"], vals, ds, d, i, s.exact, args.k, temp, ptr, n=m)
        sub.append({"split": f"test[:{m}]", "method": method(ptr), "setting": describe(ptr),
                    "search_rate": float(searched.mean()), "ppl": ppl(lm_sub, knn)})
    res["rows"], res["subset_rows"] = rows, sub
    res["test_text"] = text_of(args, "test").name
    res["confidence_seconds"] = {sp: float(c["seconds"]) for sp, c in conf.items()}
    write(args, res, lam, temp)


def write(args, res: dict, lam: float, temp: float) -> None:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")

    def table(rows):
        base = {r["split"]: r["ppl"] for r in rows if r["method"] == "every token"}
        lines = ["| split | method | setting | searches per token | searches saved | ppl | vs every token |",
                 "|---|---|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['split']} | {r['method']} | {r['setting']} | {r['search_rate']:.3f} | "
                         f"{100 * (1 - r['search_rate']):.1f}% | {r['ppl']:.3f} | "
                         f"{100 * (r['ppl'] / base[r['split']] - 1):+.2f}% |")
        return "\n".join(lines)

    def best_at_half(rows, split):
        base = next(r["ppl"] for r in rows if r["split"] == split and r["method"] == "every token")
        ok = [r for r in rows if r["split"] == split and r["search_rate"] <= 0.5]
        b = min(ok, key=lambda r: r["ppl"], default=None)
        if b is None:
            return f"{split}: no setting saved 50% of searches"
        verdict = "met" if b["ppl"] <= base * 1.005 else "not met"
        return (f"{split}: best at >= 50% searches saved: {b['method']} {b['setting']}, "
                f"{100 * (1 - b['search_rate']):.1f}% saved, ppl {b['ppl']:.3f} vs {base:.3f} "
                f"({100 * (b['ppl'] / base - 1):+.2f}%; target within 0.5%: {verdict})")

    cmd = command_line(__file__)
    ds = res["datastore"]
    text = (f"# Fewer searches per token: RetoMaton pointers and adaptive retrieval (WikiText-2)\n\n"
            f"Command: `{cmd}`\n({PLACEHOLDERS}.)\n\n"
            f"Datastore {ds['entries']} entries (d={ds['dim']}, smollm2-135m bf16), index {ds['factory']} "
            f"nprobe {ds['nprobe']} + exact re-ranking, k={res['k']}; λ={lam}, T={temp} tuned on the held-out "
            f"articles with every token searched (held-out ppl {res['tuned']['ppl']:.3f}). A pointer step scores "
            "its candidates (successors of the last step's neighbours whose value was the target) with exact "
            "distances; it searches when fewer than the threshold remain. Adaptive thresholds are quantiles of "
            "the held-out signal (LM max probability or entropy). The replay is exact: query keys do not depend "
            "on retrieval.\n\n"
            f"Splits: heldout = the {res['tokens']['heldout']} held-out valid positions; test = "
            f"{res['tokens']['test']} positions of wiki.test.raw ({res['test_text']}).\n\n"
            f"## Pointers, all positions\n\n{table(res['rows'])}\n\n"
            f"- {best_at_half(res['rows'], 'heldout')}\n- {best_at_half(res['rows'], 'test')}\n\n"
            f"## Adaptive retrieval vs pointers on the first {res['subset_rows'][0]['split']} test positions\n\n"
            "(the LM's confidence needs a forward pass; this many positions of test got one)\n\n"
            f"{table(res['subset_rows'])}\n\n- {best_at_half(res['subset_rows'], res['subset_rows'][0]['split'])}\n")
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for rows, split in ((res["rows"], "test"), (res["subset_rows"], res["subset_rows"][0]["split"])):
        base = next(r["ppl"] for r in rows if r["split"] == split and r["method"] == "every token")
        for method in sorted({r["method"] for r in rows if r["split"] == split and r["method"] != "every token"}):
            pts = sorted((1 - r["search_rate"], 100 * (r["ppl"] / base - 1)) for r in rows
                         if r["split"] == split and r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=f"{method}, {split}")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.axvline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("searches saved (share of tokens)")
    ax.set_ylabel("perplexity vs searching every token (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    img = HERE.parent / "docs" / "img" / "searches-saved.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=120)


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
