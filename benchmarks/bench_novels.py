"""The kNN-LM on 41 English novels: a datastore of about 10^7 real entries, built, indexed,
searched and measured on 2 CPU cores.

Whole novels are held out (benchmarks/novels.json): two for tuning (Cranford, Agnes Grey)
and three for test (Hard Times, Persuasion, The Hound of the Baskervilles): short ones, so
the datastore keeps 95% of the text and the held-out evaluation stays affordable, by
authors who also wrote novels of the datastore (Gaskell, the Brontës, Dickens, Austen) and
one who did not (Doyle).  The other 36 novels make the datastore, in the order of
novels.json: its first novel is about 10^5 entries, its first five about 10^6, all of them
about 1.1 x 10^7; the smaller datastores of the size curve are these prefixes.

    python benchmarks/bench_novels.py point --size 1e6      # the 10^6 point: build, index, tune, test
    python benchmarks/bench_novels.py build                 # all 36 novels (hours; resumable)
    python benchmarks/bench_novels.py variants --size 1e6   # what nprobe, re-ranking, pointers, adaptive, PCA buy
    python benchmarks/bench_novels.py report                # results/novels.{md,json} from what ran

Data: the novels folder in --data (default ../shared/data/novels), each file checked
against its sha256 first.  Heavy work is cached in benchmarks/cache/novels/ (--cache); a
stopped build resumes where it was when the same command runs again.  Results:
benchmarks/results/novels.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import sys
import time
from pathlib import Path

from common import DEFAULT_DATA, HERE, BenchError, run_main, setup_logging

from knnlm.core.corpus import file_sha256

LOG = logging.getLogger("bench_novels")
SPLIT = json.loads((HERE / "novels.json").read_text("utf-8"))
NOVELS = {r["file"]: r for r in SPLIT["novels"]}
W, S, B = 1024, 768, 4096  # the build's windows: every key has >= 256 tokens of context, 1.33 forward passes a token
EW, ES = 1024, 512  # evaluation windows (as every knnlm benchmark)
SIZES = {"1e5": 1, "1e6": 5, "all": len(SPLIT["datastore"])}  # size -> novels of the datastore's order


# fields of the settings self-tuning records now (the λ table checked against the LM's
# confidence, the cache's λ and θ): a datastore tuned before them is tuned again
CURRENT = ("lambda_table_heldout_ppl", "cache_lambda", "ppl_knnlm_cache_by_theta")

def check_novels(data: Path) -> Path:
    """The novels folder (`data`/novels, or `data` itself), every file present with its sha256."""
    folder = data if (data / "SOURCE.md").is_file() else data / "novels"
    for name, row in NOVELS.items():
        f = folder / name
        if not f.is_file():
            raise BenchError(f"{f} not found: this benchmark needs the 41 novels of SOURCE.md "
                             "(give their folder with --data)")
        got = file_sha256(f)
        if got != row["sha256"]:
            raise BenchError(f"{f} has sha256 {got}, not {row['sha256']}: another or a changed file")
    return folder


def datastore_files(folder: Path, size: str) -> list[Path]:
    return [folder / f for f in SPLIT["datastore"][: SIZES[size]]]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_forward(lm, plan, batches: int) -> float:
    """Scored tokens/s of the model's forward pass alone (no keys kept) over `batches` batches."""
    t0, n = time.perf_counter(), 0
    for b in range(min(batches, len(plan.batches))):
        lm.forward(plan.batch_input(b), [lm.key_point], logits=False)
        n += plan.batch_size(b)
    return n / (time.perf_counter() - t0)


