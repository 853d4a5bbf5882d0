"""Adding documents to and compacting a sharded datastore (and either kind by path).

`add_documents` on a sharded datastore builds the new documents into a new shard
(`shards/NNNNN`, today's datastore format, the manifest's model, window and stride), gives
it its part of every sharded index (an approximate one from the index's one training,
`trained.faiss`), and then rewrites manifest.json: that rewrite is the commit.  Killed
before it, the datastore is as it was (the unlisted shard directory is removed by the next
edit, or the same command again); after it, it holds the new documents.

`compact` rewrites each shard that holds removed documents without them (a shard left
with none is dropped), links the other shards' files unchanged, and writes a new manifest
and sharded indexes (their trained quantizers kept) in `<name>.compact.partial/`, moved
into place in one step as a single datastore's compaction is (entry ids change: a new id).

Removing documents needs neither: `knnlm.core.edit.remove_documents` records them in the
manifest.  `add_documents` and `compact` here take either kind of datastore.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from knnlm.core import edit as single
from knnlm.core.corpus import corpus_record, file_sha256
from knnlm.core.datastore import Datastore, build_datastore, publish, write_json_atomic
from knnlm.core.index import index_info, list_indexes
from knnlm.errors import KnnlmError
from knnlm.scale.manifest import _SAME, MANIFEST, ShardedDatastore, is_sharded, write_manifest

LOG = logging.getLogger(__name__)

_KEPT = ("knnlm_version", "split_from", "settings", "added_since_tuning")  # manifest fields a compaction keeps


def add_documents(lm, path: str | Path, corpora: Sequence[str | Path], batch_tokens: int = 4096,
                  progress: bool = True, on_step=None) -> dict:
    """Add the documents of `corpora` to the datastore at `path` (either kind; see
    `knnlm.core.edit.add_documents`).  Returns the edit-log entry."""
    if not is_sharded(path):
        hook = {"on_step": on_step} if on_step else {}  # (a caller may have wrapped the single one's)
        return single.add_documents(lm, path, corpora, batch_tokens=batch_tokens, progress=progress, **hook)
    path, step = Path(path), on_step or (lambda name: None)
    corpora = [Path(c) for c in corpora]
    if not corpora:
        raise KnnlmError("no corpus file given")
    with single.edit_lock(path):
        settle(path)
        ds = open_sharded(path)
        if ds.reduction:
            raise KnnlmError(f"{path} holds reduced keys: add to the datastore it was reduced from, then reduce")
        ds.check_compatible(lm.identity(ds.key_point))  # another model or tokenizer: refused
        dtype = str(lm.dtype).replace("torch.", "")
        if dtype != ds.meta["model_dtype"]:
            raise KnnlmError(f"{path} was built with the model in {ds.meta['model_dtype']}, not {dtype}: its shards "
                             f"must agree (--dtype {ds.meta['model_dtype']})")
        t0 = time.perf_counter()
        new = path / "shards" / f"{next_shard(path):05d}"
        build_datastore(lm, corpora, new, window=int(ds.meta["window"]), stride=int(ds.meta["stride"]),
                        batch_tokens=batch_tokens, key_points=[ds.key_point], progress=progress)
        meta = json.loads((new / "meta.json").read_text("utf-8"))  # the same model (checked above), named as
        write_json_atomic(new / "meta.json", {**meta, "identity": ds.manifest["identity"]})  # the manifest names it
        step("shard")
        shard = Datastore(new)
        bad = [f for f in _SAME if shard.meta.get(f) != ds.manifest.get(f)]
        if bad:
            raise KnnlmError(f"the new shard's {', '.join(bad)} differ from {path}'s: nothing was added")
        for name in list_indexes(ds):
            _, d, info = index_info(ds, name)
            trained = d / "trained.faiss"
            extra = ({"trained_sha256": info["trained_sha256"], "train_size": info.get("train_size", 0),
                      "sharded": ds.id} if trained.exists() else {})
            shard_index(new, trained if trained.exists() else None, info, name, extra)
            step(f"index {name}")
        m = single.logged(ds.manifest, "add", files=[c.name for c in corpora], count=len(shard.docs),
                           entries=shard.count, first_document=len(ds.docs), shard=len(ds.shards))
        m["shards"] = list(m["shards"]) + [{"path": str(new.relative_to(path)), "id": shard.id, "count": shard.count,
                                            "documents": len(shard.docs),
                                            "meta_sha256": file_sha256(new / "meta.json")}]
        m.update(count=ds.count + shard.count, documents=len(ds.docs) + len(shard.docs),
                 corpora=list(m.get("corpora", [])) + [corpus_record(c) for c in corpora],
                 added_since_tuning=int(m.get("added_since_tuning", 0)) + shard.count)
        write_json_atomic(path / MANIFEST, m)  # the commit
        step("committed")
        settle(path)
        LOG.info("added %d documents (%d entries) to %s as shard %d in %.1f s", len(shard.docs), shard.count, path,
                 len(ds.shards), time.perf_counter() - t0)
        return m["edits"][-1]


def compact(path: str | Path, on_step=None) -> dict:
    """Rewrite the datastore at `path` (either kind) without its removed documents; returns
    the edit-log entry.  See `knnlm.core.edit.compact` for a single datastore."""
    if not is_sharded(path):
        return single.compact(path, **({"on_step": on_step} if on_step else {}))
    path, step = Path(path), on_step or (lambda name: None)
    with single.edit_lock(path):
        settle(path)
        ds = open_sharded(path)
        if not len(ds.removed_documents):
            raise KnnlmError(f"{path} has no removed documents: nothing to compact")
        if len(ds.removed_documents) == len(ds.docs):
            raise KnnlmError(f"every document of {path} was removed: nothing would be left")
        t0 = time.perf_counter()
        partial = path.with_name(path.name + ".compact.partial")
        if partial.exists():
            shutil.rmtree(partial)
        (partial / "shards").mkdir(parents=True)
        paths = []
        for s, local in zip(ds.shards, ds.shard_removed()):
            out = partial / "shards" / f"{len(paths):05d}"
            if len(s.removed_documents) == len(s.docs):
                continue  # a shard left with nothing is dropped
            if len(s.removed_documents):
                single.write_compacted(s, out)  # its indexes again from their training
            else:
                shutil.copytree(s.path, out, copy_function=os.link)  # unchanged: the same files, linked
            paths.append(out)
            step(f"shard {len(paths) - 1}")
        entries = int(ds.count - ds.live)
        m = single.logged(ds.manifest, "compact", documents=len(ds.removed_documents), entries=entries,
                           from_id=ds.id)
        write_manifest(partial, paths, extra={**{k: m[k] for k in _KEPT if k in m}, "version": m["version"],
                                              "edits": m["edits"], "corpora": m.get("corpora", [])})
        new = ShardedDatastore(partial)
        for name in list_indexes(ds):
            _, d, info = index_info(ds, name)
            out = partial / "indexes" / name
            out.mkdir(parents=True)
            if (d / "trained.faiss").exists():
                shutil.copy2(d / "trained.faiss", out / "trained.faiss")
            write_json_atomic(out / "index.json", {**info, "datastore_id": new.id, "ntotal": new.count,
                                                   "shards": [x.id for x in new.shards],
                                                   "datastore_version": new.version})
        step("files")
        publish(partial, path)
        step("published")
        entry = m["edits"][-1]
        LOG.info("compacted %s: %d documents, %d entries dropped in %.1f s", path, entry["documents"], entries,
                 time.perf_counter() - t0)
        return entry


def open_for_edit(path: str | Path):
    """The datastore at `path` (either kind), refused where it cannot be edited."""
    return open_sharded(Path(path)) if is_sharded(path) else single.open_for_edit(path)


def open_sharded(path: Path) -> ShardedDatastore:
    ds = ShardedDatastore(path)
    if ds.pruning:
        raise KnnlmError(f"{path} was pruned (merged entries stand for several documents): edit its source")
    return ds


def shard_index(shard: Path, trained: Path | None, info: dict, name: str, extra: dict) -> None:
    """The new shard's part of the sharded index `name`: its keys in a copy of the index's
    trained (empty) index, or a Flat index."""
    from knnlm.scale.index import _add_shard

    _add_shard(str(shard), str(trained) if trained else "", info["factory"], name, int(info.get("nprobe", 32)), extra)


def next_shard(path: Path) -> int:
    """The number of a new shard directory: after every one the manifest names."""
    m = json.loads((path / MANIFEST).read_text("utf-8"))
    used = [int(Path(s["path"]).name) for s in m["shards"] if Path(s["path"]).name.isdigit()]
    return max(used, default=-1) + 1


def settle(path: Path) -> None:
    """Bring a sharded datastore's directory in line with its manifest: shard directories
    it does not name (an addition stopped before its commit) are removed, and the sharded
    indexes' index.json count its shards."""
    m = json.loads((path / MANIFEST).read_text("utf-8"))
    named = {(path / s["path"]).resolve() for s in m["shards"]}
    root = path / "shards"
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and d.resolve() not in named:
            shutil.rmtree(d)
            LOG.info("removed %s: a shard an interrupted edit left unlisted", d)
    for d in sorted((path / "indexes").iterdir()) if (path / "indexes").is_dir() else []:
        f = d / "index.json"
        if not f.exists() or d.name.endswith((".partial", ".old")):
            continue
        info = json.loads(f.read_text("utf-8"))
        if info.get("ntotal") != m["count"] or len(info.get("shards", [])) != len(m["shards"]):
            write_json_atomic(f, {**info, "ntotal": m["count"], "shards": [s["id"] for s in m["shards"]],
                                  "datastore_version": int(m.get("version", 0))})
