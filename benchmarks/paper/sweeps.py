"""Every k, T and lambda from one retrieval: log p_kNN grids, perplexity cubes, tuning on
the held-out split and reading the test split at the tuned setting."""

from __future__ import annotations

import numpy as np

from knnlm.core.scoring import interpolate, knn_target_logprobs_all_k, perplexity

from .runner import LAMBDAS, TEMPS, K


def knn_grid(r: dict, targets: np.ndarray, temps=TEMPS, ks=(K,)) -> np.ndarray:
    """log p_kNN(target) for every temperature and k: (len(temps), n, len(ks))."""
    out = np.empty((len(temps), len(targets), len(ks)))
    for ti, t in enumerate(temps):
        for i in range(0, len(targets), 4096):
            sl = slice(i, i + 4096)
            out[ti, sl] = knn_target_logprobs_all_k(r["dists"][sl], r["vals"][sl], targets[sl], t, ks)
    return out


def ppl_lambdas(lm: np.ndarray, knn: np.ndarray, lams=LAMBDAS) -> np.ndarray:
    return np.array([perplexity(interpolate(lm, knn, float(lam))) for lam in lams])


def cube(lm: np.ndarray, grid: np.ndarray, lams=LAMBDAS) -> np.ndarray:
    """Perplexity for every (T, k, lambda): (len(temps), len(ks), len(lams))."""
    return np.array([[ppl_lambdas(lm, grid[t, :, j], lams) for j in range(grid.shape[2])]
                     for t in range(grid.shape[0])])


def tuned(tune: dict, test: dict, r_tune: dict, r_test: dict, temps=TEMPS, ks=(K,)) -> dict:
    """Best (T, k, lambda) on the tuning split; test perplexity at it; the cubes."""
    ks = [k for k in ks if k <= min(r_tune["dists"].shape[1], r_test["dists"].shape[1])]
    g_tune, g_test = knn_grid(r_tune, tune["targets"], temps, ks), knn_grid(r_test, test["targets"], temps, ks)
    c_tune, c_test = cube(tune["lm"], g_tune), cube(test["lm"], g_test)
    ti, ki, li = np.unravel_index(np.argmin(c_tune), c_tune.shape)
    return {"T": temps[ti], "k": ks[ki], "lambda": float(LAMBDAS[li]), "ppl_tune": float(c_tune[ti, ki, li]),
            "ppl_test": float(c_test[ti, ki, li]), "ppl_lm_tune": perplexity(tune["lm"]),
            "ppl_lm_test": perplexity(test["lm"]), "cube_tune": c_tune, "cube_test": c_test,
            "knn_test": g_test[ti, :, ki], "knn_tune": g_tune[ti, :, ki], "ti": int(ti), "ki": int(ki)}


def public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, np.ndarray) and k not in ("ti", "ki")}
