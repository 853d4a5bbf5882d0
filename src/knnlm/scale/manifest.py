"""Sharded datastores: a manifest over shards in the single-datastore format.

A sharded datastore is a directory:

    manifest.json   format, format version, id, created, the model identity, key point,
                    d, N, documents, and the shards in order: path (relative), shard id,
                    entries, documents, sha256 of the shard's meta.json (which holds the
                    checksums of every file of the shard)
    shards/00000/   a datastore in today's format (meta.json, keys.npy, ...)
    shards/00001/   ...
    indexes/<name>/ index.json of an index over all shards (each shard holds its part in
                    its own indexes/<name>/)

Entry ids are global: shard s's row r is entry offsets[s] + r; document ids likewise
(doc_offsets[s] + the shard's document).  One shard is today's datastore, so any code
that reads a `Datastore` reads a `ShardedDatastore` through the same methods.
`open_datastore(path)` opens either kind.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from knnlm import __version__
from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore, write_json_atomic
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "knnlm-sharded-datastore"
MANIFEST_VERSION = 1
_SAME = ("key_point", "dim", "model_dtype", "window", "stride")  # must agree across shards


def open_datastore(path: str | Path) -> Datastore | "ShardedDatastore":
    """The one way to open a datastore: a directory with manifest.json is sharded,
    anything else is today's single datastore."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return ShardedDatastore(path)
    return Datastore(path)


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


