"""Memory Decoder, fine-tuning and the kNN-LM on a new domain: Spanish Wikipedia
leads, the datastore of `knnlm demo` (300 articles, 46,453 entries, smollm2-135m bf16), its
20 held-out test articles; 2 CPU cores.

A slice of the datastore's own articles (--heldout, whole documents, seeded) is held out of
every training; λ (and the kNN-LM's k, λ, T) are tuned there, with leave-own-document-out
retrieval, and every system is compared on the test articles.  Each phase is one process:

    D="--domain /work/cache/demo/es-es"        # knnlm demo's es-es folder
    python benchmarks/bench_memory_domain.py targets $D --temperature 16   # p_kNN, k=1024
    python benchmarks/bench_memory_domain.py train $D --layers 2 --temperature 16 --epochs 12
    python benchmarks/bench_memory_domain.py train $D --layers 8 --temperature 16 --epochs 12
    python benchmarks/bench_memory_domain.py finetune $D --epochs 12          # full fine-tuning, CE only
    python benchmarks/bench_memory_domain.py ftstore $D                        # datastore of the fine-tuned LM
    python benchmarks/bench_memory_domain.py quality $D                        # tune on held-out, test
    python benchmarks/bench_memory_domain.py speed $D                          # tokens/s vs base LM, one run
    python benchmarks/bench_memory.py render                                   # docs/memory.md

Fine-tuning is `train_decoder` with all 30 layers and α = 0 (plain next-token CE): the same
data, split, batches, optimizer, checkpoints and best-on-held-out rule as the decoder.
Results: benchmarks/results/memory/es-*.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import bench_memory
import numpy as np
from bench_memory import dir_bytes, rss_mb, save

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")


def setup(a) -> None:
    a.datastore = a.domain / a.datastore_name
    a.corpus = a.domain / "corpus" / "datastore.jsonl"
    a.test = a.domain / "corpus" / "test.jsonl"
    a.cache.mkdir(parents=True, exist_ok=True)


def load_lm(a, path=None):
    from knnlm.core.model import LM

    return LM.load(str(path) if path else a.model, dtype="bfloat16", device="cpu")


def targets_dir(a, temperature=None) -> Path:
    clean = "-clean" if a.clean else ""
    return a.cache / f"targets-k{a.k}-T{(temperature or a.temperature):g}{clean}"


def heldout_documents(a) -> list[int]:
    """The articles every training holds out (train_decoder's document split, same seed)."""
    from knnlm.core.datastore import Datastore
    from knnlm.memory.train import pieces, split_pieces

    ds = Datastore(a.datastore)
    return [int(d) for d in split_pieces(pieces(ds.docs, a.seq_len, ds.count), ds.docs, a.heldout, "document", 0)[2]]


def phase_targets(a) -> None:
    from knnlm import RetrievalSettings
    from knnlm.memory.targets import Targets, TargetSettings, build_targets

    out = targets_dir(a)
    if not (out / "meta.json").exists():
        held = heldout_documents(a) if a.clean else ()
        build_targets(a.datastore, out, TargetSettings(keep=64, exclude="document", exclude_documents=held),
                      retrieval=RetrievalSettings(k=a.k, temperature=a.temperature), progress=False)
    t = Targets(out)
    save(f"es-targets-T{a.temperature:g}{'-clean' if a.clean else ''}", {"clean": a.clean,"count": t.count, "k": a.k, "temperature": a.temperature, "keep": 64,
                                            "exclude": "document", "seconds": t.meta["seconds"],
                                            "mean_kept_mass": t.meta["mean_kept_mass"], "bytes": dir_bytes(out),
                                            "peak_rss_mb": rss_mb()})


def _config(a, alpha: float, lr: float):
    from knnlm.memory.train import TrainConfig

    return TrainConfig(alpha=alpha, lr=lr, epochs=a.epochs, batch_size=a.batch_size, seq_len=a.seq_len,
                       heldout=a.heldout, heldout_unit="document", patience=a.patience, seed=0,
                       autocast="bfloat16", max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)


def _train(a, name: str, layers: int, alpha: float, lr: float, temperature: float) -> None:
    from knnlm.memory.decoder import read_meta
    from knnlm.memory.train import train_decoder

    lm = load_lm(a)
    out = a.cache / name
    t0 = time.perf_counter()
    if not (out / "memory.json").exists():
        train_decoder(lm, a.datastore, targets_dir(a, temperature), out, layers=layers,
                      config=_config(a, alpha, lr), progress=False)
    m = read_meta(out)
    epochs = [{"epoch": i + 1, "step": h["step"], **h["heldout"]}
              for i, h in enumerate(x for x in m["history"] if "heldout" in x)]
    train = [h["train"] for h in m["history"] if "train" in h]
    save(f"es-train-{name}", {"name": name, "clean": a.clean, "layers": layers, "alpha": alpha, "lr": lr, "temperature": temperature,
                              "seconds": m["seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                              "steps": m["steps"], "best_step": m["best_step"], "stopped": m.get("stopped"), "heldout": m["heldout"],
                              "epochs": epochs, "first_train": m["first_train"], "last_train": m["last_train"],
                              "train_loss_by_epoch": _by_epoch(train, len(epochs), m["steps"]),
                              "config": m["config"], "train_tokens_per_epoch": m["train_tokens_per_epoch"],
                              "heldout_documents": m["heldout_documents"], "heldout_pieces": m["heldout_pieces"],
                              "bytes": dir_bytes(out), "peak_rss_mb": rss_mb()})


def _by_epoch(train: list[dict], n_epochs: int, steps: int) -> list[float]:
    """Mean train loss of each epoch's steps."""
    if not n_epochs:
        return []
    per = max(1, round(steps / n_epochs))
    return [round(float(np.mean([t["loss"] for t in train[i * per : (i + 1) * per]])), 4)
            for i in range(n_epochs) if train[i * per : (i + 1) * per]]


def phase_train(a) -> None:
    _train(a, f"mem-L{a.layers}-T{a.temperature:g}{'-clean' if a.clean else ''}", a.layers, a.alpha, a.lr,
           a.temperature)


def phase_finetune(a) -> None:
    from knnlm.memory.decoder import num_layers

    lm = load_lm(a)
    _train(a, "finetuned", num_layers(lm.model), 0.0, a.ft_lr, a.temperature)


def phase_ftstore(a) -> None:
    """The datastore of the fine-tuned LM: same corpus, same windows, its own keys."""
    from memory_shared import finetuned_store

    built = finetuned_store(load_lm(a, a.cache / "finetuned"), [a.corpus], a.datastore, a.cache / "ds-finetuned")
    if "build_seconds" in built:
        save("es-ftstore", {**built, "peak_rss_mb": rss_mb()})


def plan_logprobs(mem, plan) -> np.ndarray:
    """log p_mem(target) of every target of a plan."""
    from knnlm.memory.decoder import window_target_logprobs

    targets = plan.targets().astype(np.int64)
    out = np.empty(plan.count, dtype=np.float32)
    for b in range(len(plan.batches)):
        windows = list(plan.scored(b))
        first = min(c0 for _, c0, _, _ in windows)
        sel = np.concatenate([np.arange(t, t + c1 - c0) for _, c0, c1, t in windows])
        out[sel] = window_target_logprobs(mem, plan.batch_input(b), windows, first, targets[sel])
    return out


def decoders(a) -> list[str]:
    return sorted(p.name for p in a.cache.glob("mem-L*") if (p / "memory.json").exists())


def phase_quality(a) -> None:
    import json

    from memory_shared import ngram_mix, tuned_knn

    from knnlm.core.batching import plan_files
    from knnlm.core.index import Searcher
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.memory.decoder import MemoryDecoder
    from knnlm.memory.mix import mix_memory, sweep_memory
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.selftune import piece_plan

    lm = load_lm(a)
    ds = open_for_model(lm, a.datastore)
    searcher = Searcher(ds)
    names = decoders(a)
    held_sets = {json.dumps(json.loads((a.cache / n / "memory.json").read_text())["heldout_documents"])
                 for n in names + ["finetuned"] if (a.cache / n / "memory.json").exists()}
    if len(held_sets) != 1:
        raise SystemExit(f"the trainings held out different documents: {held_sets}")
    held_docs = json.loads(held_sets.pop())
    plan_h, own = piece_plan(ds, [(d, 0, int(ds.docs[d, 1])) for d in held_docs])
    plan_t = plan_files(lm, [a.test], int(ds.meta["window"]), int(ds.meta["stride"]), 4096)
    res = {"datastore": str(a.datastore), "entries": ds.count, "datastore_bytes": dir_bytes(a.datastore), "heldout_documents": len(held_docs),
           "heldout_tokens": plan_h.count, "test_documents": len(plan_t.docs), "test_tokens": plan_t.count,
           "decoders": names}
    sh = score_plan(lm, plan_h, searcher, k=a.k, keep_neighbors=True, exclude=own, progress=False)
    st = score_plan(lm, plan_t, searcher, k=a.k, keep_neighbors=True, progress=False)
    cached = a.domain / "queries-test.npz"
    if cached.exists():  # the demo's test queries: the same targets and LM log-probs
        z = np.load(cached)
        res["test_matches_demo_cache"] = bool(np.array_equal(z["targets"], st.targets))
        res["test_lm_max_diff_vs_demo_cache"] = float(np.abs(z["lm"] - st.lm).max())
    held, test, tuned = {"lm": sh.lm}, {"lm": st.lm}, {}

    def knn_rows(name, h, t):
        tuned[name], held[name], test[name] = tuned_knn(h, t)

    knn_rows("knnlm", sh, st)
    own_s = ds.settings
    test["knnlm_self_tuned"] = interpolate(st.lm, knn_target_logprobs(st.dists[:, : own_s["k"]], st.vals[:, : own_s["k"]],
                                                                      st.targets, own_s["temperature"]),
                                           own_s["lambda"])
    tuned["knnlm_self_tuned"] = {f: own_s[f] for f in ("k", "lambda", "temperature")}
    mem_h, mem_t = {}, {}
    for n in names:
        mem = MemoryDecoder.load_for(lm, a.cache / n)
        mem_h[n], mem_t[n] = plan_logprobs(mem, plan_h), plan_logprobs(mem, plan_t)
        for base, key in (("lm", n), ("knnlm", f"knnlm+{n}")):
            sw = sweep_memory(held[base], mem_h[n])
            lam = sw["best"]["lambda"]
            tuned[key] = {"lambda": lam, "ppl": sw["best"]["ppl"], "grid": sw["grid"]}
            held[key] = mix_memory(held[base], mem_h[n], lam)
            test[key] = mix_memory(test[base], mem_t[n], lam)
        oracle = sweep_memory(st.lm, mem_t[n])["best"]  # diagnostic only: λ chosen on the test articles
        res.setdefault("test_oracle_lambda", {})[n] = {"lambda": oracle["lambda"], "ppl": oracle["ppl"]}
        test[f"{n}_alone"] = mem_t[n]
        held[f"{n}_alone"] = mem_h[n]
    if (a.cache / "ds-finetuned" / "meta.json").exists():
        ft = load_lm(a, a.cache / "finetuned")
        fts = Searcher(open_for_model(ft, a.cache / "ds-finetuned"))
        fh = score_plan(ft, plan_h, fts, k=a.k, keep_neighbors=True, exclude=own, progress=False)
        ftt = score_plan(ft, plan_t, fts, k=a.k, keep_neighbors=True, progress=False)
        held["finetuned"], test["finetuned"] = fh.lm, ftt.lm
        knn_rows("finetuned+knn", fh, ftt)
    # simple vs neural representation: an n-gram LM of the datastore text, mixed with the LM
    held_set = set(held_docs)
    toks = np.asarray(ds.tokens)
    doc_ids = [toks[int(s) : int(s) + int(n)] for s, n, _ in ds.docs]
    ng = ngram_mix(lm.vocab_size, lambda: (d for i, d in enumerate(doc_ids) if i not in held_set),
                   lambda: doc_ids, plan_h, sh.lm, plan_t, st.lm)  # tuned without the held-out articles
    test["ngram"], test["ngram_alone"], tuned["ngram"] = ng["test"], ng["test_alone"], ng["tuned"]
    res["tuned"] = tuned
    res["heldout_ppl"] = {n: perplexity(v) for n, v in held.items()}
    res["test_ppl"] = {n: perplexity(v) for n, v in test.items()}
    if names:
        c = next((n for n in names if n.endswith("-clean")), names[0])
        res["cases"] = cases(lm, plan_t, st.lm, test["knnlm"], mem_t[c], c, tuned[c]["lambda"])
    res["peak_rss_mb"] = rss_mb()
    save("es-quality", res)


def cases(lm, plan, lm_lp, knnlm_lp, mem_lp, name: str, lam: float, top: int = 10) -> dict:
    """Test tokens where the decoder raises p(target) most over the LM, and where the kNN-LM
    does: the paper's case study, each with the three probabilities."""
    from knnlm.memory.mix import mix_memory

    t = plan.targets()
    mix = mix_memory(lm_lp, mem_lp, lam)

    def one(i):
        d = int(np.searchsorted(plan.docs[:, 2], i, side="right")) - 1  # the target's document
        at = int(plan.docs[d, 0]) + 1 + int(i - plan.docs[d, 2])  # its token in plan.tokens
        ctx = plan.tokens[max(int(plan.docs[d, 0]) + 1, at - 10) : at]  # up to 10 tokens of its own document
        return {"position": int(i), "target": lm.decode([t[i]]), "context": lm.decode(ctx),
                "p_lm": float(np.exp(lm_lp[i])), "p_knnlm": float(np.exp(knnlm_lp[i])),
                "p_mem": float(np.exp(mem_lp[i])), "p_mix": float(np.exp(mix[i]))}

    return {"decoder": name, "memory_lambda": lam,
            "mem_gain": [one(i) for i in np.argsort(-(mem_lp - lm_lp), kind="stable")[:top]],
            "knn_gain": [one(i) for i in np.argsort(-(knnlm_lp - lm_lp), kind="stable")[:top]],
            "knn_loss": [one(i) for i in np.argsort(knnlm_lp - lm_lp, kind="stable")[:top]]}


def phase_speed(a) -> None:
    """Eval tokens/s on the first --speed-docs articles of the datastore corpus: each system
    scores them --repeats times, interleaved, best kept; ratios to the base LM of this run."""
    import json

    from knnlm.core.batching import plan_files
    from knnlm.core.index import Searcher
    from knnlm.memory.decoder import MemoryDecoder
    from knnlm.run.evaluate import open_for_model, score_plan

    lm = load_lm(a)
    ds = open_for_model(lm, a.datastore)
    searcher = Searcher(ds)
    plan = plan_files(lm, [a.corpus], int(ds.meta["window"]), int(ds.meta["stride"]), 4096,
                      documents=(0, a.speed_docs))
    mems = {n: MemoryDecoder.load_for(lm, a.cache / n) for n in decoders(a)}
    q = json.loads((bench_memory.RESULTS / "es-quality.json").read_text()) if a.use_tuned else {}
    systems = {"lm": (lm, None, None), "knnlm": (lm, searcher, None)}
    for n, m in mems.items():
        systems[n] = (lm, None, m)
        systems[f"knnlm+{n}"] = (lm, searcher, m)
    if (a.cache / "ds-finetuned" / "meta.json").exists():
        ft = load_lm(a, a.cache / "finetuned")
        systems["finetuned"] = (ft, None, None)
        systems["finetuned+knn"] = (ft, Searcher(open_for_model(ft, a.cache / "ds-finetuned")), None)
    k_of = {n: q.get("tuned", {}).get(n, {}).get("k", a.k) for n in ("knnlm", "finetuned+knn")}
    score_plan(lm, plan, None, progress=False)  # warm-up
    runs = {n: [] for n in systems}
    for _ in range(a.repeats):
        for n, (m, s, mem) in systems.items():
            t0 = time.perf_counter()
            score_plan(m, plan, s, k=k_of.get(n, k_of["knnlm"]), progress=False, memory=mem)
            runs[n].append(time.perf_counter() - t0)
    tps = {n: plan.count / min(v) for n, v in runs.items()}
    save("es-speed", {"tokens": plan.count, "documents": a.speed_docs, "repeats": a.repeats, "seconds": runs, "tokens_per_second": tps,
                      "ratio": {n: tps[n] / tps["lm"] for n in tps}, "k": k_of, "peak_rss_mb": rss_mb()})


def add_domain_args(ap: argparse.ArgumentParser, cache: Path) -> None:
    """--domain, --datastore-name, --cache (default `cache`), --model: the options of the new-domain benchmarks."""
    ap.add_argument("--domain", type=Path, default=HERE.parent / "knnlm-demo" / "es-es",
                    help="knnlm demo's folder of one language: datastore-300/, corpus/{datastore,test}.jsonl")
    ap.add_argument("--datastore-name", default="datastore-300", help="the datastore folder inside --domain")
    ap.add_argument("--cache", type=Path, default=cache)
    ap.add_argument("--model", default="smollm2-135m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["targets", "train", "finetune", "ftstore", "quality", "speed"])
    add_domain_args(ap, cache=HERE / "cache" / "memory-es")
    ap.add_argument("-k", type=int, default=1024, help="neighbours (targets and tuning)")
    ap.add_argument("--temperature", type=float, default=16.0, help="kNN temperature of the training targets")
    ap.add_argument("--clean", action="store_true",
                    help="targets (and decoders trained on them) with the held-out articles left out of every "
                         "position's neighbours: no held-out token reaches the decoder")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3, help="decoder learning rate")
    ap.add_argument("--ft-lr", type=float, default=5e-5, help="fine-tuning learning rate")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--patience", type=int, default=2, help="epochs without held-out improvement before stopping")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="training time budget (a resumed run counts from its start); the best so far is kept")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout", type=float, default=0.1, help="share of the articles held out (tuning, stopping)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "memory")
    ap.add_argument("--speed-docs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="speed: interleaved passes per system (best kept)")
    ap.add_argument("--use-tuned", action="store_true", help="speed: the tuned k of es-quality.json")
    a = ap.parse_args()
    from common import setup_logging

    setup_logging("bench")
    bench_memory.set_results(a.results)
    setup(a)
    {"targets": phase_targets, "train": phase_train, "finetune": phase_finetune, "ftstore": phase_ftstore,
     "quality": phase_quality, "speed": phase_speed}[a.phase](a)


if __name__ == "__main__":
    from common import run_main

    run_main(main)
