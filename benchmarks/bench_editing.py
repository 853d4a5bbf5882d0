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
  compact  add the other ~10% of articles and train the index again on all keys (a build with
           them), remove them all, compact: seconds and bytes vs the rebuild measured by the
           `rebuild` phase (reused, not run again), the compacted keys vs the original's, and
           the IVF-PQ neighbours and perplexity of the test text vs a datastore without them
           (an index trained without them, the original's, exact search); resumable by step
           (<work>/compact.json)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import shutil
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


def ppl(lm, text: Path, searcher, k: int = K, ids: Path | None = None) -> float:
    """Perplexity of `text` at k, λ, T; with `ids`, the (n, k) neighbour ids are saved there."""
    plan = plan_files(lm, [text], 1024, 512, 4096)
    s = score_plan(lm, plan, searcher, retrieval=RetrievalSettings(k=k, temperature=T), progress=False,
                   keep_neighbors=ids is not None)
    if ids is not None:
        np.save(ids, s.ids)
    return perplexity(interpolate(s.lm, s.knn, LAM))


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of the first k neighbours (ids (n, >=k), nearest first) two searches have in common."""
    return float(np.mean([len(np.intersect1d(x[:k], y[:k])) / k for x, y in zip(a, b)]))


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
    from common import command_line

    cmd = command_line(__file__)
    res["commands"] = [c for c in res.get("commands", [res["command"]] if "command" in res else []) if c != cmd] + [cmd]
    res.pop("command", None)

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
        part = work / "compact.json"  # the steps a stopped run finished
        res["compact"] = compact_phase(lm, work, src, test, add10, lock,
                                       json.loads(part.read_text()) if part.exists() else {})
        save(res)
    render(res)


def compact_phase(lm, work: Path, src: Path, test: Path, add10: Path, lock, out: dict) -> dict:
    """10% of the entries removed and compacted.  `compacted`: the original datastore + the other
    held-out articles, its IVF-PQ index trained again on all its keys (as a build with them would
    be); then they are removed and compacted.  Its neighbours for the test text's queries (k=1024)
    are compared with a datastore without them: the same keys (checked bit for bit) with an index
    trained without them (`retrained`, today's recipe, on the compacted keys), the original
    datastore's own index, and exact search (Flat).  Each step under the lock; the steps done
    (in `out`) are skipped when the phase runs again."""
    c = work / "compacted"
    ids = lambda name: work / f"ids-{name}.npy"  # noqa: E731
    base = Datastore(src)

    def step(name, fn):
        if name not in out:
            with lock():
                t0 = time.perf_counter()
                out[name] = fn()
                print(f"compact {name}: {out[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            save_partial(work, out)

    def add():
        if c.exists():
            shutil.rmtree(c)
        shutil.copytree(src, c)
        t0 = time.perf_counter()
        e = add_documents(lm, c, [add10], batch_tokens=1024, progress=False)
        return {"seconds": time.perf_counter() - t0, "documents": e["count"], "entries": e["entries"],
                "first_document": e["first_document"]}

    def train():
        t0 = time.perf_counter()
        build_index(Datastore(c), "IVF2048,PQ64", name=IVF, overwrite=True, progress=False)
        return {"seconds": time.perf_counter() - t0, "entries": Datastore(c).count}

    def remove():
        a = out["add"]
        t0 = time.perf_counter()
        remove_documents(c, range(a["first_document"], a["first_document"] + a["documents"]))
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "ppl": ppl(lm, test, Searcher(Datastore(c), IVF), ids=ids("removed"))}

    def compacting():
        before = bytes_of(c)
        t0 = time.perf_counter()
        compact(c)
        seconds = time.perf_counter() - t0
        ds = Datastore(c)
        same = bool(np.array_equal(np.asarray(ds.keys), np.asarray(base.keys)))
        return {"seconds": seconds, "bytes_before": before, "bytes_after": bytes_of(c), "entries": ds.count,
                "keys_identical_to_original": same,
                "ppl": ppl(lm, test, Searcher(ds, IVF), ids=ids("compacted"))}

    def retrained():
        t0 = time.perf_counter()
        build_index(Datastore(c), "IVF2048,PQ64", name="retrained", progress=False)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "ppl": ppl(lm, test, Searcher(Datastore(c), "retrained"), ids=ids("retrained"))}

    def original():
        return {"ppl": ppl(lm, test, Searcher(base, IVF), ids=ids("original"))}

    def exact():
        build_index(Datastore(c), "Flat", name="flat", progress=False)
        return {"ppl": ppl(lm, test, Searcher(Datastore(c), "flat"), ids=ids("flat"))}

    for name, fn in (("add", add), ("train", train), ("remove", remove), ("compact", compacting),
                     ("retrained", retrained), ("original", original), ("exact", exact)):
        step(name, fn)
    got = {n: np.load(ids(n), mmap_mode="r") for n in ("removed", "compacted", "retrained", "original", "flat")}
    pairs = {"compacted_vs_removed": ("compacted", "removed"), "compacted_vs_retrained": ("compacted", "retrained"),
             "original_vs_retrained": ("original", "retrained"), "compacted_vs_flat": ("compacted", "flat"),
             "retrained_vs_flat": ("retrained", "flat"), "original_vs_flat": ("original", "flat")}
    out["overlap"] = {p: {str(k): overlap(got[a], got[b], k) for k in (1, 8, 64, K)} for p, (a, b) in pairs.items()}
    out["queries"] = int(len(got["flat"]))
    print(f"compact overlap: {out['overlap']}", flush=True)
    return out


def save_partial(work: Path, out: dict) -> None:
    (work / "compact.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


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
    from common import PLACEHOLDERS, placeholders

    PLACE_NOTE = f"({PLACEHOLDERS}.)"
    d, a = res["datastore"], res["added"]
    lines = ["# Editing the WikiText-2 datastore", "",
             f"The datastore of `bench_wikitext.py` ({d['entries']:,} entries, SmolLM2-135M bfloat16 on 2 CPU "
             f"cores, index {d['index']}); edits on copies.  Commands (each result from the last that ran its phase): "
             + "; ".join(f"`{placeholders(c)}`" for c in res["commands"]) + ".", PLACE_NOTE, ""]
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
    if "compact" in res and "overlap" in res["compact"]:
        lines += compact_lines(res["compact"], res, d)
    missing = [p for p in ("remove", "compact") if p not in res]
    if missing:
        lines += [f"Not measured yet: {', '.join(missing)} (`--phases {','.join(missing)}`).", ""]
    lines += ["Times are wall-clock seconds on a shared 2-core machine: each step ran under the shared CPU lock "
              "(the rebuild in pieces of at most 5 minutes, summed), while a background build ran at nice 19.", ""]
    (HERE / "results" / "editing.md").write_text("\n".join(lines), encoding="utf-8")


def compact_lines(c: dict, res: dict, d: dict) -> list[str]:
    a, rm, cp = c["add"], c["remove"], c["compact"]
    share = a["entries"] / (cp["entries"] + a["entries"])
    rb, ra = res.get("rebuild_seconds"), res.get("added", {})
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    reclaimed = cp["bytes_before"] - cp["bytes_after"]
    lines = ["## Remove and compact 10%", "",
             f"The other {a['documents']} held-out sections ({a['entries']:,} entries) added to a copy ({a['seconds']:.0f} s) "
             f"and its IVF2048,PQ64 index trained again on all {c['train']['entries']:,} keys ({c['train']['seconds']:.0f} s), "
             f"as a build with them would be; then all of them removed ({share:.1%} of the entries; {rm['seconds'] * 1000:.0f} ms) "
             "and compacted.", "",
             "| | seconds | bytes |", "|---|---:|---:|",
             f"| `compact` (keys, values, tokens, provenance rewritten; the index's {cp['entries']:,} codes added again "
             f"to its trained quantizers) | {cp['seconds']:.1f} | {mib(cp['bytes_before'])} before, "
             f"{mib(cp['bytes_after'])} after ({mib(reclaimed)} reclaimed) |"]
    if rb:
        n_rb = d["entries"] + ra.get("entries", 0)
        lines += [f"| rebuild (measured in the add phase: datastore + index of {n_rb:,} entries) | {rb:.0f} | "
                  f"{mib(d['bytes'])} (the original datastore, built without them) |",
                  f"| **ratio** | **{cp['seconds'] / rb:.1%} of the rebuild's time** | "
                  f"**{cp['bytes_after'] / d['bytes']:.5f} of the rebuild's bytes** |"]
    lines += ["", "The rebuild time is the one measured by the add phase (the corpus plus 1.5%, "
              f"{d['entries'] + ra.get('entries', 0):,} entries), not a rebuild of this datastore: the compacted one "
              f"holds {cp['entries']:,}.  "
              f"The compacted keys are {'bit for bit' if cp['keys_identical_to_original'] else 'NOT'} the original "
              "datastore's (the datastore built without those documents).", "",
              f"Neighbours of the {c['queries']:,} test-text queries (k={K}): share of the first k ids in common "
              "(1.0: the same set).  *removed*: after `remove`, before `compact`; *compacted*: after `compact` "
              "(the index trained with the removed keys); *retrained*: the same keys, an index trained without them "
              "(IVF2048,PQ64, 131,072 sampled keys); *original*: the original datastore's own index (trained on all "
              "its 237,743 keys); *exact*: Flat.", "",
              "| | k=1 | k=8 | k=64 | k=1024 |", "|---|---:|---:|---:|---:|"]
    names = {"compacted_vs_removed": "compacted vs removed", "compacted_vs_retrained": "compacted vs retrained",
             "original_vs_retrained": "original vs retrained (training alone)", "compacted_vs_flat": "compacted vs exact",
             "retrained_vs_flat": "retrained vs exact", "original_vs_flat": "original vs exact"}
    for key, label in names.items():
        if key not in c["overlap"]:
            continue  # (a step not run)
        o = c["overlap"][key]
        lines.append(f"| {label} | " + " | ".join(f"{o[str(k)]:.4f}" for k in (1, 8, 64, K)) + " |")
    o = c["overlap"]
    lines += ["", "*removed* fetches 2k candidates and leaves the removed ones out (exactly re-ranked), so its deepest "
              "neighbours come from a longer candidate list than *compacted*'s one fetch of k: the two differ "
              f"mostly at k=1024 ({o['compacted_vs_removed'][str(K)]:.3f}, top 64 {o['compacted_vs_removed']['64']:.4f}).  "
              "What the coarse quantizer's training with the removed keys changes: compacted vs retrained "
              f"{o['compacted_vs_retrained']['8']:.3f} of the top 8 and {o['compacted_vs_retrained'][str(K)]:.3f} of "
              f"the top 1024, against {o['original_vs_retrained']['8']:.3f} and {o['original_vs_retrained'][str(K)]:.3f} "
              "for two trainings that both lacked them (original vs retrained)."]
    p0 = c["retrained"]["ppl"]
    lines += ["", f"Perplexity of the test text (k={K}, λ={LAM}, T={T}):", "",
              "| | perplexity | vs retrained |", "|---|---:|---:|"]
    for label, v in (("removed", rm["ppl"]), ("compacted", cp["ppl"]), ("retrained", p0),
                     ("original", c["original"]["ppl"]), ("exact (Flat)", c.get("exact", {}).get("ppl"))):
        if v is None:
            continue
        lines.append(f"| {label} | {v:.4f} | {v / p0 - 1:+.4%} |")
    return lines + [""]


if __name__ == "__main__":
    main()
