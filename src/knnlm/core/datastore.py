"""The datastore: one (key, value) entry per target token of a corpus, on disk.

A datastore is a directory:

    meta.json    format version, model/tokenizer identity, key point, d, N, dtypes, W/S,
                 corpora (name, bytes, sha256), file checksums
    keys.npy     float16 [N, d]   key = the LM's representation of the left context
    vals.npy     int32   [N]      value = the next token (int16 overflows real vocabularies)
    tokens.npy   int32   [T]      every document's tokens, concatenated (prefix token first)
    docs.npy     int64   [D, 3]   per document: token start, token count, first entry
    docs.jsonl                    per document: source file, line, title

Entry `entry_start[d] + p` of document d holds the key read at the document's token p
and the value token p + 1, so each entry's provenance (document, token offset) is two
array lookups, and the next entry of the same document is the next row.

This module knows numpy and files, not faiss.  Building needs the model adapter and is
streaming (keys go to a memmap), resumable (progress.json after each flushed batch) and
atomic (written under `<name>.partial/`, renamed into place at the end).  An index made
during the build is its settings' object's (knnlm.core.index_fill.IndexFiller): it is handed
each flushed batch's keys and writes into `<name>.partial/` before it is published.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from knnlm import __version__
from knnlm.core.batching import WindowSettings, plan_files
from knnlm.core.corpus import corpus_record, file_sha256
from knnlm.core.settings import recorded
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_DTYPE = np.float16  # half the bytes of fp32; re-ranking distances are exact on these keys
VAL_DTYPE = np.int32  # vocabularies reach 256k: int16 overflows
_FILES = ("keys.npy", "vals.npy", "tokens.npy", "docs.npy", "docs.jsonl")
_META_FIELDS = ("id", "created", "identity", "key_point", "model_dtype", "dim", "count", "documents", "window",
                "stride", "corpora", "sha256")
_IDENTITY_FIELDS = ("model", "model_fingerprint", "weights_sample", "tokenizer_fingerprint")


# ---- reading -------------------------------------------------------------------------
class Datastore:
    """An opened datastore; arrays are memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        partial = self.path.with_name(self.path.name + ".partial")
        hint = f" (an unfinished build is in {partial}: run the build again to resume)" if partial.exists() else ""
        if not self.path.is_dir():
            raise KnnlmError(f"datastore not found: {self.path}{hint}")
        if not meta_path.exists():
            raise KnnlmError(f"not a datastore (no meta.json): {self.path}{hint}")
        self.meta = self._read_meta(meta_path)
        self.count, self.dim = int(self.meta["count"]), int(self.meta["dim"])
        self.key_point = self.meta["key_point"]
        self.keys = self._load("keys.npy", (self.count, self.dim), KEY_DTYPE)
        self.vals = self._load("vals.npy", (self.count,), VAL_DTYPE)
        self.tokens = self._load("tokens.npy", (int(self.meta["tokens"]),) if "tokens" in self.meta else None, np.int32)
        self.docs = self._load("docs.npy", (int(self.meta["documents"]), 3), np.int64)
        docs_jsonl = self.path / "docs.jsonl"
        if not docs_jsonl.exists():
            raise KnnlmError(f"datastore file missing: {docs_jsonl}")
        try:  # an edited datastore's first `documents` lines (an unfinished addition may follow them)
            lines = docs_jsonl.read_text("utf-8").splitlines()
            self.doc_info = [json.loads(line) for line in lines[: len(self.docs)]]
        except ValueError as e:
            raise KnnlmError(f"docs.jsonl in {self.path} is truncated or corrupted: {e}") from None
        if len(self.doc_info) != len(self.docs):
            raise KnnlmError(f"docs.jsonl and docs.npy disagree in {self.path}")
        # written by knnlm.retrieval.reduce: keys reduced to fewer dimensions (queries are
        # transformed to match) and near-duplicate entries merged (each kept entry counts for several)
        self.reduction = self.meta.get("reduction")
        self.pruning = self.meta.get("pruning")
        self.counts = self._load("counts.npy", (self.count,), np.int32) if self.pruning else None
        self.origin = self._load("origin.npy", (self.count,), np.int64) if self.pruning else None
        self._transform = None
        # edits (knnlm.core.edit): the version, and the documents removed since the last compaction,
        # whose entries every search leaves out (`removed`: (count,) bool, None when there are none)
        self.version = int(self.meta.get("version", 0))
        self.set_removed(self.meta.get("removed", []))

    def set_removed(self, documents) -> None:
        """Leave these documents' entries out of every search (`removed`, `live`); a sharded
        datastore's manifest sets its shards' this way."""
        self.removed_documents = np.array(sorted(int(d) for d in documents), dtype=np.int64)
        self.removed = self._removed_mask() if len(self.removed_documents) else None
        self.live = self.count - (0 if self.removed is None else int(self.removed.sum()))  # entries a search sees

    def _read_meta(self, meta_path: Path) -> dict:
        """meta.json, with every field the library reads present and well typed."""
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # UnicodeDecodeError is one
            raise KnnlmError(f"corrupted meta.json in {self.path}: {e}") from None
        if "format_version" not in meta:
            raise KnnlmError(f"corrupted meta.json in {self.path}: no format_version")
        version = meta["format_version"]
        if version != FORMAT_VERSION:
            raise KnnlmError(f"datastore format {version} is not supported (this knnlm reads {FORMAT_VERSION}): "
                             f"{meta_path}")
        identity = meta.get("identity")
        missing = [f for f in _META_FIELDS if f not in meta] + [
            f"identity.{f}" for f in _IDENTITY_FIELDS if not isinstance(identity, dict) or f not in identity]
        if missing:
            raise KnnlmError(f"corrupted meta.json in {self.path}: no {', '.join(missing)}")
        try:
            int(meta["count"]), int(meta["dim"])
        except (ValueError, TypeError) as e:
            raise KnnlmError(f"corrupted meta.json in {self.path}: count and dim must be integers ({e})") from None
        return meta

    def _load(self, name: str, shape, dtype) -> np.ndarray:
        f = self.path / name
        if not f.exists():
            raise KnnlmError(f"datastore file missing: {f}")
        try:
            arr = np.load(f, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise KnnlmError(f"{name} in {self.path} is truncated or corrupted: {e}") from None
        if (shape is not None and arr.shape != shape and arr.dtype == dtype and arr.shape[1:] == shape[1:]
                and os.path.getsize(f) >= arr.offset + int(np.prod(shape)) * arr.itemsize):
            # rows appended by an addition not committed yet, or committed before the header caught
            # up (knnlm.core.edit): the rows meta.json names
            arr = np.memmap(f, dtype=dtype, mode="r", offset=arr.offset, shape=shape)
        if arr.dtype != dtype or (shape is not None and arr.shape != shape):
            raise KnnlmError(
                f"{name} in {self.path} has shape {arr.shape} {arr.dtype}, meta.json says "
                f"{shape} {np.dtype(dtype).name}: the datastore is corrupted"
            )
        return arr

    def _removed_mask(self) -> np.ndarray:
        """(count,) bool: the entries of the removed documents."""
        docs = self.removed_documents
        if docs[-1] >= len(self.docs) or docs[0] < 0:
            raise KnnlmError(f"corrupted meta.json in {self.path}: removed documents beyond its {len(self.docs)}")
        if self.origin is not None:
            return np.isin(self.document_of(np.arange(self.count)), docs)
        mark = np.zeros(self.count + 1, dtype=np.int64)
        first = self.docs[docs, 2]
        np.add.at(mark, first, 1)  # +1 at each removed document's first entry, -1 one past its last
        np.add.at(mark, first + self.docs[docs, 1] - 1, -1)
        return np.cumsum(mark[:-1]) > 0

    def __len__(self) -> int:
        return self.count

    def read_keys(self, rows: np.ndarray) -> np.ndarray:
        """Keys of entries `rows` (sorted ascending), (n, d) float16, read from keys.npy with
        file reads rather than through the memory map, so that the process holds only these
        rows (a training sample of a datastore larger than RAM) and no mapped pages."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=KEY_DTYPE)
        row_bytes = self.dim * np.dtype(KEY_DTYPE).itemsize
        with open(self.path / "keys.npy", "rb", buffering=0) as f:
            for i, r in enumerate(rows):
                f.seek(self.keys.offset + int(r) * row_bytes)
                out[i] = np.frombuffer(f.read(row_bytes), dtype=KEY_DTYPE)
        return out

    def iter_keys(self, chunk: int = 65536):
        """(first row, keys (n, d) float16) for consecutive chunks of the keys, read with file
        reads: a pass over all keys that leaves no mapped pages behind."""
        with open(self.path / "keys.npy", "rb") as f:
            f.seek(self.keys.offset)
            for i in range(0, self.count, chunk):
                n = min(chunk, self.count - i)
                yield i, np.fromfile(f, dtype=KEY_DTYPE, count=n * self.dim).reshape(n, self.dim)

    @property
    def id(self) -> str:
        """Unique id of this datastore build; an index records it."""
        return self.meta["id"]

    def check_compatible(self, identity: dict) -> None:
        """Refuse a model, tokenizer or key point other than the datastore's own, naming both."""
        from knnlm.core.model import same_weights

        mine = self.meta["identity"]
        if not same_weights(mine["weights_sample"], identity["weights_sample"]):
            raise KnnlmError(
                f"datastore {self.path} was built with model {mine['model']} but you are using "
                f"{identity['model']}, whose weights differ"
            )
        if mine["model_fingerprint"] != identity["model_fingerprint"]:
            raise KnnlmError(
                f"datastore {self.path} was built with model {mine['model']} ({mine['model_fingerprint']}) "
                f"but you are using {identity['model']} ({identity['model_fingerprint']})"
            )
        if mine["tokenizer_fingerprint"] != identity["tokenizer_fingerprint"]:
            raise KnnlmError(
                f"datastore {self.path} was built with the tokenizer of {mine['model']} "
                f"({mine['tokenizer_fingerprint']}) but {identity['model']} has another "
                f"({identity['tokenizer_fingerprint']})"
            )
        if mine["key_point"] != identity["key_point"]:
            raise KnnlmError(
                f"datastore {self.path} holds keys from key point {mine['key_point']!r}, "
                f"not {identity['key_point']!r}"
            )

    @property
    def settings(self) -> dict | None:
        """Retrieval settings tuned on this datastore's corpus (k, lambda, temperature, how), or None."""
        return recorded(self.meta)

    def record_settings(self, settings: dict) -> None:
        """Write tuned settings into meta.json (atomically); commands default to them.  They
        record the datastore version they were tuned on."""
        self.meta["settings"] = {**settings, "datastore_version": self.version}
        self.meta.pop("added_since_tuning", None)
        write_json_atomic(self.path / "meta.json", self.meta)

    def verify(self) -> None:
        """Recompute each file's sha256 against meta.json."""
        for name, digest in self.meta["sha256"].items():
            if file_sha256(self.path / name) != digest:
                raise KnnlmError(f"{name} in {self.path} does not match its checksum: the datastore is corrupted")

    # ---- queries ---------------------------------------------------------------------
    @property
    def query_dim(self) -> int:
        """The dimension of the queries this datastore takes: the model's keys (a reduced
        datastore reduces them itself, `to_key_space`)."""
        return int(self.reduction["from_dim"]) if self.reduction else self.dim

    def to_key_space(self, queries: np.ndarray) -> np.ndarray:
        """The model's query keys (m, query_dim) as float32 in the space of this datastore's
        keys (m, dim): unchanged, or through the recorded reduction.  Queries of another
        dimension (already reduced ones included) are refused."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.query_dim:
            got = q.shape[-1] if q.ndim else 0
            if self.reduction:
                r = self.reduction
                raise KnnlmError(
                    f"datastore {self.path} holds keys reduced by {r['method']} from d={r['from_dim']} to "
                    f"d={self.dim}; it takes the model's {r['from_dim']}-d keys (and reduces them itself), not "
                    f"{got}-d queries" + (" that are already reduced" if got == self.dim else ""))
            raise KnnlmError(f"datastore {self.path} holds un-reduced {self.dim}-d keys; these queries are {got}-d"
                             + (" (reduced queries belong to a reduced datastore)" if got < self.dim else ""))
        if not self.reduction:
            return q
        if self._transform is None:
            with np.load(self.path / self.reduction["file"]) as z:
                self._transform = (z["mean"].astype(np.float32), z["components"].astype(np.float32))
        mean, comp = self._transform  # (from_dim,), (dim, from_dim)
        return (q - mean) @ comp.T  # (m, dim)

    def counts_of(self, ids: np.ndarray) -> np.ndarray | None:
        """How many original entries each of these (merged) entries stands for; None when
        the datastore was not pruned (every entry counts once)."""
        if self.counts is None:
            return None
        return np.where(np.asarray(ids) >= 0, self.counts[np.maximum(ids, 0)], 1)

    # ---- provenance ------------------------------------------------------------------
    def _original(self, ids: np.ndarray) -> np.ndarray:
        """Entry ids in the original entry order (a pruned datastore keeps a subset)."""
        ids = np.asarray(ids, dtype=np.int64)
        return ids if self.origin is None else self.origin[ids]

    def provenance(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(document, token offset of the value token) of each entry id."""
        ids = self._original(ids)
        doc = np.searchsorted(self.docs[:, 2], ids, side="right") - 1
        return doc, ids - self.docs[doc, 2] + 1

    def document_of(self, ids: np.ndarray) -> np.ndarray:
        """Document of each entry id (ids >= 0)."""
        return np.searchsorted(self.docs[:, 2], self._original(ids), side="right") - 1

    def context(self, entry: int, before: int = 16, after: int = 4) -> tuple[list[int], int, list[int]]:
        """Token ids before the entry's value, the value, and tokens after it (same document)."""
        doc, off = (int(x[0]) for x in self.provenance(np.array([entry])))
        start, n = int(self.docs[doc, 0]), int(self.docs[doc, 1])
        toks = self.tokens[start : start + n]
        return toks[max(1, off - before) : off].tolist(), int(toks[off]), toks[off + 1 : off + 1 + after].tolist()


# ---- building ------------------------------------------------------------------------
def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file, flush it to disk, rename it over `path`: a reader
    (or a power loss) sees the old file or the new one, never a part."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class BuildSettings:
    """How a datastore is built: its windows and batches (`windows`), the key point(s) it
    keeps (`key_points`, None: the model's; several: one datastore each from the same pass),
    `documents=(a, b)`: only documents a..b-1 of the corpora (in reading order, before empty
    ones are dropped: one shard of a build split by documents), and `index`: an index
    (knnlm.core.index_fill.IndexSettings) trained on the first keys and filled as the forward
    pass goes on, published with the datastore (None: no index)."""

    windows: WindowSettings = field(default_factory=WindowSettings)
    key_points: tuple[str, ...] | None = None
    documents: tuple[int, int] | None = None
    index: object | None = None  # a knnlm.core.index_fill.IndexSettings: that index made during the pass

    def __post_init__(self):
        if self.index is not None and not callable(getattr(self.index, "filler", None)):
            raise KnnlmError(f"index must be a knnlm.core.index_fill.IndexSettings or None, got {self.index!r}")
        if self.key_points is not None:
            object.__setattr__(self, "key_points", tuple(self.key_points))
            if not self.key_points:
                raise KnnlmError("key_points must name at least one key point (None: the model's)")
        if self.documents is not None:
            a, b = (int(x) for x in self.documents)
            if not 0 <= a <= b:
                raise KnnlmError(f"documents must be a range (a, b) with 0 <= a <= b, got {self.documents}")
            object.__setattr__(self, "documents", (a, b))

    @classmethod
    def of(cls, settings: "BuildSettings | None", flat: dict) -> "BuildSettings":
        """`settings` with the flat keyword arguments of build_datastore's older signature
        (window, stride, batch_tokens, key_points, documents) folded in."""
        base = settings if settings is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"build_datastore() settings must be a BuildSettings, got {type(base).__name__}")
        unknown = sorted(set(flat) - {"window", "stride", "batch_tokens", "key_points", "documents"})
        if unknown:
            raise TypeError(f"build_datastore() got an unexpected keyword argument {unknown[0]!r}")
        windows = {k: flat[k] for k in ("window", "stride", "batch_tokens") if k in flat}
        own = {k: flat[k] for k in ("key_points", "documents") if k in flat}
        if windows:
            own["windows"] = replace(base.windows, **windows)
        return replace(base, **own) if own else base


