"""Editing a datastore in place: remove documents, compact, add documents.

An edit makes a new version of the datastore (`meta.json`: `version`, and `edits`, a log
of what each version changed).  Removing documents records them in `meta.json`
(`removed`: their document ids, tombstones) and nothing else: every search leaves their
entries out from then on (`Datastore.removed`, honoured behind the `Searcher`), so a
removal takes one atomic rewrite of meta.json.  `compact` rewrites keys, values, tokens,
provenance and indexes without them (entry ids change: a new datastore id), built under
`<name>.compact.partial/` and moved into place.  One edit at a time: an edit holds
`.<name>.edit-lock` beside the datastore (a second one ends in a one-line error).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import KEY_DTYPE, Datastore, publish, write_json_atomic
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

LOG_SHOWN = 20  # document ids listed in one edit-log entry (the count is always there)


# ---- one edit at a time ----------------------------------------------------------------
@contextmanager
def edit_lock(path: str | Path) -> Iterator[None]:
    """Hold the datastore's edit lock (a file beside it, so that it outlives a compaction's
    swap of the directory); another holder makes this a KnnlmError at once."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.edit-lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KnnlmError(f"{path} is being edited by another process; try again when that edit ends") from None
        finish_interrupted(path)
        yield
    finally:
        os.close(fd)  # releases the lock


def finish_interrupted(path: Path) -> None:
    """A compaction stopped between its two renames leaves `<name>.old` and no `<name>`:
    put the finished rewrite (or else the old datastore) in place."""
    old, partial = path.with_name(path.name + ".old"), path.with_name(path.name + ".compact.partial")
    if path.exists() or not old.exists():
        return
    if (partial / "meta.json").exists():
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(old, path)
    LOG.warning("finished an interrupted compaction of %s", path)


def open_for_edit(path: str | Path) -> Datastore:
    from knnlm.scale.manifest import is_sharded

    if is_sharded(path):
        raise KnnlmError(f"{path} is a sharded datastore: edit its shards (shards/NNNNN) one at a time")
    ds = Datastore(path)
    if ds.pruning:
        raise KnnlmError(f"{path} was pruned (merged entries stand for several documents): edit its source")
    return ds


def _logged(meta: dict, op: str, **what) -> dict:
    """A copy of `meta` (meta.json, or a sharded datastore's manifest) for the next version,
    with this edit in its log."""
    meta = dict(meta)
    version = int(meta.get("version", 0)) + 1
    meta["version"] = version
    meta["edits"] = list(meta.get("edits", [])) + [
        {"version": version, "op": op, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **what}]
    return meta


# ---- which documents ---------------------------------------------------------------------
def select_documents(ds: Datastore, ids: Sequence[int] = (), titles: Sequence[str] = (),
                     sources: Sequence[str] = (), pattern: str | None = None, text_pattern: str | None = None,
                     decode=None) -> list[int]:
    """Document ids of `ds` chosen by id, exact title, source file (its name or path), a
    regular expression searched in titles (`pattern`) or in the text (`text_pattern`, read
    with `decode(token ids) -> str`).  Ids out of range or criteria that match nothing are
    a KnnlmError, so a typo never removes nothing silently."""
    n = len(ds.docs)
    chosen: set[int] = set()
    bad = [i for i in ids if not 0 <= int(i) < n]
    if bad:
        raise KnnlmError(f"no document {', '.join(map(str, bad))} in {ds.path} (it has documents 0..{n - 1})")
    chosen.update(int(i) for i in ids)
    for title in titles:
        hit = [d for d, info in enumerate(ds.doc_info) if info.get("title", "") == title]
        if not hit:
            raise KnnlmError(f"no document titled {title!r} in {ds.path}")
        chosen.update(hit)
    for src in sources:
        name = Path(src).name
        hit = [d for d, info in enumerate(ds.doc_info) if info.get("source", "") in (src, name)]
        if not hit:
            raise KnnlmError(f"no document from {src!r} in {ds.path}")
        chosen.update(hit)
    for what, pat in (("title", pattern), ("text", text_pattern)):
        if pat is None:
            continue
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise KnnlmError(f"bad pattern {pat!r}: {e}") from None
        if what == "title":
            hit = [d for d, info in enumerate(ds.doc_info) if rx.search(info.get("title", ""))]
        else:
            hit = [d for d in range(n) if rx.search(decode(document_tokens(ds, d)))]
        if not hit:
            raise KnnlmError(f"no document's {what} matches {pat!r} in {ds.path}")
        chosen.update(hit)
    return sorted(chosen)


def document_tokens(ds: Datastore, d: int) -> np.ndarray:
    """Document d's tokens, without the prefix token."""
    start, n = int(ds.docs[d, 0]), int(ds.docs[d, 1])
    return np.asarray(ds.tokens[start + 1 : start + n])


