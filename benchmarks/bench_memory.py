"""Memory Decoder vs kNN-LM vs base LM on WikiText-2 (issue 9), 2 CPU cores.

The datastore is the WikiText-2 benchmark's (bench_wikitext.py: wiki.valid.raw minus ~25k
held-out tokens, smollm2-135m bf16, indexes flat + ivf2048-pq64).  Each phase is its own
process (its peak RSS is its own), run in this order:

    python benchmarks/bench_memory.py targets   # p_kNN targets of every datastore position
    python benchmarks/bench_memory.py train --layers 2
    python benchmarks/bench_memory.py quality --layers 2   # tune on held-out, test on wiki.test.raw
    python benchmarks/bench_memory.py speed --layers 2     # tokens/s vs the base LM, same run
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

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = HERE / "results" / "memory"
LOG = logging.getLogger("bench")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(name: str, obj: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    LOG.info("wrote %s", RESULTS / f"{name}.json")


def set_results(path: Path) -> None:
    global RESULTS
    RESULTS = path


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def phase_targets(a) -> None:
    from knnlm.memory.targets import Targets, build_targets

    out = a.cache / f"targets-k{a.k}-T{a.temperature:g}"
    t0 = time.perf_counter()
    if not (out / "meta.json").exists():
        build_targets(a.datastore, out, k=a.k, temperature=a.temperature, keep=a.keep, exclude=a.exclude,
                      index=a.index, chunk=a.chunk, limit=a.limit)
    t = Targets(out)
    save("targets", {"path": str(out), "seconds": t.meta["seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                     "count": t.count, "k": a.k, "temperature": a.temperature, "keep": a.keep, "exclude": a.exclude,
                     "index": a.index, "mean_kept_mass": t.meta["mean_kept_mass"], "bytes": dir_bytes(out),
                     "peak_rss_mb": rss_mb()})


def load_lm(a):
    from knnlm.core.model import LM

    return LM.load(a.model, dtype=a.dtype, device="cpu")


def phase_train(a) -> None:
    from knnlm.memory.decoder import read_meta
    from knnlm.memory.train import TrainConfig, train_decoder

    lm = load_lm(a)
    out = a.cache / f"mem-L{a.layers}"
    cfg = TrainConfig(alpha=a.alpha, lr=a.lr, epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, heldout=0.02, eval_every=a.eval_every, seed=0, autocast=a.autocast)
    t0 = time.perf_counter()
    if not (out / "memory.json").exists():
        train_decoder(lm, a.datastore, a.cache / f"targets-k{a.k}-T{a.temperature:g}", out, layers=a.layers,
                      config=cfg)
    m = read_meta(out)
    save(f"train-L{a.layers}", {"path": str(out), "layers": a.layers, "seconds": m["seconds"],
                                "wall_seconds": round(time.perf_counter() - t0, 1), "steps": m["steps"],
                                "best_step": m["best_step"], "heldout": m["heldout"], "first_train": m["first_train"],
                                "last_train": m["last_train"], "config": m["config"],
                                "train_tokens_per_epoch": m["train_tokens_per_epoch"], "bytes": dir_bytes(out),
                                "history": [h for h in m["history"] if "heldout" in h], "peak_rss_mb": rss_mb()})


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
    knn_drop = np.argsort(knnlm - q["lm"], kind="stable")[:12]  # where the kNN-LM lowers p(target) most
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


def phase_speed(a) -> None:
    """Eval tokens/s on the first --speed-tokens of wiki.test.raw: base LM, LM + decoder,
    LM + kNN (IVF-PQ + re-rank, k=1024), interleaved A/B/C twice; ratios to the base LM."""
    from knnlm.core.batching import make_plan
    from knnlm.core.corpus import Document
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import Searcher
    from knnlm.memory.decoder import MemoryDecoder
    from knnlm.run.evaluate import score_plan

    lm = load_lm(a)
    mem = MemoryDecoder.load_for(lm, a.cache / f"mem-L{a.layers}")
    searcher = Searcher(Datastore(a.datastore), a.index)
    text = a.test_text.read_text(encoding="utf-8")
    ids = lm.encode(text, prefix=False)[: a.speed_tokens]
    plan = make_plan(lambda t: [lm.prefix_token_id] + ids, [Document("test", 0, "test", "x")], 1024, 512, 4096)
    runs = {"lm": [], "memory": [], "knn": []}
    score_plan(lm, plan, None, progress=False)  # warm-up
    for _ in range(2):
        for name in runs:
            t0 = time.perf_counter()
            score_plan(lm, plan, searcher if name == "knn" else None, k=1024, progress=False,
                       memory=mem if name == "memory" else None)
            runs[name].append(time.perf_counter() - t0)
    tps = {n: plan.count / min(v) for n, v in runs.items()}
    save(f"speed-L{a.layers}", {"tokens": plan.count, "seconds": runs, "tokens_per_second": tps,
                                "ratio_memory": tps["memory"] / tps["lm"], "ratio_knn": tps["knn"] / tps["lm"],
                                "peak_rss_mb": rss_mb(), "layers": a.layers})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["targets", "train", "quality", "speed", "render"])
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
    {"targets": phase_targets, "train": phase_train, "quality": phase_quality, "speed": phase_speed}[a.phase](a)


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