def phase_build(lm, folder: Path, cache: Path, size: str, log: dict) -> Path:
    """Build (or resume) the datastore of the first novels; each run appends one segment to
    the log: its wall time, the entries it wrote, its tokens/s and the bare forward pass's."""
    from knnlm.core.batching import plan_files
    from knnlm.core.datastore import build_datastore

    out = cache / f"ds-{size}"
    if (out / "meta.json").exists():
        LOG.info("%s is built", out)
        return out
    files = datastore_files(folder, size)
    plan = plan_files(lm, files, W, S, B)
    bare = bare_forward(lm, plan, 8)
    LOG.info("bare forward pass: %.0f tokens/s", bare)
    state = {"batches": 0, "tokens": 0}
    t0 = time.perf_counter()
    seg = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bare_tokens_per_s": bare}
    log.setdefault("segments", {}).setdefault(size, []).append(seg)

    def record() -> None:  # the segment so far, saved (a killed run keeps all but its last minutes)
        seg.update(seconds=time.perf_counter() - t0, tokens=state["tokens"], batches=state["batches"],
                   peak_rss_mb=peak_rss_mb())
        seg["tokens_per_s"] = seg["tokens"] / max(seg["seconds"], 1e-9)
        save_log(cache, log)

    def on_batch(b: int) -> None:
        state["batches"] += 1
        state["tokens"] += plan.batch_size(b)
        if state["batches"] % 64 == 0:
            record()

    try:
        build_datastore(lm, files, out, window=W, stride=S, batch_tokens=B, on_batch=on_batch)
    finally:
        record()
    return out


def excerpts(folder: Path, files: list[str], chars: int, out: Path) -> Path:
    """One document per novel: its first `chars` characters, cut at the last paragraph end."""
    from knnlm.core.corpus import read_documents

    if not out.exists():
        rows = []
        for f in files:
            text = read_documents(folder / f)[0].text[:chars]
            rows.append({"title": NOVELS[f]["title"], "text": text[: text.rfind("\n\n")].strip()})
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
        tmp.replace(out)
    return out


def phase_queries(lm, folder: Path, cache: Path, chars: int) -> dict:
    """Query keys and LM log-probs of the tuning and test excerpts (windows 1024/512), cached."""
    from common import query_cache

    return {split: query_cache(lambda: lm, excerpts(folder, SPLIT[split], chars, cache / f"{split}-{chars}.jsonl"),
                               cache / f"queries-{split}-{chars}.npz", confidence=True, cache=True)
            for split in ("tune", "test")}


def phase_index(ds, kind: str) -> dict:
    """The index `kind` of `ds` (built when missing): its build time and size."""
    from knnlm.core.index import auto_factory, build_index, index_info, index_name, list_indexes

    factory = auto_factory(ds.count, ds.dim) if kind == "auto" else kind
    name = index_name(factory)
    if name not in list_indexes(ds):
        build_index(ds, factory)
    _, d, info = index_info(ds, name)
    return {"index": name, "factory": factory, "build_seconds": info.get("build_seconds"),
            "train_size": info.get("train_size"), "bytes": (d / "index.faiss").stat().st_size}


