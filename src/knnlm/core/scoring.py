"""kNN distributions and interpolation: pure array math, no I/O.

Neighbours arrive sorted by distance, nearest first: dists (m, k) squared L2 and
vals (m, k) the token each neighbour predicts.
"""

from __future__ import annotations

import math

import numpy as np

from knnlm.errors import KnnlmError


def check_settings(lam: float | None = None, temperature: float | None = None, k: int | None = None) -> None:
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise KnnlmError(f"lambda must be in [0, 1], got {lam}")
    if temperature is not None and not temperature > 0:
        raise KnnlmError(f"temperature must be > 0, got {temperature}")
    if k is not None and k < 1:
        raise KnnlmError(f"k must be >= 1, got {k}")


def check_cache_settings(lam: float | str | None = None, theta: float | None = None, size: int | None = None) -> None:
    """lam: a weight in [0, 1] or "auto" (the tuned one, adapting: knnlm.core.settings.cache_weight)."""
    if isinstance(lam, str) and lam != "auto":
        raise KnnlmError(f"cache lambda must be a number in [0, 1] or 'auto', got {lam!r}")
    if lam is not None and lam != "auto" and not 0.0 <= lam <= 1.0:
        raise KnnlmError(f"cache lambda must be in [0, 1], got {lam}")
    if size is not None and size < 1:
        raise KnnlmError(f"cache size must be >= 1, got {size}")
    if theta is not None and not theta >= 0:
        raise KnnlmError(f"cache theta must be >= 0, got {theta}")


def knn_logits(dists, temperature: float) -> np.ndarray:
    """-d / T per neighbour (m, k) float64, shifted so each row's nearest is 0 (the kNN
    softmax is unchanged by a shift): a tiny T gives the nearest neighbour all the weight,
    its limit, instead of overflowing every logit to -inf.  A missing neighbour (d = inf)
    stays -inf."""
    d = np.asarray(dists, dtype=np.float64)
    real = np.where(np.isnan(d), np.inf, d)  # (a row that was not searched: d = nan)
    near = real.min(axis=-1, keepdims=True) if d.shape[-1] else np.zeros(d.shape[:-1] + (1,))
    with np.errstate(over="ignore", invalid="ignore"):
        return -(d - np.where(np.isfinite(near), near, 0.0)) / temperature


def knn_target_logprobs(dists: np.ndarray, vals: np.ndarray, targets: np.ndarray, temperature: float = 1.0,
                        chunk: int = 8192, counts: np.ndarray | None = None):
    """log p_kNN(target) for each row: softmax over -d/T, summed over neighbours whose
    value is the target.  -inf where no neighbour has the target.  (m,)
    counts (m, k): how many entries each neighbour stands for (a pruned datastore merges
    near-duplicates): its weight is count * exp(-d/T)."""
    if len(dists) > chunk:  # bounded float64 temporaries: (chunk, k) at a time
        return np.concatenate([knn_target_logprobs(dists[i : i + chunk], vals[i : i + chunk],
                                                   targets[i : i + chunk], temperature, chunk,
                                                   None if counts is None else counts[i : i + chunk])
                               for i in range(0, len(dists), chunk)])
    logits = knn_logits(dists, temperature)  # (m, k)
    if counts is not None:
        logits = logits + np.log(np.asarray(counts, dtype=np.float64))
    top = logits.max(axis=1, keepdims=True)  # (m, 1)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(logits - top)  # (m, k); an empty slot (d = inf) weighs 0
    hit_w = (w * (vals == np.asarray(targets)[:, None])).sum(axis=1)  # (m,)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(hit_w) - np.log(w.sum(axis=1))
    return np.where(hit_w > 0, out, -np.inf)


