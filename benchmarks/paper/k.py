"""2. Number of neighbours [Fig. 4]: every k <= 1024 from one retrieval."""

from __future__ import annotations

import numpy as np

from .runner import KS, LAMBDAS, TEMPS, Run, main_retrieval
from .sweeps import tuned
from .text import f3, pct, why, yes

TITLE = "Number of neighbours [Fig. 4]"
CLAIM = "monotone in k; k = 8 already helps"


def verdict(r) -> str:
    return f"monotone {yes(r['monotone'])}; k = 8 helps {yes(r['k8_helps'])}"


def compute(run: Run) -> dict:
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test, ks=KS)
    c_tune, c_test = t["cube_tune"], t["cube_test"]  # (T, k, lambda)
    fti, fli = np.unravel_index(np.argmin(c_tune[:, -1]), c_tune[:, -1].shape)  # tuned at k = 1024
    rows = []
    for j, k in enumerate(KS):
        ti, li = np.unravel_index(np.argmin(c_tune[:, j]), c_tune[:, j].shape)
        rows.append({"k": k, "T": TEMPS[ti], "lambda": float(LAMBDAS[li]), "ppl_test": float(c_test[ti, j, li]),
                     "ppl_test_fixed": float(c_test[fti, j, fli])})
    ppl = [r["ppl_test"] for r in rows]
    k8 = next(r for r in rows if r["k"] == 8)
    return {"rows": rows, "ppl_lm_test": t["ppl_lm_test"], "fixed": {"T": TEMPS[fti], "lambda": float(LAMBDAS[fli])},
            "monotone": bool(all(b <= a for a, b in zip(ppl, ppl[1:]))),
            "violations": [(rows[i]["k"], rows[i + 1]["k"]) for i in range(len(rows) - 1) if ppl[i + 1] > ppl[i]],
            "k8_helps": bool(k8["ppl_test"] < t["ppl_lm_test"])}


def section(r) -> list[str]:
    L = [f"**Measured:** one retrieval of k = 1024 (IVF-PQ + exact re-ranking, full WikiText datastore); for each "
         "k the first k neighbours; T and λ tuned per k on the held-out articles (and, dashed in the plot, "
         f"T = {r['fixed']['T']:g}, λ = {r['fixed']['lambda']:g} tuned for k = 1024 kept fixed).", "",
         "| k | tuned T | tuned λ | test ppl | vs LM | test ppl, T/λ fixed |", "|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['k']} | {row['T']:g} | {row['lambda']:.2f} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} | {f3(row['ppl_test_fixed'])} |")
    L += ["", f"LM alone: {f3(r['ppl_lm_test'])}.", "", "![number of neighbours](img/neighbours_k.png)", "",
          f"**Held?** Monotone in k: {yes(r['monotone'])}"
          + (f" (rises from k = {', '.join(f'{a}→{b}' for a, b in r['violations'])})" if r["violations"] else "")
          + f".  k = 8 already helps: {yes(r['k8_helps'])}.", ""]
    L += note(r)
    return L


def note(r) -> list[str]:
    if r["monotone"]:
        return []
    rows = r["rows"]
    best = min(rows, key=lambda x: x["ppl_test"])
    worst_after = max(x["ppl_test"] for x in rows if x["k"] >= best["k"])
    return why([f"The best k is {best['k']}; above it test perplexity rises by at most "
                f"{pct(worst_after, best['ppl_test'])}.  This datastore has a few hundred thousand entries, the paper's 103M: "
                "its 1024th neighbour is much farther from the query, and each extra far neighbour puts a little "
                "mass on wrong tokens that T (tuned on a factor-2 grid) and λ cannot fully cancel.  Tuned on the "
                "held-out articles, the choice of T/λ also carries noise of about this size (compare the columns)."])


def plot(r, plt, save) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([row["k"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]], "o-", label="T, λ tuned per k")
    ax.plot([row["k"] for row in r["rows"]], [row["ppl_test_fixed"] for row in r["rows"]], ".--",
            label=f"T={r['fixed']['T']:g}, λ={r['fixed']['lambda']:g} fixed")
    ax.axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
    ax.set(xscale="log", xlabel="k (neighbours)", ylabel="test perplexity")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    save(fig, "neighbours_k.png")
