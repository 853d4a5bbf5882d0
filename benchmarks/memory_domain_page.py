"""The new-domain section of docs/memory.md from benchmarks/results/memory/es-*.json
(bench_memory_domain.py), called by memory_page.render."""

from __future__ import annotations

import json
from pathlib import Path


def _load(d: Path, name: str) -> dict | None:
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


def _cell(s: str) -> str:
    return s.replace("\n", "\\n").replace("|", "\\|")


def _p(x: float) -> str:
    """A probability with 3 significant digits (1.72e-09, 0.0026, 0.915)."""
    return f"{x:.3g}"


def _label(name: str) -> str:
    if name.startswith("mem-L"):
        layers, temp = name[5:].split("-T")
        clean = temp.endswith("-clean")
        temp = temp.removesuffix("-clean")
        return f"Memory Decoder L={layers} (targets T={temp}{', held-out articles out of them' if clean else ''})"
    return name


def plot_curves(results: Path, out: Path) -> bool:
    """Held-out CE by epoch of every training (decoders and fine-tuning) into `out` (PNG)."""
    trains = sorted(results.glob("es-train-*.json"))
    if not trains:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for p in trains:
        tr = json.loads(p.read_text())
        ep = tr["epochs"]
        ax.plot([e["epoch"] for e in ep], [e["ce"] for e in ep], marker="o",
                label=_label(tr["name"]) if tr["name"] != "finetuned" else "fine-tuned LM (full)")
    return finish_plot(fig, ax, "epoch", "held-out CE (nats/token)", "Spanish leads: held-out articles, by epoch", out)


