"""Does the continuous cache's default help?  `--cache-lambda auto` mixes the cache (Grave et
al. 2017) on top of the kNN-LM with the λ the datastore tuned for it on its own corpus
(knnlm.run.selftune: swept on the tuning positions, recorded as settings.cache_lambda, 0
when the cache does not help there), adapting to the text as it is read (knnlm.core.mix).
Compared on each test text with the kNN-LM alone (the default), the same λ fixed, the old
way (a λ given by hand, e.g. 0.05, fixed) and the best fixed λ on the test text itself (an
oracle no user has).  One pass per case (the LM, the search and the cache keys together):

    python benchmarks/bench_cache.py --case wikitext2 --datastore DS --test-text TEXT
    python benchmarks/bench_cache.py --case en-us --datastore knnlm-demo/en-us/datastore-300 \\
        --test-text knnlm-demo/en-us/corpus/test.jsonl

A datastore tuned before the cache's λ was recorded is tuned again here (not recorded: the
datastore is only read).  Writes --out (.json and .md).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from common import command_line, run_main, setup_logging, write_results

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")


def run(a) -> dict:
    from knnlm.core.batching import plan_files
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.core.mix import Weight, best_lambda, mix_text
    from knnlm.core.model import LM
    from knnlm.core.scoring import perplexity
    from knnlm.core.settings import CACHE_LAMBDAS, DEFAULT_CACHE_LAMBDA, cache_weight, resolve
    from knnlm.run.evaluate import score_plan
    from knnlm.run.options import CacheSettings, RetrievalSettings
    from knnlm.run.selftune import self_tune

    lm = LM.load(a.model, dtype="bfloat16", device="cpu")
    ds = Datastore(a.datastore)
    lm.key_point = ds.key_point
    searcher = Searcher(ds)
    meta, t0 = ds.meta, time.perf_counter()
    if "cache_lambda" not in (ds.settings or {}):
        meta = {**ds.meta, "settings": self_tune(lm, ds, searcher, record=False, progress=False)}
    tune_s = time.perf_counter() - t0
    r = resolve(meta, ds.count)
    plan = plan_files(lm, [a.test_text], 1024, 512, 4096)
    t0 = time.perf_counter()
    s = score_plan(lm, plan, searcher, retrieval=RetrievalSettings(k=r.k, temperature=r.temperature),
                   cache=CacheSettings(), progress=False)
    score_s = time.perf_counter() - t0
    knn_w = Weight(r.lam, r.adapt)
    n = len(s.lm)

    def mixed(cache_w: Weight | None) -> tuple[float, list]:
        mems, ws, base = [s.knn], [knn_w], [r.by_distance(s.nearest, s.lm_max) if r.by_distance else np.full(n, r.lam)]
        if cache_w is not None:
            mems, ws, base = mems + [s.cache], ws + [cache_w], base + [np.full(n, cache_w.lam)]
        lp, _, lams = mix_text(s.lm, np.stack(mems, axis=1), ws, np.stack(base, axis=1))
        return perplexity(lp), [round(float(x), 4) for x in lams]

    auto, source = cache_weight(meta, "auto")
    knnlm, _ = mixed(None)
    ppl_auto, lams_auto = mixed(auto)
    # the oracle: the best fixed cache λ on the test text, on top of the default kNN-LM mixture
    knn_lp = mix_text(s.lm, s.knn[:, None], [knn_w], (r.by_distance(s.nearest, s.lm_max) if r.by_distance
                                                       else np.full(n, r.lam))[:, None])[0]
    oracle = best_lambda(knn_lp, s.cache, CACHE_LAMBDAS)["best"]
    st = meta["settings"]
    return {"case": a.case, "datastore": str(ds.path), "entries": ds.count, "test": str(a.test_text),
            "tokens": int(n), "ppl_lm": perplexity(s.lm), "ppl_knnlm": knnlm,
            "cache_lambda": auto.lam, "cache_lambda_source": source,
            "tuned_on": {f: st.get(f) for f in ("tokens", "ppl_knnlm_by_distance", "ppl_knnlm", "ppl_knnlm_cache")},
            "ppl_auto": ppl_auto, "lambdas_end": lams_auto, "ppl_auto_fixed": mixed(Weight(auto.lam))[0],
            "ppl_hand_fixed": mixed(Weight(DEFAULT_CACHE_LAMBDA))[0], "oracle": oracle,
            "seconds": {"tune": round(tune_s, 1), "score": round(score_s, 1), **{k: round(v, 1) for k, v in
                                                                               s.seconds.items()}}}


def render(r: dict, command: str) -> str:
    def pct(x, base):
        return f"{100 * (x / base - 1):+.2f}%"

    o = r["oracle"]
    return "\n".join([
        f"| {r['case']} | {r['entries']} | {r['tokens']} | {r['ppl_lm']:.3f} | {r['ppl_knnlm']:.3f} | "
        f"**{r['ppl_auto']:.3f}** (λ {r['cache_lambda']:.2f} from {r['cache_lambda_source']}) | "
        f"{pct(r['ppl_auto'], r['ppl_knnlm'])} | {r['ppl_auto_fixed']:.3f} | {r['ppl_hand_fixed']:.3f} "
        f"({pct(r['ppl_hand_fixed'], r['ppl_knnlm'])}) | {o['lambda']:.2f}: {o['ppl']:.3f} "
        f"({pct(o['ppl'], r['ppl_knnlm'])}) |", "", "    " + command, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, help="a name for the results")
    ap.add_argument("--datastore", required=True)
    ap.add_argument("--test-text", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(HERE / "results" / "cache"))
    a = ap.parse_args()
    setup_logging("bench", fmt="%(name)s: %(message)s")
    res = run(a)
    write_results(res, a.out, render, command_line("bench_cache.py", {"DATASTORE": a.datastore, "TEXT": a.test_text,
                                                                       "OUT": a.out}))
    return 0


if __name__ == "__main__":
    run_main(main)
