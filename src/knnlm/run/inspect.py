"""What the inspector page (knnlm.serve.page) shows, as /v1/score's response: every token's
log p under the LM, p_kNN and the mixture, all k neighbours' distances and which of them
predict the token (`knn`, from which the page recomputes the mixture at any λ, T or smaller
k), and the nearest few neighbours with their source text.

    data = page_score(lm, ds, scores, resolved, neighbors=8)   # scores: score_plan(..., keep_neighbors=True)

The server builds the same shape from `KNNLM.score` (one forward pass over the text); this
one comes from `score_plan`, the windows `knnlm eval` reads, so a long text is scored the way
`knnlm eval` scores it, document by document.
"""

from __future__ import annotations

import math

import numpy as np

DOCUMENTS = 100  # documents in the summary (as /v1/score)


def knn_rows(search: tuple | None, n: int, confidence=None) -> list[dict | None]:
    """Every token's k neighbours as searched (nearest first), from (distances (n, k),
    hits (n, k) bool, counts (n, k) or None) or None (no datastore: n Nones): per token
    {"distances": [...], "hits": [indices of the neighbours whose value is the token],
    "counts": [...] (a pruned datastore's merged entries only)}, or None where no search ran
    (adaptive retrieval).  A distance is written as the shortest decimal that reads back as
    its float32 (null for an empty slot): half the characters of a float64's, and
    Math.fround (or np.float32) of it is the distance the search returned, exactly.
    `confidence` (n,): the LM's log max p at each position, as "lm_max" (a λ table may read it)."""
    if search is None:
        return [None] * n
    dists, hits, counts = search
    d32 = np.asarray(dists, dtype=np.float32)
    short = np.where(np.isfinite(d32), d32, 0).astype(str).astype(np.float64).tolist()  # (n, k)
    finite = np.isfinite(d32)
    out = []
    for i in range(len(d32)):
        if not d32.shape[1] or np.isnan(d32[i, 0]):
            out.append(None)
            continue
        row = {"distances": short[i] if finite[i].all() else [x if f else None for x, f in zip(short[i], finite[i])],
               "hits": np.flatnonzero(hits[i]).tolist()}
        if counts is not None:
            row["counts"] = np.asarray(counts[i]).tolist()
        if confidence is not None and confidence[i] is not None:
            row["lm_max"] = float(np.float32(confidence[i]))
        out.append(row)
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def page_score(lm, ds, scores, resolved, neighbors: int = 8, context: int = 24, name: str | None = None) -> dict:
    """/v1/score's response (with `return_knn` and `return_neighbors`) for a pass of
    `score_plan(..., keep_neighbors=True)` at `resolved`'s k and T (knnlm.core.settings);
    the first target of every document after the first carries "new_document": true; "documents"
    is the attribution summary (knnlm.core.attribution), as /v1/score gives it."""
    from knnlm.run.explain import attribute_scores, knn_mixture, neighbor_weights

    name = name or ds.path.name
    plan, targets = scores.plan, scores.targets
    mix, _ = knn_mixture(scores, resolved.lam, resolved.adapt, resolved.by_distance)  # as eval mixes (core.mix)
    hits = (scores.vals == targets[:, None]) & (scores.ids >= 0)
    knn = knn_rows((scores.dists, hits, ds.counts_of(scores.ids)), len(targets), scores.lm_max)
    starts = set(int(x) for x in plan.docs[1:, 2])
    shown = scores.ids[:, :neighbors]
    entries = np.unique(shown[shown >= 0])
    docs, offs = ds.provenance(entries) if len(entries) else (np.zeros(0, int), np.zeros(0, int))
    source = {int(e): (int(d), int(o)) for e, d, o in zip(entries, docs, offs)}
    texts: dict[int, tuple] = {}
    tokens = []
    for i, t in enumerate(targets.tolist()):
        w = neighbor_weights(scores.dists[i], resolved.temperature)
        rows = []
        for j in range(min(neighbors, scores.ids.shape[1])):
            entry = int(scores.ids[i, j])
            if entry < 0:
                break
            if entry not in texts:
                left, value, right = ds.context(entry, before=context, after=8)
                texts[entry] = (lm.decode(left), value, lm.decode([value]), lm.decode(right))
            left, value, value_text, right = texts[entry]
            doc, off = source[entry]
            info = ds.doc_info[doc]
            rows.append({"datastore": name, "entry": entry, "document": doc, "title": info.get("title", ""),
                         "source": info.get("source", ""), "offset": off, "distance": _finite(float(scores.dists[i, j])),
                         "weight": float(w[j]), "token": value_text, "token_id": int(value), "context": left,
                         "after": right})
        tok = {"token": lm.decode([t]), "id": int(t), "logprob": _finite(float(mix[i])),
               "logprob_lm": _finite(float(scores.lm[i])), "logprob_knn": _finite(float(scores.knn[i])),
               "knn": knn[i], "neighbors": rows}
        if i in starts:
            tok["new_document"] = True
        tokens.append(tok)
    ppl = float(np.exp(-mix.mean()))
    table = {"lambda_by_distance": resolved.by_distance.as_dict()} if resolved.by_distance else {}
    return {"object": "score", "datastore": name, "lambda": resolved.lam, "lambda_mode": resolved.mode,
            "k": resolved.k, "knn_temperature": resolved.temperature, **table, "ppl": _finite(ppl),
            "ppl_lm": _finite(float(np.exp(-scores.lm.mean()))), "tokens": tokens,
            "documents": attribute_scores(ds, scores, resolved.lam, resolved.temperature, resolved.adapt,
                                          resolved.by_distance)
            .table(ds.doc_info, DOCUMENTS),
            "usage": {"prompt_tokens": len(plan.tokens), "total_tokens": len(plan.tokens)}}
