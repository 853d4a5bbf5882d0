"""Do the defaults help?  The settings a datastore tunes for itself (leave-own-document-out on
its own corpus, at build time) against the LM alone, the paper's defaults and the optimum
tuned on the test text itself (an oracle no user has), on three cases (issue 11):

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
import sys
import time
from pathlib import Path

import numpy as np
from common import add_data_arg, check_wikitext, data_note, query_cache, run_main, setup_logging

from knnlm.core.adapt import mix_text
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


def compare(q: dict, searcher: Searcher, settings: dict, k_max: int = 1024, chunk: int = 8192) -> dict:
    """Perplexities on the cached queries: LM, the datastore's own settings, the paper's, the test optimum."""
    ds = searcher.ds
    k_max = min(k_max, ds.count)
    n = len(q["targets"])
    dists = np.empty((n, k_max), np.float32)
    vals = np.empty((n, k_max), np.int32)
    t0 = time.perf_counter()
    for i in range(0, n, chunk):
        d, ids = searcher.search(np.asarray(q["keys"][i : i + chunk], np.float32), k_max)
        dists[i : i + chunk], vals[i : i + chunk] = d, ds.vals[np.maximum(ids, 0)]
    search_s = time.perf_counter() - t0
    lm_lp, t = q["lm"].astype(np.float64), q["targets"]

    def ppl(k, lam, temp):
        return perplexity(interpolate(lm_lp, knn_target_logprobs(dists[:, :k], vals[:, :k], t, temp), lam))

    oracle = sweep(lm_lp, dists, vals, t)["best"]
    k_own = min(int(settings["k"]), k_max)
    own_knn = knn_target_logprobs(dists[:, :k_own], vals[:, :k_own], t, settings["temperature"])
    adaptive, lam_end = mix_text(lm_lp, own_knn, settings["lambda"], adapt=True)  # what commands do by default
    return {"tokens": int(n), "ppl_lm": perplexity(lm_lp),
            "ppl_own": perplexity(adaptive), "lambda_adapted": lam_end,
            "ppl_own_fixed": ppl(k_own, settings["lambda"], settings["temperature"]),
            "own": {"k": k_own, "lambda": settings["lambda"], "temperature": settings["temperature"]},
            "ppl_paper": ppl(k_max, PAPER["lambda"], PAPER["temperature"]),
            "ppl_oracle": oracle["ppl"], "oracle": {f: oracle[f] for f in ("k", "lambda", "temperature")},
            "search_seconds": round(search_s, 1), "index": searcher.settings()}


def own_settings(lm, ds: Datastore, searcher: Searcher, tokens: int) -> dict:
    """The datastore's recorded settings; tuned now (not recorded: the datastore is read-only
    here) when it has none, as `knnlm build` would."""
    return ds.settings or self_tune(lm, ds, searcher, sample_tokens=tokens, record=False)


def run(args) -> dict:
    data = check_wikitext(args.data, ["wiki.test.raw"]) / "wiki.test.raw"  # present, right sha256
    if args.test_text:  # a part of it: its first whole articles
        part = Path(args.test_text)
        if not part.exists() or not data.read_text(encoding="utf-8").startswith(part.read_text(encoding="utf-8")):
            raise KnnlmError(f"--test-text {part} must be a beginning of {data}")
        data = part
    wt_path, demo = Path(args.wikitext_datastore), Path(args.demo_dir)
    if not (wt_path / "meta.json").exists():
        raise KnnlmError(f"no datastore at {wt_path}: run `python benchmarks/bench_wikitext.py --phases quality` first")
    demo_stores = {lang: sorted((demo / lang).glob("datastore-*")) for lang in ("es-es", "en-us")}
    if not all(demo_stores.values()):
        raise KnnlmError(f"no demo datastores in {demo}: run `knnlm demo --workdir {demo}` first")
    lm = LM.load(args.model, dtype=args.dtype, device="cpu")
    res = {"model": args.model, "dtype": args.dtype, "tune_tokens": args.tune_tokens}

    wt = Datastore(wt_path)
    wt_searcher = Searcher(wt, args.index if args.index in list_indexes(wt) else None)
    queries = query_cache(lambda: lm, data, wt_path.parent / f"queries-{data.stem}.npz")
    res["wikitext2_test"] = {"file": str(data), "sha256": file_sha256(data)}
    t0 = time.perf_counter()
    s = own_settings(lm, wt, wt_searcher, args.tune_tokens)
    res["wikitext2"] = {"datastore": str(wt_path), "entries": wt.count, "settings": s,
                        "tune_seconds": round(time.perf_counter() - t0, 1), **compare(queries, wt_searcher, s)}
    LOG.info("wikitext2: %s", res["wikitext2"])

    for lang, label in (("es-es", "demo: Spanish leads"), ("en-us", "demo: English leads")):
        ds = Datastore(demo_stores[lang][-1])
        searcher = Searcher(ds)
        test = demo / lang / "corpus" / "test.jsonl"
        q = query_cache(lambda: lm, test, demo / lang / "queries-test.npz")
        s = own_settings(lm, ds, searcher, args.tune_tokens)
        res[lang] = {"case": label, "datastore": str(ds.path), "entries": ds.count, "settings": s,
                     **compare(q, searcher, s)}
        LOG.info("%s: %s", lang, res[lang])
    ds = Datastore(demo_stores["en-us"][-1])
    searcher = Searcher(ds)
    s = own_settings(lm, ds, searcher, args.tune_tokens)
    sub = {f: v[: args.mismatch_tokens] for f, v in queries.items() if f != "doc_first"}
    res["mismatch"] = {"case": "demo English-leads datastore on WikiText-2 test", "datastore": str(ds.path),
                       "entries": ds.count, "settings": s, **compare(sub, searcher, s)}
    LOG.info("mismatch: %s", res["mismatch"])
    return res


def render(res: dict, command: str) -> str:
    rows = [(f"WikiText-2 datastore → {Path(res['wikitext2_test']['file']).name}", res["wikitext2"]), ("Spanish leads → held-out leads", res["es-es"]),
            ("English leads → held-out leads", res["en-us"]), ("English leads → WikiText-2 test (mismatch)",
                                                               res["mismatch"])]
    out = ["# Do the defaults help? (issue 11)", "",
           "Each datastore's own settings were tuned on its own corpus with leave-own-document-out retrieval",
           "(what `knnlm build` records and every command defaults to); by default λ then adapts to the text as",
           "it is read (`--lambda-mode adaptive`, knnlm.core.adapt: a Bayesian mixture of λ ∈ {0, λ0, ~2λ0} whose",
           "prior mean is λ0, so it starts as the tuned kNN-LM and can lose at most log(1/w0) ≈ 1.4 nats over a",
           "whole text to the LM alone); \"fixed λ\" is the tuned λ0 throughout.  The oracle is the best fixed",
           "setting on the test text itself (no user has it). Model: " + f"{res['model']} ({res['dtype']}), 2 CPU cores.",
           "",
           "Command:", "", "    " + command, "", data_note(["wiki.test.raw"]) + "  Folder: `--data` (default "
           "`../shared/data`).", "",
           "| case | entries | test tokens | LM | own settings (k, λ0, T) | **kNN-LM, default** (adaptive λ: end) "
           "| vs LM | own, fixed λ0 | paper's (1024, 0.25, 1) | oracle (k, λ, T) | kNN-LM, oracle |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    for name, r in rows:
        o, b = r["own"], r["oracle"]
        out.append(f"| {name} | {r['entries']} | {r['tokens']} | {r['ppl_lm']:.3f} | {o['k']}, {o['lambda']:.2f}, "
                   f"{o['temperature']:g} | **{r['ppl_own']:.3f}** (λ {r['lambda_adapted']:.3f}) | "
                   f"{100 * (r['ppl_own'] / r['ppl_lm'] - 1):+.3f}% | "
                   f"{r['ppl_own_fixed']:.3f} ({100 * (r['ppl_own_fixed'] / r['ppl_lm'] - 1):+.2f}%) | "
                   f"{r['ppl_paper']:.3f} ({100 * (r['ppl_paper'] / r['ppl_lm'] - 1):+.1f}%) | "
                   f"{b['k']}, {b['lambda']:.2f}, {b['temperature']:g} | {r['ppl_oracle']:.3f} |")
    out += ["", "The WikiText-2 datastore is the one `python benchmarks/bench_wikitext.py --phases quality` builds; the "
            "demo datastores are `knnlm demo --workdir DIR`'s; `--test-text` tests on the first whole articles of "
            "wiki.test.raw (checked to be its beginning); the mismatch case uses the first --mismatch-tokens of "
            "those positions."]
    out += ["", f"Self-tuning the WikiText-2 datastore ({res['wikitext2']['settings'].get('tokens')} positions) took "
            f"{res['wikitext2']['tune_seconds']} s here (0 when the datastore already had settings)."]
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
    ap.add_argument("--out", default=str(HERE / "results" / "defaults"))
    args = ap.parse_args()
    setup_logging("bench", fmt="%(name)s: %(message)s")
    res = run(args)
    command = "python " + " ".join(["benchmarks/bench_defaults.py"] + sys.argv[1:])
    res["command"] = command
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(render(res, command))
    print(render(res, command))
    return 0


if __name__ == "__main__":
    run_main(main)
