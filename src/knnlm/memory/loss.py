"""Memory Decoder math: sparse p_kNN training targets and the training loss.  Pure array
math, no I/O, in the style of knnlm.core.scoring.

A training target is p_kNN(. | position) over the vocabulary, stored sparse: the `keep`
most likely tokens (ids, -1 padding) with their probabilities renormalised over those
tokens, and the p_kNN mass they held before renormalising.
"""

from __future__ import annotations

import numpy as np

from knnlm.core.scoring import knn_logits
from knnlm.errors import KnnlmError

DEFAULT_ALPHA = 0.5  # weight of the KL term (Memory Decoder paper)
DEFAULT_K = 1024  # neighbours per position (Memory Decoder paper)
DEFAULT_TEMPERATURE = 16.0  # kNN softmax temperature (Memory Decoder paper)
DEFAULT_KEEP = 64  # tokens of p_kNN stored per position


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise KnnlmError(f"alpha must be in [0, 1], got {alpha}")


def sparse_knn_targets(dists: np.ndarray, ids: np.ndarray, vals: np.ndarray, temperature: float,
                       keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p_kNN of each row as its `keep` most likely tokens.

    dists (m, k) squared L2, nearest first (inf: no neighbour); ids (m, k) entry ids
    (-1: no neighbour); vals (m, k) the neighbours' tokens.  p_kNN(y) is the softmax of
    -d/T summed over the neighbours whose value is y.  Returns

        top_ids   (m, keep) int32    tokens, most likely first; -1 pads
        top_probs (m, keep) float32  their probabilities renormalised over the kept tokens
        mass      (m,)      float32  p_kNN mass of the kept tokens before renormalising
                                     (1 when every token fits; 0 for a row with no neighbour)

    Example: d = (0, 0, T ln 2), values (5, 7, 5), T = 1, keep = 1: weights 1, 1, 1/2, so
    p_kNN = {5: 0.6, 7: 0.4}; top_ids = [[5]], top_probs = [[1.0]], mass = [0.6].
    """
    m, k = dists.shape
    logits = knn_logits(dists, temperature)  # (m, k)
    real = (np.asarray(ids) >= 0) & np.isfinite(logits)
    top = np.where(real, logits, -np.inf).max(axis=1, keepdims=True)  # (m, 1)
    w = np.where(real, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)  # (m, k)
    total = w.sum(axis=1, keepdims=True)  # (m, 1)
    p = np.divide(w, total, out=np.zeros_like(w), where=total > 0)  # (m, k), rows sum to 1 or 0
    v = np.where(real, vals, np.iinfo(np.int64).max).astype(np.int64)  # missing neighbours sort last
    order = np.argsort(v, axis=1, kind="stable")
    sv, sp = np.take_along_axis(v, order, 1), np.take_along_axis(p, order, 1)  # (m, k) grouped by token
    start = np.ones((m, k), dtype=bool)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]  # first neighbour of each token's group
    group = np.cumsum(start, axis=1) - 1  # (m, k) group number within the row
    sums = np.bincount((np.arange(m)[:, None] * k + group).ravel(), weights=sp.ravel(), minlength=m * k)
    sums = sums.reshape(m, k)  # (m, k): p_kNN of group g of row r at [r, g]
    tokens = np.full((m, k), -1, dtype=np.int64)
    rows, cols = np.nonzero(start)
    tokens[rows, group[rows, cols]] = sv[rows, cols]
    sums = np.where((tokens >= 0) & (tokens != np.iinfo(np.int64).max), sums, 0.0)
    keep_n = min(keep, k)
    best = np.argsort(-sums, axis=1, kind="stable")[:, :keep_n]  # (m, keep_n)
    top_p = np.take_along_axis(sums, best, 1)
    top_ids = np.where(top_p > 0, np.take_along_axis(tokens, best, 1), -1)
    mass = top_p.sum(axis=1)  # (m,)
    probs = np.divide(top_p, mass[:, None], out=np.zeros_like(top_p), where=mass[:, None] > 0)
    out_ids = np.full((m, keep), -1, dtype=np.int32)
    out_p = np.zeros((m, keep), dtype=np.float32)
    out_ids[:, :keep_n], out_p[:, :keep_n] = top_ids, probs
    return out_ids, out_p, mass.astype(np.float32)


def memory_loss(logits, next_tokens, target_ids, target_probs, alpha: float = DEFAULT_ALPHA):
    """(loss, kl, ce): loss = alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE(next token).

    logits (n, V) the decoder's; next_tokens (n,); target_ids (n, s) int64 (-1 pads) and
    target_probs (n, s) the sparse p_kNN of each position.  KL = sum_y p(y) (log p(y) -
    log q(y)) over the stored tokens, averaged over the positions that have a target
    (a position without any neighbour has none); CE = -log q(next token), averaged over
    all positions.  Torch tensors; gradients flow through `logits` only.

    Worked example (tests/test_memory.py): V = 3, q = softmax(logits) = (1/2, 1/4, 1/4),
    p_kNN = {0: 1/2, 2: 1/2}, next token 1, alpha = 1/2:
        KL = 1/2 ln((1/2)/(1/2)) + 1/2 ln((1/2)/(1/4)) = (ln 2)/2 = 0.346574
        CE = -ln(1/4) = ln 4 = 1.386294
        loss = (0.346574 + 1.386294) / 2 = 0.866434
    """
    import torch

    check_alpha(alpha)
    logq = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    ce = -logq.gather(1, next_tokens[:, None]).squeeze(1)  # (n,)
    valid = target_ids >= 0  # (n, s)
    p = torch.where(valid, target_probs.float(), torch.zeros((), dtype=torch.float32, device=logq.device))
    lq = logq.gather(1, target_ids.clamp(min=0))  # (n, s)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    kl_rows = (plogp - p * lq).sum(dim=1)  # (n,)
    has = valid.any(dim=1)
    kl = kl_rows[has].mean() if bool(has.any()) else logq.new_zeros(())
    ce = ce.mean()
    return alpha * kl + (1.0 - alpha) * ce, kl, ce
