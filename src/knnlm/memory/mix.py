"""Mixing a memory decoder with an LM (or a kNN-LM): pure math, no I/O.

    p(y) = lam * p_mem(y) + (1 - lam) * p_base(y)        (in log space)

p_base is the LM's distribution, or the kNN-LM's when a datastore is used too (the
decoder is mixed on top, as the continuous cache is), so lam = 0 gives p_base exactly.
"""

from __future__ import annotations

import math

import numpy as np

import logging

from knnlm.core.mix import Weight
from knnlm.core.scoring import interpolate, perplexity
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)
_hinted: set[str] = set()

DEFAULT_MEMORY_LAMBDA = 0.25
MEMORY_LAMBDAS = tuple(round(x, 2) for x in np.arange(0.0, 1.0001, 0.05))


def check_memory_lambda(lam: float | None) -> None:
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise KnnlmError(f"memory lambda must be in [0, 1], got {lam}")


def recorded_lambda(meta: dict) -> float | None:
    """The λ tuned on the decoder's held-out text when it was trained (memory.json "settings")."""
    lam = (meta.get("settings") or {}).get("lambda") if isinstance(meta.get("settings"), dict) else None
    return float(lam) if isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0 else None


def memory_weight(meta: dict, lam: float | None = None, mode: str | None = None, name: str = "") -> Weight:
    """A decoder's λ policy: `lam` as given, else its recorded (tuned) λ, else the default
    with a one-line hint; adaptive (knnlm.core.mix) unless λ is given or `mode` says "fixed"."""
    check_memory_lambda(lam)
    given = lam is not None
    if not given:
        lam = recorded_lambda(meta)
        if lam is None:
            lam = DEFAULT_MEMORY_LAMBDA
            if name not in _hinted:
                _hinted.add(name)
                LOG.warning("memory decoder %s has no tuned lambda: using %s, adapting to the text; "
                            "`knnlm tune TEXT --memory %s` sweeps it, --memory-lambda sets it", name, lam, name)
    return Weight(float(lam), mode == "adaptive" if mode is not None else not given)


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