def phase_quality(lm, ds, queries: dict, index: str) -> dict:
    """Test perplexity of the LM and of the kNN-LM with the datastore's own (self-tuned)
    settings and with k, λ, T tuned on the tuning novels; the test optimum beside them; the
    default (as `knnlm eval`: the λ table, adapting, and the continuous cache where self-tuning
    kept one) beside the default before the λ table (one adaptive λ0) and without the cache."""
    from common import cache_logprobs, default_logprobs, retrieve

    from knnlm.core.index import Searcher
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.run.selftune import self_tune
    from knnlm.run.tune import sweep

    searcher = Searcher(ds, index)
    own = ds.settings
    if not own or any(f not in own for f in CURRENT):  # tuned before the settings `knnlm build` tunes now
        own = self_tune(lm, ds, searcher, progress=False)
    k = min(1024, ds.count)
    tq, q = queries["tune"], queries["test"]
    td, tv, _ = retrieve(searcher, tq["keys"], k)
    tuned = sweep(tq["lm"].astype(float), td, tv, tq["targets"])["best"]
    dists, vals, secs = retrieve(searcher, q["keys"], k)
    lm_lp, t = q["lm"].astype(float), q["targets"]

    def ppl(s):
        kk = min(int(s["k"]), k)
        return perplexity(interpolate(lm_lp, knn_target_logprobs(dists[:, :kk], vals[:, :kk], t, s["temperature"]),
                                      s["lambda"]))

    pick = ("k", "lambda", "temperature")
    oracle = sweep(lm_lp, dists, vals, t)["best"]
    cache_lp, theta, size = cache_logprobs(q, own)  # the continuous cache at the datastore's θ and size
    ends: list = []
    default, lam_end = default_logprobs(lm_lp, dists, vals, t, own, q.get("lm_max"), cache_lp, ends)  # as `knnlm eval`
    knn_default, _ = default_logprobs(lm_lp, dists, vals, t, own, q.get("lm_max"))  # the datastore alone
    before, _ = default_logprobs(lm_lp, dists, vals, t, {**own, "lambda_by_distance": None})  # one adaptive λ0
    return {"entries": ds.count, "test_tokens": int(len(t)), "tune_tokens": int(len(tq["targets"])),
            "index": searcher.settings(), "search_ms_per_token": 1000 * secs / len(t),
            "ppl_lm": perplexity(lm_lp),
            "ppl_default": perplexity(default), "lambda_end": lam_end, "ppl_before": perplexity(before),
            "ppl_default_without_cache": perplexity(knn_default),
            "cache": {"lambda": own.get("cache_lambda", 0.0), "theta": theta, "size": size,
                      "lambda_end": ends[1] if len(ends) > 1 else None},
            "lambda_by_distance": own.get("lambda_by_distance"),
            "own": {f: own[f] for f in pick}, "ppl_own": ppl(own),
            "tuned": {f: tuned[f] for f in pick}, "ppl_tuned": ppl(tuned),
            "oracle": {f: oracle[f] for f in pick}, "ppl_oracle": oracle["ppl"]}


def exact_topk(ds, queries, k: int, chunk: int = 65536):
    """Exact top-k (squared L2 to the stored float16 keys) of each query, by one pass over the
    keys with file reads (no index, no keys in RAM): (dists, ids) ascending, (m, k).  Each
    chunk's top-k comes from FAISS's brute-force search (matrix products and a heap), merged
    into a running heap."""
    import faiss
    import numpy as np

    q = np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(q), k)
    for start, keys in ds.iter_keys(chunk):
        d, i = faiss.knn(q, np.ascontiguousarray(keys, np.float32), min(k, len(keys)))
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i + start, np.int64))
    heap.finalize()
    return heap.D, heap.I


def save_row(out: Path, row: dict) -> None:
    """Put one configuration's row into the JSON list `out` (replacing that factory's row)."""
    rows = json.loads(out.read_text("utf-8")) if out.exists() else []
    rows = [r for r in rows if r["factory"] != row["factory"]] + [row]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n", "utf-8")
    tmp.replace(out)


