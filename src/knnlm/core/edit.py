"""Editing a datastore in place: remove documents, compact, add documents.

An edit makes a new version of the datastore (`meta.json`: `version`, and `edits`, a log
of what each version changed).  Removing documents records them in `meta.json`
(`removed`: their document ids, tombstones) and nothing else: every search leaves their
entries out from then on (`Datastore.removed`, honoured behind the `Searcher`), so a
removal takes one atomic rewrite of meta.json.  `compact` rewrites keys, values, tokens,
provenance and indexes without them (entry ids change: a new datastore id), built under
`<name>.compact.partial/` and moved into place.  One edit at a time: an edit holds
`.<name>.edit-lock` beside the datastore (a second one ends in a one-line error).

Adding documents runs the model over them alone and appends their rows to the arrays in
place; readers see the rows meta.json names (`Datastore` maps no more), and each index
gets their codes without retraining in `index-v<version>.faiss`.  The rewrite of
meta.json is the commit: a crash before it leaves the datastore as it was (the next edit,
or the same command again, cuts the appended rows off), a crash after it leaves the new
version (the next edit renames the index files into place).
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
from knnlm.core.datastore import _FILES, KEY_DTYPE, VAL_DTYPE, Datastore, publish, write_json_atomic
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
        if (path / "meta.json").exists():
            settle(path)
        yield
    finally:
        os.close(fd)  # releases the lock


def finish_interrupted(path: Path) -> None:
    """A compaction stopped between its two renames leaves `<name>.old` and no `<name>`:
    put the finished rewrite (or else the old datastore) in place."""
    old, partial = path.with_name(path.name + ".old"), path.with_name(path.name + ".compact.partial")
    if path.exists() or not old.exists():
        return
    if (partial / "meta.json").exists() or (partial / "manifest.json").exists():
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(old, path)
    LOG.warning("finished an interrupted compaction of %s", path)


def open_for_edit(path: str | Path) -> Datastore:
    from knnlm.scale.manifest import is_sharded

    if is_sharded(path):
        raise KnnlmError(f"{path} is a sharded datastore: edit it with knnlm.scale.edit")
    ds = Datastore(path)
    if ds.pruning:
        raise KnnlmError(f"{path} was pruned (merged entries stand for several documents): edit its source")
    return ds


def logged(meta: dict, op: str, **what) -> dict:
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
        meta = logged(ds.manifest if sharded else ds.meta, "remove", documents=docs[:LOG_SHOWN], count=len(docs),
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
    Returns the edit-log entry.  (A sharded datastore: knnlm.scale.edit.compact.)"""
    path = Path(path)
    step = on_step or (lambda name: None)
    with edit_lock(path):
        ds = open_for_edit(path)
        if not len(ds.removed_documents):
            raise KnnlmError(f"{path} has no removed documents: nothing to compact")
        t0 = time.perf_counter()
        partial = path.with_name(path.name + ".compact.partial")
        meta = write_compacted(ds, partial, chunk, step)
        publish(partial, path)
        step("published")
        entry = meta["edits"][-1]
        LOG.info("compacted %s: %d documents, %d entries dropped in %.1f s", path, entry["documents"],
                 entry["entries"], time.perf_counter() - t0)
        return entry


