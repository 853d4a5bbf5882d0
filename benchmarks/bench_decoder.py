"""Is a Memory Decoder with its default λ never worse than the LM?  Decoders trained as a user
would (`knnlm memory targets`, `knnlm memory train` with its defaults and a few epochs), then
the test text scored by the LM, the LM + decoder with the default λ (the one `memory train`
tuned on its held-out text and recorded, adapting as the text is read: what `knnlm eval
--memory` does), the same λ fixed, the old default (0.25 fixed) and the best λ on the test
text itself (an oracle no user has).  Three cases:

- code: a small datastore of one kind of text: the model configuration files
  (`models/*/configuration_*.py`) of the installed transformers, ~20k tokens of them as the
  datastore and 20 other files as the test text (seeded choice; the corpus is written to
  WORK/code/corpus with its sha256);
- es-es: the demo's Spanish leads (`knnlm demo`'s datastore-300, its held-out test leads);
- wikitext2: the WikiText-2 benchmark's datastore (targets of its first --limit positions),
  tested on --test-text (the first whole articles of wiki.test.raw).

Each phase is one process (run each under the shared CPU lock):

    python benchmarks/bench_decoder.py corpus --case code                # builds WORK/code/datastore
    python benchmarks/bench_decoder.py targets --case code               # knnlm memory targets (defaults)
    python benchmarks/bench_decoder.py train --case code --epochs 3      # knnlm memory train (defaults)
    python benchmarks/bench_decoder.py quality --case code
    python benchmarks/bench_decoder.py render                            # benchmarks/results/decoder.md

Results: WORK/CASE/quality.json; `render` collects them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
from common import run_main, setup_logging

from knnlm.errors import KnnlmError

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")
CASES = ("code", "es-es", "wikitext2")
LABELS = {"code": "code: transformers' configuration files (small, one kind)",
          "es-es": "Spanish leads (demo) → held-out leads", "wikitext2": "WikiText-2 → first test articles"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def case_paths(a) -> dict:
    """datastore, test text and working folder of a.case."""
    work = Path(a.work) / a.case
    if a.case == "code":
        return {"work": work, "datastore": work / "datastore", "test": work / "corpus" / "test.jsonl"}
    if a.case == "es-es":
        demo = Path(a.demo_dir) / "es-es"
        stores = sorted(demo.glob("datastore-*"))
        if not stores:
            raise KnnlmError(f"no demo datastore in {demo}: run `knnlm demo --workdir {a.demo_dir}` first")
        return {"work": work, "datastore": stores[-1], "test": demo / "corpus" / "test.jsonl"}
    if not a.test_text:
        raise KnnlmError("--case wikitext2 needs --test-text (the first whole articles of wiki.test.raw)")
    return {"work": work, "datastore": Path(a.wikitext_datastore), "test": Path(a.test_text)}


def load_lm(a):
    from knnlm.core.model import LM

    return LM.load(a.model, dtype="bfloat16", device="cpu")


def phase_corpus(a, p) -> None:
    """The code case's corpus (seeded choice of files) and its datastore, built and self-tuned."""
    import transformers

    import knnlm

    if a.case != "code":
        raise KnnlmError("only --case code builds its own corpus")
    files = sorted(Path(transformers.__file__).parent.glob("models/*/configuration_*.py"))
    files = [f for f in files if 500 <= f.stat().st_size <= 15000]  # no empty shims, no giant tables
    random.Random(0).shuffle(files)
    lm = load_lm(a)
    docs = [{"title": f"{f.parent.name}/{f.name}", "text": f.read_text(encoding="utf-8")} for f in files]
    test, store, tokens = docs[: a.test_files], [], 0
    for d in docs[a.test_files :]:
        if tokens >= a.domain_tokens:
            break
        store.append(d)
        tokens += len(lm.encode(d["text"]))
    corpus = p["work"] / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, rows in (("datastore.jsonl", store), ("test.jsonl", test)):
        (corpus / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    from knnlm.core.datastore import Datastore
    from knnlm.run.selftune import self_tune

    built = p["datastore"] / "meta.json"
    if built.exists() and json.loads(built.read_text())["corpora"][0]["sha256"] == sha256(corpus / "datastore.jsonl"):
        ds = Datastore(p["datastore"])  # built by an earlier run of this phase: tuned only if it was not
        if not ds.settings:
            self_tune(lm, ds, progress=False)
            ds = Datastore(p["datastore"])
    else:
        ds = knnlm.build(lm, [corpus / "datastore.jsonl"], p["datastore"], overwrite=True, progress=False)
    info = {"transformers": transformers.__version__, "files_datastore": len(store), "files_test": len(test),
            "datastore_entries": ds.count, "sha256": {n: sha256(corpus / n) for n in ("datastore.jsonl", "test.jsonl")}}
    (p["work"] / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    LOG.info("corpus: %s", info)


def phase_targets(a, p) -> None:
    from knnlm.memory.targets import build_targets

    t0 = time.perf_counter()
    out = build_targets(p["datastore"], p["work"] / "targets", limit=a.limit, overwrite=True, progress=False)
    (p["work"] / "targets.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1),
                                                        "limit": a.limit, "path": str(out)}) + "\n")