# ---- remove ------------------------------------------------------------------------------
def remove_documents(path: str | Path, documents: Sequence[int]) -> dict:
    """Remove documents from the datastore at `path`: from now on no search returns their
    entries.  One atomic rewrite of meta.json (of a sharded datastore: of its manifest, by
    global document id); returns the edit-log entry."""
    from knnlm.scale.manifest import MANIFEST, ShardedDatastore, is_sharded

    path = Path(path)
    with edit_lock(path):
        sharded = is_sharded(path)
        ds = ShardedDatastore(path) if sharded else open_for_edit(path)
        docs = sorted({int(d) for d in documents})
        if not docs:
            raise KnnlmError("no documents to remove")
        bad = [d for d in docs if not 0 <= d < len(ds.docs)]
        if bad:
            raise KnnlmError(f"no document {', '.join(map(str, bad))} in {path} (it has documents "
                             f"0..{len(ds.docs) - 1})")
        again = sorted(set(docs) & set(ds.removed_documents.tolist()))
        if again:
            raise KnnlmError(f"document {', '.join(map(str, again))} of {path} was already removed")
        entries = int((ds.docs[docs, 1] - 1).sum())
        meta = _logged(ds.manifest if sharded else ds.meta, "remove", documents=docs[:LOG_SHOWN], count=len(docs),
                       entries=entries)
        meta["removed"] = sorted(ds.removed_documents.tolist() + docs)
        write_json_atomic(path / (MANIFEST if sharded else "meta.json"), meta)
        return meta["edits"][-1]


# ---- compact -----------------------------------------------------------------------------
def compact(path: str | Path, chunk: int = 65536, on_step=None) -> dict:
    """Rewrite the datastore at `path` without its removed documents: keys, values, tokens,
    provenance and every index (a trained IVF index keeps its training: only the remaining
    keys are added again).  Built beside it and moved into place; the datastore gets a new id
    (entry ids change).  `on_step(name)` is called after each step (for fault-injection tests).
    Returns the edit-log entry."""
    from knnlm.core.index import build_index, index_info, list_indexes

    path = Path(path)
    step = on_step or (lambda name: None)
    with edit_lock(path):
        ds = open_for_edit(path)
        gone = ds.removed_documents
        if not len(gone):
            raise KnnlmError(f"{path} has no removed documents: nothing to compact")
        t0 = time.perf_counter()
        keep = np.setdiff1d(np.arange(len(ds.docs)), gone)  # (D',) kept documents, in order
        n_ent = ds.docs[keep, 1] - 1  # entries of each kept document
        rows = _ranges(ds.docs[keep, 2], n_ent)  # (N',) old entry ids kept, in order
        toks = _ranges(ds.docs[keep, 0], ds.docs[keep, 1])
        partial = path.with_name(path.name + ".compact.partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        keys = np.lib.format.open_memmap(partial / "keys.npy", mode="w+", dtype=KEY_DTYPE, shape=(len(rows), ds.dim))
        for a in range(0, len(rows), chunk):
            keys[a : a + chunk] = ds.keys[rows[a : a + chunk]]
        keys.flush()
        del keys
        np.save(partial / "vals.npy", np.asarray(ds.vals)[rows])
        np.save(partial / "tokens.npy", np.asarray(ds.tokens)[toks])
        table = np.stack([np.cumsum(ds.docs[keep, 1]) - ds.docs[keep, 1], ds.docs[keep, 1],
                          np.cumsum(n_ent) - n_ent], axis=1).astype(np.int64)  # (D', 3)
        np.save(partial / "docs.npy", table)
        (partial / "docs.jsonl").write_text("".join(json.dumps(ds.doc_info[d]) + "\n" for d in keep), "utf-8")
        if ds.reduction:
            shutil.copy2(ds.path / ds.reduction["file"], partial / ds.reduction["file"])
        step("files")
        meta = _logged(ds.meta, "compact", documents=len(gone), entries=int(ds.count - len(rows)), from_id=ds.id)
        meta.update(id=uuid.uuid4().hex, count=len(rows), documents=len(keep), removed=[],
                    sha256={name: file_sha256(partial / name) for name in ds.meta["sha256"]})
        write_json_atomic(partial / "meta.json", meta)
        new = Datastore(partial)
        for name in list_indexes(ds):
            _, d, info = index_info(ds, name)
            extra = {k: info[k] for k in ("train_size", "trained_sha256") if k in info}
            trained = None
            if info["factory"] != "Flat":
                import faiss

                trained = faiss.read_index(str(d / "index.faiss"))
                trained.reset()  # the trained quantizers without the entries
                extra["trained_before"] = f"version {ds.version}"
            build_index(new, info["factory"], name=name, nprobe=int(info.get("nprobe", 32)), trained=trained,
                        progress=False, extra=extra)
            step(f"index {name}")
        del new
        publish(partial, path)
        step("published")
        entry = meta["edits"][-1]
        LOG.info("compacted %s: %d documents, %d entries dropped in %.1f s", path, len(gone), entry["entries"],
                 time.perf_counter() - t0)
        return entry


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for each (s, n), as int64."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    out = np.ones(total, dtype=np.int64)
    ends = np.cumsum(lengths)
    nz = lengths > 0
    first = (ends - lengths)[nz]
    out[first] = starts[nz] - np.concatenate([[0], (starts + lengths - 1)[nz][:-1]])
    out[0] = starts[nz][0]
    return np.cumsum(out)