def finish_plot(fig, ax, xlabel: str, ylabel: str, title: str, out: Path) -> bool:
    """Labels, grid and legend of a memory page's plot, saved as `out` (110 dpi); True."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def domain_section(results: Path, img: Path | None = None) -> list[str]:
    q = _load(results, "es-quality")
    if q is None:
        return []
    s = _load(results, "es-speed") or {}
    ratio = s.get("ratio", {})
    ppl, tuned = q["test_ppl"], q["tuned"]
    base = ppl["lm"]
    trains = {p.stem[len("es-train-"):]: json.loads(p.read_text()) for p in sorted(results.glob("es-train-*.json"))}
    targets = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("es-targets-*.json"))}
    fts = _load(results, "es-ftstore")

    def r(n):
        return f"{ratio[n]:.2f}x" if n in ratio else ""

    def row(name, key, speed="", train="", disk=""):
        if key not in ppl:
            return None
        p = ppl[key]
        return f"| {name} | {p:.3f} | {100 * (p / base - 1):+.1f}% | {speed} | {train} | {disk} |"

    def train_time(name):
        tr = trains.get(name)
        if tr is None:
            return ""
        t = targets.get(f"es-targets-T{tr['temperature']:g}{'-clean' if tr.get('clean') else ''}")
        if name == "finetuned":
            return f"{tr['seconds'] / 60:.1f} min ({tr['best_step']} steps kept of {tr['steps']})"
        extra = f" + targets {t['seconds'] / 60:.1f}" if t else ""
        return f"{(tr['seconds'] + (t['seconds'] if t else 0)) / 60:.1f} min (train {tr['seconds'] / 60:.1f}{extra})"

    kn, ks = tuned["knnlm"], tuned["knnlm_self_tuned"]
    lines = ["## New domain: Spanish Wikipedia leads", "",
             f"The datastore of `knnlm demo` (es-es): {q['entries']} entries from 300 lead sections of Spanish "
             "Wikipedia, smollm2-135m bf16, an English model that reads Spanish badly.  "
             f"{q['heldout_documents']} of the 300 articles ({q['heldout_tokens']} tokens, seeded) are held out of "
             "every training (decoders and fine-tuning: early stopping on them) and every λ (and the kNN-LM's k, λ, "
             "T) is tuned on them, retrieving with the article's own entries left out.  Test: the demo's "
             f"{q['test_documents']} held-out articles, {q['test_tokens']} tokens, not in the datastore"
             + (" (targets and LM log-probs identical to the demo's cached queries: "
                f"{q.get('test_matches_demo_cache')}, max |Δ log p| {q.get('test_lm_max_diff_vs_demo_cache', 0):.1e})"
                if "test_matches_demo_cache" in q else "") + ".", "",
             "| system | test ppl | vs base LM | eval tokens/s vs base LM | training (2 CPU cores) | bytes on disk |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = [row("base LM (smollm2-135m bf16)", "lm", "1.00x"),
            row(f"kNN-LM, the datastore's own settings (k={ks['k']}, λ={ks['lambda']:g}, T={ks['temperature']:g})",
                "knnlm_self_tuned"),
            row(f"kNN-LM, tuned on the held-out articles (k={kn['k']}, λ={kn['lambda']:g}, T={kn['temperature']:g})",
                "knnlm", r("knnlm"), "none (one forward pass)", _mb(q["datastore_bytes"]) + " (keys, Flat index)")]
    for n in q["decoders"]:
        tr = trains.get(n, {})
        rows.append(row(f"{_label(n)}, λ={tuned[n]['lambda']:g}", n, r(n), train_time(n),
                        _mb(tr["bytes"]) if tr else ""))
    ft = trains.get("finetuned")
    if ft:
        rows.append(row(f"fine-tuned LM (full, lr {ft['lr']:g}, best of {len(ft['epochs'])} epochs: step "
                        f"{ft['best_step']})", "finetuned", r("finetuned"), train_time("finetuned"), _mb(ft["bytes"])))
        if "finetuned+knn" in tuned:
            f = tuned["finetuned+knn"]
            rows.append(row(f"fine-tuned + kNN (its own datastore; k={f['k']}, λ={f['lambda']:g}, "
                            f"T={f['temperature']:g})", "finetuned+knn", r("finetuned+knn"),
                            f"+ {fts['build_seconds'] / 60:.1f} min datastore" if fts else "",
                            f"{_mb(ft['bytes'])} + {_mb(fts['bytes'])}" if fts else ""))
    for n in q["decoders"]:
        rows.append(row(f"{_label(n)} on top of the tuned kNN-LM, λ_mem={tuned['knnlm+' + n]['lambda']:g}",
                        f"knnlm+{n}", r(f"knnlm+{n}")))
    ng = tuned.get("ngram")
    if ng:
        rows.append(row(f"LM + {ng['order']}-gram Kneser-Ney of the datastore text, λ={ng['lambda']:g}", "ngram"))
    lines += [x for x in rows if x]
    alone = ", ".join(f"{_label(n)} {ppl[n + '_alone']:.1f}" for n in q["decoders"])
    lines += ["", f"Alone (λ = 1): {alone}" + (f"; the n-gram model {ppl['ngram_alone']:.1f}" if ng else "") + ".", ""]
    held_ppl = q.get("heldout_ppl", {})
    if q["decoders"] and "lm" in held_ppl:
        lines += ["Held-out vs test perplexity (alone): LM " f"{held_ppl['lm']:.1f} / {base:.1f}; " + "; ".join(
            f"{_label(n)} {held_ppl[n + '_alone']:.1f} / {ppl[n + '_alone']:.1f}" for n in q["decoders"]) + ".", ""]
    oracle = q.get("test_oracle_lambda")
    if oracle:
        lines += ["Diagnostic only, not a result (λ chosen on the test articles themselves): " + "; ".join(
            f"{_label(n)} λ = {o['lambda']:g} → {o['ppl']:.3f}" for n, o in oracle.items())
            + "; the held-out choice was " + ", ".join(f"{tuned[n]['lambda']:g}" for n in oracle) + ".", ""]
    lines += analyses(q, ppl, trains)
    if ratio and q["decoders"]:
        lines.insert(-1, "| decoder inference >= 0.7x the base LM's eval tokens/s (issue target) | " + "; ".join(
            f"{_label(n)} {ratio[n]:.2f}x" for n in q["decoders"] if n in ratio)
            + f" (kNN-LM {ratio.get('knnlm', float('nan')):.2f}x) | "
            + ("yes" if all(ratio.get(n, 0) >= 0.7 for n in q["decoders"]) else "L=2 yes, larger L no"
               if any(ratio.get(n, 0) >= 0.7 for n in q["decoders"]) else "no") + " |")
    if s:
        tps = s["tokens_per_second"]
        lines += [f"Speed: the first {s['documents']} articles of the datastore corpus ({s['tokens']} tokens) scored by "
                  f"each system {s.get('repeats', 2)} times, interleaved, best kept, in one process: "
                  + ", ".join(f"{n} {v:.0f} tokens/s" for n, v in tps.items())
                  + f" (kNN: Flat index, k = {s['k']['knnlm']}).", ""]
    if trains:
        lines += ["### Training curves", "",
                  "Held-out articles after each epoch (early stopping keeps the best; patience 2 epochs):", "",
                  "| training | tokens / epoch | epoch: held-out loss (KL, CE) | mean train loss by epoch | peak RSS |",
                  "|---|---:|---|---|---:|"]
        for n, tr in trains.items():
            ep = "; ".join(f"{e['epoch']}: {e['loss']:.3f} ({e['kl']:.2f}, {e['ce']:.3f})" for e in tr["epochs"])
            label = "fine-tuned LM (α = 0: CE only)" if n == "finetuned" else _label(n)
            lines.append(f"| {label} | {tr['train_tokens_per_epoch']} | {ep} | "
                         f"{', '.join(f'{x:.2f}' for x in tr['train_loss_by_epoch'])} | {tr['peak_rss_mb']:.0f} MB |")
        lines.append("")
        if img is not None and plot_curves(results, img):
            lines += [f"![held-out CE by epoch]({img.parent.name}/{img.name})", ""]
    if targets:
        lines += ["Training targets: " + "; ".join(
            f"k = {t['k']}, T = {t['temperature']:g}: {t['count']} positions in {t['seconds']:.0f} s, the 64 most "
            f"likely tokens held {100 * t['mean_kept_mass']:.1f}% of p_kNN, {_mb(t['bytes'])}"
            for t in targets.values()) + " (each position's own article left out of its neighbours).", ""]
    c = q.get("cases")
    if c:
        lines += [f"### Case study (test tokens; decoder {_label(c['decoder'])}, λ = {c['memory_lambda']:g})", ""]
        for key, title in (("mem_gain", "Where the decoder raises p(target) most over the LM"),
                           ("knn_gain", "Where the kNN-LM raises it most"),
                           ("knn_loss", "Where the kNN-LM lowers it most")):
            lines += [f"{title}:", "", "| context | token | p_LM | p_kNN-LM | p_mem | p_LM+mem |",
                      "|---|---|---:|---:|---:|---:|"]
            for x in c[key]:
                lines.append(f"| …{_cell(x['context'])[-45:]} | `{_cell(x['target'])}` | {_p(x['p_lm'])} | "
                             f"{_p(x['p_knnlm'])} | {_p(x['p_mem'])} | {_p(x['p_mix'])} |")
            lines.append("")
    return lines


def analyses(q: dict, ppl: dict, trains: dict) -> list[str]:
    """The issue's target on the new domain and the kNN-LM paper's analyses: claim / measured / held?"""
    base, knn = ppl["lm"], ppl["knnlm"]

    def pct(x):
        return f"{100 * (x / base - 1):+.1f}%"

    out = ["### Claims on the new domain", "", "| claim | measured (test ppl) | held? |", "|---|---|---|"]
    if q["decoders"]:
        best = min(q["decoders"], key=lambda n: ppl[n])
        each = "; ".join(f"{_label(n)} {ppl[n]:.3f} ({pct(ppl[n])})" for n in q["decoders"])
        out.append(f"| Memory Decoder at least as good as the kNN-LM on a new domain (issue target; the Memory "
                   f"Decoder paper: better) | {each}; tuned kNN-LM {knn:.3f} ({pct(knn)}) | "
                   f"{'yes' if ppl[best] <= knn else 'no'} |")
        out.append(f"| ... and clearly better than the base LM | {ppl[best]:.3f} vs {base:.3f} | "
                   f"{'yes' if ppl[best] < 0.98 * base else 'no'} |")
    out += paper_claims(ppl)
    return out + [""]


def paper_claims(ppl: dict, digits: int = 1) -> list[str]:
    """The kNN-LM paper's claims measured where `ppl` (test perplexities: lm, knnlm and any of
    ngram, finetuned, finetuned+knn) has them: claim / measured / held? table rows."""
    base, knn = ppl["lm"], ppl["knnlm"]

    def pct(x):
        return f"{100 * (x / base - 1):+.{digits}f}%"

    out = []
    if "ngram" in ppl:
        ng = ppl["ngram"]
        held = (base - ng) < 0.25 * (base - knn)
        out.append(f"| Simple vs neural representation (kNN-LM paper, Sec. 6): an n-gram LM of the datastore text "
                   f"mixed with the LM gains little (paper: -0.2 ppl), the kNN-LM much more | LM + n-gram {ng:.3f} "
                   f"({pct(ng)}) vs kNN-LM {knn:.3f} ({pct(knn)}) | {'yes' if held else 'no'} |")
    if "finetuned" in ppl:
        ft = ppl["finetuned"]
        out.append(f"| Retrieval vs training on the same data (kNN-LM paper, Sec. 4.2: retrieving from the data "
                   f"beats training on it) | fine-tuned LM {ft:.3f} ({pct(ft)}) vs kNN-LM {knn:.3f} ({pct(knn)}) | "
                   f"{'yes' if knn < ft else 'no'} |")
        if "finetuned+knn" in ppl:
            fk = ppl["finetuned+knn"]
            out.append(f"| ... and they add up (fine-tuned + kNN better than either) | {fk:.3f} ({pct(fk)}) | "
                       f"{'yes' if fk < min(ft, knn) else 'no'} |")
    return out