def phase_train(a, p) -> None:
    from knnlm.memory.decoder import read_meta
    from knnlm.memory.train import TrainConfig, train_decoder

    cfg = TrainConfig(epochs=a.epochs, autocast=a.autocast,
                      max_seconds=None if a.max_minutes is None else 60 * a.max_minutes,
                      heldout_unit=a.heldout_unit, heldout=a.heldout)
    lm = load_lm(a)
    out = train_decoder(lm, p["datastore"], p["work"] / "targets", p["work"] / "mem", layers=a.layers, config=cfg,
                        overwrite=True, progress=False)
    m = read_meta(out)
    LOG.info("decoder: %s steps, %s s, settings %s", m["steps"], m["seconds"], m.get("settings"))


def phase_quality(a, p) -> None:
    from knnlm.core.batching import plan_files
    from knnlm.core.mix import Weight, mix_text
    from knnlm.core.scoring import perplexity
    from knnlm.memory.decoder import MemoryDecoder, read_meta
    from knnlm.memory.mix import DEFAULT_MEMORY_LAMBDA, MEMORY_LAMBDAS, memory_weight, sweep_memory
    from knnlm.run.evaluate import score_plan

    lm = load_lm(a)
    mem = MemoryDecoder.load_for(lm, p["work"] / "mem")
    meta = read_meta(p["work"] / "mem")
    plan = plan_files(lm, [p["test"]], 1024, 512, 4096)
    t0 = time.perf_counter()
    s = score_plan(lm, plan, None, mem, progress=False)
    seconds = time.perf_counter() - t0

    def ppl(w: Weight) -> float:
        return perplexity(mix_text(s.lm, s.memory[:, None], [w])[0])

    default = memory_weight(meta)  # what eval/generate/serve use when no λ is given
    grid = sweep_memory(s.lm, s.memory, MEMORY_LAMBDAS)
    res = {"case": a.case, "datastore": str(p["datastore"]), "test": str(p["test"]), "test_sha256": sha256(p["test"]),
           "tokens": int(plan.count), "ppl_lm": perplexity(s.lm), "default": {"lambda": default.lam,
                                                                              "mode": default.mode},
           "ppl_default": ppl(default), "ppl_recorded_fixed": ppl(Weight(default.lam)),
           "ppl_old_default": ppl(Weight(DEFAULT_MEMORY_LAMBDA)), "ppl_decoder_alone": perplexity(s.memory),
           "oracle": grid["best"], "grid": grid["grid"], "settings": meta.get("settings"),
           "training": {f: meta.get(f) for f in ("steps", "best_step", "seconds", "epochs_done", "heldout_pieces",
                                                "heldout_documents", "train_tokens_per_epoch", "layers",
                                                "config", "stopped")},
           "seconds_scoring": round(seconds, 1)}
    tj = p["work"] / "targets.json"
    if tj.exists():
        res["targets"] = json.loads(tj.read_text())
    cj = p["work"] / "corpus.json"
    if cj.exists():
        res["corpus"] = json.loads(cj.read_text())
    (p["work"] / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    LOG.info("%s: LM %.3f, default (λ %.2f %s) %.3f, fixed %.3f, 0.25 %.3f, oracle λ %.2f %.3f", a.case,
             res["ppl_lm"], default.lam, default.mode, res["ppl_default"], res["ppl_recorded_fixed"],
             res["ppl_old_default"], grid["best"]["lambda"], grid["best"]["ppl"])


def pct(x: float, base: float) -> str:
    return f"{100 * (x / base - 1):+.2f}%"


def render(a) -> str:
    rows = []
    for case in CASES:
        q = Path(a.work) / case / "quality.json"
        if q.exists():
            rows.append(json.loads(q.read_text()))
    out = ["# Memory Decoder: is the default λ ever worse than the LM?", "",
           "A decoder (L = 2 layers cut from the LM) trained as a user would: `knnlm memory targets DS -o T` and",
           "`knnlm memory train DS --targets T -o MEM` with the defaults, a few epochs.  `memory train` tunes λ on",
           "the decoder's held-out pieces of its corpus and records it (0 when the decoder does not help there);",
           "**the default** is that λ adapting to the text as it is read (knnlm.core.mix: at most log(1/w0) ≈ 1.4",
           "nats over a whole text worse than the LM).  \"old default\" is λ = 0.25 fixed (before λ was tuned);",
           "the oracle is the best λ on the test text itself (no user has it).  Model: smollm2-135m (bfloat16),",
           "2 shared CPU cores.", "",
           "| case | datastore entries | decoder trained | test tokens | LM | **default** (recorded λ, "
           "adaptive) | vs LM | recorded λ fixed | old default (0.25 fixed) | oracle λ (test) | oracle ppl |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st, tr, o = r.get("settings") or {}, r["training"], r["oracle"]
        lam = r["default"]["lambda"]
        entries = json.loads((Path(r["datastore"]) / "meta.json").read_text())["count"]
        lim = (r.get("targets") or {}).get("limit")
        trained = f"{tr['steps']} steps, stopped: {tr['stopped']}" + (f"; targets of the first {lim} positions"
                                                                        if lim else "")
        out.append(f"| {LABELS[r['case']]} | {entries} | {trained} | {r['tokens']} | "
                   f"{r['ppl_lm']:.3f} | **{r['ppl_default']:.3f}** (λ {lam:.2f}, {r['default']['mode']}) | "
                   f"{pct(r['ppl_default'], r['ppl_lm'])} | {r['ppl_recorded_fixed']:.3f} "
                   f"({pct(r['ppl_recorded_fixed'], r['ppl_lm'])}) | {r['ppl_old_default']:.3f} "
                   f"({pct(r['ppl_old_default'], r['ppl_lm'])}) | {o['lambda']:.2f} | {o['ppl']:.3f} "
                   f"({pct(o['ppl'], r['ppl_lm'])}) |")
    out += ["", "How each recorded λ was tuned (memory.json `settings`):", ""]
    for r in rows:
        st = r.get("settings") or {}
        out.append(f"- {r['case']}: λ {st.get('lambda')} on {st.get('tokens')} tokens ({st.get('how')}: ppl LM "
                   f"{st.get('ppl_lm', float('nan')):.3f} -> {st.get('ppl_memory', float('nan')):.3f} there); "
                   f"decoder alone on the test text {r['ppl_decoder_alone']:.1f}; training {tr_line(r)}.")
    out += ["", "Commands (each phase under the shared CPU lock; WORK: the work folder, knnlm-demo: `knnlm demo`'s "
            "--workdir, wiki_test_head.txt: the first whole articles of wiki.test.raw):", "", "```"] + a.commands + ["```", ""]
    return "\n".join(out)


def tr_line(r: dict) -> str:
    t = r["training"]
    return f"{t['steps']} steps, {t['seconds']} s, {t['train_tokens_per_epoch']} tokens an epoch, stopped: {t['stopped']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["corpus", "targets", "train", "quality", "render"])
    ap.add_argument("--case", choices=CASES, default="code")
    ap.add_argument("--work", default=str(HERE / "cache" / "decoder"), help="folder of every case's files")
    ap.add_argument("--demo-dir", default="knnlm-demo", help="the demo's --workdir (case es-es)")
    ap.add_argument("--wikitext-datastore", default=str(HERE / "cache" / "wikitext2" / "ds-bfloat16"))
    ap.add_argument("--test-text", default=None, help="case wikitext2: the test text")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--domain-tokens", type=int, default=20000, help="case code: datastore tokens")
    ap.add_argument("--test-files", type=int, default=20, help="case code: test files")
    ap.add_argument("--limit", type=int, default=None, help="targets of the first N positions only")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heldout", type=float, default=0.02, help="as `knnlm memory train --heldout`")
    ap.add_argument("--heldout-unit", default="piece", help="as `knnlm memory train --heldout-unit`")
    ap.add_argument("--autocast", default="bfloat16", help="as `knnlm memory train --autocast`")
    ap.add_argument("--max-minutes", type=float, default=None, help="training budget (the best so far is kept)")
    ap.add_argument("--commands", default=None, help="render: a file of the commands that made the results")
    ap.add_argument("--out", default=str(HERE / "results" / "decoder.md"))
    a = ap.parse_args()
    setup_logging("bench", fmt="%(name)s: %(message)s")
    if a.phase == "render":
        a.commands = Path(a.commands).read_text().splitlines() if a.commands else []
        Path(a.out).write_text(render(a))
        print(Path(a.out).read_text())
        return 0
    p = case_paths(a)
    p["work"].mkdir(parents=True, exist_ok=True)
    {"corpus": phase_corpus, "targets": phase_targets, "train": phase_train, "quality": phase_quality}[a.phase](a, p)
    return 0


if __name__ == "__main__":
    run_main(main)