class _Rows:
    """Rows of several arrays as one: `rows[ids]` for int ids/arrays and slices, without
    concatenating (each part stays a memmap)."""

    def __init__(self, parts: Sequence[np.ndarray], offsets: np.ndarray):
        self.parts, self.offsets = list(parts), offsets
        self.shape = (int(offsets[-1]),) + parts[0].shape[1:]
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self[np.arange(*key.indices(len(self)))]
        if np.isscalar(key):
            i = int(key) + (len(self) if int(key) < 0 else 0)
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            return self.parts[s][i - self.offsets[s]]
        ids = np.asarray(key, dtype=np.int64)
        flat = ids.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"entry ids must be in [0, {len(self)})")
        out = np.empty((len(flat),) + self.shape[1:], dtype=self.dtype)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self.parts[s][flat[sel] - self.offsets[s]]
        return out.reshape(ids.shape + self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate([np.asarray(p) for p in self.parts])
        return a if dtype is None else a.astype(dtype)


class _Docs:
    """The shards' document tables (`doc_info`) as one list, by global document id."""

    def __init__(self, parts: Sequence[list], offsets: np.ndarray):
        self.parts, self.offsets = list(parts), offsets

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range")
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[s][i - self.offsets[s]]

    def __iter__(self):
        for p in self.parts:
            yield from p


class ShardedDatastore:
    """An opened sharded datastore with the `Datastore` interface and global ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.shards: list[Datastore] = []
        for i, entry in enumerate(m["shards"]):
            spath = self.path / entry["path"]
            if not (spath / "meta.json").exists():
                raise KnnlmError(f"shard {i} of {self.path} is missing: {spath} (no meta.json)")
            digest = file_sha256(spath / "meta.json")
            if digest != entry["meta_sha256"]:
                raise KnnlmError(f"shard {i} of {self.path} is corrupted or was replaced: {spath}/meta.json does "
                                 "not match the manifest's checksum")
            ds = Datastore(spath)
            if ds.id != entry["id"] or ds.count != entry["count"]:
                raise KnnlmError(f"shard {i} of {self.path} ({spath}) is not the shard the manifest names")
            if ds.meta["identity"] != m["identity"]:
                raise KnnlmError(f"shard {i} of {self.path} was built with model {ds.meta['identity']['model']} "
                                 f"({ds.meta['identity']['model_fingerprint']}), the manifest's first shard with "
                                 f"{m['identity']['model']} ({m['identity']['model_fingerprint']}): shards of "
                                 "different models cannot be searched together")
            for f in _SAME:
                if ds.meta.get(f) != m.get(f):
                    raise KnnlmError(f"shard {i} of {self.path} has {f}={ds.meta.get(f)!r}, the manifest "
                                     f"{m.get(f)!r}")
            self.shards.append(ds)
        self.offsets = np.concatenate([[0], np.cumsum([s.count for s in self.shards])]).astype(np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum([len(s.docs) for s in self.shards])]).astype(np.int64)
        self.count, self.dim, self.key_point = int(self.offsets[-1]), int(m["dim"]), m["key_point"]
        if self.count != m["count"]:
            raise KnnlmError(f"manifest {self.path} says {m['count']} entries, its shards hold {self.count}")
        first = self.shards[0].meta
        self.meta = {**first, "id": m["id"], "created": m["created"], "count": self.count,
                     "documents": int(self.doc_offsets[-1]), "shards": len(self.shards),
                     "corpora": m.get("corpora", first["corpora"]), "sha256": {}, "settings": m.get("settings"),
                     "version": m.get("version", 0), "edits": m.get("edits", []), "removed": m.get("removed", [])}
        self.keys = _Rows([s.keys for s in self.shards], self.offsets)
        self.vals = _Rows([s.vals for s in self.shards], self.offsets)
        self.doc_info = _Docs([s.doc_info for s in self.shards], self.doc_offsets)
        # the corpus tokens and the (D, 3) document table (token start, token count, first entry)
        # with global token offsets and entry ids, as one datastore's (self-tuning reads them)
        self.token_offsets = np.concatenate([[0], np.cumsum([len(s.tokens) for s in self.shards])]).astype(np.int64)
        self.tokens = _Rows([s.tokens for s in self.shards], self.token_offsets)
        self.docs = np.concatenate([np.asarray(s.docs, dtype=np.int64) + [t, 0, e] for s, t, e in
                                    zip(self.shards, self.token_offsets, self.offsets)]).reshape(-1, 3)
        self.reduction = self.shards[0].reduction
        self.pruning = getattr(self.shards[0], "pruning", None)
        if any(s.reduction != self.reduction for s in self.shards):
            raise KnnlmError(f"the shards of {self.path} hold keys reduced in different ways")
        # documents removed (knnlm.core.edit), recorded in the manifest by global document id: each
        # shard leaves its own out of its searches; the global mask is theirs concatenated
        self.version = int(m.get("version", 0))
        self.removed_documents = np.array(sorted(int(d) for d in m.get("removed", [])), dtype=np.int64)
        for s, local in zip(self.shards, self.shard_removed()):
            s.set_removed(set(s.removed_documents.tolist()) | set(local))
        self.removed = (np.concatenate([s.removed if s.removed is not None else np.zeros(s.count, bool)
                                        for s in self.shards]) if len(self.removed_documents) else None)
        self.live = sum(s.live for s in self.shards)
        has_counts = [s.counts is not None for s in self.shards]
        self.counts = _Rows([s.counts if s.counts is not None else np.ones(s.count, np.int32) for s in self.shards],
                            self.offsets) if any(has_counts) else None

    def shard_removed(self) -> list[list[int]]:
        """The removed documents of each shard, as its own document ids."""
        docs = self.removed_documents
        shard = np.searchsorted(self.doc_offsets, docs, side="right") - 1
        return [(docs[shard == i] - self.doc_offsets[i]).tolist() for i in range(len(self.shards))]

    def __len__(self) -> int:
        return self.count

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def settings(self) -> dict | None:
        """Retrieval settings tuned on the whole sharded datastore (in the manifest), or None."""
        from knnlm.core.settings import recorded

        return recorded(self.manifest)

    def record_settings(self, settings: dict) -> None:
        self.manifest["settings"] = self.meta["settings"] = {**settings, "datastore_version": self.version}
        self.manifest.pop("added_since_tuning", None)
        write_json_atomic(self.path / MANIFEST, self.manifest)

    @property
    def query_dim(self) -> int:
        return self.shards[0].query_dim

    def to_key_space(self, queries: np.ndarray) -> np.ndarray:
        return self.shards[0].to_key_space(queries)  # every shard has the first one's keys (checked on open)

    def counts_of(self, ids: np.ndarray) -> np.ndarray | None:
        if self.counts is None:
            return None
        return np.where(np.asarray(ids) >= 0, self.counts[np.maximum(ids, 0)], 1)

    def check_compatible(self, identity: dict) -> None:
        self.shards[0].check_compatible(identity)  # every shard has the first one's identity (checked on open)

    def verify(self) -> None:
        """Every file of every shard against its checksum."""
        for s in self.shards:
            s.verify()

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def document_of(self, ids: np.ndarray) -> np.ndarray:
        """Global document of each global entry id (ids >= 0)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(ids.shape, dtype=np.int64)
        shard = self.shard_of(ids)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s].document_of(ids[sel] - self.offsets[s]) + self.doc_offsets[s]
        return out

    def provenance(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global document, token offset of the value token) of each global entry id."""
        ids = np.asarray(ids, dtype=np.int64)
        doc, off = np.empty(ids.shape, dtype=np.int64), np.empty(ids.shape, dtype=np.int64)
        shard = self.shard_of(ids)
        for s in np.unique(shard):
            sel = shard == s
            d, o = self.shards[s].provenance(ids[sel] - self.offsets[s])
            doc[sel], off[sel] = d + self.doc_offsets[s], o
        return doc, off

    def context(self, entry: int, before: int = 16, after: int = 4) -> tuple[list[int], int, list[int]]:
        s = int(self.shard_of(np.array([entry]))[0])
        return self.shards[s].context(int(entry - self.offsets[s]), before=before, after=after)


def read_manifest(path: Path) -> dict:
    """manifest.json with every field present and well typed, or one clear error."""
    f = path / MANIFEST
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        raise KnnlmError(f"corrupted manifest {f}: {e}") from None
    if m.get("format") != MANIFEST_FORMAT:
        raise KnnlmError(f"corrupted manifest {f}: format is {m.get('format')!r}, not {MANIFEST_FORMAT!r}")
    if m.get("format_version") != MANIFEST_VERSION:
        raise KnnlmError(f"sharded datastore format {m.get('format_version')} is not supported (this knnlm reads "
                         f"{MANIFEST_VERSION}): {f}")
    need = ("id", "created", "identity", "key_point", "dim", "count", "shards")
    missing = [k for k in need if k not in m]
    if missing:
        raise KnnlmError(f"corrupted manifest {f}: no {', '.join(missing)}")
    shards = m["shards"]
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and {"path", "id", "count", "meta_sha256"} <= s.keys() for s in shards):
        raise KnnlmError(f"corrupted manifest {f}: `shards` must be a non-empty list of "
                         "{path, id, count, meta_sha256}")
    return m


def write_manifest(out: str | Path, shard_paths: Sequence[str | Path], extra: dict | None = None) -> Path:
    """Write `out`/manifest.json over the given shard directories (in this order); paths
    inside `out` are stored relative to it.  Returns the manifest's path."""
    out = Path(out)
    shards = [Datastore(p) for p in shard_paths]
    if not shards:
        raise KnnlmError("a sharded datastore needs at least one shard")
    first = shards[0].meta
    for i, s in enumerate(shards[1:], 1):
        if s.meta["identity"] != first["identity"]:
            raise KnnlmError(f"shard {i} ({s.path}) was built with {s.meta['identity']['model']}, shard 0 with "
                             f"{first['identity']['model']}: shards of different models cannot be combined")
    entries = []
    for s in shards:
        try:
            rel = str(s.path.resolve().relative_to(out.resolve()))
        except ValueError:
            rel = str(s.path.resolve())
        entries.append({"path": rel, "id": s.id, "count": s.count, "documents": len(s.docs),
                        "meta_sha256": file_sha256(s.path / "meta.json")})
    corpora, seen = [], set()
    for s in shards:
        for c in s.meta["corpora"]:
            if c["sha256"] not in seen:
                seen.add(c["sha256"])
                corpora.append(c)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "knnlm_version": __version__,
        "id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": first["identity"],
        **{f: first.get(f) for f in _SAME},
        "count": sum(s.count for s in shards),
        "documents": sum(len(s.docs) for s in shards),
        "corpora": corpora,
        "shards": entries,
        **(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MANIFEST, manifest)
    return out / MANIFEST
