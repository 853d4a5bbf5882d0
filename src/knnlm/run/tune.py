"""Sweep lambda, temperature and k from neighbours retrieved once."""

from __future__ import annotations

import numpy as np

from knnlm.core.adapt import mix_text
from knnlm.core.scoring import interpolate, knn_target_logprobs_all_k, perplexity

DEFAULT_LAMBDAS = tuple(round(x, 2) for x in np.arange(0.0, 1.0001, 0.05))
DEFAULT_TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def default_ks(k_max: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if k < k_max]
    return ks + [k_max]


def sweep(lm_lp, dists, vals, targets, lambdas=DEFAULT_LAMBDAS, temperatures=DEFAULT_TEMPERATURES, ks=None,
          chunk: int = 4096, counts=None) -> dict:
    """Perplexity for every (k, T, lambda) from one retrieval at k = dists.shape[1].

    Returns {"grid": [{k, temperature, lambda, ppl}...], "best": {...}, "ppl_lm": ...,
    "best_adaptive": {ppl, lambda_adapted}}: the last, λ adapting from the best one as the
    text is read (what commands do by default, knnlm.core.adapt).
    """
    ks = list(ks or default_ks(dists.shape[1]))
    if max(ks) > dists.shape[1]:
        raise ValueError(f"k up to {max(ks)} asked, only {dists.shape[1]} neighbours retrieved")
    n = len(targets)
    grid = []
    for t in temperatures:
        knn = np.empty((n, len(ks)))
        for i in range(0, n, chunk):  # bounded memory: (chunk, K) at a time
            sl = slice(i, i + chunk)
            knn[sl] = knn_target_logprobs_all_k(dists[sl], vals[sl], targets[sl], t, ks,
                                                None if counts is None else counts[sl])
        for j, k in enumerate(ks):
            for lam in lambdas:
                grid.append({"k": int(k), "temperature": float(t), "lambda": float(lam),
                             "ppl": perplexity(interpolate(lm_lp, knn[:, j], float(lam)))})
    best = min(grid, key=lambda r: r["ppl"])
    kb = best["k"]
    knn = np.concatenate([knn_target_logprobs_all_k(dists[i : i + chunk, :kb], vals[i : i + chunk, :kb],
                                                    targets[i : i + chunk], best["temperature"], [kb],
                                                    None if counts is None else counts[i : i + chunk, :kb])[:, 0]
                          for i in range(0, n, chunk)]) if n else np.empty(0)
    lp, lam_end = mix_text(lm_lp, knn, best["lambda"], adapt=True)
    return {"grid": grid, "best": best, "ppl_lm": perplexity(lm_lp), "tokens": int(n),
            "best_adaptive": {"ppl": perplexity(lp), "lambda_adapted": lam_end}}
