"""Implicit vs explicit memory (Khandelwal et al. 2020, Sec. 6, Fig. 8) on the Spanish new
domain: the LM fine-tuned to memorise a text (train loss near zero, no dropout),
mixed with the original LM, against the kNN-LM whose datastore is that same text.

The text is a seeded subset of the demo datastore's training articles (the 30 held-out
articles of bench_memory_domain.py kept out), ~13k tokens, so that one epoch of full
fine-tuning costs ~2 minutes on 2 cores.  Every λ (and the kNN-LM's k, λ, T) is tuned on the
held-out articles; test: the demo's 20 test articles.  Each phase is one process:

    D="--domain /work/cache/demo/es-es --cache /work/cache/mem9b"
    python benchmarks/bench_memory_implicit.py subset $D      # choose the articles (cheap)
    python benchmarks/bench_memory_implicit.py train $D --slot-minutes 18   # again to resume
    python benchmarks/bench_memory_implicit.py store $D       # the kNN-LM datastore of the subset
    python benchmarks/bench_memory_implicit.py quality $D     # tune on held-out, test
    python benchmarks/bench_memory.py render                  # docs/memory.md

The memorising LM is `train_decoder` with all 30 layers, α = 0 (next-token CE only, no
targets), keep="last" (the final weights, not the best held-out ones: no early stopping),
train_documents = the subset, until_train_loss (stop after the first epoch whose mean train
loss is below it).  smollm2-135m has no dropout (attention_dropout 0.0, no other dropout
in its Llama layers).  Results: benchmarks/results/memory/es-implicit.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import bench_memory
import numpy as np
from bench_memory import dir_bytes, rss_mb
from bench_memory_domain import add_domain_args, heldout_documents, load_lm, setup

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")
NAME = "es-implicit"


def _results() -> Path:
    return bench_memory.RESULTS / f"{NAME}.json"


def _load() -> dict:
    p = _results()
    return json.loads(p.read_text()) if p.exists() else {}


def command() -> None:
    """Append this process's command line to es-implicit.json's list (every run, slots too)."""
    from common import command_line

    res = _load()
    res.setdefault("commands", []).append(command_line(__file__))
    bench_memory.save(NAME, res)


def record(part: str, obj: dict) -> None:
    """Merge one phase's results into es-implicit.json."""
    res = _load()
    res[part] = obj
    bench_memory.save(NAME, res)


def subset_documents(a) -> list[int]:
    return json.loads((a.cache / "subset.json").read_text())["documents"]


def phase_subset(a) -> None:
    """A seeded subset of the articles not held out, in corpus order, until --subset-tokens
    predicted tokens; written as a corpus file (the datastore's lines) for the kNN-LM build."""
    from knnlm.core.datastore import Datastore

    ds = Datastore(a.datastore)
    held = set(heldout_documents(a))
    rest = [d for d in range(len(ds.docs)) if d not in held]
    chosen, tokens = [], 0
    for d in np.random.default_rng(a.seed).permutation(rest):
        if tokens >= a.subset_tokens:
            break
        chosen.append(int(d))
        tokens += int(ds.docs[d, 1]) - 1
    chosen.sort()
    lines = a.corpus.read_text(encoding="utf-8").splitlines()
    docs = [json.loads(x) for x in (a.datastore / "docs.jsonl").read_text().splitlines()]
    assert all(docs[d]["source"] == a.corpus.name for d in chosen)
    a.cache.mkdir(parents=True, exist_ok=True)
    (a.cache / "subset.jsonl").write_text("".join(lines[docs[d]["line"] - 1] + "\n" for d in chosen), encoding="utf-8")
    info = {"documents": chosen, "count": len(chosen), "predicted_tokens": tokens, "seed": a.seed,
            "heldout_documents": sorted(held), "of_training_articles": len(rest)}
    (a.cache / "subset.json").write_text(json.dumps(info) + "\n")
    record("subset", info)


def _config(a):
    from knnlm.memory.train import TrainConfig

    return TrainConfig(alpha=0.0, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, seq_len=a.seq_len,
                       heldout=a.heldout, heldout_unit="document", seed=0, autocast="bfloat16", keep="last",
                       train_documents=subset_documents(a), until_train_loss=a.until_loss,
                       max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)


