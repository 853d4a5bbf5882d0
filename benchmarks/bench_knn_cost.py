"""What the kNN part of evaluation costs per token on a ~10^5-entry datastore searched
exactly (a Flat index), and where that time goes.

One run measures, on the same model and machine, (1) eval tokens/s of the LM alone and of
the kNN-LM with the library's defaults (`knnlm.run.evaluate.evaluate`, the datastore's
self-tuned k, λ, T, adaptive λ by distance), on many short documents (64-256 tokens,
one window each: the LM's cost per token is lowest there, so the kNN part shows most) and
on long text (windows of 1024, stride 512), each pair timed back to back; and (2) a
per-stage profile of the kNN part per token over the same short documents' queries:
search (the Flat index, exact), the neighbours' values gathered, p_kNN(target) built, the
mixing (λ from the nearest distance, adaptive posterior).  The stages are timed on query
keys computed once (`common.query_cache`), in batches of the evaluation's size.

    python benchmarks/bench_knn_cost.py --datastore CACHE/novels/ds-1e5 \\
        --text CACHE/novels/test-32000.jsonl --label after

The datastore is copied (keys and all) into --cache and given a Flat index there; the
original is only read.  Results: printed, and added under --label to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import HERE, BenchError, query_cache, run_main, setup_logging

LOG = logging.getLogger("bench_knn_cost")
FILES = ("keys.npy", "vals.npy", "tokens.npy", "docs.npy", "docs.jsonl", "meta.json")


def flat_copy(src: Path, cache: Path, ivf: str) -> Path:
    """A copy of datastore `src` in `cache` with a Flat index (built once) and a copy of
    its IVF index `ivf`."""
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import build_index

    out = cache / f"{src.name}-flat"
    if not (out / "indexes" / "flat" / "index.json").exists():
        for f in FILES:
            if not (src / f).exists():
                raise BenchError(f"{src} is not a knnlm datastore ({f} missing)")
        out.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copy2(src / f, out / f)
        build_index(Datastore(out), "Flat", name="flat", overwrite=True, progress=False)
    if not (out / "indexes" / ivf).exists():
        if not (src / "indexes" / ivf / "index.json").exists():
            raise BenchError(f"{src} has no index {ivf!r} (give one with --ivf)")
        shutil.copytree(src / "indexes" / ivf, out / "indexes" / ivf)
    return out


def texts(lm, source: Path, cache: Path, tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """Two jsonl files cut from `source`'s documents: short documents of 64-256 tokens
    (random lengths) and long ones of 4096 tokens, about `tokens` tokens each."""
    short, long_ = cache / f"short-{tokens}.jsonl", cache / f"long-{tokens}.jsonl"
    if short.exists() and long_.exists():
        return short, long_
    rows = [json.loads(x) for x in source.read_text("utf-8").splitlines() if x.strip()]
    ids = [lm.tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    rng = np.random.default_rng(seed)
    pieces, n, d, at = [], 0, 0, 0
    while n < tokens:  # short documents from the start of each source document in turn
        size = int(rng.integers(64, 257))
        if at + size > len(ids[d]):
            d, at = (d + 1) % len(ids), 0
            continue
        pieces.append(ids[d][at : at + size])
        at, n = at + size, n + size
        d, at = ((d + 1) % len(ids), 0) if len(pieces) % 8 == 0 else (d, at)
    longs, n = [], 0
    for doc in ids:  # long documents from the end of each source document (other text than the short ones)
        for a in range(max(0, len(doc) - 4096 * 8), len(doc) - 4095, 4096):
            if n < tokens:
                longs.append(doc[a : a + 4096])
                n += 4096
    for path, parts in ((short, pieces), (long_, longs)):
        path.write_text("".join(json.dumps({"text": lm.tokenizer.decode(p)}) + "\n" for p in parts), "utf-8")
    return short, long_


def eval_pair(lm, text: Path, ds: Path, repeats: int) -> dict:
    """tokens/s of evaluate() without and with the datastore, alternating; the best of `repeats`."""
    from knnlm.run.evaluate import evaluate

    best = {"lm": 0.0, "knnlm": 0.0}
    res = None
    for _ in range(repeats):
        for name, path in (("lm", None), ("knnlm", ds)):
            t0 = time.perf_counter()
            r = evaluate(lm, [text], path, index="flat" if path else None, progress=False)
            best[name] = max(best[name], r["tokens"] / (time.perf_counter() - t0))
            if path is not None:
                res = r
    ms_knn = 1e3 * (1 / best["knnlm"] - 1 / best["lm"])
    return {"tokens": res["tokens"], "lm_tokens_per_s": round(best["lm"], 2),
            "knnlm_tokens_per_s": round(best["knnlm"], 2), "ratio": round(best["knnlm"] / best["lm"], 3),
            "knn_ms_per_token": round(ms_knn, 3), "ppl_lm": res["ppl_lm"], "ppl_knnlm": res["ppl_knnlm"],
            "k": res["k"], "lambda": res["lambda"], "temperature": res["temperature"],
            "lambda_mode": res["lambda_mode"], "by_distance": "lambda_by_distance" in res}


def stages(lm, ds_path: Path, q: dict, batch: int, index: str, mmap: bool = False) -> dict:
    """ms per token of each stage of evaluation's kNN part, over the cached queries `q`,
    searching `index`; memory-mapped (`mmap`, as a shard is searched), the search is split
    into the index's own search and the exact re-ranking from the memory-mapped keys."""
    from knnlm.core.index import Searcher, rerank_from_keys
    from knnlm.core.mix import Weight, mix_text
    from knnlm.core.scoring import knn_target_logprobs
    from knnlm.core.settings import resolve
    from knnlm.run.evaluate import open_for_model
    from knnlm.scale import open_searcher

    ds = open_for_model(lm, ds_path)
    c = resolve(ds.meta, ds.count)
    s = Searcher(ds, index, mmap=True) if mmap else open_searcher(ds, index, device=str(lm.device))
    keys, targets, lm_lp = q["keys"], q["targets"], q["lm"]
    n = len(targets)
    t = dict.fromkeys(("search", "gather", "distribution", "mix"), 0.0)
    if mmap:
        t["rerank"] = 0.0
    knn_lp, nearest = np.empty(n), np.empty(n)
    for a in range(0, n, batch):
        t0 = time.perf_counter()
        x = ds.to_key_space(keys[a : a + batch])
        if mmap:  # Searcher._search's two steps, timed apart
            _, i = s.index.search(x, c.k)
            tr = time.perf_counter()
            d, i = rerank_from_keys(ds.keys, x, i)
            t["rerank"] += time.perf_counter() - tr
        else:
            d, i = s.search(x, c.k)
        t1 = time.perf_counter()
        v = ds.vals[np.maximum(i, 0)]
        counts = ds.counts_of(i)
        t2 = time.perf_counter()
        lp = knn_target_logprobs(d, v, targets[a : a + batch], c.temperature, counts=counts)
        lp[(i < 0).all(axis=1)] = np.nan
        knn_lp[a : a + batch], nearest[a : a + batch] = lp, d[:, 0]
        t3 = time.perf_counter()
        t["search"] += t1 - t0
        t["gather"] += t2 - t1
        t["distribution"] += t3 - t2
    t0 = time.perf_counter()
    base = None if c.by_distance is None else c.by_distance(nearest)[:, None]
    mix_text(lm_lp, knn_lp[:, None], [Weight(c.lam, c.adapt)], base)
    t["mix"] = time.perf_counter() - t0
    if mmap:
        t["search"] -= t["rerank"]
    out = {name: round(1e3 * sec / n, 4) for name, sec in t.items()}
    out["total"] = round(sum(out.values()), 4)
    out["not_search"] = round(out["total"] - out["search"], 4)
    out["queries"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datastore", required=True, help="a ~10^5-entry datastore of the default model (only read)")
    ap.add_argument("--text", required=True, help="held-out text, a .jsonl of documents")
    ap.add_argument("--cache", default=str(HERE / "cache" / "knn-cost"))
    ap.add_argument("--tokens", type=int, default=6000, help="tokens of each text (short documents, long windows)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4096, help="queries per search in the stage profile")
    ap.add_argument("--ivf", default="ivf1024-pq64", help="the datastore's IVF index, profiled memory-mapped")
    ap.add_argument("--no-eval", action="store_true", help="the stage profiles only")
    ap.add_argument("--label", default="run", help="the name this run's results are stored under in --out")
    ap.add_argument("--out", default=str(HERE / "results" / "knn_cost.json"))
    a = ap.parse_args()
    setup_logging("bench_knn_cost")
    import torch

    from knnlm.core.model import LM

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lm = LM.load("smollm2-135m", dtype="bfloat16", device="cpu")
    ds = flat_copy(Path(a.datastore), cache, a.ivf)
    short, long_ = texts(lm, Path(a.text), cache, a.tokens)
    result = {"datastore": Path(a.datastore).name, "command": " ".join(["python", *sys.argv]),
              "threads": torch.get_num_threads()}
    q = query_cache(lambda: lm, short, cache / f"queries-{short.stem}.npz")
    result["stages_flat_ms_per_token"] = stages(lm, ds, q, a.batch, "flat")
    LOG.info("stages, flat: %s", result["stages_flat_ms_per_token"])
    result["stages_ivf_mmap_ms_per_token"] = stages(lm, ds, q, a.batch, a.ivf, mmap=True)
    LOG.info("stages, %s memory-mapped: %s", a.ivf, result["stages_ivf_mmap_ms_per_token"])
    for name, path in () if a.no_eval else (("short", short), ("long", long_)):
        result[name] = eval_pair(lm, path, ds, a.repeats)
        LOG.info("%s: %s", name, result[name])
    out = Path(a.out)
    all_ = json.loads(out.read_text("utf-8")) if out.exists() else {}
    all_[a.label] = result
    out.write_text(json.dumps(all_, indent=1) + "\n", "utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