def phase_indexes(lm, ds, queries: dict, factories: list[str], nprobes: list[int], n_exact: int, cache: Path,
                  out: Path) -> list:
    """Each FAISS configuration on `ds`: training and adding time, bytes, and per nprobe the
    search ms per test token at k = 1024 (re-ranked from the stored keys), recall of the exact
    top-k and test perplexity with the tuned settings, against exact search over all entries.
    Each row is saved into `out` as soon as it is measured (rows of other factories stay)."""
    import numpy as np

    from common import retrieve

    from knnlm.core.index import Searcher, build_index, index_info, index_name, list_indexes
    from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
    from knnlm.run.tune import sweep

    k = min(1024, ds.count)
    q = queries["test"]
    pick = np.linspace(0, len(q["targets"]) - 1, min(n_exact, len(q["targets"]))).astype(int)
    exact_path = cache / f"exact-{ds.count}-{len(pick)}.npz"
    if not exact_path.exists():
        t0 = time.perf_counter()
        ed, ei = exact_topk(ds, q["keys"][pick], k)
        np.savez(exact_path, dists=ed, ids=ei, seconds=time.perf_counter() - t0)
    ex = np.load(exact_path)
    lm_lp, t = q["lm"][pick].astype(float), q["targets"][pick]
    tq = queries["tune"]
    rows = []

    def ppl(d, ids, s):
        v = ds.vals[np.maximum(ids, 0)]
        return perplexity(interpolate(lm_lp, knn_target_logprobs(d[:, :s["k"]], v[:, :s["k"]], t, s["temperature"]),
                                      s["lambda"]))

    for factory in factories:
        name = index_name(factory)
        if name not in list_indexes(ds):
            build_index(ds, factory)
        _, d, info = index_info(ds, name)
        row = {"factory": factory, "build_seconds": info.get("build_seconds"), "train_size": info.get("train_size"),
               "bytes": (d / "index.faiss").stat().st_size, "bytes_per_entry": (d / "index.faiss").stat().st_size / ds.count,
               "nprobe": []}
        for nprobe in nprobes:
            s = Searcher(ds, name, nprobe=nprobe)
            td, tv, _ = retrieve(s, tq["keys"], k)
            tuned = sweep(tq["lm"].astype(float), td, tv, tq["targets"])["best"]
            t0 = time.perf_counter()
            dd, ii = s.search(np.asarray(q["keys"][pick], np.float32), k)
            ms = 1000 * (time.perf_counter() - t0) / len(pick)
            recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ii, ex["ids"])]))
            row["nprobe"].append({"nprobe": nprobe, "ms_per_token": ms, "recall": recall,
                                  "tuned": {f: tuned[f] for f in ("k", "lambda", "temperature")},
                                  "ppl": ppl(dd, ii, tuned), "ppl_exact": ppl(ex["dists"], ex["ids"], tuned)})
            LOG.info("%s nprobe %d: %.2f ms/token, recall %.3f, ppl %.3f (exact %.3f)", factory, nprobe, ms, recall,
                     row["nprobe"][-1]["ppl"], row["nprobe"][-1]["ppl_exact"])
        rows.append(row)
        save_row(out, row)
    return rows


def anon_rss_mb() -> float:
    """This process's anonymous resident memory (MB): what it holds itself, not the page
    cache's pages of memory-mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_prompts(folder: Path, cache: Path, chars: int) -> tuple[Path, list[str]]:
    """The test novels' first `chars` characters (one document each) and their first 200
    characters as generation prompts."""
    text = excerpts(folder, SPLIT["test"], chars, cache / f"test-{chars}.jsonl")
    return text, [json.loads(line)["text"][:200] for line in text.read_text("utf-8").splitlines()]


def index_of(ds_path: Path, kind: str) -> str:
    """The name of the index `kind` ("auto": the one `knnlm build` picks) of the datastore."""
    from knnlm.core.index import auto_factory, index_name
    from knnlm.scale import open_datastore

    ds = open_datastore(ds_path)
    return index_name(auto_factory(ds.count, ds.dim) if kind == "auto" else kind)


def phase_speed(lm, ds_path: Path, folder: Path, cache: Path, chars: int, gen_tokens: int, repeats: int,
                index: str) -> dict:
    """Evaluation and one-stream generation with the datastore's defaults as ratios of the
    base LM's tokens/s, measured interleaved in one process (the median of `repeats`); the
    process's anonymous RSS after the searches."""
    import statistics

    import knnlm
    from knnlm.run.generate import KNNLM

    text, prompts = test_prompts(folder, cache, chars)
    rss_before = anon_rss_mb()
    retrieval = knnlm.RetrievalSettings(index=index)
    knn = KNNLM(lm, {"novels": ds_path}, retrieval=retrieval)
    runs = {"eval_lm": [], "eval_knnlm": [], "gen_lm": [], "gen_knnlm": []}
    ppl = {}
    for _ in range(repeats):  # interleaved, so other load on the machine hits both alike
        for name, ds in (("eval_lm", None), ("eval_knnlm", ds_path)):
            r = knnlm.evaluate(lm, [text], ds, retrieval=retrieval if ds else None, progress=False)
            runs[name].append(r["tokens"] / r["seconds"])
            ppl[name] = r["ppl_knnlm" if ds else "ppl_lm"]
            tokens = r["tokens"]
        for name, ds in (("gen_lm", None), ("gen_knnlm", "novels")):
            t0 = time.perf_counter()
            for p in prompts:
                knn.generate(p, gen_tokens, datastore=ds, ignore_eos=True)
            runs[name].append(gen_tokens * len(prompts) / (time.perf_counter() - t0))
    rate = {name: statistics.median(v) for name, v in runs.items()}
    return {"eval_tokens": tokens, "gen_tokens": gen_tokens * len(prompts), "repeats": repeats,
            "tokens_per_s": rate, "runs": runs, "ppl": ppl,
            "eval_ratio": rate["eval_knnlm"] / rate["eval_lm"], "gen_ratio": rate["gen_knnlm"] / rate["gen_lm"],
            "search": knn.searchers["novels"].settings(),
            "anon_rss_mb": anon_rss_mb(), "anon_rss_mb_before_datastore": rss_before}


