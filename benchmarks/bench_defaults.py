"""Do the defaults help?  The settings a datastore tunes for itself (leave-own-document-out on
its own corpus, at build time) against the LM alone, the paper's defaults and the optimum
tuned on the test text itself (an oracle no user has), on three cases:

1. WikiText-2: the WikiText-2 benchmark's datastore (wiki.valid.raw minus held-out articles,
   IVF-PQ + re-ranking), tested on all of wiki.test.raw;
2. the demo's data: each demo datastore (Spanish and English Wikipedia leads) on its held-out
   articles;
3. a domain that does not match: the demo's English-leads datastore tested on WikiText-2 test.

    python benchmarks/bench_defaults.py --wikitext-datastore benchmarks/cache/wikitext2/ds-bfloat16 \
        --demo-dir knnlm-demo

Needs: the WikiText-2 datastore (`python benchmarks/bench_wikitext.py --phases quality` builds it)
and the demo's datastores (`knnlm demo` builds them); `wiki.test.raw` (sha256 173c87a5...) in
--data.  The test set's query keys and LM log-probs are cached beside the WikiText-2 datastore
(queries-test.npz), so a second run only searches.  Writes benchmarks/results/defaults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from common import (add_data_arg, cache_logprobs, check_wikitext, command_line, data_note, default_logprobs,
                    query_cache, retrieve, run_main, setup_logging, write_results)

from knnlm.core.adapt import mix_text
from knnlm.core.mix import Weight
from knnlm.core.mix import mix_text as mix_memories
from knnlm.core.neighbor import DistanceLambda
from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher, list_indexes
from knnlm.core.model import LM
from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
from knnlm.core.settings import PAPER
from knnlm.errors import KnnlmError
from knnlm.run.selftune import self_tune
from knnlm.run.tune import sweep

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")


def compare(q: dict, searcher: Searcher, settings: dict, k_max: int = 1024) -> dict:
    """Perplexities on the cached queries: LM, the datastore's own settings (the default and
    the default before the λ table), the paper's, the test optimum."""
    k_max = min(k_max, searcher.ds.count)
    dists, vals, search_s = retrieve(searcher, q["keys"], k_max)
    lm_lp, t = q["lm"].astype(np.float64), q["targets"]

    def ppl(k, lam, temp):
        return perplexity(interpolate(lm_lp, knn_target_logprobs(dists[:, :k], vals[:, :k], t, temp), lam))

    oracle = sweep(lm_lp, dists, vals, t)["best"]
    k_own = min(int(settings["k"]), k_max)
    own_knn = knn_target_logprobs(dists[:, :k_own], vals[:, :k_own], t, settings["temperature"])
    before, lam_end = mix_text(lm_lp, own_knn, settings["lambda"], adapt=True)  # one adaptive λ from λ0
    knn_default, _ = default_logprobs(lm_lp, dists, vals, t, settings, q["lm_max"])  # the datastore alone
    ends: list = []
    c_lp, theta, size = cache_logprobs(q, settings) if (settings.get("cache_lambda") or 0) > 0 else (None, 0, 0)
    default, _ = default_logprobs(lm_lp, dists, vals, t, settings, q["lm_max"], c_lp, ends)  # as `knnlm eval`
    cache = {}
    if len(ends) > 1:  # the continuous cache is in the default: its λ and where it ended
        cache = {"cache_lambda": settings["cache_lambda"], "cache_lambda_adapted": ends[1],
                 "cache_theta": theta, "cache_size": size}
    table = DistanceLambda.from_dict(settings.get("lambda_by_distance"))
    fixed = {}
    if table is not None:  # the table's λ at each position, not adapting
        base = table(dists[:, 0], q["lm_max"])[:, None]
        fixed = {"ppl_table_fixed": perplexity(mix_memories(lm_lp, own_knn[:, None], [Weight(settings["lambda"])],
                                                            base)[0]), "lambda_by_distance": table.as_dict()}
    return {"tokens": int(len(t)), "ppl_lm": perplexity(lm_lp), "ppl_default": perplexity(default), **fixed,
            "ppl_default_knn": perplexity(knn_default), **cache,
            "ppl_own": perplexity(before), "lambda_adapted": lam_end,
            "ppl_own_fixed": ppl(k_own, settings["lambda"], settings["temperature"]),
            "own": {"k": k_own, "lambda": settings["lambda"], "temperature": settings["temperature"]},
            "ppl_paper": ppl(k_max, PAPER["lambda"], PAPER["temperature"]),
            "ppl_oracle": oracle["ppl"], "oracle": {f: oracle[f] for f in ("k", "lambda", "temperature")},
            "search_seconds": round(search_s, 1), "index": searcher.settings()}


