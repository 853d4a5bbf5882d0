"""λ that reads its neighbours: the datastore's weight as a function of how near the nearest
neighbour is (Drozdov et al. 2022, "You can't pick your neighbors, or can you?"), and of how
sure the LM itself is.

A position whose nearest key is almost its own context (a near-copy of text the datastore
holds) should trust p_kNN more than one whose nearest key is far; and where the LM is
already sure of the next token a memory has less to add than where it hesitates.  The table
cuts the nearest neighbour's squared L2 distance into B buckets at the quantiles of the
distances seen when tuning (leave-own-document-out on the datastore's own corpus,
knnlm.run.selftune) and, when it reads the LM's confidence too, each of those into C buckets
of the LM's log max p (the log-probability of its most likely next token, known before the
token is: nothing is peeked at), and holds the best fixed λ of each cell:

    λ(d)    = lams[b]        where edges[b-1] <= d < edges[b]   (edges: B-1 ascending thresholds)
    λ(d, c) = lams[b][j]     and confidence_edges[j-1] <= c < confidence_edges[j]

Worked example: edges (10, 20), lams (0.6, 0.3, 0.05): d = 4 -> 0.6, d = 15 -> 0.3,
d = 20 -> 0.05.  With confidence_edges (-1.0,) and lams ((0.6, 0.4), (0.3, 0.2), (0.05, 0.0)):
d = 4 where the LM's top token has p = 0.2 (c = log 0.2 = -1.6) -> 0.6, where it has
p = 0.9 (c = -0.1) -> 0.4.  Self-tuning keeps the confidence cut only where it helps out of
sample on the tuning positions (`fit_checked`: alternate pieces of text held out, both ways);
else the table reads the distance alone.  The table gives the base λ of each position; an adaptive λ then
adapts around it (knnlm.core.mix: candidates {0, λ_t, hi(λ_t)}), so its bound against the LM
still holds.  Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from knnlm.core.mix import mix_targets
from knnlm.errors import KnnlmError

BUCKETS = 8  # of the nearest distance
CONFIDENCE_BUCKETS = 4  # of the LM's log max p, within each distance bucket
LAMBDAS = tuple(round(x, 2) for x in np.arange(0.0, 0.9501, 0.05))  # λ < 1: p_LM keeps a share
MIN_TOKENS = 64  # a cell with fewer tuning positions takes its distance bucket's λ (a bucket: the global λ)


def _ascending(e: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(e)) and not np.any(np.diff(e) <= 0))


@dataclass(frozen=True)
class DistanceLambda:
    """λ per bucket of the nearest neighbour's distance, and of the LM's log max p when
    `confidence_edges` are given (see the module doc)."""

    edges: tuple[float, ...]
    lams: tuple  # (B,) floats; with confidence_edges (B,) rows of C floats
    confidence_edges: tuple[float, ...] = ()

    def __post_init__(self):
        e, c = np.asarray(self.edges, dtype=np.float64), np.asarray(self.confidence_edges, dtype=np.float64)
        try:
            lams = np.asarray(self.lams, dtype=np.float64)
        except (TypeError, ValueError):
            raise KnnlmError(f"a distance λ table needs rows of equal length, got {self}") from None
        shape = (len(e) + 1, len(c) + 1) if len(c) else (len(e) + 1,)
        if lams.shape != shape or not _ascending(e) or not _ascending(c):
            raise KnnlmError(f"a distance λ table needs ascending edges and one λ more than edges, got {self}")
        if not np.all((lams >= 0) & (lams <= 1)):
            raise KnnlmError(f"distance λ table: every λ must be in [0, 1], got {np.asarray(self.lams).tolist()}")

    @property
    def reads_confidence(self) -> bool:
        """Whether λ depends on the LM's log max p too (then every call must give it)."""
        return len(self.confidence_edges) > 0

    def __call__(self, nearest, confidence=None) -> np.ndarray:
        """λ of each position (n,) from its nearest neighbour's distance (n,) and, for a table
        that reads it, the LM's log max p there (n,); NaN distance (no neighbour) gives 0."""
        d = np.asarray(nearest, dtype=np.float64)
        b = np.searchsorted(self.edges, np.nan_to_num(d, nan=0.0), "right")
        lams = np.asarray(self.lams, dtype=np.float64)
        if self.reads_confidence:
            if confidence is None:
                raise KnnlmError("this λ table reads the LM's confidence: give its log max p at each position")
            c = np.broadcast_to(np.asarray(confidence, dtype=np.float64), d.shape)
            out = lams[b, np.searchsorted(self.confidence_edges, np.nan_to_num(c, nan=0.0), "right")]
        else:
            out = lams[b]
        return np.where(np.isnan(d), 0.0, out)

    def as_dict(self) -> dict:
        out = {"edges": [float(x) for x in self.edges], "lambdas": np.asarray(self.lams, dtype=float).tolist()}
        if self.reads_confidence:
            out["confidence_edges"] = [float(x) for x in self.confidence_edges]
        return out

    @classmethod
    def from_dict(cls, d: dict | None) -> "DistanceLambda | None":
        """The table recorded in a datastore's settings, or None (none recorded, or unreadable)."""
        if not isinstance(d, dict):
            return None
        try:
            conf = tuple(float(x) for x in d.get("confidence_edges", ()))
            rows = d["lambdas"]
            lams = tuple(tuple(float(x) for x in r) for r in rows) if conf else tuple(float(x) for x in rows)
            return cls(tuple(float(x) for x in d["edges"]), lams, conf)
        except (KeyError, TypeError, ValueError, KnnlmError):
            return None