# the variants of the variants phase: what each of knnlm's options buys on a large datastore;
# "datastore": one of novels_derived.DERIVED, made from the datastore and searched instead of it
VARIANTS = {"default": {}, "nprobe 8": {"nprobe": 8}, "no re-ranking (PQ distances)": {"rerank": False},
            "pointers 16": {"pointers": 16}, "adaptive 0.5": {"adaptive": 0.5},
            "PCA 144": {"datastore": "pca144"}, "4 shards": {"datastore": "shards4"}}
GEN_VARIANTS = ("default", "pointers 16", "adaptive 0.5", "PCA 144", "4 shards")


def variant_settings(name: str, index: str | None = None):
    """The RetrievalSettings of the variant `name` of VARIANTS (on the index `index`; None: a
    generation call's settings, whose index is the KNNLM's)."""
    import knnlm
    from knnlm.retrieval.adaptive import Adaptive
    from knnlm.retrieval.pointers import Pointers

    v = {k: x for k, x in VARIANTS[name].items() if k != "datastore"}
    if "pointers" in v:
        v["pointers"] = Pointers(v["pointers"])
    if "adaptive" in v:
        v["adaptive"] = Adaptive("max_prob", v["adaptive"])
    return knnlm.RetrievalSettings(index=index, **v)