def knn_target_logprobs_all_k(dists, vals, targets, temperature: float, ks, counts=None) -> np.ndarray:
    """log p_kNN(target) using only the first k neighbours, for every k in `ks`.  (m, len(ks))

    One pass: the nearest neighbour has the largest logit, so the running sums of
    exp(logit - first logit) neither overflow nor depend on k.  counts (m, K): merged
    entries' counts (a pruned datastore), each neighbour weighing count * exp(-d/T).
    """
    logits = knn_logits(dists, temperature)  # (m, K)
    first = logits[:, :1]
    w = np.exp(logits - np.where(np.isfinite(first), first, 0.0))
    if counts is not None:
        w = w * np.asarray(counts, dtype=np.float64)
    hit = vals == np.asarray(targets)[:, None]
    cols = np.asarray(ks) - 1
    all_w = np.cumsum(w, axis=1)[:, cols]  # (m, len(ks))
    hit_w = np.cumsum(w * hit, axis=1)[:, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(hit_w) - np.log(all_w)
    return np.where(hit_w > 0, out, -np.inf)


def interpolate(lm_logprobs, knn_logprobs, lam: float):
    """log(lam * p_kNN + (1 - lam) * p_LM), in log space; lam = 0 returns lm_logprobs exactly."""
    lm = np.asarray(lm_logprobs, dtype=np.float64)
    if lam == 0.0:
        return lm
    knn = np.asarray(knn_logprobs, dtype=np.float64)
    if lam == 1.0:
        return knn
    return np.logaddexp(math.log(lam) + knn, math.log1p(-lam) + lm)


def knn_probabilities(dists, vals, vocab_size: int, temperature: float = 1.0, counts=None):
    """Full p_kNN over the vocabulary, (m, V) float32 torch: softmax(-d/T) summed per value
    (a missing neighbour, d = inf, weighs 0).  counts (m, k) as in `knn_target_logprobs`."""
    import torch

    logits = torch.as_tensor(knn_logits(dists, temperature).astype(np.float32))
    if counts is not None:
        logits = logits + torch.log(torch.as_tensor(np.asarray(counts, dtype=np.float32)))
    w = torch.softmax(logits, dim=1)  # (m, k)
    w = torch.nan_to_num(w, nan=0.0)
    p = torch.zeros(logits.shape[0], vocab_size, dtype=torch.float32)
    p.scatter_add_(1, torch.as_tensor(np.asarray(vals, dtype=np.int64)), w)
    return p


def knn_distribution(dists, vals, vocab_size: int, temperature: float = 1.0, counts=None):
    """Full p_kNN over the vocabulary as log-probs, (m, V): for generation only."""
    import torch

    return torch.log(knn_probabilities(dists, vals, vocab_size, temperature, counts))


def perplexity(logprobs) -> float:
    lp = np.asarray(logprobs, dtype=np.float64)
    return float(np.exp(-lp.mean())) if lp.size else float("nan")


# ---- continuous cache (Grave et al., 2017) -------------------------------------------
def cache_target_logprobs(keys, targets, doc_starts, theta: float, size: int, block: int = 256) -> np.ndarray:
    """log p_cache(target) at every position, from the same document's earlier positions.

    keys (n, d): one vector per position (knnlm uses the final hidden state, the input of
    the output embedding, as Grave et al. do); targets (n,): the token each position
    predicts; doc_starts: first position of each document, ascending, starting at 0.
    Position t's cache holds positions i with max(doc start, t - size) <= i < t, each
    storing (key h_i, value targets[i] = the token that followed it), and

        p_cache(w | t) = sum_{i in cache, targets[i] = w} exp(theta * h_t . h_i)
                         / sum_{i in cache} exp(theta * h_t . h_i)

    (Grave et al.'s dot-product similarity).  Returns (n,) float64: -inf where no cached
    position has the target, NaN where the cache is empty (a document's first position);
    `mix_cache` then falls back to the other distribution.
    """
    check_cache_settings(theta=theta, size=size)
    keys = np.asarray(keys, dtype=np.float32)  # (n, d)
    targets = np.asarray(targets)
    n = len(targets)
    bounds = list(np.asarray(doc_starts, dtype=np.int64)) + [n]
    out = np.full(n, np.nan)
    for a, z in zip(bounds[:-1], bounds[1:]):  # one document at a time: caches never cross
        for q0 in range(a + 1, z, block):  # position a has an empty cache
            q1 = min(q0 + block, z)
            c0 = max(a, q0 - size)  # oldest position any query of the block may see
            t = np.arange(q0, q1)[:, None]  # (b, 1) query positions
            i = np.arange(c0, q1 - 1)[None, :]  # (1, c) candidate positions
            seen = (i < t) & (i >= t - size)  # (b, c)
            logits = theta * (keys[q0:q1] @ keys[c0 : q1 - 1].T).astype(np.float64)  # (b, c)
            logits = np.where(seen, logits, -np.inf)
            top = logits.max(axis=1, keepdims=True)  # (b, 1), finite: every query sees >= 1 position
            w = np.exp(logits - top)  # (b, c); unseen weigh 0
            hit = targets[c0 : q1 - 1][None, :] == targets[q0:q1, None]  # (b, c)
            hit_w = (w * hit).sum(axis=1)
            with np.errstate(divide="ignore"):
                out[q0:q1] = np.log(hit_w) - np.log(w.sum(axis=1))
    return out


def mix_cache(base_logprobs, cache_logprobs, cache_lambda: float) -> np.ndarray:
    """log(cache_lambda * p_cache + (1 - cache_lambda) * p_base), nested on top of the
    kNN-LM (or the LM): cache_lambda = 0 returns base_logprobs exactly; where the cache
    is empty (NaN) the base distribution is used alone."""
    check_settings(lam=cache_lambda)
    base = np.asarray(base_logprobs, dtype=np.float64)
    if cache_lambda == 0.0:
        return base
    cache = np.asarray(cache_logprobs, dtype=np.float64)
    empty = np.isnan(cache)
    mixed = interpolate(base, np.where(empty, -np.inf, cache), cache_lambda)
    return np.where(empty, base, mixed)


def cache_vocab_logprobs(query, keys, values, vocab_size: int, theta: float, size: int) -> np.ndarray | None:
    """log p_cache(w) for every token w (V,) float64 at one position, from its key `query`
    (d,), the earlier positions' keys (c, d) of the same document, oldest first, and the
    token that followed each (c,): `cache_target_logprobs`' distribution over the whole
    vocabulary (the same window, the last `size` of them; the same similarity exp(theta
    h_t . h_i)).  -inf where no cached position has w; None where the cache is empty (its
    λ is then 0)."""
    check_cache_settings(theta=theta, size=size)
    keys = np.asarray(keys, dtype=np.float32).reshape(-1, np.shape(query)[-1])[-size:]  # (c, d)
    values = np.asarray(values, dtype=np.int64)[-size:]
    if not len(values):
        return None
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)  # (1, d)
    logits = theta * (q @ keys.T).astype(np.float64)[0]  # (c,)
    w = np.exp(logits - logits.max())
    p = np.bincount(values, weights=w, minlength=vocab_size)[:vocab_size]  # (V,)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log(w.sum())
