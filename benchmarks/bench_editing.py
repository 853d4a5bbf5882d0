"""Editing the WikiText-2 datastore: add 1% vs rebuild, remove one document, compact 10%.

    python benchmarks/bench_editing.py --cache /work/cache/wikitext2 --work /tmp/editing

The source datastore (<cache>/ds-bfloat16, from `knnlm build valid_datastore.txt`) is only
read: every edit happens on copies under --work.  Added documents are the articles of
<cache>/valid_heldout.txt (WikiText-2 valid articles the datastore does not hold), one
jsonl line each.  Phases (each result merged into benchmarks/results/editing.json):

  add      copy + `add_documents` of ~1% more entries (batch 1024: one window a forward pass)
  rebuild  `build_datastore` of the corpus + those articles and its index (the same auto
           factory, trained on the new keys), in pieces of at most --lock-seconds each under
           the shared CPU lock (resumable build; the pieces' times are summed)
  ppl      perplexity of a test slice with the added and the rebuilt datastore (IVF-PQ)
  remove   remove one added article: seconds until it is no longer retrieved; perplexity on
           its own text vs a datastore that never held it (Flat: exact; IVF-PQ)
  compact  add the other ~10% of articles, remove them all, compact: seconds and bytes vs
           the rebuild, and the compacted datastore vs the original (keys, search)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from knnlm.core.batching import plan_files
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.edit import add_documents, compact, remove_documents
from knnlm.core.index import Searcher, build_index
from knnlm.core.scoring import interpolate, perplexity
from knnlm.run.evaluate import score_plan
from knnlm.run.options import RetrievalSettings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "editing.json"
K, LAM, T = 1024, 0.25, 1.0  # the paper's settings, the same for every datastore compared
IVF = "ivf2048-pq64"  # the datastore's index (auto for its size)


@contextmanager
def cpu_lock(path: str):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def articles(text: str) -> list[dict]:
    """WikiText's articles (` = Title = ` lines) cut into their sections (` = = Section = = `),
    one jsonl record (document) each, titled "Article / Section"."""
    parts = re.split(r"^ = ([^=].*?) = \n", text, flags=re.M)
    out = []
    for title, body in zip(parts[1::2], parts[2::2]):
        secs = re.split(r"^ = = ([^=].*?) = = \n", body, flags=re.M)
        out.append({"title": title.strip(), "text": f" = {title.strip()} = \n" + secs[0]})
        out += [{"title": f"{title.strip()} / {s.strip()}", "text": f" = = {s.strip()} = = \n" + b}
                for s, b in zip(secs[1::2], secs[2::2])]
    return [r for r in out if r["text"].strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bytes_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ppl(lm, text: Path, searcher, k: int = K) -> float:
    plan = plan_files(lm, [text], 1024, 512, 4096)
    s = score_plan(lm, plan, searcher, retrieval=RetrievalSettings(k=k, temperature=T), progress=False)
    return perplexity(interpolate(s.lm, s.knn, LAM))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/work/cache/wikitext2")
    ap.add_argument("--work", default="/tmp/knnlm-editing")
    ap.add_argument("--phases", default="add,rebuild,ppl,remove,compact")
    ap.add_argument("--lock", default="/work/cache/cpu.lock", help="the shared CPU lock ('' : none)")
    ap.add_argument("--lock-seconds", type=float, default=300, help="longest piece of the rebuild under the lock")
    ap.add_argument("--test-chars", type=int, default=40_000, help="characters of test_subset.txt scored")
    args = ap.parse_args()
    cache, work = Path(args.cache), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lock = (lambda: cpu_lock(args.lock)) if args.lock else contextmanager(lambda: (yield))
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res["command"] = "python benchmarks/bench_editing.py " + " ".join(sys.argv[1:])

    from knnlm.core.model import LM

    lm = LM.load("smollm2-135m", dtype="bfloat16", device="cpu")
    src = cache / "ds-bfloat16"
    base = Datastore(src)
    arts = articles((cache / "valid_heldout.txt").read_text(encoding="utf-8"))
    sizes = [len(lm.encode(a["text"])) - 1 for a in arts]
    n1 = int(np.searchsorted(np.cumsum(sizes), 0.01 * base.count)) + 1  # the first articles reaching 1%
    add1 = write_jsonl(work / "add1.jsonl", arts[:n1])
    add10 = write_jsonl(work / "add10.jsonl", arts[n1:])
    res["datastore"] = {"entries": base.count, "index": "ivf2048-pq64", "bytes": bytes_of(src)}
    res["added"] = {"articles": n1, "entries": int(sum(sizes[:n1])), "share": sum(sizes[:n1]) / base.count}
    test = work / "test.txt"
    test.write_text((cache / "test_subset.txt").read_text(encoding="utf-8")[: args.test_chars], encoding="utf-8")
    phases = args.phases.split(",")

    def fresh(name: str) -> Path:
        p = work / name
        if p.exists():
            shutil.rmtree(p)
        shutil.copytree(src, p)
        return p

    if "add" in phases:
        with lock():
            a = fresh("added")
            t0 = time.perf_counter()
            add_documents(lm, a, [add1], batch_tokens=1024, progress=False)
            res["add_seconds"] = time.perf_counter() - t0
        print(f"add: {res['add_seconds']:.1f} s", flush=True)
        save(res)
    if "rebuild" in phases:
        r = work / "rebuilt"
        for p in (r, r.with_name(r.name + ".partial")):
            if p.exists():
                shutil.rmtree(p)
        spent = 0.0
        while True:  # the forward pass in pieces under the lock; the build resumes where it stopped
            with lock():
                t0 = time.perf_counter()

                def pause(_batch, t0=t0):
                    if time.perf_counter() - t0 > args.lock_seconds:
                        raise TimeoutError

                try:
                    build_datastore(lm, [cache / "valid_datastore.txt", add1], r, progress=False, on_batch=pause)
                    spent += time.perf_counter() - t0
                    break
                except TimeoutError:
                    spent += time.perf_counter() - t0
            print(f"rebuild: {spent:.0f} s so far", flush=True)
        with lock():
            t0 = time.perf_counter()
            build_index(Datastore(r), "auto", progress=False)
            res["rebuild_index_seconds"] = time.perf_counter() - t0
        res["rebuild_datastore_seconds"] = spent
        res["rebuild_seconds"] = spent + res["rebuild_index_seconds"]
        print(f"rebuild: {res['rebuild_seconds']:.0f} s", flush=True)
        save(res)
    if "ppl" in phases:
        with lock():
            res["ppl_added"] = ppl(lm, test, Searcher(Datastore(work / "added"), IVF))
            res["ppl_rebuilt"] = ppl(lm, test, Searcher(Datastore(work / "rebuilt"), IVF))
            res["ppl_base"] = ppl(lm, test, Searcher(base, IVF))
        print(f"ppl: added {res['ppl_added']:.4f} rebuilt {res['ppl_rebuilt']:.4f} base {res['ppl_base']:.4f}")
        save(res)
    if "remove" in phases:
        res["remove"] = remove_phase(lm, work, src, arts[:n1], lock)
        save(res)
    if "compact" in phases:
        with lock():
            c = fresh("compacted")
            t0 = time.perf_counter()
            e = add_documents(lm, c, [add10], batch_tokens=1024, progress=False)
            added10 = time.perf_counter() - t0
            ds = Datastore(c)
            remove_documents(c, range(1, len(ds.docs)))
            before = bytes_of(c)
            t0 = time.perf_counter()
            compact(c)
            seconds = time.perf_counter() - t0
            after, ds = bytes_of(c), Datastore(c)
            same = bool(np.array_equal(np.asarray(ds.keys), np.asarray(base.keys)))
            q = np.asarray(base.keys[:: max(1, base.count // 200)], dtype=np.float32)
            _, i1 = Searcher(ds, IVF).search(q, 64)
            _, i0 = Searcher(base, IVF).search(q, 64)
            res["compact"] = {"removed_entries": e["entries"], "share": e["entries"] / (base.count + e["entries"]),
                              "add_seconds": added10, "seconds": seconds, "bytes_before": before,
                              "bytes_after": after, "keys_identical_to_original": same,
                              "ivf_neighbours_same_as_original": float((i1 == i0).mean())}
        print(f"compact: {res['compact']}", flush=True)
        save(res)
    render(res)


def remove_phase(lm, work: Path, src: Path, added: list[dict], lock) -> dict:
    """Remove the first added document from the added datastore; compare with one that never held it."""
    out = {}
    gone = work / "gone.txt"
    gone.write_text(added[0]["text"], encoding="utf-8")
    with lock():
        a = work / "added"
        ds = Datastore(a)
        first = int(ds.docs[1, 2])
        own = np.arange(first, first + int(ds.docs[1, 1]) - 1)  # the article's entries
        q = np.asarray(ds.keys[own], dtype=np.float32)  # its own keys: their nearest entries are its own
        out["before_retrieved"] = float(np.isin(Searcher(ds, IVF).search(q, 8)[1], own).mean())
        out["ppl_own_text_before"] = ppl(lm, gone, Searcher(ds, IVF))
        t0 = time.perf_counter()
        remove_documents(a, [1])
        out["remove_seconds"] = time.perf_counter() - t0
        ds = Datastore(a)
        _, i = Searcher(ds, IVF).search(q, 8)
        out["until_not_retrieved_seconds"] = time.perf_counter() - t0  # remove, reopen, search
        out["after_retrieved"] = float(np.isin(i, own).mean())
        # a datastore that never held it: the original + the other added articles
        w = work / "without"
        if w.exists():
            shutil.rmtree(w)
        shutil.copytree(src, w)
        others = write_jsonl(work / "others.jsonl", added[1:])
        if added[1:]:
            add_documents(lm, w, [others], batch_tokens=1024, progress=False)
        out["ppl_own_text_removed_ivfpq"] = ppl(lm, gone, Searcher(ds, IVF))
        out["ppl_own_text_without_ivfpq"] = ppl(lm, gone, Searcher(Datastore(w), IVF))
        for p in (a, w):
            build_index(Datastore(p), "Flat", progress=False, overwrite=True)
        out["ppl_own_text_removed_flat"] = ppl(lm, gone, Searcher(Datastore(a), "flat"))
        out["ppl_own_text_without_flat"] = ppl(lm, gone, Searcher(Datastore(w), "flat"))
    print(f"remove: {out}", flush=True)
    return out


def save(res: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")


def render(res: dict) -> None:
    """benchmarks/results/editing.md from the json."""
    d, a = res["datastore"], res["added"]
    lines = ["# Editing the WikiText-2 datastore", "",
             f"The datastore of `bench_wikitext.py` ({d['entries']:,} entries, SmolLM2-135M bfloat16 on 2 CPU "
             f"cores, index {d['index']}); edits on copies.  Command: `{res['command']}`.", ""]
    if "add_seconds" in res and "rebuild_seconds" in res:
        lines += ["## Add 1%", "",
                  f"{a['articles']} sections of held-out WikiText-2 articles (one document each), {a['entries']:,} entries ({a['share']:.2%}).", "",
                  "| | seconds |", "|---|---:|",
                  f"| `knnlm add` (forward pass over the new articles, codes added to the trained index) | "
                  f"{res['add_seconds']:.1f} |",
                  f"| rebuild: datastore {res['rebuild_datastore_seconds']:.0f} s + index "
                  f"{res['rebuild_index_seconds']:.0f} s | {res['rebuild_seconds']:.0f} |",
                  f"| **ratio** | **{res['rebuild_seconds'] / res['add_seconds']:.0f}x** |", ""]
    if "ppl_added" in res:
        diff = res["ppl_added"] / res["ppl_rebuilt"] - 1
        lines += [f"Perplexity of the first characters of the test subset (k={K}, λ={LAM}, T={T}): added "
                  f"{res['ppl_added']:.4f}, rebuilt {res['ppl_rebuilt']:.4f} ({diff:+.4%}); the original datastore "
                  f"{res['ppl_base']:.4f}.", ""]
    if "remove" in res:
        r = res["remove"]
        lines += ["## Remove one document", "",
                  f"The first added article, searched with its own keys (k=8): {r['before_retrieved']:.0%} of the "
                  f"neighbours were its own entries before, {r['after_retrieved']:.0%} after.  `remove` took "
                  f"{r['remove_seconds'] * 1000:.0f} ms; remove + reopen + the first search "
                  f"{r['until_not_retrieved_seconds'] * 1000:.0f} ms.", "",
                  "| perplexity on its own text | Flat | IVF-PQ |", "|---|---:|---:|",
                  f"| before the removal | | {r['ppl_own_text_before']:.4f} |",
                  f"| after the removal | {r['ppl_own_text_removed_flat']:.6f} | {r['ppl_own_text_removed_ivfpq']:.4f} |",
                  f"| a datastore that never held it | {r['ppl_own_text_without_flat']:.6f} | "
                  f"{r['ppl_own_text_without_ivfpq']:.4f} |",
                  f"| difference | {abs(r['ppl_own_text_removed_flat'] - r['ppl_own_text_without_flat']):.1e} | "
                  f"{abs(r['ppl_own_text_removed_ivfpq'] - r['ppl_own_text_without_ivfpq']):.1e} |", ""]
    if "compact" in res:
        c = res["compact"]
        rb = res.get("rebuild_seconds")
        lines += ["## Compact 10%", "",
                  f"The other held-out sections added ({c['removed_entries']:,} entries, {c['add_seconds']:.0f} s), "
                  f"then removed ({c['share']:.1%} of the entries) and compacted: {c['seconds']:.1f} s"
                  + (f" ({c['seconds'] / rb:.1%} of the rebuild's time)" if rb else "") +
                  f", {(c['bytes_before'] - c['bytes_after']) / 2**20:.0f} MiB reclaimed of "
                  f"{c['bytes_before'] / 2**20:.0f} MiB.  The compacted keys are "
                  + ("bit for bit" if c["keys_identical_to_original"] else "not") +
                  " the original datastore's; its IVF-PQ index (the original training, the keys added again) "
                  f"returns the same 64 neighbours for {c['ivf_neighbours_same_as_original']:.2%} of "
                  "(query, rank) pairs.", ""]
    missing = [p for p in ("remove", "compact") if p not in res]
    if missing:
        lines += [f"Not measured yet: {', '.join(missing)} (`--phases {','.join(missing)}`).", ""]
    lines += ["Times are wall-clock seconds on a shared 2-core machine: each step ran under the shared CPU lock "
              "(the rebuild in pieces of at most 5 minutes, summed), while a background build ran at nice 19.", ""]
    (HERE / "results" / "editing.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