def phase_variants(lm, ds_path: Path, folder: Path, cache: Path, size: str, opts, only: list[str]) -> dict:
    """Each variant of VARIANTS in `only` (the defaults with one option changed, or a datastore
    made from this one) as `knnlm eval` runs it on the test novels, and those of GEN_VARIANTS in
    one-stream generation: tokens/s as a ratio of the base LM's measured interleaved in one
    process (the median of `repeats`), perplexity (every memory mixed) and the share of tokens
    that searched.  A run of some variants only replaces their rows in variants-<size>.json,
    with the base LM of their own run."""
    import statistics

    import knnlm
    from knnlm.run.generate import KNNLM
    from novels_derived import make_derived

    text, prompts = test_prompts(folder, cache, opts.speed_chars)
    paths = {n: make_derived(lm, ds_path, VARIANTS[n]["datastore"], cache / f"derived-{size}.json")
             if "datastore" in VARIANTS[n] else ds_path for n in only}
    index = {n: index_of(p, opts.index if p == ds_path else "auto") for n, p in paths.items()}
    knns = {p: KNNLM(lm, {"novels": p}, retrieval=knnlm.RetrievalSettings(index=index[n])) for n, p in paths.items()}
    gen = [n for n in GEN_VARIANTS if n in only]
    runs: dict = {"eval": {n: [] for n in ["LM", *only]}, "gen": {n: [] for n in ["LM", *gen]}}
    out: dict = {"eval": {}, "gen": {}}
    warm = excerpts(folder, SPLIT["test"][:1], 1000, cache / "test-warm-1000.jsonl")
    for n in only:  # what a server answering for a while holds in the page cache: the keys and the index
        LOG.info("%s: %.1f GB of keys and index read through the page cache", n,
                 read_through(paths[n], index[n]) / 1e9)
    for n in [None, *only]:  # untimed: the first calls' one-off costs (the model's and the indexes' pages)
        knnlm.evaluate(lm, [warm], paths.get(n), retrieval=variant_settings(n, index[n]) if n else None,
                       progress=False)
    for _ in range(opts.repeats):  # interleaved, so other load on the machine hits all alike
        for name in runs["eval"]:
            ds, ret = (None, None) if name == "LM" else (paths[name], variant_settings(name, index[name]))
            r = knnlm.evaluate(lm, [text], ds, retrieval=ret, progress=False)
            runs["eval"][name].append(r["tokens"] / r["seconds"])
            out["eval"][name] = {"ppl": r["ppl"], "search_rate": r.get("search_rate", 0.0), "tokens": r["tokens"]}
            LOG.info("eval, %s: %.1f tokens/s, ppl %.3f", name, runs["eval"][name][-1], r["ppl"])
        for name in runs["gen"]:
            knn = knns[paths[only[0] if name == "LM" else name]]  # the LM's: any of them, with no datastore
            ret = None if name == "LM" else variant_settings(name)
            t0 = time.perf_counter()
            for prompt in prompts:
                knn.generate(prompt, opts.gen_tokens, datastore=None if name == "LM" else "novels", retrieval=ret,
                             ignore_eos=True)
            runs["gen"][name].append(opts.gen_tokens * len(prompts) / (time.perf_counter() - t0))
            LOG.info("generation, %s: %.2f tokens/s", name, runs["gen"][name][-1])
    for kind in ("eval", "gen"):
        lm_rate = statistics.median(runs[kind]["LM"])
        for name, rates in runs[kind].items():
            out[kind].setdefault(name, {}).update(tokens_per_s=statistics.median(rates),
                                                  ratio=statistics.median(rates) / lm_rate)
    res = {"variants": {n: VARIANTS[n] for n in only}, "repeats": opts.repeats,
           "gen_tokens": opts.gen_tokens * len(prompts), "runs": runs, **out}
    return merge_variants(cache / f"variants-{size}.json", res)


def merge_variants(path: Path, res: dict) -> dict:
    """`res` over the earlier variants run saved at `path`: a variant measured again takes its new
    row; rows of a later run than the first keep their own run's base LM as "LM, run N"."""
    if not path.exists():
        return res
    old = json.loads(path.read_text("utf-8"))
    if set(old["variants"]) <= set(res["variants"]):
        return res  # every earlier row measured again
    run = 1 + max([1, *(int(n.rsplit(" ", 1)[1]) for n in old["eval"] if n.startswith("LM, run "))])
    for kind in ("eval", "gen"):
        for name in res["variants"]:
            old[kind].pop(name, None)  # a variant measured again moves under its new run's LM
        for name, row in res[kind].items():
            old[kind][f"LM, run {run}" if name == "LM" else name] = row
    old.setdefault("later_runs", {})[str(run)] = res["runs"]
    old["variants"].update(res["variants"])
    for kind in ("eval", "gen"):  # a later run's LM row left with no rows of its own goes
        names = list(old[kind])
        for a, b in zip(names, names[1:] + ["LM"]):
            if a.startswith("LM") and b.startswith("LM"):
                del old[kind][a]
    return old


