"""λ that reads its neighbours: the datastore's weight as a function of how near the nearest
neighbour is (Drozdov et al. 2022, "You can't pick your neighbors, or can you?").

A position whose nearest key is almost its own context (a near-copy of text the datastore
holds) should trust p_kNN more than one whose nearest key is far.  The table cuts the
nearest neighbour's squared L2 distance into B buckets at the quantiles of the distances
seen when tuning (leave-own-document-out on the datastore's own corpus, knnlm.run.selftune)
and holds the best fixed λ of each bucket:

    λ(d) = lams[b]   where edges[b-1] <= d < edges[b]   (edges: B-1 ascending thresholds)

Worked example: edges (10, 20), lams (0.6, 0.3, 0.05): d = 4 -> 0.6, d = 15 -> 0.3,
d = 20 -> 0.05.  The table gives the base λ of each position; an adaptive λ then adapts
around it (knnlm.core.mix: candidates {0, λ(d_t), hi(λ(d_t))}), so its bound against the LM
still holds.  Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from knnlm.errors import KnnlmError

BUCKETS = 8
LAMBDAS = tuple(round(x, 2) for x in np.arange(0.0, 0.9501, 0.05))  # λ < 1: p_LM keeps a share
MIN_TOKENS = 64  # a bucket with fewer tuning positions takes the global λ


@dataclass(frozen=True)
class DistanceLambda:
    """λ per bucket of the nearest neighbour's distance (see the module doc)."""

    edges: tuple[float, ...]
    lams: tuple[float, ...]

    def __post_init__(self):
        e, lams = np.asarray(self.edges, dtype=np.float64), np.asarray(self.lams, dtype=np.float64)
        if len(lams) != len(e) + 1 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
            raise KnnlmError(f"a distance λ table needs ascending edges and one λ more than edges, got {self}")
        if not np.all((lams >= 0) & (lams <= 1)):
            raise KnnlmError(f"distance λ table: every λ must be in [0, 1], got {list(self.lams)}")

    def __call__(self, nearest) -> np.ndarray:
        """λ of each position (n,) from its nearest neighbour's distance (n,); NaN (no
        neighbour) gives 0."""
        d = np.asarray(nearest, dtype=np.float64)
        out = np.asarray(self.lams, dtype=np.float64)[np.searchsorted(self.edges, np.nan_to_num(d, nan=0.0), "right")]
        return np.where(np.isnan(d), 0.0, out)

    def as_dict(self) -> dict:
        return {"edges": [float(x) for x in self.edges], "lambdas": [float(x) for x in self.lams]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "DistanceLambda | None":
        """The table recorded in a datastore's settings, or None (none recorded, or unreadable)."""
        if not isinstance(d, dict):
            return None
        try:
            return cls(tuple(float(x) for x in d["edges"]), tuple(float(x) for x in d["lambdas"]))
        except (KeyError, TypeError, ValueError, KnnlmError):
            return None


def fit(lm_logprobs, knn_logprobs, nearest, fallback: float, buckets: int = BUCKETS,
        lambdas=LAMBDAS, min_tokens: int = MIN_TOKENS) -> DistanceLambda:
    """The table that minimises the log-loss of the fixed mixture on tuning positions:
    lm, knn (n,) log-probs of their targets, nearest (n,) their nearest distances.  Edges at
    the distances' quantiles; each bucket's λ the best of `lambdas` on its positions (the
    buckets are independent: a fixed mixture's loss is a sum over positions); a bucket of
    fewer than `min_tokens` positions gets `fallback` (the datastore's global λ)."""
    ll = np.asarray(lm_logprobs, dtype=np.float64)
    lk = np.asarray(knn_logprobs, dtype=np.float64)
    d = np.asarray(nearest, dtype=np.float64)
    ok = np.isfinite(d) & ~np.isnan(lk)
    ll, lk, d = ll[ok], lk[ok], d[ok]
    if len(d) < 2 * min_tokens or buckets < 2:
        return DistanceLambda((), (float(fallback),))
    edges = np.unique(np.quantile(d, np.arange(1, buckets) / buckets))
    which = np.searchsorted(edges, d, "right")
    lams = np.asarray(lambdas, dtype=np.float64)
    with np.errstate(divide="ignore"):
        loss = -np.logaddexp(np.log(lams)[None, :] + lk[:, None], np.log1p(-lams)[None, :] + ll[:, None])  # (n, L)
    out = []
    for b in range(len(edges) + 1):
        rows = which == b
        out.append(float(lams[np.argmin(loss[rows].sum(axis=0))]) if rows.sum() >= min_tokens else float(fallback))
    return DistanceLambda(tuple(float(x) for x in edges), tuple(out))
