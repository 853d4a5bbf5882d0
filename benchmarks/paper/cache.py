"""6. Continuous cache [Sec. 4.1] (Grave et al. 2017) on top of the LM and of the kNN-LM."""

from __future__ import annotations

import time

import numpy as np

from knnlm.core.scoring import cache_target_logprobs, interpolate, mix_cache, perplexity

from .runner import CACHE_SIZES, CACHE_THETAS, LAMBDAS, Run, main_retrieval, save_npz
from .sweeps import tuned
from .text import f3, pct, yes

TITLE = "Continuous cache [Sec. 4.1]"
CLAIM = "the cache and the datastore are complementary"


def verdict(r) -> str:
    return yes(r["complementary"])


def compute(run: Run) -> dict:
    """Continuous cache on the final hidden states; theta and lambda_cache tuned on the
    held-out articles, on top of the LM alone and on top of the tuned kNN-LM."""
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    base = {"tune": {"LM": tune["lm"], "kNN-LM": interpolate(tune["lm"], t["knn_tune"], t["lambda"])},
            "test": {"LM": test["lm"], "kNN-LM": interpolate(test["lm"], t["knn_test"], t["lambda"])}}
    path = run.cache / "cache_lp.npz"
    have = dict(np.load(path)) if path.exists() else {}
    t0 = time.perf_counter()

    def lp(split, theta, size):
        key = f"{split}-{theta}-{size}"
        if key not in have:
            f = tune if split == "tune" else test
            have[key] = cache_target_logprobs(f["key_final"], f["targets"], f["starts"], theta, size)
            save_npz(path, **have)
        return have[key]

    grid = {}
    for b in ("LM", "kNN-LM"):
        for th in CACHE_THETAS:
            c = lp("tune", th, 2000)
            grid[(b, th, 2000)] = [perplexity(mix_cache(base["tune"][b], c, float(lc))) for lc in LAMBDAS]
    best = {}
    for b in ("LM", "kNN-LM"):
        (th, size), li = min((((th, 2000), int(np.argmin(grid[(b, th, 2000)]))) for th in CACHE_THETAS),
                             key=lambda x: grid[(b, *x[0])][x[1]])
        best[b] = {"theta": th, "size": size, "lambda_cache": float(LAMBDAS[li]),
                   "ppl_tune": grid[(b, th, size)][li]}
    th_star = best["kNN-LM"]["theta"]
    sizes = {}
    for size in CACHE_SIZES:
        c_tune, c_test = lp("tune", th_star, size), lp("test", th_star, size)
        li = int(np.argmin([perplexity(mix_cache(base["tune"]["kNN-LM"], c_tune, float(lc))) for lc in LAMBDAS]))
        sizes[size] = {"lambda_cache": float(LAMBDAS[li]),
                       "ppl_test": perplexity(mix_cache(base["test"]["kNN-LM"], c_test, float(LAMBDAS[li])))}
    rows = [{"model": "LM", "ppl_test": perplexity(test["lm"])},
            {"model": "LM + cache", **best["LM"],
             "ppl_test": perplexity(mix_cache(test["lm"], lp("test", best["LM"]["theta"], 2000),
                                              best["LM"]["lambda_cache"]))},
            {"model": "kNN-LM", "ppl_test": perplexity(base["test"]["kNN-LM"]), "lambda": t["lambda"], "T": t["T"]},
            {"model": "kNN-LM + cache", **best["kNN-LM"],
             "ppl_test": perplexity(mix_cache(base["test"]["kNN-LM"], lp("test", th_star, 2000),
                                              best["kNN-LM"]["lambda_cache"]))}]
    curves = {b: [perplexity(mix_cache(base["test"][b], lp("test", best[b]["theta"], 2000), float(lc)))
                  for lc in LAMBDAS] for b in ("LM", "kNN-LM")}
    if "cache sweeps" not in run.timer.data:
        run.timer.record("cache sweeps", time.perf_counter() - t0)
    p = {r["model"]: r["ppl_test"] for r in rows}
    return {"rows": rows, "sizes": sizes, "curves": curves, "lambdas": LAMBDAS.tolist(),
            "complementary": bool(p["kNN-LM + cache"] < min(p["kNN-LM"], p["LM + cache"])),
            "gain_cache_on_lm": 1 - p["LM + cache"] / p["LM"], "gain_cache_on_knnlm": 1 - p["kNN-LM + cache"] / p["kNN-LM"],
            "theta_grid": list(CACHE_THETAS)}