def _best(loss: np.ndarray, rows: np.ndarray, lams: np.ndarray, min_tokens: int, fallback: float) -> float:
    return float(lams[np.argmin(loss[rows].sum(axis=0))]) if rows.sum() >= min_tokens else float(fallback)


def fit(lm_logprobs, knn_logprobs, nearest, fallback: float, buckets: int = BUCKETS,
        lambdas=LAMBDAS, min_tokens: int = MIN_TOKENS, confidence=None,
        confidence_buckets: int = CONFIDENCE_BUCKETS) -> DistanceLambda:
    """The table that minimises the log-loss of the fixed mixture on tuning positions:
    lm, knn (n,) log-probs of their targets, nearest (n,) their nearest distances, and
    `confidence` (n,) the LM's log max p there (None: a table of the distance alone).
    Edges at the distances' quantiles; each bucket's λ the best of `lambdas` on its
    positions (the buckets are independent: a fixed mixture's loss is a sum over positions);
    a bucket of fewer than `min_tokens` positions gets `fallback` (the datastore's global λ).
    With `confidence`, each bucket is cut again at the quantiles of the confidences (over all
    positions), each cell's λ fitted the same way, a small cell taking its bucket's λ."""
    ll = np.asarray(lm_logprobs, dtype=np.float64)
    lk = np.asarray(knn_logprobs, dtype=np.float64)
    d = np.asarray(nearest, dtype=np.float64)
    ok = np.isfinite(d) & ~np.isnan(lk)
    c = None if confidence is None else np.asarray(confidence, dtype=np.float64)
    if c is not None:
        ok &= np.isfinite(c)
        c = c[ok]
    ll, lk, d = ll[ok], lk[ok], d[ok]
    if len(d) < 2 * min_tokens or buckets < 2:
        return DistanceLambda((), (float(fallback),))
    edges = np.unique(np.quantile(d, np.arange(1, buckets) / buckets))
    which = np.searchsorted(edges, d, "right")
    lams = np.asarray(lambdas, dtype=np.float64)
    with np.errstate(divide="ignore"):
        loss = -np.logaddexp(np.log(lams)[None, :] + lk[:, None], np.log1p(-lams)[None, :] + ll[:, None])  # (n, L)
    by_d = [_best(loss, which == b, lams, min_tokens, fallback) for b in range(len(edges) + 1)]
    edges_t = tuple(float(x) for x in edges)
    if c is None or confidence_buckets < 2:
        return DistanceLambda(edges_t, tuple(by_d))
    c_edges = np.unique(np.quantile(c, np.arange(1, confidence_buckets) / confidence_buckets))
    if not len(c_edges):  # one confidence everywhere: nothing to cut
        return DistanceLambda(edges_t, tuple(by_d))
    cell = np.searchsorted(c_edges, c, "right")
    rows = tuple(tuple(_best(loss, (which == b) & (cell == j), lams, min_tokens, by_d[b])
                       for j in range(len(c_edges) + 1)) for b in range(len(edges) + 1))
    return DistanceLambda(edges_t, rows, tuple(float(x) for x in c_edges))


def _heldout_ppl(ll, lk, d, c, fallback, fold, with_confidence: bool) -> float:
    """Perplexity of the fixed mixture on each fold's positions with the table fitted on the other's."""
    loss = 0.0
    for f in (0, 1):
        tr, te = fold != f, fold == f
        t = fit(ll[tr], lk[tr], d[tr], fallback, confidence=c[tr] if with_confidence else None)
        lam = t(d[te], c[te] if with_confidence else None)
        loss -= float(np.sum(mix_targets(ll[te], lk[te][:, None], lam[:, None])))
    return float(np.exp(loss / len(ll)))


def fit_checked(lm_logprobs, knn_logprobs, nearest, fallback: float, confidence, groups) -> tuple[DistanceLambda, dict]:
    """`fit` with the LM's confidence only where it helps out of sample: both tables (distance
    alone; distance and confidence) are fitted on alternate groups of the positions (`groups`
    (n,): e.g. each position's piece of text) and scored on the others, both ways; the one with
    the lower held-out perplexity is then fitted on all positions.  Returns it and the check
    ({"distance": ppl, "distance_and_confidence": ppl} held out)."""
    ll, lk = np.asarray(lm_logprobs, dtype=np.float64), np.asarray(knn_logprobs, dtype=np.float64)
    d, c = np.asarray(nearest, dtype=np.float64), np.asarray(confidence, dtype=np.float64)
    ok = np.isfinite(d) & ~np.isnan(lk) & np.isfinite(c)
    ll, lk, d, c = ll[ok], lk[ok], d[ok], c[ok]
    fold = np.asarray(groups)[ok] % 2
    if len(np.unique(fold)) < 2:  # one group: nothing held out, the distance alone
        return fit(ll, lk, d, fallback), {}
    check = {"distance": _heldout_ppl(ll, lk, d, c, fallback, fold, False),
             "distance_and_confidence": _heldout_ppl(ll, lk, d, c, fallback, fold, True)}
    use = check["distance_and_confidence"] < check["distance"]
    return fit(ll, lk, d, fallback, confidence=c if use else None), check
