"""Pieces shared by the two Memory Decoder benchmarks (bench_memory.py on WikiText-2,
bench_memory_domain.py on the Spanish leads): the n-gram baseline, the kNN-LM tuned on a
held-out text, and the datastore of a fine-tuned LM."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def ngram_mix(vocab_size: int, fit_tuning, fit_test, plan_h, lm_h: np.ndarray, plan_t, lm_t: np.ndarray,
              orders=(2, 3, 4, 5)) -> dict:
    """The kNN-LM paper's simple-representation baseline: an interpolated Kneser-Ney n-gram LM
    of the datastore text mixed with the LM.  The order and λ are chosen on the held-out plan
    (`fit_tuning()`: the documents to count for it), then the model of `fit_test()` (the whole
    datastore text) is mixed with the LM on the test plan.  Returns the tuned settings with
    the grid, and the test log-probs mixed and alone."""
    from knnlm.core.scoring import perplexity
    from knnlm.memory.mix import mix_memory, sweep_memory
    from knnlm.memory.ngram import KneserNey

    t0 = time.perf_counter()
    grid = []
    for order in orders:
        ng_h = KneserNey(order, vocab_size).fit(fit_tuning()).target_logprobs(plan_h.tokens, plan_h.docs)
        sw = sweep_memory(lm_h, ng_h)
        grid.append({"order": order, "lambda": sw["best"]["lambda"], "ppl": sw["best"]["ppl"],
                     "alone": perplexity(ng_h)})
    best = min(grid, key=lambda g: g["ppl"])
    ng_t = KneserNey(best["order"], vocab_size).fit(fit_test()).target_logprobs(plan_t.tokens, plan_t.docs)
    return {"tuned": {**best, "grid": grid}, "test": mix_memory(lm_t, ng_t, best["lambda"]), "test_alone": ng_t,
            "seconds": round(time.perf_counter() - t0, 1)}


def tuned_knn(h, t) -> tuple[dict, np.ndarray, np.ndarray]:
    """k, λ, T of a kNN-LM tuned on held-out scores `h` (score_plan with keep_neighbors), and
    the mixed log-probs of the held-out and of the test scores `t` with them."""
    from knnlm.core.scoring import interpolate, knn_target_logprobs
    from knnlm.run.tune import sweep

    b = sweep(h.lm, h.dists, h.vals, h.targets)["best"]

    def mix(s):
        k = b["k"]
        return interpolate(s.lm, knn_target_logprobs(s.dists[:, :k], s.vals[:, :k], s.targets, b["temperature"]),
                           b["lambda"])

    return b, mix(h), mix(t)


def finetuned_store(ft, corpora: list[Path], base_datastore: Path, out: Path, index: str = "auto",
                    nprobe: int = 32) -> dict:
    """The datastore of a fine-tuned LM `ft`: the base datastore's corpus, windows and stride,
    its own keys, and an index (`index`: a FAISS factory or "auto").  Each of the two steps
    is skipped when already done (a run cut between them goes on with the index); returns the
    seconds of the steps done by this call (build_seconds, index_seconds), entries and bytes."""
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index, list_indexes

    done = {}
    if not (out / "meta.json").exists():
        t0 = time.perf_counter()
        base = Datastore(base_datastore).meta
        build_datastore(ft, corpora, out, window=int(base["window"]), stride=int(base["stride"]), progress=False)
        done["build_seconds"] = round(time.perf_counter() - t0, 1)
    if not list_indexes(Datastore(out)):
        t0 = time.perf_counter()
        build_index(Datastore(out), index, nprobe=nprobe, progress=False)
        done.update(index_seconds=round(time.perf_counter() - t0, 1), index=index)
    return {**done, "entries": Datastore(out).count, "bytes": dir_bytes(out)}