def write_compacted(ds: Datastore, out: Path, chunk: int = 65536, step=lambda name: None) -> dict:
    """Write `ds` without its removed documents (`ds.removed_documents`) to the new directory
    `out`: a datastore of the next version with a new id, and each index of `ds` again (an
    approximate one keeps its training, FAISS `reset`, and takes the remaining keys).
    Returns its meta.json."""
    from knnlm.core.index import build_index, index_info, list_indexes

    gone = ds.removed_documents
    keep = np.setdiff1d(np.arange(len(ds.docs)), gone)  # (D',) kept documents, in order
    if not len(keep):
        raise KnnlmError(f"every document of {ds.path} was removed: nothing would be left")
    n_ent = ds.docs[keep, 1] - 1  # entries of each kept document
    rows = _ranges(ds.docs[keep, 2], n_ent)  # (N',) old entry ids kept, in order
    toks = _ranges(ds.docs[keep, 0], ds.docs[keep, 1])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    keys = np.lib.format.open_memmap(out / "keys.npy", mode="w+", dtype=KEY_DTYPE, shape=(len(rows), ds.dim))
    for a in range(0, len(rows), chunk):
        keys[a : a + chunk] = ds.keys[rows[a : a + chunk]]
    keys.flush()
    del keys
    np.save(out / "vals.npy", np.asarray(ds.vals)[rows])
    np.save(out / "tokens.npy", np.asarray(ds.tokens)[toks])
    table = np.stack([np.cumsum(ds.docs[keep, 1]) - ds.docs[keep, 1], ds.docs[keep, 1],
                      np.cumsum(n_ent) - n_ent], axis=1).astype(np.int64)  # (D', 3)
    np.save(out / "docs.npy", table)
    (out / "docs.jsonl").write_text("".join(json.dumps(ds.doc_info[d]) + "\n" for d in keep), "utf-8")
    if ds.reduction:
        shutil.copy2(ds.path / ds.reduction["file"], out / ds.reduction["file"])
    step("files")
    meta = logged(ds.meta, "compact", documents=len(gone), entries=int(ds.count - len(rows)), from_id=ds.id)
    meta.update(id=uuid.uuid4().hex, count=len(rows), documents=len(keep), tokens=len(toks), removed=[],
                sha256={name: file_sha256(out / name) for name in ds.meta["sha256"]})
    write_json_atomic(out / "meta.json", meta)
    new = Datastore(out)
    for name in list_indexes(ds):
        _, d, info = index_info(ds, name)
        extra = {k: info[k] for k in ("train_size", "train_sample", "trained_sha256", "sharded") if k in info}
        trained = None
        if info["factory"] != "Flat":
            import faiss

            trained = faiss.read_index(str(d / "index.faiss"))
            trained.reset()  # the trained quantizers without the entries
            extra["trained_before"] = f"version {ds.version}"
        build_index(new, info["factory"], name=name, nprobe=int(info.get("nprobe", 32)), trained=trained,
                    progress=False, extra=extra)
        step(f"index {name}")
    return meta


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


# ---- add ---------------------------------------------------------------------------------
_ARRAYS = (("keys.npy", KEY_DTYPE), ("vals.npy", VAL_DTYPE), ("tokens.npy", np.int32), ("docs.npy", np.int64))


def _rows(meta: dict) -> dict[str, int]:
    """The rows of each array that meta.json names."""
    return {"keys.npy": int(meta["count"]), "vals.npy": int(meta["count"]), "docs.npy": int(meta["documents"]),
            "tokens.npy": int(meta["tokens"])}


def settle(path: Path) -> None:
    """Bring an edited datastore's files in line with its meta.json: rows an uncommitted
    addition appended are cut off, and a committed addition's index files take their names."""
    meta = json.loads((path / "meta.json").read_text("utf-8"))
    version = int(meta.get("version", 0))
    if "tokens" in meta:
        for name, dtype in _ARRAYS:
            _resize(path / name, dtype, _rows(meta)[name])
        n = int(meta["documents"])
        lines = (path / "docs.jsonl").read_bytes().splitlines(keepends=True)
        if len(lines) > n:
            with open(path / "docs.jsonl", "r+b") as fh:
                fh.truncate(sum(len(x) for x in lines[:n]))
    root = path / "indexes"
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        for f in sorted(d.glob("index-v*.faiss*")):
            m = re.fullmatch(r"index-v(\d+)\.faiss", f.name)
            if m and int(m.group(1)) == version:
                info = json.loads((d / "index.json").read_text())
                info.update(ntotal=int(meta["count"]), datastore_version=version, sha256=file_sha256(f))
                write_json_atomic(d / "index.json", info)
                os.replace(f, d / "index.faiss")
            else:
                f.unlink()  # an uncommitted or unfinished one