def phase_train(a) -> None:
    """Memorise the subset; --slot-minutes interrupts this process (checkpoint kept) so that a
    long training runs in several locked slots: run the same command again to resume."""
    from knnlm.errors import KnnlmError
    from knnlm.memory.decoder import num_layers, read_meta
    from knnlm.memory.train import train_decoder

    lm = load_lm(a)
    out = a.cache / a.name
    t0 = time.perf_counter()

    def slot(step, last):
        LOG.info("step %d: train loss %.4f (%.0f s in this slot)", step, last["loss"], time.perf_counter() - t0)
        if a.slot_minutes is not None and time.perf_counter() - t0 > 60 * a.slot_minutes:
            raise KeyboardInterrupt

    if not (out / "memory.json").exists():
        try:
            train_decoder(lm, a.datastore, None, out, layers=num_layers(lm.model), config=_config(a),
                          progress=False, on_step=slot)
        except KnnlmError as e:
            if "interrupted" not in str(e):
                raise
            LOG.info("slot over: %s", e)
            return
    m = read_meta(out)
    hist = m["history"]
    epochs = [{"epoch": i + 1, "step": h["step"], **h["heldout"]}
              for i, h in enumerate(x for x in hist if "heldout" in x)]
    train = [h["train"] for h in hist if "train" in h]
    record("train" if a.name == "memorised" else f"train-{a.name}", {
                     "layers": m["layers"], "lr": m["config"]["lr"], "config": m["config"], "seconds": m["seconds"],
                     "steps": m["steps"], "stopped": m["stopped"], "kept": m["kept"], "epochs": epochs,
                     "train_loss_by_epoch": by_epoch(train, -(-m["train_pieces"] // m["config"]["batch_size"])),
                     "train_pieces": m["train_pieces"], "train_tokens_per_epoch": m["train_tokens_per_epoch"],
                     "heldout_documents": m["heldout_documents"], "best_heldout_step": m["best_step"],
                     "bytes": dir_bytes(out), "peak_rss_mb": rss_mb()})


def by_epoch(train: list[dict], per_epoch: int) -> list[float]:
    """Mean train loss of each epoch's steps (the last one may be cut short)."""
    return [round(float(np.mean([t["loss"] for t in train[i : i + per_epoch]])), 4)
            for i in range(0, len(train), per_epoch)]


def phase_store(a) -> None:
    """The kNN-LM datastore of exactly the subset: the original LM, the demo datastore's windows."""
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    lm = load_lm(a, None if a.keys == "lm" else a.cache / a.keys)
    out = a.cache / ("ds-subset" if a.keys == "lm" else f"ds-subset-{a.keys}")
    base = Datastore(a.datastore)
    t0 = time.perf_counter()
    if not (out / "meta.json").exists():
        build_datastore(lm, [a.cache / "subset.jsonl"], out, window=int(base.meta["window"]),
                        stride=int(base.meta["stride"]), progress=False)
        build_index(Datastore(out), "auto", progress=False)
    ds = Datastore(out)
    def tokens(store, row):
        return np.asarray(store.tokens[int(row[0]) : int(row[0]) + int(row[1])])

    same = all(np.array_equal(tokens(ds, r), tokens(base, base.docs[d])) for r, d in zip(ds.docs, subset_documents(a)))
    if not same or len(ds.docs) != len(subset_documents(a)):
        raise SystemExit("the subset datastore's tokens are not the subset's tokens in the demo datastore")
    record("store" if a.keys == "lm" else f"store-{a.keys}", {
                     "entries": ds.count, "documents": len(ds.docs), "tokens_match_demo_datastore": same,
                     "seconds": round(time.perf_counter() - t0, 1), "bytes": dir_bytes(out),
                     "indexes": sorted(x.name for x in (out / "indexes").iterdir()), "peak_rss_mb": rss_mb()})


def phase_quality(a) -> None:
    """The base LM (--keys lm: the original; or an LM trained in the `train` phase, e.g. the
    1-epoch "adapted" one), mixed with the memorising LM, against the kNN-LM of the subset
    with the base LM's keys; every λ (and k, λ, T) tuned on the held-out articles."""
    from knnlm.core.batching import plan_files
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.memory.mix import mix_memory, sweep_memory
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.selftune import piece_plan
    from knnlm.run.tune import sweep

    lm = load_lm(a, None if a.keys == "lm" else a.cache / a.keys)
    full = Datastore(a.datastore)  # the corpus tokens and windows
    store = open_for_model(lm, a.cache / ("ds-subset" if a.keys == "lm" else f"ds-subset-{a.keys}"))
    held_docs = heldout_documents(a)
    trained = json.loads((a.cache / "memorised" / "memory.json").read_text())
    if trained["heldout_documents"] != held_docs:
        raise SystemExit("the memorising LM held out other articles than bench_memory_domain's split")
    plan_h, _ = piece_plan(full, [(d, 0, int(full.docs[d, 1])) for d in held_docs])
    plan_s, _ = piece_plan(full, [(d, 0, int(full.docs[d, 1])) for d in subset_documents(a)])  # the memorised text
    plan_t = plan_files(lm, [a.test], int(full.meta["window"]), int(full.meta["stride"]), 4096)
    searcher = Searcher(store)  # the held-out and test articles are not in it: nothing to leave out
    sh = score_plan(lm, plan_h, searcher, k=a.k, keep_neighbors=True, progress=False)
    st = score_plan(lm, plan_t, searcher, k=a.k, keep_neighbors=True, progress=False)
    lm_s = score_plan(lm, plan_s, None, progress=False).lm
    b = sweep(sh.lm, sh.dists, sh.vals, sh.targets)["best"]

    def knn(sc):
        return interpolate(sc.lm, knn_target_logprobs(sc.dists[:, : b["k"]], sc.vals[:, : b["k"]], sc.targets,
                                                      b["temperature"]), b["lambda"])

    mem = load_lm(a, a.cache / "memorised")
    mem_h, mem_t, mem_s = (score_plan(mem, p, None, progress=False).lm for p in (plan_h, plan_t, plan_s))
    msw = sweep_memory(sh.lm, mem_h)
    lam = msw["best"]["lambda"]
    test = {"lm": st.lm, "knnlm": knn(st), "implicit": mix_memory(st.lm, mem_t, lam), "memorised_alone": mem_t}
    held = {"lm": sh.lm, "knnlm": knn(sh), "implicit": mix_memory(sh.lm, mem_h, lam), "memorised_alone": mem_h}
    oracle = sweep_memory(st.lm, mem_t)["best"]  # diagnostic only: λ chosen on the test articles
    record("quality" if a.keys == "lm" else f"quality-{a.keys}", {
        "base": a.keys, "subset_entries": store.count, "heldout_documents": len(held_docs),
        "heldout_tokens": plan_h.count, "test_documents": len(plan_t.docs), "test_tokens": plan_t.count,
        "subset_tokens": plan_s.count, "knnlm": {f: b[f] for f in ("k", "lambda", "temperature")},
        "implicit_lambda": lam, "implicit_grid": msw["grid"],
        "test_oracle_lambda": {"lambda": oracle["lambda"], "ppl": oracle["ppl"]},
        "test_ppl": {n: perplexity(v) for n, v in test.items()},
        "heldout_ppl": {n: perplexity(v) for n, v in held.items()},
        "subset_ppl": {"lm": perplexity(lm_s), "memorised": perplexity(mem_s)},
        "peak_rss_mb": rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["subset", "train", "store", "quality"])
    add_domain_args(ap, cache=HERE / "cache" / "memory-es-implicit")
    ap.add_argument("--subset-tokens", type=int, default=13000, help="predicted tokens of the memorised articles")
    ap.add_argument("--seed", type=int, default=0, help="the subset's choice")
    ap.add_argument("-k", type=int, default=1024, help="neighbours (tuning the kNN-LM)")
    ap.add_argument("--name", default="memorised",
                    help="train: the LM's folder in --cache (memorised; e.g. adapted with --epochs 1)")
    ap.add_argument("--keys", default="lm",
                    help="store/quality: the base LM, 'lm' (the original) or a trained one's --name (e.g. adapted)")
    ap.add_argument("--lr", type=float, default=3e-4, help="constant learning rate of the memorising LM")
    ap.add_argument("--epochs", type=int, default=40, help="at most")
    ap.add_argument("--until-loss", type=float, default=0.1, help="stop after the first epoch of lower mean train loss")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="training time budget over all slots; then the final weights are kept")
    ap.add_argument("--slot-minutes", type=float, default=None,
                    help="interrupt this process's training after this long (checkpointed; run again to resume)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout", type=float, default=0.1, help="share of the articles held out (bench_memory_domain's)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "memory")
    a = ap.parse_args()
    from common import setup_logging

    setup_logging("bench")
    bench_memory.set_results(a.results)
    setup(a)
    command()
    {"subset": phase_subset, "train": phase_train, "store": phase_store, "quality": phase_quality}[a.phase](a)


if __name__ == "__main__":
    from common import run_main

    run_main(main)
