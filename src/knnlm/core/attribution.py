"""Attribution: which documents of a datastore a text's probabilities came from, and how much.

At position i the kNN-LM gives the target y_i the probability

    p(y_i) = λ_i p_kNN(y_i) + (1 - λ_i) p_LM(y_i),   p_kNN(y_i) = Σ_j w_ij [v_ij = y_i],
    w_ij = c_ij exp(-d_ij / T) / Σ_j' c_ij' exp(-d_ij' / T)     (c: entries a merged entry stands for)

so neighbour j of position i carried λ_i w_ij of the mixture's probability mass, and
λ_i w_ij [v_ij = y_i] of it went to the target: those are its contributions, exactly
(the second, summed over j, is the kNN part of p(y_i)).  A document's share is the sum over
the neighbour slots it filled.  Pure numpy; no datastore, no model.

Example: two positions, two neighbours each (documents 3 and 5; then 5 and 5).

>>> a = attribute(docs=np.array([[3, 5], [5, 5]]), weights=np.array([[0.75, 0.25], [0.5, 0.5]]),
...               lambdas=np.array([0.5, 0.2]), matches=np.array([[True, False], [True, True]]))
>>> a.carried.tolist(), a.to_target.tolist()
([[0.375, 0.125], [0.1, 0.1]], [[0.375, 0.0], [0.1, 0.1]])
>>> [(s.document, round(s.weight, 3), round(s.target_weight, 3), s.tokens, s.target_tokens, s.neighbors)
...  for s in a.documents]
[(3, 0.375, 0.375, 1, 1, 1), (5, 0.325, 0.2, 2, 1, 3)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from knnlm.core.scoring import knn_logits


def knn_weights(dists: np.ndarray, temperature: float, counts: np.ndarray | None = None) -> np.ndarray:
    """softmax(-d / T) over each row of neighbours (m, k) float64 (a 1-d row gives (k,)); a
    neighbour standing for c entries weighs c exp(-d / T).  Empty slots (d = inf) and rows
    that were not searched (d = nan) weigh 0."""
    d = np.asarray(dists, dtype=np.float64)
    row = d.ndim == 1
    d = np.atleast_2d(d)  # (m, k)
    logits = np.where(np.isfinite(d), knn_logits(d, temperature), -np.inf)
    if counts is not None:
        logits = logits + np.log(np.atleast_2d(np.asarray(counts, dtype=np.float64)))
    top = logits.max(axis=1, keepdims=True)  # (m, 1)
    w = np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # (m, k)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    return w[0] if row else w


@dataclass
class DocumentShare:
    """One document's part in a text's probabilities, summed over the neighbour slots it filled."""

    document: int
    weight: float  # Σ λ w: probability mass of the mixture its entries carried (to any token)
    target_weight: float  # Σ λ w [value = target]: probability it added to the text's own tokens
    knn_weight: float  # Σ w: its share of the kNN distributions, in positions (1.0 = one whole position)
    tokens: int  # positions where it was among the neighbours
    target_tokens: int  # positions where one of its entries predicted the target
    neighbors: int  # neighbour slots it filled


@dataclass
class Attribution:
    """Per-neighbour contributions (n, k) and the documents' summary, largest `weight` first."""

    carried: np.ndarray  # (n, k) λ_i w_ij
    to_target: np.ndarray  # (n, k) λ_i w_ij [v_ij = y_i]
    documents: list[DocumentShare] = field(default_factory=list)

    def table(self, doc_info: Sequence[dict] | None = None, top: int | None = None) -> list[dict]:
        """The documents' summary as JSON-ready dicts (with title and source from `doc_info`,
        a datastore's per-document records, when given); the first `top` of them."""
        out = []
        for s in self.documents[:top]:
            row = asdict(s)
            if doc_info is not None:
                info = doc_info[s.document]
                row["title"], row["source"] = info.get("title", ""), info.get("source", "")
            out.append(row)
        return out


def attribute(docs: np.ndarray, weights: np.ndarray, lambdas: np.ndarray, matches: np.ndarray) -> Attribution:
    """Contributions of each neighbour and each document to a text's probabilities.

    docs (n, k) int: the document of each neighbour (-1: no neighbour in that slot);
    weights (n, k): its kNN weight w (`knn_weights`; rows sum to 1 or 0); lambdas (n,): λ at
    each position (nan, e.g. a position adaptive retrieval skipped, counts as 0); matches
    (n, k) bool: whether its value is the position's target.  See the module docstring.
    """
    docs = np.atleast_2d(np.asarray(docs, dtype=np.int64))
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    lam = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    match = np.atleast_2d(np.asarray(matches, dtype=bool))
    if not (docs.shape == w.shape == match.shape and lam.shape == docs.shape[:1]):
        raise ValueError(f"docs {docs.shape}, weights {w.shape}, matches {match.shape} must be (n, k) "
                         f"and lambdas {lam.shape} (n,)")
    valid = (docs >= 0) & np.isfinite(w)  # (n, k)
    w = np.where(valid, w, 0.0)
    carried = np.nan_to_num(lam)[:, None] * w  # (n, k)
    to_target = np.where(match, carried, 0.0)
    n, k = docs.shape
    d = docs[valid]  # (v,) one per filled slot
    if not len(d):
        return Attribution(carried, to_target, [])
    pos = np.broadcast_to(np.arange(n)[:, None], (n, k))[valid]  # (v,)
    uniq, inv = np.unique(d, return_inverse=True)  # (u,), (v,)
    sums = [np.bincount(inv, weights=x[valid], minlength=len(uniq)) for x in (carried, to_target, w)]
    slots = np.bincount(inv, minlength=len(uniq))

    def positions(mask: np.ndarray) -> np.ndarray:
        """How many distinct positions each document fills a slot of, among the masked slots."""
        pairs = np.unique(np.stack([inv[mask], pos[mask]], axis=1), axis=0)  # (p, 2) distinct (doc, position)
        return np.bincount(pairs[:, 0], minlength=len(uniq)) if len(pairs) else np.zeros(len(uniq), np.int64)

    tokens = positions(np.ones(len(d), dtype=bool))
    target_tokens = positions(match[valid] & (w[valid] > 0))
    order = np.lexsort((uniq, -sums[0]))  # largest weight first, then document id
    shares = [DocumentShare(int(uniq[u]), float(sums[0][u]), float(sums[1][u]), float(sums[2][u]),
                            int(tokens[u]), int(target_tokens[u]), int(slots[u])) for u in order]
    return Attribution(carried, to_target, shares)


def attribute_neighbors(ds, dists: np.ndarray, ids: np.ndarray, targets: np.ndarray, lambdas: np.ndarray,
                        temperature: float) -> Attribution:
    """`attribute` for a search's results: dists, ids (n, k) as a searcher returns them (-1:
    none), the text's targets (n,) and λ (n,); the documents and values are read from `ds`
    (any datastore: `document_of`, `vals`, `counts_of`)."""
    ids = np.asarray(ids, dtype=np.int64)
    real = ids >= 0  # (n, k)
    safe = np.maximum(ids, 0)
    docs = np.where(real, np.asarray(ds.document_of(safe.reshape(-1))).reshape(ids.shape), -1)
    match = real & (np.asarray(ds.vals[safe]) == np.asarray(targets)[:, None])
    return attribute(docs, knn_weights(dists, temperature, ds.counts_of(ids)), lambdas, match)