def read_through(ds_path: Path, index: str) -> int:
    """Read the keys and the index `index` of a datastore (each shard's, for a sharded one) once,
    so their pages are in the page cache; returns the bytes read."""
    files = [f for d in [ds_path, *sorted((ds_path / "shards").glob("*"))]
             for f in [d / "keys.npy", *sorted((d / "indexes" / index).glob("*"))] if f.is_file()]
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 26):
                total += len(chunk)
    return total


def phase_serve(lm, ds_path: Path, folder: Path, cache: Path, chars: int, tokens: int, repeats: int,
                index: str) -> dict:
    """`knnlm serve` over the datastore with its defaults: completion tokens/s for 1 and 8
    concurrent streams (greedy, `tokens` each), against the same server answering with the
    base LM alone (`"datastore": null`), interleaved, the median of `repeats`."""
    import statistics

    from bench_serve import load

    import knnlm
    from knnlm.run.generate import KNNLM
    from knnlm.serve.server import create_app, serve_in_thread

    _, prompts = test_prompts(folder, cache, chars)
    app = create_app(KNNLM(lm, {"novels": ds_path}, retrieval=knnlm.RetrievalSettings(index=index)), max_queue=32,
                     max_tokens=tokens, max_batch=8)
    runs = {f"{who}, {n} stream{'s' * (n > 1)}": [] for n in (1, 8) for who in ("LM", "kNN-LM")}
    with serve_in_thread(app) as url:
        load(url, 2, 1, 4, {"temperature": 0}, prompts)  # warm-up: model, index pages
        for _ in range(repeats):
            for name in runs:
                streams = 1 if name.endswith(" 1 stream") else 8
                body = {"temperature": 0, "datastore": "novels" if name.startswith("kNN") else None}
                seconds, _, _, made = load(url, streams, 3 if streams == 1 else 1, tokens, body, prompts)
                runs[name].append(made / seconds)
                LOG.info("%s: %.1f tokens/s", name, runs[name][-1])
    rate = {name: statistics.median(v) for name, v in runs.items()}
    return {"tokens": tokens, "repeats": repeats, "tokens_per_s": rate, "runs": runs,
            "ratio_1": rate["kNN-LM, 1 stream"] / rate["LM, 1 stream"],
            "ratio_8": rate["kNN-LM, 8 streams"] / rate["LM, 8 streams"], "anon_rss_mb": anon_rss_mb()}


