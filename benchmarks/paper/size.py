"""1. Datastore size [Fig. 2]: perplexity as the datastore grows (prefixes, then more text)."""

from __future__ import annotations

import numpy as np

from knnlm.core.datastore import Datastore

from .runner import K, Run
from .sweeps import public, tuned
from .text import f3, pct, why, yes

TITLE = "Datastore size [Fig. 2]"
CLAIM = "perplexity falls monotonically as the datastore grows; tuned λ grows"


def verdict(r) -> str:
    return f"ppl {yes(r['monotone_ppl'])}; λ {yes(r['monotone_lambda'])}"


def compute(run: Run) -> dict:
    """Datastore size: prefixes of the WikiText datastore (log-spaced), and the whole of
    it plus Wikipedia lead sections; exact search; T fixed at the full datastore's tuned
    value, lambda tuned per size on the held-out articles."""
    tune, test = run.forward("wt_tune"), run.forward("wt_test")
    wt = run.wikitext_datastore()
    full = Datastore(wt).count
    sizes = [int(full / 2 ** e) for e in range(run.args.size_points - 1, -1, -1)]
    r_full = (run.flat("wt-flat", wt, "wt_tune", keep_ids=True), run.flat("wt-flat", wt, "wt_test", keep_ids=True))
    t_full = tuned(tune, test, *r_full)
    temp = t_full["T"]
    rows = []
    for n in sizes:
        rt = r_full if n == full else (run.flat(f"wt-flat-{n}", wt, "wt_tune", n), run.flat(f"wt-flat-{n}", wt, "wt_test", n))
        t = tuned(tune, test, *rt, temps=(temp,))
        rows.append({"entries": n, "source": "WikiText-2 valid (prefix)" if n < full else "WikiText-2 valid (all)",
                     **public(t)})
    leads = run.build("leads", ["leads"])[0]
    n_leads = Datastore(leads).count
    r_l = (run.flat("leads-flat", leads, "wt_tune"), run.flat("leads-flat", leads, "wt_test"))
    merged = tuple(merge(a, b) for a, b in zip(r_full, r_l))
    t = tuned(tune, test, *merged, temps=(temp,))
    rows.append({"entries": full + n_leads, "source": f"all of it + {n_leads} tokens of Wikipedia leads", **public(t)})
    from_leads = {str(k): float(merged[1]["from_b"][:, :k].mean()) for k in (1, 8, K)}  # as JSON keys
    ppl = [r["ppl_test"] for r in rows]
    lam = [r["lambda"] for r in rows]
    return {"rows": rows, "T": temp, "ppl_lm_test": t_full["ppl_lm_test"], "leads_entries": n_leads,
            "leads_share_test": from_leads,
            "monotone_ppl": bool(all(b < a for a, b in zip(ppl, ppl[1:]))),
            "monotone_lambda": bool(all(b >= a for a, b in zip(lam, lam[1:])))}


def merge(a: dict, b: dict) -> dict:
    """Top-k of the union of two exact neighbour lists: exact top-k of the union datastore."""
    d = np.concatenate([a["dists"], b["dists"]], axis=1)
    v = np.concatenate([a["vals"], b["vals"]], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :K]
    return {"dists": np.take_along_axis(d, order, 1), "vals": np.take_along_axis(v, order, 1),
            "from_b": order >= a["dists"].shape[1]}


def section(r) -> list[str]:
    L = [f"**Measured:** nested prefixes of the WikiText datastore (whole entries from its start; log-spaced, "
         f"factor 2), then all of it plus {r['leads_entries']} entries from Wikipedia lead sections of the demo "
         "corpus (none titled like a WikiText-2 valid/test article), exact search, k = 1024, "
         f"T = {r['T']:g} (tuned on the full datastore), λ tuned per size.", "",
         "| datastore entries | source | tuned λ | test ppl | vs LM |", "|---:|---|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['entries']} | {row['source']} | {row['lambda']:.2f} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} |")
    L += ["", f"LM alone: {f3(r['ppl_lm_test'])}.", "", "![datastore size](img/datastore_size.png)", "",
          f"**Held?** Monotone perplexity: {yes(r['monotone_ppl'])}.  Larger λ for larger datastores: "
          f"{yes(r['monotone_lambda'])}.", ""]
    L += note(r)
    return L


def note(r) -> list[str]:
    ppl = [row["ppl_test"] for row in r["rows"]]
    wt = [row for row in r["rows"] if "leads" not in row["source"]]
    out = []
    if len(wt) > 1:
        g0, g1 = (1 - wt[0]["ppl_test"] / r["ppl_lm_test"]), (1 - wt[-1]["ppl_test"] / r["ppl_lm_test"])
        out.append(f"Over the WikiText prefixes the gain grows from {100 * g0:.1f}% ({wt[0]['entries']} entries) to "
                   f"{100 * g1:.1f}% ({wt[-1]['entries']}), "
                   + ("every doubling helping, no saturation in sight." if all(b < a for a, b in
                                                                              zip(ppl[:len(wt)], ppl[1:len(wt)]))
                      else "though not at every doubling."))
    if r["monotone_ppl"]:
        return ["**Note:** " + " ".join(out), ""] if out else []
    if len(ppl) > len(wt) and ppl[-1] >= ppl[len(wt) - 1]:
        share = r.get("leads_share_test", {})
        out.append(f"Adding the Wikipedia leads changed test perplexity by {100 * (ppl[-1] / ppl[len(wt) - 1] - 1):+.2f}%"
                   + (f"; they hold {100 * share['8']:.1f}% of the test queries' 8 nearest neighbours and "
                      f"{100 * share[str(K)]:.1f}% of their {K} (vs {100 * r['leads_entries'] / r['rows'][-1]['entries']:.0f}% "
                      "of the entries)" if share else "")
                   + ".  Lead sections are short summaries from another Wikipedia dump, without WikiText's "
                   "tokenisation (` @-@ `, ` , `) and article layout, so their keys rarely sit near a WikiText test "
                   "context: more memories of another kind of text do not help.  The paper grew its datastore with "
                   "the same kind of text as its test set (Wikipedia articles).")
    return why(out)


def plot(r, plt, save) -> None:
    x = [row["entries"] for row in r["rows"]]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(x[:-1], [row["ppl_test"] for row in r["rows"][:-1]], "o-", label="WikiText datastore")
    ax[0].plot(x[-1:], [r["rows"][-1]["ppl_test"]], "s", color="C3", label="+ Wikipedia leads")
    ax[0].axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
    ax[0].set(xscale="log", xlabel="datastore entries", ylabel="test perplexity", title="Perplexity")
    ax[0].legend(fontsize=8)
    ax[1].plot(x[:-1], [row["lambda"] for row in r["rows"][:-1]], "o-")
    ax[1].plot(x[-1:], [r["rows"][-1]["lambda"]], "s", color="C3")
    ax[1].set(xscale="log", xlabel="datastore entries", ylabel="tuned λ", title="Tuned interpolation λ")
    save(fig, "datastore_size.png")
