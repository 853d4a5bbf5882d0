"""8. Where kNN helps [Sec. 6]: test tokens by how often their target is a datastore value."""

from __future__ import annotations

import numpy as np

from knnlm.core.batching import plan_files
from knnlm.core.scoring import interpolate, perplexity
from knnlm.core.settings import Resolved
from knnlm.run.evaluate import Scores, open_for_model

from .runner import Run, main_retrieval
from .sweeps import tuned
from .text import f3, pct, why, yes

TITLE = "Where kNN helps [Sec. 6]"
CLAIM = "gains concentrate on rare patterns / the long tail"


def verdict(r) -> str:
    v = frequency_verdict(r)
    return f"{yes(v['held'])} ({v['rare']} vs {v['frequent']} occurrences)"


def bucket_label(bucket: str) -> str:
    return "0" if bucket == "0-0" else bucket  # "0-0" is the key: targets absent from the datastore


def compute(run: Run) -> dict:
    """Where the datastore helps: test tokens bucketed by how often the target token is a
    value in the datastore; then the tokens it helped most, with their neighbours."""
    from knnlm.run.explain import ExplainSettings, explain, render

    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    ds = open_for_model(run.lm, run.wikitext_datastore())
    counts = np.bincount(np.asarray(ds.vals), minlength=run.lm.vocab_size)[test["targets"]]
    mix = interpolate(test["lm"], t["knn_test"], t["lambda"])
    edges = [0, 1, 10, 100, 1000, 10_000, np.inf]
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        m = (counts >= lo) & (counts < hi)
        if not m.any():
            continue
        rows.append({"bucket": f"{lo}-{int(hi) - 1}" if np.isfinite(hi) else f">={lo}", "tokens": int(m.sum()),
                     "share": float(m.mean()), "ppl_lm": perplexity(test["lm"][m]), "ppl_knnlm": perplexity(mix[m]),
                     "mean_gain_nats": float((mix[m] - test["lm"][m]).mean())})
    held = [r for r in rows if not r["bucket"].startswith("0-")]  # targets the datastore can predict at all
    plan = plan_files(run.lm, [run.files()["wt_test"]], run.W, run.S, run.B)
    assert np.array_equal(plan.targets(), test["targets"]), "test split changed since its forward pass"
    k = t["k"]
    s = Scores(plan, test["targets"], test["lm"], t["knn_test"], dists=r_test["dists"][:, :k],
               ids=r_test["ids"][:, :k].astype(np.int64), vals=r_test["vals"][:, :k])
    items = explain(run.lm, ds, s, Resolved(k, t["lambda"], t["T"], "explicit"),
                    ExplainSettings(top=run.args.examples, neighbors=4))
    return {"rows": rows, "examples_md": render(items), "settings": {"k": k, "T": t["T"], "lambda": t["lambda"]},
            "rare_gain_larger": bool(held[0]["mean_gain_nats"] > held[-1]["mean_gain_nats"]),
            "rare_bucket": held[0]["bucket"], "frequent_bucket": held[-1]["bucket"],
            "ppl_lm_test": perplexity(test["lm"]), "ppl_knnlm_test": perplexity(mix)}


def frequency_verdict(r) -> dict:
    """Rarest vs most frequent bucket among targets the datastore holds (count >= 1)."""
    held = [x for x in r["rows"] if not x["bucket"].startswith("0-")]
    return {"held": held[0]["mean_gain_nats"] > held[-1]["mean_gain_nats"], "rare": held[0]["bucket"],
            "frequent": held[-1]["bucket"]}


def section(r) -> list[str]:
    s, v = r["settings"], frequency_verdict(r)
    L = [f"**Measured:** test tokens bucketed by how many datastore entries have the target token as their value; "
         f"kNN-LM at the tuned k = {s['k']}, T = {s['T']:g}, λ = {s['lambda']:.2f}.", "",
         "| occurrences in the datastore | test tokens | share | LM ppl | kNN-LM ppl | change | mean gain (nats/token) |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {bucket_label(row['bucket'])} | {row['tokens']} | {100 * row['share']:.1f}% | {f3(row['ppl_lm'])} | "
                 f"{f3(row['ppl_knnlm'])} | {pct(row['ppl_knnlm'], row['ppl_lm'])} | {row['mean_gain_nats']:+.3f} |")
    L += ["", "![frequency](img/frequency.png)", "",
          "**Held?** Larger gain for the rarest targets the datastore holds than for the most frequent "
          f"({v['rare']} vs {v['frequent']} occurrences; targets absent from the datastore cannot gain and are "
          f"shown apart): {yes(v['held'])}.", ""]
    L += note(r)
    L += ["### The test tokens the datastore helped most (`knnlm.run.explain`)", "",
          "Each with its nearest neighbours in the datastore (weight = share of p_kNN, d = squared L2 distance, "
          "✓ = the neighbour's value is the target).", "", r["examples_md"], ""]
    return L


def note(r) -> list[str]:
    rows = r["rows"]
    zero = next((x for x in rows if x["bucket"].startswith("0-")), None)
    out = []
    if zero is not None:
        out.append(f"Targets that never occur as a value in the datastore ({100 * zero['share']:.1f}% of test "
                   f"tokens) get no p_kNN and lose exactly log(1/(1 - λ)) each "
                   f"({zero['mean_gain_nats']:+.3f} nats/token at λ = {r['settings']['lambda']:.2f}).")
    best = max(rows, key=lambda x: x["mean_gain_nats"])
    out.append(f"The largest mean gain is in the {best['bucket']} bucket ({best['mean_gain_nats']:+.3f} nats/token)"
               + (": the examples below suggest why: WikiText's own conventions such as ` @-@ ` for a hyphen are "
                  "frequent in the datastore yet unexpected by a model trained on ordinary text, and the datastore "
                  "teaches them." if " @" in r.get("examples_md", "") else "."))
    return (why if not frequency_verdict(r)["held"] else (lambda x: ["**Note:** " + " ".join(x), ""]))(out)


def plot(r, plt, save) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [f"{bucket_label(row['bucket'])}\n({100 * row['share']:.0f}%)" for row in r["rows"]]
    ax.bar(labels, [100 * (row["ppl_knnlm"] / row["ppl_lm"] - 1) for row in r["rows"]], color="C0")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="occurrences of the target token as a datastore value (share of test tokens)",
           ylabel="perplexity change, %")
    ax.tick_params(axis="x", labelsize=8)
    save(fig, "frequency.png")
