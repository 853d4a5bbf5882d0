"""Sharded datastores on WikiText-2: exactness, the build on Ray workers, shard actors.

    python benchmarks/bench_scale.py --phases exact    # sharded vs unsharded search and perplexity
    python benchmarks/bench_scale.py --phases build    # 1 vs 3 Ray workers vs one process, same entries
    python benchmarks/bench_scale.py --phases actors   # queries/s with 1, 2, 4 shard actors

`exact` needs no LM run: it reads the WikiText-2 datastore and the query keys, LM log-probs
and targets that benchmarks/bench_wikitext.py caches (--cache, default benchmarks/cache;
/work/cache/wikitext2 on the shared machine), splits a COPY of the datastore into 3 shards
and compares kNN-LM perplexities.  The source datastore is only read.
Results: benchmarks/results/scale.json (merged phase by phase) and scale.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np

from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher, index_name
from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
from knnlm.scale import open_datastore, open_searcher
from knnlm.scale.index import build_sharded_index
from knnlm.scale.split import split_datastore

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = HERE / "results" / "scale.json"
LOG = logging.getLogger("bench")


def knn_ppl(searcher, vals, q: dict, k: int, lam: float, temperature: float, chunk: int = 2048) -> dict:
    """kNN-LM perplexity of the query set, searching `chunk` queries at a time; neighbour ids kept."""
    n = len(q["targets"])
    knn = np.empty(n, dtype=np.float64)
    ids = np.empty((n, k), dtype=np.int64)
    t0 = time.perf_counter()
    for a in range(0, n, chunk):
        d, i = searcher.search(np.asarray(q["keys"][a : a + chunk], dtype=np.float32), k)
        knn[a : a + chunk] = knn_target_logprobs(d, vals[np.maximum(i, 0)], q["targets"][a : a + chunk], temperature)
        ids[a : a + chunk] = i
    secs = time.perf_counter() - t0
    return {"ppl": perplexity(interpolate(q["lm"], knn, lam)), "seconds": round(secs, 2),
            "queries_per_s": round(n / secs, 1), "ids": ids}


def same_sets(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of each row's neighbours that both lists share."""
    return float(np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b)]))


def phase_exact(args) -> dict:
    src = Datastore(args.cache / "ds-bfloat16")
    z = np.load(args.cache / args.queries)
    n = min(args.limit or len(z["targets"]), len(z["targets"]))
    q = {"keys": z["keys"][:n], "lm": z["lm"][:n].astype(np.float64), "targets": z["targets"][:n]}
    work = args.work / "wt2-3shards"
    if not (work / "manifest.json").exists():
        t0 = time.perf_counter()
        split_datastore(src.path, work, 3, at="entries", overwrite=True)
        LOG.info("split in %.1f s", time.perf_counter() - t0)
    sh = open_datastore(work)
    names = set(os.listdir(work / "indexes")) if (work / "indexes").exists() else set()
    t_flat = t_ivf = None
    if "flat" not in names:
        t0 = time.perf_counter()
        build_sharded_index(sh, "Flat", progress=False)
        t_flat = time.perf_counter() - t0
    ivf = index_name(args.ivf)
    if ivf not in names and not args.flat_only:
        t0 = time.perf_counter()
        build_sharded_index(sh, args.ivf, train_size=args.train_size, nprobe=32, progress=False)
        t_ivf = time.perf_counter() - t0
    sh = open_datastore(work)
    k, lam, temp = args.k, args.lam, args.temperature
    out = {"queries": args.queries, "tokens": n, "k": k, "lambda": lam, "temperature": temp,
           "entries": sh.count, "shards": [s.count for s in sh.shards], "split": "at equal entry counts "
           "(the datastore is one .txt stream, one document)", "sharded_ivf_train_size": args.train_size,
           "sharded_index_seconds": {"flat": t_flat, ivf: t_ivf}, "ivf": args.ivf}
    runs = {
        "flat_single": lambda: Searcher(src, "flat"),
        "flat_sharded": lambda: open_searcher(sh, "flat"),
        "ivf_single": lambda: Searcher(src, ivf, nprobe=32, rerank=True),
        "ivf_sharded": lambda: open_searcher(sh, ivf, nprobe=32, rerank=True),
    }
    if args.flat_only:
        del runs["ivf_single"], runs["ivf_sharded"]
    ids = {}
    for name, make in runs.items():
        LOG.info("search %s", name)
        r = knn_ppl(make(), src.vals, q, k, lam, temp)
        ids[name] = r.pop("ids")
        out[name] = r
        LOG.info("%s: %s", name, r)
    out["ppl_lm"] = perplexity(q["lm"])
    f1, f2 = out["flat_single"]["ppl"], out["flat_sharded"]["ppl"]
    out["flat_rel_diff"] = abs(f2 - f1) / f1
    out["flat_same_ids_in_order"] = float(np.mean(ids["flat_single"] == ids["flat_sharded"]))
    out["flat_same_neighbour_sets"] = same_sets(ids["flat_single"][:2000], ids["flat_sharded"][:2000])
    if not args.flat_only:
        i1, i2 = out["ivf_single"]["ppl"], out["ivf_sharded"]["ppl"]
        out["ivf_rel_diff"] = abs(i2 - i1) / i1
        out["ivf_recall_vs_flat"] = {"single": same_sets(ids["ivf_single"][:2000], ids["flat_single"][:2000]),
                                     "sharded": same_sets(ids["ivf_sharded"][:2000], ids["flat_single"][:2000])}
    return out