def save_log(cache: Path, log: dict) -> None:
    tmp = cache / "build-log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1) + "\n", "utf-8")
    tmp.replace(cache / "build-log.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["check", "build", "point", "indexes", "speed", "variants", "serve", "report"],
                    help="check: the data's sha256; build: the datastore; point: build, index, tune and test "
                         "one size; indexes: FAISS configurations on one size against exact search; speed: evaluation "
                         "and generation tokens/s against the base LM; variants: the same for the defaults with "
                         "one option changed (nprobe, re-ranking, pointers, adaptive retrieval, PCA-reduced keys, "
                         "shards); serve: `knnlm serve`'s tokens/s for 1 and 8 streams against the base LM; "
                         "report: write results/novels.{md,json}")
    ap.add_argument("--factories", default="IVF1024,PQ64;IVF4096,PQ64;IVF4096,PQ32",
                    help="indexes phase: FAISS factory strings, ';'-separated")
    ap.add_argument("--nprobes", default="8,32", help="indexes phase: nprobe values, comma-separated")
    ap.add_argument("--exact-tokens", type=int, default=2000,
                    help="indexes phase: test tokens searched exactly over all entries (default: 2000)")
    ap.add_argument("--chars", type=int, default=32_000,
                    help="characters of each held-out novel read for tuning and test (default: 32000)")
    ap.add_argument("--speed-chars", type=int, default=6_000,
                    help="speed and variants phases: characters of each test novel evaluated (default: 6000)")
    ap.add_argument("--gen-tokens", type=int, default=32,
                    help="speed, variants and serve phases: tokens generated per prompt (default: 32)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="speed, variants and serve phases: interleaved repeats (default: 2)")
    ap.add_argument("--only", default=None,
                    help="variants phase: the variants to measure, comma-separated (default: all of them)")
    ap.add_argument("--index", default="auto", help="index of the point (default: auto, as knnlm build)")
    ap.add_argument("--size", choices=sorted(SIZES), default="all", help="datastore: 1e5, 1e6 or all novels")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding novels/ (default: ../shared/data)")
    ap.add_argument("--cache", default=str(HERE / "cache" / "novels"))
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    setup_logging("bench_novels")
    folder = check_novels(Path(args.data))
    if args.phase == "check":
        print(f"{len(NOVELS)} novels in {folder}: sha256 as recorded")
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / "build-log.json"
    log = json.loads(log_path.read_text("utf-8")) if log_path.exists() else {}
    if args.phase == "report":
        command = "python benchmarks/bench_novels.py " + " ".join(sys.argv[1:])
        from novels_page import render

        render(cache, log, re.sub(r" --data[= ]\S+", "", command), SPLIT, SIZES)  # the data is checked by sha256
        return
    from knnlm.core.model import LM

    lm = LM.load("smollm2-135m", dtype=args.dtype)
    ds_path = phase_build(lm, folder, cache, args.size, log)
    if args.phase == "point":
        from knnlm.core.datastore import Datastore

        ds = Datastore(ds_path)
        res = {"size": args.size, "novels": SPLIT["datastore"][: SIZES[args.size]], "build": log.get("segments", {}).get(args.size)}
        res["index"] = phase_index(ds, args.index)
        res.update(phase_quality(lm, ds, phase_queries(lm, folder, cache, args.chars), res["index"]["index"]))
        out = cache / f"point-{args.size}.json"
        out.write_text(json.dumps(res, indent=1) + "\n", "utf-8")
        LOG.info("%s: %s", out, json.dumps({k: res[k] for k in ("entries", "ppl_lm", "ppl_own", "ppl_tuned")}))
    if args.phase == "indexes":
        from knnlm.core.datastore import Datastore

        rows = phase_indexes(lm, Datastore(ds_path), phase_queries(lm, folder, cache, args.chars),
                             args.factories.split(";"), [int(x) for x in args.nprobes.split(",")], args.exact_tokens, cache,
                             cache / f"indexes-{args.size}.json")
        LOG.info("%s: %d configurations", cache / f"indexes-{args.size}.json", len(rows))
    if args.phase == "speed":
        res = phase_speed(lm, ds_path, folder, cache, args.speed_chars, args.gen_tokens, args.repeats,
                          index_of(ds_path, args.index))
        out = cache / f"speed-{args.size}.json"
        out.write_text(json.dumps(res, indent=1) + "\n", "utf-8")
        LOG.info("%s: eval %.2fx, generation %.2fx the base LM", out, res["eval_ratio"], res["gen_ratio"])
    if args.phase == "variants":
        only = [n.strip() for n in args.only.split(",")] if args.only else list(VARIANTS)
        if unknown := [n for n in only if n not in VARIANTS]:
            raise BenchError(f"no variant {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
        res = phase_variants(lm, ds_path, folder, cache, args.size, args, only)
        out = cache / f"variants-{args.size}.json"
        out.write_text(json.dumps(res, indent=1) + "\n", "utf-8")
        LOG.info("%s: %s", out, {n: round(v["ratio"], 2) for n, v in res["eval"].items()})
    if args.phase == "serve":
        res = phase_serve(lm, ds_path, folder, cache, args.speed_chars, args.gen_tokens, args.repeats,
                          index_of(ds_path, args.index))
        out = cache / f"serve-{args.size}.json"
        out.write_text(json.dumps(res, indent=1) + "\n", "utf-8")
        LOG.info("%s: 1 stream %.2fx, 8 streams %.2fx the base LM", out, res["ratio_1"], res["ratio_8"])


if __name__ == "__main__":
    run_main(main)
