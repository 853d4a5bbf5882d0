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


def knn_target_logprobs(dists: np.ndarray, vals: np.ndarray, targets: np.ndarray, temperature: float = 1.0):
    """log p_kNN(target) for each row: softmax over -d/T, summed over neighbours whose
    value is the target.  -inf where no neighbour has the target.  (m,)"""
    logits = -np.asarray(dists, dtype=np.float64) / temperature  # (m, k)
    top = logits.max(axis=1, keepdims=True)  # (m, 1)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(logits - top)  # (m, k); an empty slot (d = inf) weighs 0
    hit_w = (w * (vals == np.asarray(targets)[:, None])).sum(axis=1)  # (m,)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(hit_w) - np.log(w.sum(axis=1))
    return np.where(hit_w > 0, out, -np.inf)


def knn_target_logprobs_all_k(dists, vals, targets, temperature: float, ks) -> np.ndarray:
    """log p_kNN(target) using only the first k neighbours, for every k in `ks`.  (m, len(ks))

    One pass: the nearest neighbour has the largest logit, so the running sums of
    exp(logit - first logit) neither overflow nor depend on k.
    """
    logits = -np.asarray(dists, dtype=np.float64) / temperature  # (m, K)
    first = logits[:, :1]
    w = np.exp(logits - np.where(np.isfinite(first), first, 0.0))
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


def knn_distribution(dists, vals, vocab_size: int, temperature: float = 1.0):
    """Full p_kNN over the vocabulary as log-probs, (m, V): for generation only."""
    import torch

    d = torch.as_tensor(np.asarray(dists, dtype=np.float32))
    w = torch.softmax(-d / temperature, dim=1)  # (m, k)
    w = torch.nan_to_num(w, nan=0.0)
    p = torch.zeros(d.shape[0], vocab_size, dtype=torch.float32)
    p.scatter_add_(1, torch.as_tensor(np.asarray(vals, dtype=np.int64)), w)
    return torch.log(p)


def perplexity(logprobs) -> float:
    lp = np.asarray(logprobs, dtype=np.float64)
    return float(np.exp(-lp.mean())) if lp.size else float("nan")