_TUNED: dict = {}  # datastore path -> the settings tuned in this run (the English leads serve two cases)


def own_settings(lm, ds: Datastore, searcher: Searcher, tokens: int, earlier: dict | None = None) -> dict:
    """The datastore's recorded settings; tuned now (not recorded: the datastore is read-only
    here), as `knnlm build` tunes, when they were tuned before its λ table was checked
    against the LM's confidence, its cache's λ was, or its cache's θ was (no
    `lambda_table_heldout_ppl`, `cache_lambda` or `ppl_knnlm_cache_by_theta`).  `earlier`:
    the settings an earlier run tuned for this datastore the same way (--settings-from),
    used instead of tuning again."""
    s = ds.settings
    current = ("lambda_table_heldout_ppl", "cache_lambda", "ppl_knnlm_cache_by_theta")  # the cache's θ tuned too
    if s and all(f in s for f in current):
        return s
    if earlier is not None and all(f in earlier for f in current):
        return earlier
    if str(ds.path) not in _TUNED:
        _TUNED[str(ds.path)] = self_tune(lm, ds, searcher, sample_tokens=tokens, record=False)
    return _TUNED[str(ds.path)]


def run(args) -> dict:
    data = check_wikitext(args.data, ["wiki.test.raw"]) / "wiki.test.raw"  # present, right sha256
    if args.test_text:  # a part of it: its first whole articles
        part = Path(args.test_text)
        if not part.exists() or not data.read_text(encoding="utf-8").startswith(part.read_text(encoding="utf-8")):
            raise KnnlmError(f"--test-text {part} must be a beginning of {data}")
        data = part
    wt_path, demo = Path(args.wikitext_datastore), Path(args.demo_dir)
    cases = set(args.cases.split(","))
    qdir = Path(args.query_cache) if args.query_cache else None

    def qpath(default: Path) -> Path:  # query caches beside the data, or in --query-cache
        return default if qdir is None else qdir / f"{default.parent.name}-{default.name}"

    if qdir is not None:
        qdir.mkdir(parents=True, exist_ok=True)
    if not (wt_path / "meta.json").exists():
        raise KnnlmError(f"no datastore at {wt_path}: run `python benchmarks/bench_wikitext.py --phases quality` first")
    demo_stores = {lang: sorted((demo / lang).glob("datastore-*")) for lang in ("es-es", "en-us")}
    if not all(demo_stores.values()):
        raise KnnlmError(f"no demo datastores in {demo}: run `knnlm demo --workdir {demo}` first")
    lm = LM.load(args.model, dtype=args.dtype, device="cpu")
    res = {"model": args.model, "dtype": args.dtype, "tune_tokens": args.tune_tokens}
    earlier = {}
    if args.settings_from:  # each case's settings as an earlier run tuned them
        old = json.loads(Path(args.settings_from).read_text())
        earlier = {case: old[case]["settings"] for case in ("wikitext2", "es-es", "en-us") if case in old}
        res["settings_from"] = str(args.settings_from)

    res["wikitext2_test"] = {"file": str(data), "sha256": file_sha256(data)}
    queries = None
    if cases & {"wikitext2", "mismatch"}:
        queries = query_cache(lambda: lm, data, qpath(wt_path.parent / f"queries-{data.stem}.npz"), confidence=True,
                              cache=True)
    if "wikitext2" in cases:
        wt = Datastore(wt_path)
        wt_searcher = Searcher(wt, args.index if args.index in list_indexes(wt) else None)
        t0 = time.perf_counter()
        s = own_settings(lm, wt, wt_searcher, args.tune_tokens, earlier.get("wikitext2"))
        res["wikitext2"] = {"datastore": str(wt_path), "entries": wt.count, "settings": s,
                            "tune_seconds": round(time.perf_counter() - t0, 1), **compare(queries, wt_searcher, s)}
        LOG.info("wikitext2: %s", res["wikitext2"])

    for lang, label in (("es-es", "demo: Spanish leads"), ("en-us", "demo: English leads")):
        if lang not in cases:
            continue
        ds = Datastore(demo_stores[lang][-1])
        searcher = Searcher(ds)
        test = demo / lang / "corpus" / "test.jsonl"
        q = query_cache(lambda: lm, test, qpath(demo / lang / "queries-test.npz"), confidence=True, cache=True)
        s = own_settings(lm, ds, searcher, args.tune_tokens, earlier.get(lang))
        res[lang] = {"case": label, "datastore": str(ds.path), "entries": ds.count, "settings": s,
                     **compare(q, searcher, s)}
        LOG.info("%s: %s", lang, res[lang])
    if "mismatch" in cases:
        ds = Datastore(demo_stores["en-us"][-1])
        searcher = Searcher(ds)
        s = own_settings(lm, ds, searcher, args.tune_tokens, earlier.get("en-us"))
        sub = {f: v[: args.mismatch_tokens] if np.ndim(v) else v for f, v in queries.items() if f != "doc_first"}
        sub["doc_first"] = queries["doc_first"][queries["doc_first"] < len(sub["targets"])]
        res["mismatch"] = {"case": "demo English-leads datastore on WikiText-2 test", "datastore": str(ds.path),
                           "entries": ds.count, "settings": s, **compare(sub, searcher, s)}
        LOG.info("mismatch: %s", res["mismatch"])
    return res


