"""Memory Decoder vs kNN-LM vs base LM on WikiText-2, 2 CPU cores.

The datastore is the WikiText-2 benchmark's (bench_wikitext.py: wiki.valid.raw minus ~25k
held-out tokens, smollm2-135m bf16, indexes flat + ivf2048-pq64).  Each phase is its own
process (its peak RSS is its own), run in this order:

    python benchmarks/bench_memory.py targets   # p_kNN targets of every datastore position
    python benchmarks/bench_memory.py train --layers 2
    python benchmarks/bench_memory.py quality --layers 2   # tune on held-out, test on wiki.test.raw
    python benchmarks/bench_memory.py speed --layers 2     # tokens/s vs the base LM, same run
    python benchmarks/bench_memory.py ngram      # LM + Kneser-Ney n-gram of the datastore text
    python benchmarks/bench_memory.py finetune --max-minutes 35   # the base LM fine-tuned (α = 0)
    python benchmarks/bench_memory.py ftstore    # its datastore over the same text
    python benchmarks/bench_memory.py ftquality  # fine-tuned and fine-tuned + kNN: tune, test
    python benchmarks/bench_memory.py ftspeed    # tokens/s of both vs the base LM and kNN-LM
    python benchmarks/bench_memory.py render

--cache (default benchmarks/cache/memory) holds targets and decoders; --datastore and
--queries point at a built datastore and the per-position LM log-probs and query keys of the
held-out and test texts (bench_wikitext's cache, or /work/cache/wikitext2 in this session).
Results: benchmarks/results/memory/*.json and docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
from memory_shared import dir_bytes  # noqa: F401  (bench_memory_domain imports it from here)

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = HERE / "results" / "memory"
LOG = logging.getLogger("bench")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(name: str, obj: dict) -> None:
    """Results `name`.json, with this machine's folders as placeholders (common.PLACEHOLDERS)."""
    from common import placeholders

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(placeholders(json.dumps(obj, indent=2, sort_keys=True)) + "\n")
    LOG.info("wrote %s", RESULTS / f"{name}.json")


def set_results(path: Path) -> None:
    global RESULTS
    RESULTS = path