def wiki_slice(path: Path, tokens_goal: int, lm) -> Path:
    """The first WikiText-2 valid articles up to `tokens_goal` tokens, one JSONL line each."""
    text = (DATA / "wiki.valid.raw").read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = $", text, flags=re.M)]
    arts = [text[a:b] for a, b in zip([0] + starts[1:], starts[1:] + [len(text)])]
    rows, n = [], 0
    for a in arts:
        if n >= tokens_goal:
            break
        rows.append(json.dumps({"title": a.strip().splitlines()[0].strip(" ="), "text": a}))
        n += len(lm.encode(a))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def phase_build(args) -> dict:
    import ray

    from knnlm.core.datastore import build_datastore
    from knnlm.core.model import LM
    from knnlm.scale.build import build_sharded
    from knnlm.scale.cluster import runtime_env

    lm = LM.load("smollm2-135m", dtype="bfloat16", device="cpu")
    work = args.work / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = wiki_slice(work / "slice.jsonl", args.build_tokens, lm)
    settings = dict(window=1024, stride=512, batch_tokens=4096)
    t0 = time.perf_counter()
    build_datastore(lm, [corpus], work / "single", progress=False, **settings)
    t_single = time.perf_counter() - t0
    single = Datastore(work / "single")
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), runtime_env=runtime_env(), include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    out = {"corpus": f"first {len(corpus.read_text().splitlines())} articles of wiki.valid.raw",
           "entries": single.count, "documents": len(single.docs), "single_process_seconds": round(t_single, 2),
           "single_tokens_per_s": round(single.count / t_single, 1), "ray_init_seconds": round(t_ray, 2)}
    for workers in [int(w) for w in args.build_workers.split(",")]:
        t0 = time.perf_counter()
        ds = open_datastore(build_sharded(lm, [corpus], work / f"w{workers}", workers=workers, **settings))
        secs = time.perf_counter() - t0
        ids = np.arange(single.count)
        same = {
            "keys_bit_identical": bool(np.array_equal(np.asarray(ds.keys[ids]).view(np.uint16),
                                                      np.asarray(single.keys).view(np.uint16))),
            "vals": bool(np.array_equal(ds.vals[ids], np.asarray(single.vals))),
            "provenance": all(np.array_equal(a, b) for a, b in zip(ds.provenance(ids), single.provenance(ids))),
            "doc_info": list(ds.doc_info) == list(single.doc_info),
        }
        out[f"workers_{workers}"] = {"shards": [s.count for s in ds.shards], "seconds": round(secs, 2),
                                     "tokens_per_s": round(ds.count / secs, 1),
                                     "ratio_to_single_process": round(t_single / secs, 3), "same_as_single": same}
        LOG.info("workers=%d: %s", workers, out[f"workers_{workers}"])
    ray.shutdown()
    shutil.rmtree(work)
    return out


def compare(d, i, d_ref, i_ref) -> dict:
    """How equal two (m, k) results are: ids in order, neighbour sets per row, distances slot by slot."""
    return {"same_ids_in_order": bool(np.array_equal(i, i_ref)),
            "same_slots": float(np.mean(i == i_ref)),
            "same_neighbour_sets_rows": float(np.mean((np.sort(i, 1) == np.sort(i_ref, 1)).all(1))),
            "max_abs_dist_diff": float(np.abs(d - d_ref).max()),
            "max_dist_diff_rel_to_kth": float((np.abs(d - d_ref) / np.maximum(d_ref[:, -1:], 1e-30)).max())}


