"""Settings a datastore tunes for itself, on its own corpus, with leave-own-document-out.

`knnlm build` ends here (unless --no-tune): pieces of the datastore's own documents are
read by the LM as if they were new text, each position retrieves its neighbours with its
own document left out (`Searcher.search(..., exclude=)`: the same document within 8192
tokens, i.e. a whole article, or a neighbourhood in a long .txt stream), so the sweep sees
what unseen text of the same kind sees.  λ, T and k are swept from that one retrieval
(`knnlm.run.tune.sweep`), then λ per bucket of the nearest neighbour's distance and, where
that helps on held-out pieces, of the LM's confidence (its log max p) at the best k and T
(knnlm.core.neighbor), and recorded in meta.json; commands default to them.
The continuous cache's similarity scale θ and λ are swept together on the same positions on
top of that kNN-LM (each piece is its own document, its cache its own earlier positions, the
final hidden states kept from the same pass) and recorded as `cache_theta` and
`cache_lambda` (λ 0 when the cache does not help there, or does not help held out:
alternate pieces with θ and λ swept on the others, adapting); every command mixes the cache
by default with them when λ is above 0 (core.settings.cache_weight, cache_params).
A cache's worth grows with the document (names and phrases recur thousands of tokens apart),
which pieces of PIECE + 1 tokens cannot show: where the corpus has documents longer than
that, the cache is tuned on a second sample of pieces of up to CACHE_PIECE + 1 tokens, read
and retrieved the same way (at the tuned k), on top of the kNN-LM just tuned; where every
document fits a piece, on the first pass's positions (`cache_tuned_on` says which).  Its size
is not tuned, nor recorded (commands use the default, DEFAULT_CACHE_SIZE >= CACHE_PIECE).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from knnlm.core.batching import Plan, doc_of, make_plan
from knnlm.core.corpus import Document
from knnlm.core.index import EXCLUDE_RADIUS, Searcher
from knnlm.core.mix import Weight, best_lambda, mix_targets, mix_text
from knnlm.core.neighbor import DistanceLambda, fit_checked
from knnlm.core.scoring import cache_target_logprobs, interpolate, knn_target_logprobs, perplexity
from knnlm.core.settings import CACHE_LAMBDAS, CACHE_THETAS, DEFAULT_CACHE_SIZE, DEFAULT_CACHE_THETA
from knnlm.run.evaluate import score_plan
from knnlm.run.options import RetrievalSettings
from knnlm.run.tune import sweep

LOG = logging.getLogger(__name__)

SAMPLE_TOKENS = 16384  # positions tuned on (fewer if the datastore is smaller)
PIECE = 1024  # longest piece of a document read at once
# longest piece the cache is tuned on where documents are longer than PIECE: 4 pieces of
# SAMPLE_TOKENS, so its held-out check (alternate pieces) is still 2 against 2, and the cache
# sees 4x the range at the same number of positions (about one more tuning pass of cost)
CACHE_PIECE = 4096


def sample_pieces(docs: np.ndarray, tokens: int, seed: int = 0,
                  piece: int | None = None) -> list[tuple[int, int, int]]:
    """Random pieces (document, first token, end token) of the corpus, whole documents up to
    `piece` + 1 tokens (None: PIECE), cut into such pieces beyond, until they predict `tokens`
    targets; in corpus order.  docs: the datastore's (D, 3) table (token start, token count, first entry).

    A document of 5 tokens and one of 2050 give pieces (0, 0, 5), (1, 0, 1025), (1, 1024, 2049),
    (1, 2048, 2050): each token after the first is a target in exactly one piece.
    """
    piece = PIECE if piece is None else piece
    pieces = [(d, s, min(s + piece + 1, int(n)))
              for d, (_, n, _) in enumerate(docs) for s in range(0, int(n) - 1, piece)]
    order = np.random.default_rng(seed).permutation(len(pieces))
    pick, total = [], 0
    for i in order:
        if total >= tokens:
            break
        pick.append(pieces[i])
        total += pieces[i][2] - pieces[i][1] - 1
    return sorted(pick)


def piece_plan(ds, pieces: list[tuple[int, int, int]], batch_tokens: int = 4096) -> tuple[Plan, np.ndarray]:
    """The pieces as a text to read (windows as the datastore's), and each target's own
    datastore entry (n,): the entry whose value is that very token of the corpus."""
    prefix = ds.meta.get("prefix_token_id")
    seqs, own = [], []
    for d, s, e in pieces:
        start, first = int(ds.docs[d, 0]), int(ds.docs[d, 2])
        ids = np.asarray(ds.tokens[start + s : start + e], dtype=np.int64)
        if s > 0 and prefix is not None:  # a piece from inside a document starts afresh, like new text
            ids = np.concatenate([[prefix], ids])
            own.append(np.arange(first + s - 1, first + e - 1))  # entry p - 1 predicts token p
        else:
            own.append(np.arange(first + s, first + e - 1))
        seqs.append(ids)
    plan = make_plan(lambda key: seqs[int(key)], [Document("sample", i, "", str(i)) for i in range(len(seqs))],
                     int(ds.meta["window"]), int(ds.meta["stride"]), batch_tokens)
    own = np.concatenate(own)
    assert len(own) == plan.count, (len(own), plan.count)
    return plan, own


def cache_by_theta(scores, thetas=CACHE_THETAS, size: int = DEFAULT_CACHE_SIZE) -> dict[float, np.ndarray]:
    """log p_cache(target) (n,) at each θ of `thetas` from the pass's final hidden states
    (`Scores.cache_keys`), each piece its own document: one matrix product per block and θ."""
    return {float(t): cache_target_logprobs(scores.cache_keys, scores.targets, scores.plan.docs[:, 2], t, size)
            for t in thetas}


def best_cache(base: np.ndarray, caches: dict[float, np.ndarray], rows=slice(None)) -> dict:
    """The (θ, λ) of the lowest perplexity on `rows`: λ swept over CACHE_LAMBDAS at each θ
    (`caches`: θ -> log p_cache); {"theta", "lambda", "ppl", "grid": {θ: its best λ's ppl}}.
    Where no λ above 0 helps, every θ ties with the base alone: the default θ is kept."""
    best, grid = None, {}
    for theta, cache in caches.items():
        r = best_lambda(base[rows], cache[rows], CACHE_LAMBDAS)["best"]
        grid[theta] = r["ppl"]
        key = (r["ppl"], r["lambda"] == 0.0 and theta != DEFAULT_CACHE_THETA)
        if best is None or key < best[0]:
            best = (key, {"theta": theta, "lambda": r["lambda"], "ppl": r["ppl"]})
    return {**best[1], "grid": grid}


def cache_lambda(scores, best: dict, table: DistanceLambda | None,
                 caches: dict[float, np.ndarray] | None = None) -> dict:
    """The continuous cache's θ and λ on top of the tuned kNN-LM (λ by distance when there
    is a table) on the tuning positions: {"cache_lambda", "cache_theta", ...};
    `caches` θ -> log p_cache(target) (None: `cache_by_theta` over CACHE_THETAS).
    Kept only where it helps held out: on alternate pieces, the cache with the θ and λ swept
    on the others, adapting as every command mixes it (knnlm.core.mix), must beat the kNN-LM
    alone (`cache_lambda_heldout_ppl`); else λ 0, no cache."""
    k, t = best["k"], best["temperature"]
    knn = knn_target_logprobs(scores.dists[:, :k], scores.vals[:, :k], scores.targets, t)
    base = (mix_targets(scores.lm, knn[:, None], table(scores.dists[:, 0], scores.lm_max)[:, None]) if table is not None
            else interpolate(scores.lm, knn, best["lambda"]))
    caches = caches if caches is not None else cache_by_theta(scores)
    res = best_cache(base, caches)
    out = {"cache_lambda": res["lambda"], "cache_theta": res["theta"], "ppl_knnlm_cache": res["ppl"],
           "ppl_knnlm_cache_by_theta": {str(th): p for th, p in res["grid"].items()}}
    piece = doc_of(scores.plan.docs, np.arange(len(base)))
    fold = piece % 2
    if out["cache_lambda"] > 0 and len(np.unique(fold)) == 2:
        held = np.empty(len(base))
        for f in (0, 1):  # θ and λ swept on one half of the pieces, the cache adapting from them on the other
            pick = best_cache(base, caches, fold == f)
            rows = fold != f
            held[rows] = mix_text(base[rows], caches[pick["theta"]][rows][:, None],
                                  [Weight(pick["lambda"], adapt=True)])[0]
        check = {"without": perplexity(base), "with": perplexity(held)}
        out["cache_lambda_heldout_ppl"] = check
        if not check["with"] < check["without"]:
            out["cache_lambda"] = 0.0
    return out


def distance_table(scores, best: dict) -> tuple[DistanceLambda | None, float | None, dict]:
    """λ per bucket of the nearest neighbour's distance and, where that helps held out, of the
    LM's log max p (knnlm.core.neighbor.fit_checked), fitted on the same leave-own-document-out
    positions at the best k and T; its perplexity there and the held-out check; (None, None,
    {}) when there are too few positions for more than one bucket."""
    k, t = best["k"], best["temperature"]
    knn = knn_target_logprobs(scores.dists[:, :k], scores.vals[:, :k], scores.targets, t)  # as `sweep` scores
    piece = doc_of(scores.plan.docs, np.arange(len(scores.lm)))  # (n,) each one's piece
    table, check = fit_checked(scores.lm, knn, scores.dists[:, 0], best["lambda"], scores.lm_max, piece)
    if len(table.lams) < 2:
        return None, None, {}
    return table, perplexity(mix_targets(scores.lm, knn[:, None], table(scores.dists[:, 0], scores.lm_max)[:, None])), \
        check


def self_tune(lm, ds, searcher: Searcher | None = None, sample_tokens: int = SAMPLE_TOKENS, k: int = 1024,
              batch_tokens: int = 4096, seed: int = 0, progress: bool = True, record: bool = True) -> dict:
    """Tune λ, T and k on the datastore's own corpus with leave-own-document-out retrieval;
    returns the settings (and, with `record`, writes them into the datastore's meta.json)."""
    t0 = time.perf_counter()
    searcher = searcher or Searcher(ds)
    k = min(k, ds.count)
    gone = set(np.asarray(getattr(ds, "removed_documents", ())).tolist())

    def read(piece: int, k: int):  # a sample of pieces, read with leave-own-document-out retrieval
        pieces = [p for p in sample_pieces(ds.docs, sample_tokens, seed, piece) if p[0] not in gone]
        plan, own = piece_plan(ds, pieces, batch_tokens)  # removed documents are not read either
        return len(pieces), score_plan(lm, plan, searcher, retrieval=RetrievalSettings(k=k), keep_neighbors=True,
                                       exclude=own, keep_cache_keys=True, progress=progress)

    count, scores = read(PIECE, k)
    plan = scores.plan
    res = sweep(scores.lm, scores.dists, scores.vals, scores.targets)
    best = res["best"]
    table, by_distance, check = distance_table(scores, best)
    settings = {
        "k": int(best["k"]), "lambda": float(best["lambda"]), "temperature": float(best["temperature"]),
        "how": "leave-own-document-out on the datastore's corpus",
        "tokens": int(plan.count), "pieces": count, "exclude_radius": EXCLUDE_RADIUS, "seed": seed,
        "index": searcher.settings(), "ppl_lm": res["ppl_lm"], "ppl_knnlm": float(best["ppl"]),
        "seconds": round(time.perf_counter() - t0, 1), "tuned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if table is not None:
        settings.update(lambda_by_distance=table.as_dict(), ppl_knnlm_by_distance=by_distance)
        if check:
            settings["lambda_table_heldout_ppl"] = check
    lengths = [int(n) for d, (_, n, _) in enumerate(ds.docs) if d not in gone]
    cache_piece, cache_count, cache_scores = PIECE, count, scores
    if max(lengths, default=0) > PIECE + 1:  # long documents: the cache is tuned on long pieces of them
        cache_piece = CACHE_PIECE
        cache_count, cache_scores = read(CACHE_PIECE, int(best["k"]))
    settings.update(cache_lambda(cache_scores, best, table))
    settings["cache_tuned_on"] = {"positions": int(cache_scores.plan.count), "pieces": cache_count,
                                  "piece_tokens": cache_piece + 1}
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    LOG.info("tuned on %d positions of %s: k=%d lambda=%.2f T=%g (ppl %.3f -> %.3f)", plan.count, ds.path,
             settings["k"], settings["lambda"], settings["temperature"], res["ppl_lm"], best["ppl"])
    if record:
        ds.record_settings(settings)
    return settings