def render(res: dict, command: str) -> str:
    names = {"wikitext2": f"WikiText-2 datastore → {Path(res['wikitext2_test']['file']).name}",
             "es-es": "Spanish leads → held-out leads", "en-us": "English leads → held-out leads",
             "mismatch": "English leads → WikiText-2 test (mismatch)"}
    rows = [(label, res[key]) for key, label in names.items() if key in res]
    out = ["# Do the defaults help?", "",
           "Each datastore's own settings were tuned on its own corpus with leave-own-document-out retrieval",
           "(what `knnlm build` records and every command defaults to): k, λ0 and T, and a table of λ per",
           "bucket of the nearest neighbour's distance (8 buckets at the tuning distances' quantiles) and, within",
           "each, of the LM's confidence, its log max p at the position (4 buckets; knnlm.core.neighbor), the",
           "confidence kept only where it lowered the perplexity of alternate tuning pieces held out (column",
           "\"table\": distance × confidence, or distance alone).",
           "**The default** reads each position's base λ from that table and adapts it to the text as it is read",
           "(knnlm.core.mix: a Bayesian mixture of {0, λ_t, ~2λ_t} whose prior mean is λ_t, so it can lose at",
           "most log(1/w0) ≈ 1.4 nats over a whole text to the LM alone), and where the datastore tuned a λ above 0",
           "for the continuous cache (the document's own earlier positions, Grave et al. 2017) on the same tuning",
           "positions, swept with its similarity scale θ (0.005 to 0.1), one that also helped held out (θ and λ swept",
           "on alternate pieces, the cache adapting on the others), mixes the cache after it with that θ and λ,",
           "adapting too (column \"cache\": its λ, where it ended, its θ, and the default without it).",
           "\"before\" is the default before the",
           "table: one adaptive λ from λ0; \"table, fixed\" the table's λ without adapting; \"fixed λ0\" the tuned",
           "λ0 throughout.  The oracle is the best fixed setting on the test text itself (no user has it).",
           f"Model: {res['model']} ({res['dtype']}), 2 CPU cores.", "",
           "Commands (each under the shared CPU lock; DATASTORE: the WikiText-2 datastore, DEMO: `knnlm demo`'s "
           "--workdir, TEXT: the first whole articles of wiki.test.raw, its first 101,501 characters, CACHE: a "
           "folder for the cached test queries, DATA: the folder holding wiki.test.raw, OUT: where the results go):", "", "    " + command, "", data_note(["wiki.test.raw"]) + "  Folder: `--data` (default "
           "`../shared/data`).", "",
           "| case | entries | test tokens | LM | own settings (k, λ0, T) | **default** (λ by distance × LM "
           "confidence, adaptive, + cache) | vs LM | vs before | cache: λ (end); without it "
           "| before (adaptive λ0: end) "
           "| table (held out: distance alone vs × confidence) | table, fixed | own, fixed λ0 "
           "| paper's (1024, 0.25, 1) | oracle (k, λ, T) | kNN-LM, oracle |",
           "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|---:|"]
    for name, r in rows:
        o, b = r["own"], r["oracle"]
        d = r["ppl_default"]
        fixed_d = f"{r['ppl_table_fixed']:.3f}" if "ppl_table_fixed" in r else "–"
        t = r.get("lambda_by_distance")
        kind = ("–" if t is None else f"{len(t['lambdas'])} × {len(t['lambdas'][0])}" if "confidence_edges" in t
                else f"{len(t['lambdas'])}")
        cache = (f"{r['cache_lambda']:.2f} ({r['cache_lambda_adapted']:.3f}), θ {r['cache_theta']:g}; "
                 f"{r['ppl_default_knn']:.3f}"
                 if "cache_lambda" in r else f"{r['settings'].get('cache_lambda', 0):.2f}: none")
        check = r["settings"].get("lambda_table_heldout_ppl")
        if check:
            kind += f" (held out: {check['distance']:.3f} vs {check['distance_and_confidence']:.3f})"
        out.append(f"| {name} | {r['entries']} | {r['tokens']} | {r['ppl_lm']:.3f} | {o['k']}, {o['lambda']:.2f}, "
                   f"{o['temperature']:g} | **{d:.3f}** | {100 * (d / r['ppl_lm'] - 1):+.2f}% | "
                   f"{100 * (d / r['ppl_own'] - 1):+.2f}% | {cache} | {r['ppl_own']:.3f} (λ {r['lambda_adapted']:.3f}) | "
                   f"{kind} | {fixed_d} | {r['ppl_own_fixed']:.3f} ({100 * (r['ppl_own_fixed'] / r['ppl_lm'] - 1):+.2f}%) | "
                   f"{r['ppl_paper']:.3f} ({100 * (r['ppl_paper'] / r['ppl_lm'] - 1):+.1f}%) | "
                   f"{b['k']}, {b['lambda']:.2f}, {b['temperature']:g} | {r['ppl_oracle']:.3f} |")
    out += ["", "The WikiText-2 datastore is the one `python benchmarks/bench_wikitext.py --phases quality` builds; the "
            "demo datastores are `knnlm demo --workdir DIR`'s; `--test-text` tests on the first whole articles of "
            "wiki.test.raw (checked to be its beginning); the mismatch case uses the first --mismatch-tokens of "
            "those positions.  A datastore whose settings were tuned before the λ table was checked against the "
            "LM's confidence and the cache's θ and λ held out is tuned again here (not recorded: the datastore is only read), as `knnlm build` "
            "tunes it now, unless --settings-from gives the settings an earlier run tuned for it that way."]
    if "wikitext2" in res and res["wikitext2"].get("tune_seconds"):
        out += ["", f"Self-tuning the WikiText-2 datastore ({res['wikitext2']['settings'].get('tokens')} positions) "
                f"took {res['wikitext2']['tune_seconds']} s here."]
    if res.get("settings_from"):
        out += ["", f"A run with --settings-from took each datastore's settings as an earlier run tuned them "
                f"({Path(res['settings_from']).name}), not tuned again."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wikitext-datastore", default=str(HERE / "cache" / "wikitext2" / "ds-bfloat16"))
    ap.add_argument("--index", default="ivf2048-pq64", help="index of the WikiText-2 datastore (if it has it)")
    ap.add_argument("--demo-dir", default="knnlm-demo", help="the demo's --workdir")
    add_data_arg(ap)
    ap.add_argument("--test-text", default=None,
                    help="the first whole articles of wiki.test.raw as a file, to test on less (default: all of it)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tune-tokens", type=int, default=16384, help="as `knnlm build --tune-tokens`")
    ap.add_argument("--mismatch-tokens", type=int, default=60000, help="WikiText-2 test positions for case 3")
    ap.add_argument("--cases", default="wikitext2,es-es,en-us,mismatch",
                    help="comma-separated cases to run (of wikitext2, es-es, en-us, mismatch)")
    ap.add_argument("--settings-from", default=None, metavar="JSON",
                    help="an earlier run's results: each datastore's settings as it tuned them there, instead of "
                         "tuning again (a datastore's own recorded settings, when current, come first)")
    ap.add_argument("--query-cache", default=None,
                    help="folder for the cached test queries (default: beside each test text's datastore)")
    ap.add_argument("--out", default=str(HERE / "results" / "defaults"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="write one page from the results of several runs (each its cases), running nothing")
    args = ap.parse_args()
    setup_logging("bench", fmt="%(name)s: %(message)s")
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        res = {k: v for p in parts for k, v in p.items()}
        res["commands"] = [p["command"] for p in parts]
        write_results(res, args.out, render, "\n    ".join(res["commands"]))
        return 0
    res = run(args)
    write_results(res, args.out, render, command_line("bench_defaults.py", {
        "DATASTORE": args.wikitext_datastore, "DEMO": args.demo_dir, "TEXT": args.test_text, "CACHE": args.query_cache,
        "OUT": args.out, "DATA": args.data}))
    return 0


if __name__ == "__main__":
    run_main(main)