def section(r) -> list[str]:
    L = ["**Measured:** the continuous cache of Grave et al. (2017), `knnlm.core.scoring.cache_target_logprobs`: "
         "for position t, p_cache(w) ∝ Σ_{i<t, x_{i+1}=w} exp(θ h_t·h_i) over the previous positions of the "
         "same document (here the test subset is one stream, so the cache crosses article boundaries as in "
         "Grave et al.'s WikiText runs), h = final hidden state (input of the output embedding), read in the same "
         "forward pass as the kNN query.  Nested mixture p = λ_c p_cache + (1 − λ_c) p_base with p_base the LM or "
         f"the tuned kNN-LM; θ ∈ {list(r['theta_grid'])} and λ_c tuned on the held-out articles with a cache of "
         "2000 positions.", "",
         "| model | θ | λ_cache | test ppl | vs LM |", "|---|---:|---:|---:|---:|"]
    lm = r["rows"][0]["ppl_test"]
    for row in r["rows"]:
        th = f"{row['theta']:g}" if "theta" in row else ""
        lc = f"{row['lambda_cache']:.2f}" if "lambda_cache" in row else ""
        L.append(f"| {row['model']} | {th} | {lc} | {f3(row['ppl_test'])} | {pct(row['ppl_test'], lm)} |")
    L += ["", "Cache size (θ of the kNN-LM + cache row, λ_cache re-tuned per size), on top of the kNN-LM:", "",
          "| cache size | λ_cache | test ppl |", "|---:|---:|---:|"]
    for size, row in sorted(r["sizes"].items(), key=lambda x: int(x[0])):
        L.append(f"| {size} | {row['lambda_cache']:.2f} | {f3(row['ppl_test'])} |")
    L += ["", "![continuous cache](img/cache.png)", "",
          f"**Held?** Complementary (kNN-LM + cache better than both kNN-LM and LM + cache): {yes(r['complementary'])}. "
          f"The cache cuts perplexity by {100 * r['gain_cache_on_lm']:.1f}% on top of the LM and by "
          f"{100 * r['gain_cache_on_knnlm']:.1f}% on top of the kNN-LM.", "",
          "The same mixture from the command line, at the kNN-LM + cache row's settings:", "",
          "```bash", f"knnlm eval benchmarks/cache/paper/data/test_subset.txt -d benchmarks/cache/wikitext2/ds-bfloat16 "
          f"--index ivf2048-pq64 -k 1024 --lambda {r['rows'][2]['lambda']:g} --temperature {r['rows'][2]['T']:g} "
          f"--cache-lambda {r['rows'][3]['lambda_cache']:g} --cache-theta {r['rows'][3]['theta']:g} --cache-size 2000",
          "```", ""]
    return L


def plot(r, plt, save) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].bar([row["model"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]],
              color=["gray", "C1", "C0", "C2"])
    lo = min(row["ppl_test"] for row in r["rows"])
    ax[0].set(ylabel="test perplexity", ylim=(lo * 0.95, r["rows"][0]["ppl_test"] * 1.02))
    ax[0].tick_params(axis="x", labelsize=8)
    for b in ("LM", "kNN-LM"):
        ax[1].plot(r["lambdas"], r["curves"][b], label=f"cache on top of {b}")
    ax[1].set(xlabel="λ_cache", ylabel="test perplexity", ylim=(lo * 0.95, r["rows"][0]["ppl_test"] * 1.3))
    ax[1].legend(fontsize=8)
    save(fig, "cache.png")
