"""7. kNN temperature: lambda tuned per T."""

from __future__ import annotations

import numpy as np

from .runner import LAMBDAS, TEMPS, K, Run, main_retrieval
from .sweeps import tuned
from .text import f3, pct

TITLE = "kNN temperature"
CLAIM = "(no claim: the paper uses T = 1)"


def verdict(r) -> str:
    return f"best T = {r['best_T']:g}"


def compute(run: Run) -> dict:
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    rows = []
    for i, temp in enumerate(TEMPS):
        li = int(np.argmin(t["cube_tune"][i, 0]))
        rows.append({"T": temp, "lambda": float(LAMBDAS[li]), "ppl_tune": float(t["cube_tune"][i, 0, li]),
                     "ppl_test": float(t["cube_test"][i, 0, li])})
    return {"rows": rows, "best_T": t["T"], "ppl_lm_test": t["ppl_lm_test"], "k": K}


def section(r) -> list[str]:
    L = [f"**Measured:** k = {r['k']}, the full WikiText datastore (IVF-PQ + re-ranking), λ tuned per T.", "",
         "| T | tuned λ | held-out ppl | test ppl | vs LM |", "|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['T']:g} | {row['lambda']:.2f} | {f3(row['ppl_tune'])} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} |")
    L += ["", "![temperature](img/temperature.png)", "", f"Best T on the held-out articles: {r['best_T']:g}.", ""]
    return L


def plot(r, plt, save) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([row["T"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]], "o-")
    ax.axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
    ax.set(xscale="log", xlabel="kNN temperature T (λ tuned per T)", ylabel="test perplexity")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    save(fig, "temperature.png")
