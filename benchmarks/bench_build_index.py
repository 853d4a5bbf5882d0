"""What an index costs a datastore build: made during the forward pass (the default of
`knnlm build`) or afterwards in a second pass over the keys (`knnlm index`), as build
tokens/s over the bare forward pass's, all measured in one run on the same text.

The text: the first --chars characters of each of the first --novels novels of the novels
datastore's order (benchmarks/novels.json), one document each, with the novels benchmark's
build windows.  An IVF-PQ index is forced (--factory; `auto` picks Flat below 100k entries)
and trained on --train-size keys, so that training happens part-way through the build and
the index work shows.  Four timed steps, one after the other: (1) the bare forward pass
(the model over the same windows, nothing kept); (2) the datastore alone; (3) the index of
(2) built afterwards (`build_index`: a uniform sample read back from keys.npy, then every
key added in a second pass); (4) the datastore with its index made during the pass.  Then
the resumability check: (4) again, killed at --kill-at of its batches after the index was
trained, and resumed; the resumed build's index equals (4)'s, and the resume's index
catch-up (the trained checkpoint read, the keys on disk added) is timed.

    python benchmarks/bench_build_index.py --out benchmarks/results/build-index.json

Data: --data (default ../shared/data), the novels checked against their sha256 first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_novels import SPLIT, check_novels
from common import DEFAULT_DATA, HERE, command_line, run_main, setup_logging

LOG = logging.getLogger("bench_build_index")
W, S, B = 1024, 768, 4096  # the novels build's windows


def excerpt_corpus(folder: Path, novels: int, chars: int, out: Path) -> Path:
    """One jsonl document per novel: its first `chars` characters, cut at a paragraph end."""
    lines = []
    for name in SPLIT["datastore"][:novels]:
        text = gzip.open(folder / name, "rt", encoding="utf-8").read(chars + 2000).replace("\r\n", "\n")
        cut = text.rfind("\n\n", 0, chars)
        lines.append(json.dumps({"title": name, "text": text[: cut if cut > 0 else chars]}))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def bare_forward(lm, plan) -> float:
    """Seconds of the model's forward pass over every batch of `plan`, keys thrown away."""
    t0 = time.perf_counter()
    for b in range(len(plan.batches)):
        lm.forward(plan.batch_input(b), [lm.key_point], logits=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding novels/ (or the novels folder)")
    ap.add_argument("--model", default=None, help="default: the library's default model")
    ap.add_argument("--novels", type=int, default=3)
    ap.add_argument("--chars", type=int, default=50_000, help="characters of each novel")
    ap.add_argument("--factory", default="IVF256,PQ64")
    ap.add_argument("--train-size", type=int, default=16_384)
    ap.add_argument("--kill-at", type=float, default=0.7, help="share of the batches after which the kill comes")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(HERE / "results" / "build-index.json"))
    args = ap.parse_args()
    setup_logging("bench_build_index")

    import faiss

    from knnlm.core.batching import WindowSettings, plan_files
    from knnlm.core.datastore import BuildSettings, Datastore, build_datastore
    from knnlm.core.index import Searcher, build_index, index_name
    from knnlm.core.index_fill import IndexSettings
    from knnlm.core.model import DEFAULT_MODEL, LM

    folder = check_novels(Path(args.data))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-build-index-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = excerpt_corpus(folder, args.novels, args.chars, work / "corpus.jsonl")
    lm = LM.load(args.model or DEFAULT_MODEL, dtype="float32", device="cpu")
    plan = plan_files(lm, [corpus], W, S, B)
    count = plan.count
    LOG.info("%d entries, %d batches, %s trained on the first %d keys", count, len(plan.batches), args.factory,
             args.train_size)
    lm.forward(plan.batch_input(0), [lm.key_point], logits=False)  # warm-up (one batch)
    windows = WindowSettings(W, S, B)
    index = IndexSettings(args.factory, train_size=args.train_size)
    name = index_name(args.factory)

    def timed(f):
        t0 = time.perf_counter()
        f()
        seconds = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n", encoding="utf-8")  # so far
        return seconds

    res = {"entries": count, "batches": len(plan.batches), "factory": args.factory, "train_size": args.train_size,
           "novels": SPLIT["datastore"][: args.novels], "chars_per_novel": args.chars, "window": W, "stride": S,
           "batch_tokens": B, "threads": faiss.omp_get_max_threads()}
    res["bare_s"] = bare_forward(lm, plan)
    LOG.info("bare forward pass: %.1f s", res["bare_s"])
    res["datastore_s"] = timed(lambda: build_datastore(lm, [corpus], work / "plain", BuildSettings(windows),
                                                       overwrite=True, progress=False))
    LOG.info("datastore alone: %.1f s", res["datastore_s"])
    res["index_after_s"] = timed(lambda: build_index(Datastore(work / "plain"), args.factory,
                                                     train_size=args.train_size, overwrite=True, progress=False))
    LOG.info("index afterwards: %.1f s", res["index_after_s"])
    res["during_s"] = timed(lambda: build_datastore(lm, [corpus], work / "during", BuildSettings(windows, index=index),
                                                    overwrite=True, progress=False))
    info = json.loads((work / "during" / "indexes" / name / "index.json").read_text())
    res["during_index_s"] = info["build_seconds"]
    LOG.info("datastore with its index made during the pass: %.1f s (index work %.1f s)", res["during_s"],
             info["build_seconds"])

    # killed after the index was trained, then resumed
    kill = max(1, int(args.kill_at * len(plan.batches)))
    partial = work / "killed.partial"

    def crash(b: int) -> None:
        if b + 1 >= kill and (partial / f"trained-{name}.faiss").exists():
            raise RuntimeError("killed")

    try:
        build_datastore(lm, [corpus], work / "killed", BuildSettings(windows, index=index), overwrite=True,
                        progress=False, on_batch=crash)
        raise RuntimeError("the build was not killed: the index was trained only at its last batch")
    except RuntimeError as e:
        if str(e) != "killed":
            raise
    done = json.loads((partial / "progress.json").read_text())["batches_done"]
    rows = sum(plan.batch_size(b) for b in range(done))
    res["resume_s"] = timed(lambda: build_datastore(lm, [corpus], work / "killed", BuildSettings(windows, index=index),
                                                    progress=False))
    killed_info = json.loads((work / "killed" / "indexes" / name / "index.json").read_text())
    res.update(killed_after_batches=done, keys_on_disk_at_resume=rows,
               resume_index_s=killed_info["build_seconds"])
    a, b = Datastore(work / "during"), Datastore(work / "killed")
    q = np.asarray(a.keys[:: max(1, count // 500)], dtype=np.float32)
    res["resumed_index_file_equal"] = ((work / "during" / "indexes" / name / "index.faiss").read_bytes()
                                       == (work / "killed" / "indexes" / name / "index.faiss").read_bytes())
    res["resumed_neighbours_equal"] = bool(all(
        np.array_equal(x, y) for x, y in zip(Searcher(a, name).search(q, 16), Searcher(b, name).search(q, 16))))

    tps = {k: count / res[k] for k in ("bare_s", "datastore_s", "during_s")}
    res["tokens_per_s"] = {"bare": tps["bare_s"], "datastore": tps["datastore_s"],
                           "datastore_then_index": count / (res["datastore_s"] + res["index_after_s"]),
                           "index_during": tps["during_s"]}
    res["ratio_to_bare"] = {k: v / tps["bare_s"] for k, v in res["tokens_per_s"].items()}
    res["command"] = command_line(__file__)
    print(json.dumps(res, indent=2))
    Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    run_main(main)