def build_datastore(
    lm,
    corpora: Sequence[str | Path],
    out: str | Path,
    settings: BuildSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    **flat,
) -> list[Path]:
    """Build a datastore from corpus files with one forward pass; returns its path(s).

    `settings` (a BuildSettings; the flat keywords window=, stride=, batch_tokens=,
    key_points=, documents= still work) say what is built.  With several key points, one
    pass writes one datastore per key point, to `out` for the first and `out-<key point>`
    for the others.  A build interrupted (crash, Ctrl-C) resumes from its last flushed
    batch when called again with the same arguments.  `on_batch(i)` is called after
    batch i is safely on disk.
    """
    import torch
    from tqdm.auto import tqdm

    settings = BuildSettings.of(settings, flat)
    window, stride, batch_tokens = (settings.windows.window, settings.windows.stride,
                                    settings.windows.batch_tokens)
    documents = settings.documents
    out = Path(out)
    key_points = list(settings.key_points or [lm.key_point])
    outs = [out] + [out.with_name(f"{out.name}-{kp}") for kp in key_points[1:]]
    for o in outs:
        if o.exists() and not overwrite:
            raise KnnlmError(f"{o} already exists (use --overwrite to replace it)")
    corpora = [Path(c) for c in corpora]
    if not corpora:
        raise KnnlmError("no corpus file given")
    if lm.max_positions and window > lm.max_positions:
        raise KnnlmError(f"window {window} is longer than the model's {lm.max_positions} positions")
    plan = plan_files(lm, corpora, window, stride, batch_tokens, documents)  # reads and checks each file first
    records = [corpus_record(c) for c in corpora]
    signature = {
        "identity": lm.identity(),
        "key_points": key_points,
        "corpora": records,
        "window": window,
        "stride": stride,
        "batch_tokens": batch_tokens,
        "count": plan.count,
    }
    if documents is not None:
        signature["documents"] = list(documents)
    dims = {kp: lm.dim(kp) for kp in key_points}
    partials = [o.with_name(o.name + ".partial") for o in outs]
    # the index made as the keys are flushed (trained once its sample is on disk); a bad
    # factory string is refused here, before anything is written
    fillers = {kp: settings.index.filler(p, plan.count, dims[kp]) for kp, p in zip(key_points, partials)
               } if settings.index is not None else {}
    done = 0
    progress_file = partials[0] / "progress.json"
    if progress_file.exists():
        try:
            state = json.loads(progress_file.read_text())
        except ValueError:
            state = None
        if (isinstance(state, dict) and state.get("signature") == json.loads(json.dumps(signature))
                and isinstance(state.get("batches_done"), int)
                and all(_partial_intact(p, plan.count, dims[kp]) for kp, p in zip(key_points, partials))):
            done = state["batches_done"]
            LOG.warning("resuming the build in %s from batch %d/%d", partials[0], done, len(plan.batches))
        else:
            LOG.warning("starting over: the unfinished build in %s had other input or settings, or is damaged",
                        partials[0])
    if done == 0:
        for p in partials:
            if p.exists():
                shutil.rmtree(p)
            p.mkdir(parents=True)
            np.save(p / "vals.npy", plan.targets().astype(VAL_DTYPE))
            np.save(p / "tokens.npy", plan.tokens)
            np.save(p / "docs.npy", plan.docs)
            (p / "docs.jsonl").write_text("".join(json.dumps(i) + "\n" for i in plan.doc_info), encoding="utf-8")
    mode = "r+" if done else "w+"
    keys = {
        kp: np.lib.format.open_memmap(p / "keys.npy", mode=mode, dtype=KEY_DTYPE, shape=(plan.count, dims[kp]))
        for kp, p in zip(key_points, partials)
    }
    rows = sum(plan.batch_size(b) for b in range(done))  # keys on disk
    bar = tqdm(total=plan.count, initial=rows, unit="tok", desc="datastore", disable=not progress)
    try:
        if done:
            for kp, filler in fillers.items():
                filler.resume(keys[kp], rows)
        for bi in range(done, len(plan.batches)):
            feats, _ = lm.forward(plan.batch_input(bi), key_points, logits=False)
            feats = {kp: f.to("cpu", torch.float16).numpy() for kp, f in feats.items()}  # (B, T, d)
            n = 0
            for row, c0, c1, t0 in plan.scored(bi):
                for kp in key_points:
                    keys[kp][t0 : t0 + c1 - c0] = feats[kp][row, c0:c1]
                n += c1 - c0
            for mm in keys.values():
                mm.flush()
            write_json_atomic(progress_file, {"signature": signature, "batches_done": bi + 1})
            rows += n
            for kp, filler in fillers.items():
                filler.flushed(keys[kp], rows)
            bar.update(n)
            if on_batch is not None:
                on_batch(bi)
    except KeyboardInterrupt:
        raise KnnlmError(f"interrupted: the partial build is kept in {partials[0]}; run the same command to resume")
    finally:
        bar.close()
        del keys
    for kp, o, p in zip(key_points, outs, partials):
        meta = {
            "format_version": FORMAT_VERSION,
            "knnlm_version": __version__,
            "id": uuid.uuid4().hex,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "identity": lm.identity(kp),
            "key_point": kp,
            "model_dtype": str(lm.dtype).replace("torch.", ""),
            "dim": dims[kp],
            "count": plan.count,
            "documents": len(plan.docs),
            "dtypes": {"keys": "float16", "vals": "int32", "tokens": "int32"},
            "window": window,
            "stride": stride,
            "prefix_token_id": lm.prefix_token_id,
            "corpora": records,
            "sha256": {name: file_sha256(p / name) for name in _FILES},
        }
        if kp in fillers:
            fillers[kp].finish(meta["id"])
        write_json_atomic(p / "meta.json", meta)
        (p / "progress.json").unlink(missing_ok=True)
        publish(p, o)
    return outs