def phase_targets(a) -> None:
    from knnlm import RetrievalSettings
    from knnlm.memory.targets import Targets, TargetSettings, build_targets

    out = a.cache / f"targets-k{a.k}-T{a.temperature:g}"
    t0 = time.perf_counter()
    if not (out / "meta.json").exists():
        build_targets(a.datastore, out, TargetSettings(a.keep, a.exclude, chunk=a.chunk),
                      retrieval=RetrievalSettings(k=a.k, temperature=a.temperature, index=a.index), limit=a.limit)
    t = Targets(out)
    save("targets", {"path": str(out), "seconds": t.meta["seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                     "count": t.count, "k": a.k, "temperature": a.temperature, "keep": a.keep, "exclude": a.exclude,
                     "index": a.index, "mean_kept_mass": t.meta["mean_kept_mass"], "bytes": dir_bytes(out),
                     "peak_rss_mb": rss_mb()})


def load_lm(a, path: Path | None = None):
    from knnlm.core.model import LM

    return LM.load(str(path) if path else a.model, dtype=a.dtype, device="cpu")


def _train(a, name: str, layers: int | None, alpha: float, lr: float) -> None:
    """A decoder of `layers` layers (None: all of the LM's) trained on the datastore text."""
    from knnlm.memory.decoder import num_layers, read_meta
    from knnlm.memory.train import TrainConfig, train_decoder

    lm = load_lm(a)
    layers = layers or num_layers(lm.model)
    out = a.cache / name
    cfg = TrainConfig(alpha=alpha, lr=lr, epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, heldout=0.02, eval_every=a.eval_every, seed=0, autocast=a.autocast,
                      max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)
    t0 = time.perf_counter()
    if not (out / "memory.json").exists():
        train_decoder(lm, a.datastore, a.cache / f"targets-k{a.k}-T{a.temperature:g}", out, layers=layers,
                      config=cfg)
    m = read_meta(out)
    save(f"train-{name.removeprefix('mem-')}", {
        "path": str(out), "layers": layers, "seconds": m["seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
        "steps": m["steps"], "best_step": m["best_step"], "stopped": m.get("stopped"), "heldout": m["heldout"],
        "first_train": m["first_train"], "last_train": m["last_train"], "config": m["config"],
        "train_tokens_per_epoch": m["train_tokens_per_epoch"], "train_pieces": m["train_pieces"],
        "bytes": dir_bytes(out), "history": [h for h in m["history"] if "heldout" in h], "peak_rss_mb": rss_mb()})


def phase_train(a) -> None:
    _train(a, f"mem-L{a.layers}", a.layers, a.alpha, a.lr)


def phase_finetune(a) -> None:
    """The base LM fine-tuned on the datastore text: train_decoder with all its layers and
    α = 0 (next-token CE only), the decoder's split, batches, optimizer and best-on-held-out
    rule (as bench_memory_domain.py's finetune)."""
    _train(a, "finetuned", None, 0.0, a.ft_lr)


def text_plan(lm, text: Path, targets: np.ndarray):
    """The W 1024 / S 512 plan of `text`, checked to have the queries file's targets."""
    from knnlm.core.batching import plan_files

    plan = plan_files(lm, [text], 1024, 512, 4096)
    if not np.array_equal(plan.targets(), targets):
        raise SystemExit(f"{text}: the targets differ from the queries file's")
    return plan


def phase_ngram(a) -> None:
    """Simple vs neural representation (kNN-LM paper, Sec. 6): a Kneser-Ney n-gram LM of the
    datastore text mixed with the LM; order and λ tuned on the held-out text (not in the
    datastore), test on the test text.  The LM log-probs are the queries files'.  Where the
    gains come from: WikiText's ` @-@ `-style tokens vs the rest, for the n-gram and for the
    tuned kNN-LM of quality-L2.json (searched again here)."""
    import json

    from memory_shared import ngram_mix

    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity

    lm = load_lm(a)
    ds = Datastore(a.datastore)
    toks = np.asarray(ds.tokens)
    docs = [toks[int(s) : int(s) + int(n)] for s, n, _ in ds.docs]
    qh, qt = (dict(np.load(a.queries / f"queries-{split}.npz")) for split in ("heldout", "test"))
    plan_h, plan_t = text_plan(lm, a.heldout_text, qh["targets"]), text_plan(lm, a.test_text, qt["targets"])
    ng = ngram_mix(lm.vocab_size, lambda: docs, lambda: docs, plan_h, qh["lm"], plan_t, qt["lm"])
    kt = json.loads((RESULTS / f"quality-L{a.layers}.json").read_text())["knn_tuned"]
    dists, vals = knn_logprobs(Searcher(ds, a.index), qt, kt["k"])
    knnlm = interpolate(qt["lm"], knn_target_logprobs(dists, vals, qt["targets"], kt["temperature"]), kt["lambda"])
    t = qt["targets"]
    text = {int(i): lm.decode([int(i)]) for i in np.unique(t)}
    fmt = np.array([("@" in text[int(x)]) or (i > 0 and text[int(t[i - 1])] == " @") for i, x in enumerate(t)])
    systems = {"lm": qt["lm"], "ngram": ng["test"], "knnlm": knnlm}
    by_kind = {kind: {"tokens": int(m.sum()), **{f"{n}_ppl": perplexity(v[m]) for n, v in systems.items()},
                      **{f"{n}_gain_share": float((v[m] - qt["lm"][m]).sum() / (v - qt["lm"]).sum())
                         for n, v in systems.items() if n != "lm"}}
               for kind, m in (("formatting", fmt), ("other", ~fmt))}
    save("ngram", {"datastore": str(a.datastore), "datastore_tokens": int(len(toks)), "tuned": ng["tuned"],
                   "heldout_tokens": plan_h.count, "test_tokens": plan_t.count, "seconds": ng["seconds"],
                   "heldout_ppl": {"lm": perplexity(qh["lm"])},
                   "test_ppl": {"lm": perplexity(qt["lm"]), "ngram": perplexity(ng["test"]),
                                "ngram_alone": perplexity(ng["test_alone"]), "knnlm": perplexity(knnlm)},
                   "knn_tuned": kt, "index": a.index, "by_kind": by_kind, "peak_rss_mb": rss_mb()})


def phase_ftstore(a) -> None:
    """The fine-tuned LM's datastore over the same text, windows and index kind as the base's."""
    import json

    from memory_shared import finetuned_store

    built = finetuned_store(load_lm(a, a.cache / "finetuned"), [a.queries / "valid_datastore.txt"], a.datastore,
                            a.cache / "ds-finetuned", index=a.ft_index)
    before = json.loads((RESULTS / "ftstore.json").read_text()) if (RESULTS / "ftstore.json").exists() else {}
    rss = max(before.get("peak_rss_mb", 0), rss_mb())
    save("ftstore", {**before, **built, "peak_rss_mb": rss})  # a run cut after the build keeps its seconds


def phase_ftquality(a) -> None:
    """Test ppl of the fine-tuned LM, and of it with a kNN over its own datastore (k, λ, T
    tuned on the held-out text)."""
    from memory_shared import tuned_knn

    from knnlm.core.index import Searcher
    from knnlm.core.scoring import perplexity
    from knnlm.run.evaluate import open_for_model, score_plan

    ft = load_lm(a, a.cache / "finetuned")
    searcher = Searcher(open_for_model(ft, a.cache / "ds-finetuned"))
    scores, base = {}, {}
    t0 = time.perf_counter()
    for split, text in (("heldout", a.heldout_text), ("test", a.test_text)):
        q = np.load(a.queries / f"queries-{split}.npz")
        base[split] = perplexity(q["lm"])
        scores[split] = score_plan(ft, text_plan(ft, text, q["targets"]), searcher, k=1024, keep_neighbors=True,
                                   progress=False)
    b, held, test = tuned_knn(scores["heldout"], scores["test"])
    save("finetuned", {"index": searcher.name, "entries": searcher.ds.count, "tuned": b,
                       "heldout_ppl": {"lm": base["heldout"], "finetuned": perplexity(scores["heldout"].lm),
                                       "finetuned+knn": perplexity(held)},
                       "test_ppl": {"lm": base["test"], "finetuned": perplexity(scores["test"].lm),
                                    "finetuned+knn": perplexity(test)},
                       "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss_mb()})


def memory_logprobs(lm, mem, text: Path, targets: np.ndarray) -> tuple[np.ndarray, float]:
    """log p_mem(target) over `text` with the windows of the queries file (W 1024, S 512)."""
    from knnlm.core.batching import plan_files
    from knnlm.memory.decoder import window_target_logprobs

    plan = plan_files(lm, [text], 1024, 512, 4096)
    if not np.array_equal(plan.targets(), targets):
        raise SystemExit(f"{text}: the targets differ from the queries file's")
    out = np.empty(plan.count, dtype=np.float32)
    t0 = time.perf_counter()
    for b in range(len(plan.batches)):
        windows = list(plan.scored(b))
        first = min(c0 for _, c0, _, _ in windows)
        sel = np.concatenate([np.arange(t, t + c1 - c0) for _, c0, c1, t in windows])
        out[sel] = window_target_logprobs(mem, plan.batch_input(b), windows, first, targets[sel])
    return out, time.perf_counter() - t0


def knn_logprobs(searcher, q: dict, k: int, chunk: int = 8192):
    dists = np.empty((len(q["targets"]), k), np.float32)
    vals = np.empty((len(q["targets"]), k), np.int64)
    for i in range(0, len(q["targets"]), chunk):
        d, ids = searcher.search(np.asarray(q["keys"][i : i + chunk], np.float32), k)
        dists[i : i + chunk], vals[i : i + chunk] = d, searcher.ds.vals[np.maximum(ids, 0)]
    return dists, vals


def phase_quality(a) -> None:
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.memory.decoder import MemoryDecoder
    from knnlm.memory.mix import disagreements, mix_memory, sweep_memory
    from knnlm.run.tune import sweep

    lm = load_lm(a)
    mem = MemoryDecoder.load_for(lm, a.cache / f"mem-L{a.layers}")
    ds = Datastore(a.datastore)
    searcher = Searcher(ds, a.index)
    res = {"layers": a.layers, "index": a.index, "datastore": str(a.datastore), "entries": ds.count,
           "datastore_bytes": dir_bytes(a.datastore) - dir_bytes(a.datastore / "indexes")
           + dir_bytes(a.datastore / "indexes" / a.index)}
    parts = {}
    for split, text in (("heldout", a.heldout_text), ("test", a.test_text)):
        q = dict(np.load(a.queries / f"queries-{split}.npz"))
        mem_lp, sec = memory_logprobs(lm, mem, text, q["targets"])
        t0 = time.perf_counter()
        dists, vals = knn_logprobs(searcher, q, 1024)
        parts[split] = (q, mem_lp, dists, vals)
        res[f"{split}_tokens"] = int(len(q["targets"]))
        res[f"{split}_seconds_memory"] = round(sec, 1)
        res[f"{split}_seconds_search"] = round(time.perf_counter() - t0, 1)
        LOG.info("%s: %d tokens, decoder %.0f s", split, len(q["targets"]), sec)
    q, mem_lp, dists, vals = parts["heldout"]
    knn_tune = sweep(q["lm"], dists, vals, q["targets"])
    b = knn_tune["best"]
    res["knn_tuned"] = b
    held_knn = knn_target_logprobs(dists[:, : b["k"]], vals[:, : b["k"]], q["targets"], b["temperature"])
    mem_tune = sweep_memory(q["lm"], mem_lp)
    both_tune = sweep_memory(interpolate(q["lm"], held_knn, b["lambda"]), mem_lp)
    res.update(memory_lambda=mem_tune["best"]["lambda"], knn_memory_lambda=both_tune["best"]["lambda"],
               heldout_ppl={"lm": perplexity(q["lm"]), "knnlm": b["ppl"], "memory": mem_tune["best"]["ppl"],
                            "knnlm_memory": both_tune["best"]["ppl"]},
               memory_lambda_grid=mem_tune["grid"])
    q, mem_lp, dists, vals = parts["test"]
    knn = knn_target_logprobs(dists[:, : b["k"]], vals[:, : b["k"]], q["targets"], b["temperature"])
    knnlm = interpolate(q["lm"], knn, b["lambda"])
    paper = interpolate(q["lm"], knn_target_logprobs(dists, vals, q["targets"], 1.0), 0.25)
    res["test_ppl"] = {
        "lm": perplexity(q["lm"]),
        "knnlm": perplexity(knnlm),
        "knnlm_paper_defaults": perplexity(paper),
        "memory": perplexity(mix_memory(q["lm"], mem_lp, res["memory_lambda"])),
        "memory_alone": perplexity(mem_lp),
        "knnlm_memory": perplexity(mix_memory(knnlm, mem_lp, res["knn_memory_lambda"])),
    }
    cases = disagreements(q["lm"], mem_lp, knn, res["memory_lambda"], b["lambda"], top=len(mem_lp))
    gain = [c for c in cases if c["p_mem"] > c["p_lm"]][:12]
    res["cases_gain"] = [_case(lm, q, c) for c in gain]
    # where the kNN-LM lowers p(target) most, in probability (in log ratio every target no neighbour
    # predicts ties at log(1 - λ))
    knn_drop = np.argsort(np.exp(knnlm) - np.exp(q["lm"]), kind="stable")[:12]
    res["cases_knn_drop"] = [_case(lm, q, {"position": int(i), "p_lm": float(np.exp(q["lm"][i])),
                                           "p_knnlm": float(np.exp(knnlm[i])), "p_mem": float(np.exp(mem_lp[i])),
                                           "p_mix": float(np.exp(mix_memory(q["lm"][i:i + 1], mem_lp[i:i + 1],
                                                                            res["memory_lambda"])[0]))})
                             for i in knn_drop]
    res["peak_rss_mb"] = rss_mb()
    save(f"quality-L{a.layers}", res)


def _case(lm, q, c: dict) -> dict:
    i = c["position"]
    t = q["targets"]
    return {**c, "target": lm.decode([t[i]]), "context": lm.decode(t[max(0, i - 10) : i])}


def speed_plan(lm, a):
    """The first --speed-tokens of the test text as one document (W 1024, S 512)."""
    from knnlm.core.batching import make_plan
    from knnlm.core.corpus import Document

    ids = lm.encode(a.test_text.read_text(encoding="utf-8"), prefix=False)[: a.speed_tokens]
    return make_plan(lambda t: [lm.prefix_token_id] + ids, [Document("test", 0, "test", "x")], 1024, 512, 4096)


def timed(plan, systems: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds of each system (name: (lm, searcher, memory, k)) scoring `plan`, run `repeats`
    times interleaved after one warm-up; (seconds lists, tokens/s of the best run)."""
    from knnlm.run.evaluate import score_plan

    lm0 = next(iter(systems.values()))[0]
    score_plan(lm0, plan, None, progress=False)  # warm-up
    runs = {n: [] for n in systems}
    for _ in range(repeats):
        for name, (lm, searcher, mem, k) in systems.items():
            t0 = time.perf_counter()
            score_plan(lm, plan, searcher, k=k, progress=False, memory=mem)
            runs[name].append(time.perf_counter() - t0)
    return runs, {n: plan.count / min(v) for n, v in runs.items()}


def phase_speed(a) -> None:
    """Eval tokens/s on the first --speed-tokens of wiki.test.raw: base LM, LM + decoder,
    LM + kNN (IVF-PQ + re-rank, k=1024), interleaved; ratios to the base LM."""
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.memory.decoder import MemoryDecoder

    lm = load_lm(a)
    mem = MemoryDecoder.load_for(lm, a.cache / f"mem-L{a.layers}")
    searcher = Searcher(Datastore(a.datastore), a.index)
    plan = speed_plan(lm, a)
    runs, tps = timed(plan, {"lm": (lm, None, None, 1024), "memory": (lm, None, mem, 1024),
                             "knn": (lm, searcher, None, 1024)}, a.repeats)
    save(f"speed-L{a.layers}", {"tokens": plan.count, "repeats": a.repeats, "seconds": runs,
                                "tokens_per_second": tps, "ratio_memory": tps["memory"] / tps["lm"],
                                "ratio_knn": tps["knn"] / tps["lm"], "peak_rss_mb": rss_mb(), "layers": a.layers})


def phase_ftspeed(a) -> None:
    """Eval tokens/s of the base LM, the fine-tuned LM, the kNN-LM and the fine-tuned LM + kNN
    (its own datastore, its tuned k), interleaved in one process; ratios to the base LM."""
    import json

    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.run.evaluate import open_for_model

    lm = load_lm(a)
    ft = load_lm(a, a.cache / "finetuned")
    ft_k = json.loads((RESULTS / "finetuned.json").read_text())["tuned"]["k"]
    knn_k = json.loads((RESULTS / "quality-L2.json").read_text())["knn_tuned"]["k"]
    plan = speed_plan(lm, a)
    runs, tps = timed(plan, {"lm": (lm, None, None, knn_k), "finetuned": (ft, None, None, ft_k),
                             "knnlm": (lm, Searcher(Datastore(a.datastore), a.index), None, knn_k),
                             "finetuned+knn": (ft, Searcher(open_for_model(ft, a.cache / "ds-finetuned")), None,
                                               ft_k)}, a.repeats)
    save("speed-finetuned", {"tokens": plan.count, "repeats": a.repeats, "seconds": runs, "tokens_per_second": tps,
                             "k": {"knnlm": knn_k, "finetuned+knn": ft_k},
                             "ratio": {n: v / tps["lm"] for n, v in tps.items()}, "peak_rss_mb": rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["targets", "train", "quality", "speed", "ngram", "finetune", "ftstore",
                                      "ftquality", "ftspeed", "render"])
    ap.add_argument("--cache", type=Path, default=HERE / "cache" / "memory")
    ap.add_argument("--datastore", type=Path, default=HERE / "cache" / "wikitext2" / "ds-bfloat16")
    ap.add_argument("--queries", type=Path, default=HERE / "cache" / "wikitext2",
                    help="folder of queries-heldout.npz, queries-test.npz and valid_heldout.txt")
    ap.add_argument("--index", default="ivf2048-pq64")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("-k", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=16.0)
    ap.add_argument("--keep", type=int, default=32)
    ap.add_argument("--exclude", default="document")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--autocast", default="bfloat16")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="training time budget (a resumed run counts from its start); the best so far is kept")
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="fine-tuning learning rate")
    ap.add_argument("--ft-index", default="IVF2048,PQ64", help="index of the fine-tuned LM's datastore")
    ap.add_argument("--repeats", type=int, default=2, help="speed: interleaved passes per system (best kept)")
    ap.add_argument("--speed-tokens", type=int, default=16384)
    ap.add_argument("--test-text", type=Path, default=DATA / "wiki.test.raw")
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args()
    set_results(a.results)
    a.heldout_text = a.queries / "valid_heldout.txt"
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if a.phase == "render":
        from memory_page import render

        render(RESULTS, HERE.parent / "docs" / "memory.md")
        return
    {"targets": phase_targets, "train": phase_train, "quality": phase_quality, "speed": phase_speed,
     "ngram": phase_ngram, "finetune": phase_finetune, "ftstore": phase_ftstore, "ftquality": phase_ftquality,
     "ftspeed": phase_ftspeed}[a.phase](a)


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