def _resize(f: Path, dtype, rows: int, new: np.ndarray | None = None) -> None:
    """Cut the .npy file `f` to its first `rows` rows, append `new` rows, and make its header
    say so (rewritten in place; the whole file only when the new header does not fit)."""
    arr = np.load(f, mmap_mode="r")
    offset, rowshape = arr.offset, arr.shape[1:]
    if arr.shape[0] == rows and new is None and os.path.getsize(f) == offset + arr.nbytes:
        return
    del arr
    rowbytes = np.dtype(dtype).itemsize * int(np.prod(rowshape, dtype=np.int64))
    total = rows + (0 if new is None else len(new))
    with open(f, "r+b") as fh:
        fh.truncate(offset + rows * rowbytes)
        if new is not None:
            fh.seek(0, 2)
            fh.write(np.ascontiguousarray(new, dtype=dtype).tobytes())
        fits = _write_header(fh, offset, (total,) + rowshape, dtype)
        fh.flush()
        os.fsync(fh.fileno())
    if not fits:
        old = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=(total,) + rowshape)
        tmp = f.with_name(f.name + ".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=old.shape)
        for a in range(0, total, 1 << 16):
            out[a : a + (1 << 16)] = old[a : a + (1 << 16)]
        out.flush()
        del out, old
        os.replace(tmp, f)


def _write_header(fh, offset: int, shape: tuple, dtype) -> bool:
    """Rewrite a .npy header in place, same length; False when the new one does not fit."""
    fh.seek(0)
    magic = fh.read(8)  # \x93NUMPY, major, minor
    size = 2 if magic[6] == 1 else 4
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": tuple(int(x) for x in shape)}
    text = "{" + "".join(f"'{k}': {v!r}, " for k, v in d.items()) + "}"  # as numpy writes it (byte for byte)
    room = offset - 8 - size
    if len(text) + 1 > room:
        return False
    fh.seek(8 + size)
    fh.write((text.ljust(room - 1) + "\n").encode("latin1"))
    return True


def add_documents(lm, path: str | Path, corpora: Sequence[str | Path], batch_tokens: int = 4096,
                  progress: bool = True, on_step=None) -> dict:
    """Add the documents of `corpora` to the datastore at `path`: one forward pass over them
    alone (the datastore's window and stride), their entries appended with their provenance,
    every index given their codes without retraining.  Atomic (see the module docstring);
    `on_step(name)` after each step (fault injection).  Returns the edit-log entry."""
    import faiss
    import torch
    from tqdm.auto import tqdm

    from knnlm.core.batching import plan_files
    from knnlm.core.corpus import corpus_record
    from knnlm.core.index import index_file, list_indexes

    path = Path(path)
    step = on_step or (lambda name: None)
    corpora = [Path(c) for c in corpora]
    if not corpora:
        raise KnnlmError("no corpus file given")
    with edit_lock(path):
        ds = open_for_edit(path)
        ds.check_compatible(lm.identity(ds.key_point))  # another model or tokenizer: refused
        plan = plan_files(lm, corpora, int(ds.meta["window"]), int(ds.meta["stride"]), batch_tokens)
        if not plan.count:
            raise KnnlmError(f"no document with two or more tokens in {', '.join(map(str, corpora))}")
        t0 = time.perf_counter()
        keys = np.empty((plan.count, ds.dim), dtype=KEY_DTYPE)  # (n, d)
        bar = tqdm(total=plan.count, unit="tok", desc="add", disable=not progress)
        for bi in range(len(plan.batches)):
            feats, _ = lm.forward(plan.batch_input(bi), [ds.key_point], logits=False)
            f = feats[ds.key_point].to("cpu", torch.float32).numpy()  # (B, T, query_dim)
            for row, c0, c1, e0 in plan.scored(bi):
                keys[e0 : e0 + c1 - c0] = ds.to_key_space(f[row, c0:c1]) if ds.reduction else f[row, c0:c1]
            bar.update(plan.batch_size(bi))
        bar.close()
        forward = time.perf_counter() - t0
        step("keys")
        meta = dict(ds.meta)
        if "tokens" not in meta:  # name the token rows before any is appended (older datastores)
            meta["tokens"] = len(ds.tokens)
            write_json_atomic(path / "meta.json", meta)
        n0, t_0, d0, version = ds.count, len(ds.tokens), len(ds.docs), ds.version + 1
        new = {"keys.npy": keys, "vals.npy": plan.targets(), "tokens.npy": plan.tokens,
               "docs.npy": plan.docs + np.array([t_0, 0, n0], dtype=np.int64)}
        for name, dtype in _ARRAYS:
            _resize(path / name, dtype, _rows(meta)[name], new[name])
        with open(path / "docs.jsonl", "ab") as fh:
            fh.write("".join(json.dumps({**i, "version": version}) + "\n" for i in plan.doc_info).encode())
        step("files")
        for name in list_indexes(ds):
            d = path / "indexes" / name
            index = faiss.read_index(str(index_file(d, ds)))
            index.add(keys.astype(np.float32))
            tmp = d / f"index-v{version}.faiss.tmp"
            faiss.write_index(index, str(tmp))
            os.replace(tmp, d / f"index-v{version}.faiss")
            del index
            step(f"index {name}")
        meta = logged(meta, "add", files=[c.name for c in corpora], count=len(plan.docs), entries=plan.count,
                       first_document=d0)
        meta.update(count=n0 + plan.count, documents=d0 + len(plan.docs), tokens=t_0 + len(plan.tokens),
                    corpora=list(meta["corpora"]) + [corpus_record(c) for c in corpora],
                    added_since_tuning=int(meta.get("added_since_tuning", 0)) + plan.count,
                    sha256={name: file_sha256(path / name) for name in _FILES})
        write_json_atomic(path / "meta.json", meta)  # the commit
        step("committed")
        settle(path)
        entry = meta["edits"][-1]
        LOG.info("added %d documents (%d entries) to %s in %.1f s (forward pass %.1f s)", len(plan.docs),
                 plan.count, path, time.perf_counter() - t0, forward)
        return entry