def _partial_intact(p: Path, count: int, dim: int) -> bool:
    """Whether an unfinished build's files are all there, keys.npy at its full shape."""
    if not all((p / f).exists() for f in _FILES):
        return False
    try:
        keys = np.load(p / "keys.npy", mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return False
    return keys.shape == (count, dim) and keys.dtype == KEY_DTYPE


def publish(partial: Path, final: Path) -> None:
    """Move a finished build (a directory) into place, replacing an old one.

    Its files are flushed to disk first (fsync): otherwise, after a power loss, the
    rename could be on disk before the data, leaving a complete-looking directory of
    zeros under the final name.  An old directory is swapped out in one step where the
    filesystem can (Linux's renameat2 RENAME_EXCHANGE), so at every instant `final` is
    the complete old or the complete new one; elsewhere it is renamed aside first, and a
    later publish puts it back if a kill came between the two renames.  The old one is
    removed last."""
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():  # a publish killed between its two renames
        os.replace(old, final)
    elif old.exists():  # a publish killed while removing the old one
        shutil.rmtree(old)
    _fsync_tree(partial)
    if not final.exists():
        os.replace(partial, final)
    elif _exchange(partial, final):
        os.replace(partial, old)  # (now the old one: never left under the partial's name)
    else:
        os.replace(final, old)
        os.replace(partial, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