def phase_actors(args) -> dict:
    """Queries/s with the 4 shards in process and on 1, 2, 4 Ray actors, and how equal the results are.

    An actor over g of the shard groups runs FAISS with cpu_count // groups threads, and FAISS's
    exact (BLAS) distances change in the last float32 bits with the thread count, which may swap
    neighbours of nearly equal distance.  So each run is compared with the in-process search at
    the default threads and with the in-process search at the actor's thread count (expected:
    identical ids and bit-identical distances, i.e. the merge itself is exact)."""
    import faiss
    import ray

    from knnlm.scale.cluster import runtime_env

    src = Datastore(args.cache / "ds-bfloat16")
    work = args.work / "wt2-4shards"
    if not (work / "manifest.json").exists():
        split_datastore(src.path, work, 4, at="entries", overwrite=True)
        build_sharded_index(open_datastore(work), "Flat", progress=False)
    sh = open_datastore(work)
    z = np.load(args.cache / args.queries)
    q = np.asarray(z["keys"][: args.actor_queries], dtype=np.float32)
    cpus = os.cpu_count() or 1
    default_threads = faiss.omp_get_max_threads()
    in_process = {}  # FAISS threads -> (dists, ids) of the in-process search

    def local(threads: int):
        if threads not in in_process:
            faiss.omp_set_num_threads(threads)
            try:
                in_process[threads] = open_searcher(sh, "flat").search(q, args.k)
            finally:
                faiss.omp_set_num_threads(default_threads)
        return in_process[threads]

    ray.init(num_cpus=cpus, runtime_env=runtime_env(), include_dashboard=False, log_to_driver=False)
    out = {"index": "flat (exact)", "shards": 4, "entries": sh.count, "queries": len(q), "k": args.k,
           "cpu_cores": cpus, "faiss_threads_in_process": default_threads}
    for backend, actors in (("local", None), ("ray", 1), ("ray", 2), ("ray", 4)):
        s = open_searcher(sh, "flat", backend=backend, actors=actors)
        s.search(q[:64], args.k)  # warm: actors up, files paged in
        t0 = time.perf_counter()
        d, i = s.search(q, args.k)
        secs = time.perf_counter() - t0
        if backend == "ray":
            s.close()
        threads = default_threads if backend == "local" else max(1, cpus // len(s.groups))
        key = "in_process" if backend == "local" else f"actors_{actors}"
        if backend == "local":
            in_process.setdefault(default_threads, (d, i))
        out[key] = {"queries_per_s": round(len(q) / secs, 1), "faiss_threads": threads,
                    "vs_in_process": compare(d, i, *local(default_threads))}
        same = local(threads)
        out[key]["vs_in_process_same_threads"] = {
            "same_ids_in_order": bool(np.array_equal(i, same[1])), "same_dists_bitwise": bool(np.array_equal(d, same[0]))}
        LOG.info("%s: %s", key, out[key])
    ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="exact,build,actors")
    p.add_argument("--cache", type=Path, default=HERE / "cache" / "wikitext2",
                   help="holds ds-bfloat16/ and the query files (from bench_wikitext.py)")
    p.add_argument("--work", type=Path, default=HERE / "cache" / "scale", help="where shards are written")
    p.add_argument("--queries", default="queries-heldout.npz")
    p.add_argument("--limit", type=int, default=0, help="first N queries only (0: all)")
    p.add_argument("--train-size", type=int, default=120_000, help="keys sampled across shards to train IVF-PQ")
    p.add_argument("--ivf", default="IVF2048,PQ64", help="the approximate index (the cached datastore has it)")
    p.add_argument("--flat-only", action="store_true", help="exact: only the Flat comparison (no IVF training)")
    p.add_argument("--build-tokens", type=int, default=25_000)
    p.add_argument("--build-workers", default="1,3", help="Ray worker counts to build with, each against one process")
    p.add_argument("--actor-queries", type=int, default=2048)
    p.add_argument("-k", type=int, default=1024)
    p.add_argument("--lam", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    from common import command_line

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for phase in args.phases.split(","):
        t0 = time.time()
        res = {"exact": phase_exact, "build": phase_build, "actors": phase_actors}[phase](args)
        res["wall_seconds"] = round(time.time() - t0, 1)
        res["command"] = command_line(__file__)
        res["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        results[phase] = res
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(json.dumps(res, indent=2, sort_keys=True))


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
