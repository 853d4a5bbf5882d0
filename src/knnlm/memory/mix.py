"""Mixing a memory decoder with an LM (or a kNN-LM): pure math, no I/O.

    p(y) = lam * p_mem(y) + (1 - lam) * p_base(y)        (in log space)

p_base is the LM's distribution, or the kNN-LM's when a datastore is used too (the
decoder is mixed on top, as the continuous cache is), so lam = 0 gives p_base exactly.
"""

from __future__ import annotations

import math

import numpy as np

from knnlm.core.scoring import interpolate, perplexity
from knnlm.errors import KnnlmError

DEFAULT_MEMORY_LAMBDA = 0.25
MEMORY_LAMBDAS = tuple(round(x, 2) for x in np.arange(0.0, 1.0001, 0.05))


def check_memory_lambda(lam: float | None) -> None:
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise KnnlmError(f"memory lambda must be in [0, 1], got {lam}")


def mix_memory(base_logprobs, mem_logprobs, lam: float) -> np.ndarray:
    """log(lam * p_mem + (1 - lam) * p_base) per target, (n,); lam = 0 returns base exactly."""
    check_memory_lambda(lam)
    return interpolate(base_logprobs, mem_logprobs, lam)


def mix_memory_distribution(base_logprobs, mem_logprobs, lam: float):
    """The same over a vocabulary, torch (..., V); lam = 0 returns base_logprobs itself."""
    import torch

    if lam == 0.0:
        return base_logprobs
    if lam == 1.0:
        return mem_logprobs
    return torch.logaddexp(math.log(lam) + mem_logprobs, math.log1p(-lam) + base_logprobs)


def sweep_memory(base_logprobs, mem_logprobs, lambdas=MEMORY_LAMBDAS) -> dict:
    """Perplexity for every memory lambda: {"grid": [{lambda, ppl}], "best": {...}, "ppl_base"}."""
    for lam in lambdas:
        check_memory_lambda(lam)
    grid = [{"lambda": float(lam), "ppl": perplexity(mix_memory(base_logprobs, mem_logprobs, float(lam)))}
            for lam in lambdas]
    return {"grid": grid, "best": min(grid, key=lambda r: r["ppl"]), "ppl_base": perplexity(base_logprobs)}


def disagreements(lm_logprobs, mem_logprobs, knn_logprobs, mem_lambda: float, knn_lambda: float,
                  top: int = 20) -> list[dict]:
    """The `top` targets where the decoder and the LM disagree most (largest |log p_mem -
    log p_LM|), each with p_LM, p_mem, the LM + decoder mixture and, given p_kNN, the
    kNN-LM's probability: the paper's case study (factual tokens vs function words)."""
    lm = np.asarray(lm_logprobs, dtype=np.float64)
    mem = np.asarray(mem_logprobs, dtype=np.float64)
    mix = mix_memory(lm, mem, mem_lambda)
    knnlm = None if knn_logprobs is None else interpolate(lm, knn_logprobs, knn_lambda)
    order = np.argsort(-np.abs(mem - lm), kind="stable")[:top]
    return [{"position": int(i), "p_lm": float(np.exp(lm[i])), "p_mem": float(np.exp(mem[i])),
             "p_mix": float(np.exp(mix[i])), **({} if knnlm is None else {"p_knnlm": float(np.exp(knnlm[i]))})}
            for i in order]
