"""Memory Decoder training targets: p_kNN at every position of a datastore's own corpus,
without the position's own memories, stored sparse on disk.

Entry i of a datastore is position i of its corpus: its key is the query (the LM's
representation of the left context, exactly what a query at that position would be) and
its value the next token.  Searching with that key finds the entry itself at distance 0,
and, for text repeated inside the same document, entries that carry the answer for the
same reason.  At test time neither exists (the test text is not in the datastore), so a
decoder trained on them would learn to copy.  The default therefore leaves the position's
own document out, as `Searcher.search(..., exclude=...)` does: the whole document, or,
inside a long one (a .txt corpus is one stream), the entries within EXCLUDE_RADIUS of the
position -- what a held-out document sees.  `self` drops only the entry itself (the
document's repetitions stay, so targets are sharper than at test time); `radius:N` leaves
out the entries of the same document within N of the position.

A targets directory (written under `<name>.partial/`, renamed into place when complete;
an interrupted run resumes from its last finished chunk):

    meta.json   format, datastore id/path/corpora, k, T, keep, exclusion, index settings,
                mean kept mass, file checksums
    ids.npy     int32   [N, keep]  the most likely tokens of p_kNN at entry i, -1 pads
    probs.npy   float32 [N, keep]  their probabilities, renormalised over the kept tokens
    mass.npy    float32 [N]        p_kNN mass the kept tokens held before renormalising
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from knnlm import __version__
from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore, publish, write_json_atomic
from knnlm.core.index import EXCLUDE_RADIUS, Searcher, search_excluding
from knnlm.core.scoring import check_settings
from knnlm.errors import KnnlmError
from knnlm.memory.loss import DEFAULT_K, DEFAULT_KEEP, DEFAULT_TEMPERATURE, sparse_knn_targets

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FILES = ("ids.npy", "probs.npy", "mass.npy")


def exclusion_radius(exclude: str) -> int:
    """Entries of the position's document left out, as a distance: 'document' ->
    EXCLUDE_RADIUS (the searcher's rule), 'self' -> 1 (the entry alone), 'radius:N' -> N."""
    if exclude == "document":
        return EXCLUDE_RADIUS
    if exclude == "self":
        return 1
    kind, _, n = exclude.partition(":")
    if kind == "radius" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise KnnlmError(f"exclude must be 'document', 'self' or 'radius:N' (N >= 1), got {exclude!r}")


def open_corpus_datastore(path: str | Path) -> Datastore:
    """A datastore whose corpus tokens are there and line up with its entries."""
    path = Path(path)
    if path.is_dir() and (path / "meta.json").exists() and not (path / "tokens.npy").exists():
        raise KnnlmError(f"datastore {path} has no corpus tokens (tokens.npy): memory decoder targets need "
                         "the text the datastore was built from; rebuild it with `knnlm build`")
    ds = Datastore(path)
    tokens, docs = np.asarray(ds.tokens), np.asarray(ds.docs)
    if docs.ndim != 2 or docs.shape[1] != 3 or int((docs[:, 1] - 1).sum()) != ds.count:
        raise KnnlmError(f"the corpus tokens of {path} do not match its {ds.count} entries: the datastore "
                         "is corrupted")
    keep = np.ones(len(tokens), dtype=bool)
    keep[docs[:, 0]] = False  # a document's first token is context only
    if not np.array_equal(tokens[keep], np.asarray(ds.vals)):
        raise KnnlmError(f"the corpus tokens of {path} do not match its values: the datastore is corrupted")
    return ds


class Targets:
    """An opened targets directory; arrays memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "meta.json").exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" (an unfinished run is in {partial}: run it again to resume)" if partial.exists() else ""
            raise KnnlmError(f"not a memory-targets directory (no meta.json): {self.path}{hint}")
        try:
            self.meta = json.loads((self.path / "meta.json").read_text("utf-8"))
            if not isinstance(self.meta, dict) or self.meta.get("kind") != "memory-targets":
                raise ValueError("not a memory-targets meta.json")
            n, keep = int(self.meta["count"]), int(self.meta["keep"])
        except (ValueError, KeyError, TypeError) as e:
            raise KnnlmError(f"corrupted meta.json in {self.path}: {e}") from None
        self.count, self.keep = n, keep
        self.ids = self._load("ids.npy", (n, keep), np.int32)
        self.probs = self._load("probs.npy", (n, keep), np.float32)
        self.mass = self._load("mass.npy", (n,), np.float32)

    def _load(self, name: str, shape, dtype) -> np.ndarray:
        f = self.path / name
        try:
            arr = np.load(f, mmap_mode="r")
        except FileNotFoundError:
            raise KnnlmError(f"memory targets file missing: {f}") from None
        except (ValueError, OSError, EOFError) as e:
            raise KnnlmError(f"{name} in {self.path} is truncated or corrupted: {e}") from None
        if arr.shape != shape or arr.dtype != dtype:
            raise KnnlmError(f"{name} in {self.path} has shape {arr.shape} {arr.dtype}, expected {shape} "
                             f"{np.dtype(dtype).name}: the targets are corrupted")
        return arr

    def check_for(self, ds: Datastore) -> None:
        """Refuse targets of another datastore, or computed before some of its documents were
        removed (their entries may be among the targets' neighbours: a decoder would learn them)."""
        if self.meta.get("datastore_id") != ds.id:
            raise KnnlmError(f"targets {self.path} were computed from datastore {self.meta.get('datastore_id')}, "
                             f"not from {ds.path} ({ds.id})")
        since = sorted(set(ds.removed_documents.tolist()) - set(self.meta.get("datastore_removed", [])))
        if since:
            raise KnnlmError(f"targets {self.path} were computed from version {self.meta.get('datastore_version', 0)} "
                             f"of {ds.path}, before {len(since)} of its documents were removed (version {ds.version}):"
                             " their entries may be among the targets' neighbours; compute the targets again")


@dataclass(frozen=True)
class TargetSettings:
    """What each position's target keeps: the `keep` likeliest tokens of p_kNN, after
    leaving out the position's own memories (`exclude`: 'document', 'self' or 'radius:N',
    see `exclusion_radius`) and the datastore documents `exclude_documents` from every
    position's neighbours (a slice held out of a decoder's training, so that none of its
    tokens reach the decoder through the targets); `chunk` positions are searched at a time."""

    keep: int = DEFAULT_KEEP
    exclude: str = "document"
    exclude_documents: tuple[int, ...] = ()
    chunk: int = 2048

    def __post_init__(self):
        if self.keep < 1:
            raise KnnlmError(f"keep must be >= 1, got {self.keep}")
        if self.chunk < 1:
            raise KnnlmError(f"chunk must be >= 1, got {self.chunk}")
        exclusion_radius(self.exclude)
        try:
            held = tuple(sorted({operator.index(d) for d in self.exclude_documents or ()}))
        except TypeError:
            raise KnnlmError(f"exclude_documents must be document numbers, got {self.exclude_documents!r}") from None
        if held and held[0] < 0:
            raise KnnlmError(f"exclude_documents must be document numbers (>= 0), got {held[0]}")
        object.__setattr__(self, "exclude_documents", held)


_SEARCH = ("k", "temperature", "index", "nprobe", "rerank")  # what the targets take of a RetrievalSettings
_FLAT = {**{name: "retrieval" for name in _SEARCH}, **{f.name: "targets" for f in dataclasses.fields(TargetSettings)}}


def _search_settings(retrieval, flat: dict) -> dict:
    """k, T, index, nprobe, rerank from a knnlm.RetrievalSettings (read by name: this layer
    does not import knnlm.run) and the flat keywords; its other fields must be left unset."""
    out = dict.fromkeys(_SEARCH)
    if retrieval is not None:
        if not dataclasses.is_dataclass(retrieval) or not all(hasattr(retrieval, f) for f in _SEARCH):
            raise TypeError(f"build_targets() retrieval must be a RetrievalSettings, got {type(retrieval).__name__}")
        for f in dataclasses.fields(retrieval):
            value = getattr(retrieval, f.name)
            if f.name in _SEARCH:
                out[f.name] = value
            elif value != f.default:
                raise KnnlmError(f"RetrievalSettings.{f.name} does not apply to memory targets")
    out.update((name, flat[name]) for name in _SEARCH if name in flat)
    out["k"] = DEFAULT_K if out["k"] is None else out["k"]
    out["temperature"] = DEFAULT_TEMPERATURE if out["temperature"] is None else out["temperature"]
    check_settings(temperature=out["temperature"], k=out["k"])
    if out["nprobe"] is not None and out["nprobe"] < 1:
        raise KnnlmError(f"nprobe must be >= 1, got {out['nprobe']}")
    return out


def build_targets(
    datastore: str | Path,
    out: str | Path,
    targets: TargetSettings | None = None,
    *,
    retrieval=None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    **flat,
) -> Path:
    """Compute the sparse p_kNN targets of every datastore entry (the first `limit` only,
    if given) into `out`; returns its path.  `targets`: what each target keeps and leaves
    out (TargetSettings); `retrieval`: a knnlm.RetrievalSettings with the search's k
    (default DEFAULT_K), temperature (DEFAULT_TEMPERATURE), index, nprobe and rerank.  The
    flat keywords of those fields (k=, temperature=, keep=, exclude=, chunk=, ...) are
    accepted too.  Memory is bounded by `chunk` queries at a time (keys read from the
    memmap, results written to memmaps)."""
    unknown = [name for name in flat if name not in _FLAT]
    if unknown:
        raise TypeError(f"build_targets() got an unexpected keyword argument {unknown[0]!r}")
    if targets is not None and not isinstance(targets, TargetSettings):
        raise TypeError(f"build_targets() targets must be a TargetSettings, got {type(targets).__name__}")
    search = _search_settings(retrieval, flat)
    targets = dataclasses.replace(targets or TargetSettings(),
                                  **{name: v for name, v in flat.items() if _FLAT[name] == "targets"})
    from tqdm.auto import tqdm

    out = Path(out)
    k, temperature = search["k"], search["temperature"]
    keep, exclude, chunk = targets.keep, targets.exclude, targets.chunk
    radius = exclusion_radius(exclude)
    if out.exists() and not overwrite:
        raise KnnlmError(f"{out} already exists (use --overwrite to replace it)")
    ds = open_corpus_datastore(datastore)
    left = ds.count - min(int(ds.docs[:, 1].max()) - 1, 2 * radius - 1)  # fewest entries a position may see
    if k > left:
        raise KnnlmError(f"k={k} is more than the {max(left, 0)} entries that leaving out each position's own "
                         f"(exclude {exclude!r}) may leave of {ds.path}")
    searcher = Searcher(ds, search["index"], nprobe=search["nprobe"], rerank=search["rerank"])
    held = list(targets.exclude_documents)
    if held and not held[-1] < len(ds.docs):
        raise KnnlmError(f"exclude_documents must be document numbers of {ds.path} (0..{len(ds.docs) - 1})")
    left_out = None
    if held:
        left_out = np.zeros(ds.count, dtype=bool)
        for d in held:
            left_out[int(ds.docs[d, 2]) : int(ds.docs[d, 2]) + int(ds.docs[d, 1]) - 1] = True
    n = ds.count if limit is None else max(0, min(int(limit), ds.count))
    signature = {"datastore_id": ds.id, "removed": ds.removed_documents.tolist(), "k": k, "temperature": temperature, "keep": keep, "exclude": exclude,
                 "search": searcher.settings(), "chunk": chunk, "count": n, "exclude_documents": held}
    partial = out.with_name(out.name + ".partial")
    progress_file = partial / "progress.json"
    done = 0
    if progress_file.exists():
        try:
            state = json.loads(progress_file.read_text())
        except ValueError:
            state = None
        if isinstance(state, dict) and state.get("signature") == signature and _intact(partial, n, keep):
            done = int(state["chunks_done"])
            LOG.warning("resuming the targets in %s from entry %d/%d", partial, min(done * chunk, n), n)
        else:
            LOG.warning("starting over: the unfinished targets in %s had other input or settings", partial)
    if done == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    mode = "r+" if done else "w+"
    ids = np.lib.format.open_memmap(partial / "ids.npy", mode=mode, dtype=np.int32, shape=(n, keep))
    probs = np.lib.format.open_memmap(partial / "probs.npy", mode=mode, dtype=np.float32, shape=(n, keep))
    mass = np.lib.format.open_memmap(partial / "mass.npy", mode=mode, dtype=np.float32, shape=(n,))
    chunks = range(0, n, chunk)
    bar = tqdm(total=n, initial=min(done * chunk, n), unit="pos", desc="targets", disable=not progress)
    t0 = time.perf_counter()
    try:
        for ci in range(done, len(chunks)):
            a = chunks[ci]
            z = min(a + chunk, n)
            entries = np.arange(a, z)
            q = np.asarray(ds.keys[a:z], dtype=np.float32)  # (m, d): the stored key IS the query
            d, i = search_excluding(searcher.search, ds.document_of, q, k, entries, ds.count, radius=radius,
                                    left_out=left_out)
            vals = np.asarray(ds.vals)[np.maximum(i, 0)]  # (m, k)
            ids[a:z], probs[a:z], mass[a:z] = sparse_knn_targets(d, i, vals, temperature, keep)
            for mm in (ids, probs, mass):
                mm.flush()
            write_json_atomic(progress_file, {"signature": signature, "chunks_done": ci + 1})
            bar.update(z - a)
            if on_chunk is not None:
                on_chunk(ci)
    except KeyboardInterrupt:
        raise KnnlmError(f"interrupted: the partial targets are kept in {partial}; run the same command to resume")
    finally:
        bar.close()
    mean_mass = float(np.asarray(mass, dtype=np.float64).mean()) if n else 0.0
    del ids, probs, mass
    meta = {
        "kind": "memory-targets",
        "format_version": FORMAT_VERSION,
        "knnlm_version": __version__,
        "id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "datastore": str(ds.path),
        "datastore_id": ds.id,
        "datastore_version": ds.version,
        "datastore_removed": ds.removed_documents.tolist(),  # left out of every target
        "corpora": ds.meta["corpora"],
        "tokens_sha256": ds.meta["sha256"].get("tokens.npy"),
        "count": n,
        "datastore_count": ds.count,
        "k": k,
        "temperature": temperature,
        "keep": keep,
        "exclude": exclude,
        "exclude_documents": held,
        "search": searcher.settings(),
        "mean_kept_mass": round(mean_mass, 6),
        "seconds": round(time.perf_counter() - t0, 2),
        "sha256": {name: file_sha256(partial / name) for name in _FILES},
    }
    write_json_atomic(partial / "meta.json", meta)
    progress_file.unlink(missing_ok=True)
    publish(partial, out)
    return out


def _intact(p: Path, n: int, keep: int) -> bool:
    try:
        shapes = [np.load(p / f, mmap_mode="r").shape for f in _FILES]
    except (ValueError, OSError, EOFError):
        return False
    return shapes == [(n, keep), (n, keep), (n,)]
