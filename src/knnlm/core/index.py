"""FAISS indexes over a datastore's keys, and search with exact re-ranking.

An index lives in `<datastore>/indexes/<name>/` as `index.faiss` + `index.json`; the
json records its format version, the datastore id it was built for (loading refuses any
other) and index.faiss's sha256 (checked by `verify_indexes`, `knnlm info --verify`: a
flipped byte in the codes reads without error).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np

from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore, publish
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1  # index.json's; one without (built before it was recorded) reads as 1
FLAT_BELOW = 100_000  # `auto`: exact search below this many entries, IVF-PQ above
# A Flat index answers fewer queries than this at once (generation: one per sequence) by a
# scan of the stored float16 keys (`fp16_index`) instead of its float32 copy: the same exact
# distances from half the bytes (4.4x faster at 46k entries, one query, k = 1024, 2 CPU cores;
# benchmarks/results/generate-fewer.md).  From this many on (evaluation) FAISS's float32 Flat
# index computes them with matrix products (BLAS), much faster for a batch.  FAISS itself
# switches at the same size (its distance_compute_blas_threshold): below, distances are summed
# one key at a time in both ways.  Memory-mapped (sharded) searchers keep the Flat index.
FEW_QUERIES = 20
# Re-ranking copies the stored float16 keys into RAM (a FAISS index over them) up to this
# size; larger keys (a 10^7-entry datastore of 576-dim keys: 12.6 GB) are re-ranked from
# the memory-mapped file instead: only each query's candidate rows are read, the page cache
# keeps what is read often, and the search process stays small.
KEYS_IN_RAM_MAX = 2 << 30


# From this many IVF lists on, `auto` gives the index an HNSW32 coarse quantizer: adding a key
# to a flat one costs a distance to every list (576-d novels keys, PQ64, 2 CPU cores: 186 s
# per 10^6 keys at 16,384 lists, 527 s at 65,536) where a graph walk costs 80 s and 99 s
# (benchmarks/results/quantizer.md); the same recall at 10^6 (novels.md).
HNSW_QUANTIZER_FROM = 8192


def auto_factory(count: int, dim: int) -> str:
    """`Flat` for small datastores; else IVF (about 4 sqrt(N) lists; an HNSW32 coarse
    quantizer from HNSW_QUANTIZER_FROM lists on) with PQ codes of up to 64 bytes (paper:
    IVF4096,PQ64 for 103M entries).  Measured on 1.1e7 novels entries against exact search
    (benchmarks/results/novels.md): IVF16384_HNSW32,PQ64 at nprobe 32 within 0.1% of exact
    perplexity; 65,536 lists lower recall and slower, PQ32 the same perplexity, lower recall."""
    if count < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(count))))
    m = max(m for m in range(1, 65) if dim % m == 0)
    return f"IVF{nlist}{'_HNSW32' if nlist >= HNSW_QUANTIZER_FROM else ''},PQ{m}"


# k-means points per IVF list when training: FAISS asks for at least 39 and samples 256 at
# most; 64 gives the same lists at a quarter of 256's training time.  Product quantizers need
# 256 points per centroid of each sub-quantizer: 65,536.
TRAIN_PER_LIST = 64
TRAIN_PQ = 65_536


def train_sample_size(factory: str) -> int:
    """Keys to train the index `factory` on: 64 per IVF list, at least 65,536."""
    m = re.search(r"IVF(\d+)", factory)
    return max(TRAIN_PQ, TRAIN_PER_LIST * int(m.group(1))) if m else TRAIN_PQ


# From this many IVF lists on, the coarse quantizer's k-means runs in two levels (sqrt(nlist)
# clusters, then each split in proportion to its points): a cost of N x 2 sqrt(nlist) distances
# an iteration instead of N x nlist (16,384 lists: 256 instead of 16,384 distances per key and
# iteration).  Indexes with a transform in front (PCA, OPQ) train as FAISS does.
TWO_LEVEL_FROM = 8192


def train_index(index, xs: np.ndarray, factory: str) -> None:
    """Train the empty FAISS `index` of `factory` on the keys `xs` (float32, (n, d)); IVF
    indexes of TWO_LEVEL_FROM lists or more get their coarse centroids by two-level k-means
    (faiss.contrib.clustering), the rest (PQ codebooks on the residuals) as FAISS trains it."""
    faiss = _faiss()
    ivf = faiss.downcast_index(index)
    if isinstance(ivf, faiss.IndexIVF) and ivf.nlist >= TWO_LEVEL_FROM and ivf.metric_type == faiss.METRIC_L2:
        from faiss.contrib.clustering import two_level_clustering

        LOG.info("two-level k-means: %d lists on %d keys", ivf.nlist, len(xs))
        # min_points_per_centroid=1: a small first-level cluster splits without FAISS's warning
        centroids, _ = two_level_clustering(xs, int(math.sqrt(ivf.nlist)), ivf.nlist, min_points_per_centroid=1)
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)
    index.train(xs)


def index_name(factory: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", factory.lower()).strip("-")


def index_target(ds, kind: str, name: str | None, overwrite: bool) -> tuple[str, str, Path]:
    """(FAISS factory, index name, its directory) of a new index of `ds` ("auto": by size);
    refuses to replace an existing one unless `overwrite`."""
    factory = auto_factory(ds.count, ds.dim) if kind == "auto" else kind
    if factory.lower() == "flat":
        factory = "Flat"
    name = name or index_name(factory)
    final = ds.path / "indexes" / name
    if final.exists() and not overwrite:
        raise KnnlmError(f"index {final} already exists (use --overwrite to replace it)")
    return factory, name, final


def _faiss():
    import faiss

    return faiss


def build_index(
    ds: Datastore,
    kind: str = "auto",
    name: str | None = None,
    train_size: int | None = None,
    nprobe: int = 32,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    chunk: int = 8192,  # ADD_CHUNK
    trained=None,
    extra: dict | None = None,
) -> Path:
    """Train (on a random sample of keys: `train_size`, by default `train_sample_size`) and
    fill a FAISS index; returns its directory.

    `trained`: an already trained empty index of the factory `kind` to fill instead (one
    training shared by the shards of a sharded datastore); `extra`: more index.json fields.
    """
    from tqdm.auto import tqdm

    factory, name, final = index_target(ds, kind, name, overwrite)
    index = _faiss().clone_index(trained) if trained is not None else new_index(ds.dim, factory)
    t0 = time.time()
    n_train = 0
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n_train = min(ds.count, train_size or train_sample_size(factory))
        sample = np.sort(rng.choice(ds.count, size=n_train, replace=False))
        train_sample(index, factory, ds.read_keys(sample))  # only the sample in memory, however large the datastore
    bar = tqdm(total=ds.count, unit="key", desc=f"index {name}", disable=not progress)
    for _, keys in ds.iter_keys(chunk):  # chunk: see ADD_CHUNK
        index.add(keys.astype(np.float32))
        bar.update(len(keys))
    bar.close()
    info = _index_record(index, factory, ds.dim, n_train, "random", nprobe, ds.id, int(getattr(ds, "version", 0)),
                        time.time() - t0, extra)
    tmp = final.with_name(name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_index(index, info, tmp)
    publish(tmp, final)
    return final


def new_index(dim: int, factory: str):
    """An empty FAISS index of `factory` (L2) over `dim`-d keys."""
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise KnnlmError(f"invalid FAISS factory string {factory!r}: {str(e).strip().splitlines()[-1]}") from None


def train_sample(index, factory: str, keys: np.ndarray) -> None:
    """`train_index` on `keys` (n, d), converted to float32 here; FAISS's errors as KnnlmError."""
    LOG.info("training %s on %d keys", factory, len(keys))
    xs = np.asarray(keys, dtype=np.float32)
    try:
        train_index(index, xs, factory)
    except RuntimeError as e:
        raise KnnlmError(f"cannot train {factory} on {len(xs)} keys: {str(e).strip().splitlines()[-1]}") from None


def _index_record(index, factory: str, dim: int, n_train: int, sample: str, nprobe: int, datastore_id: str,
                 datastore_version: int, seconds: float, extra: dict | None = None) -> dict:
    """index.json's fields (all but the sha256 `write_index` adds).  `sample`: which keys
    trained it, "random" (a uniform sample of all) or "first" (the build's first keys);
    None where this index was not trained here (Flat, or a shared trained index)."""
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "factory": factory,
        "metric": "l2",
        "dim": dim,
        "ntotal": int(index.ntotal),
        "train_size": n_train,
        "train_sample": sample if n_train else None,
        "nprobe": nprobe,
        "rerank": factory != "Flat",
        "datastore_id": datastore_id,
        "datastore_version": datastore_version,
        "build_seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def write_index(index, info: dict, directory: Path) -> None:
    """index.faiss and index.json (with index.faiss's sha256) into a new `directory`."""
    directory.mkdir(parents=True)
    _faiss().write_index(index, str(directory / "index.faiss"))
    info["sha256"] = file_sha256(directory / "index.faiss")
    (directory / "index.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# Keys added to an index at once: FAISS encodes a chunk with PQ distance tables of chunk x M x
# 256 floats (65,536 keys at PQ64: 4.3 GB; 8,192: 0.5 GB), measured as the peak of a build.
ADD_CHUNK = 8192


def list_indexes(ds: Datastore) -> list[str]:
    root = ds.path / "indexes"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()  # (not one being written, or replaced: never read as complete)
                  if (p / "index.json").exists() and not p.name.endswith((".partial", ".old")))


def index_info(ds: Datastore, name: str | None = None) -> tuple[str, Path, dict]:
    """(name, directory, index.json) of a datastore's index (its only one if `name` is
    None), checked to belong to this datastore; reads no FAISS file, so a command can
    refuse a wrong index before it loads a model."""
    names = list_indexes(ds)
    if name is None:
        if len(names) != 1:
            raise KnnlmError(
                f"datastore {ds.path} has {'no index' if not names else 'several indexes: ' + ', '.join(names)};"
                + (" build one with `knnlm index`" if not names else " pick one with --index")
            )
        name = names[0]
    d = ds.path / "indexes" / name
    if not (d / "index.json").exists():
        raise KnnlmError(f"no index {name!r} in {ds.path} (have: {', '.join(names) or 'none'})")
    try:
        info = json.loads((d / "index.json").read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise KnnlmError(f"corrupted index.json in {d}: {e}") from None
    version = info.get("format_version", INDEX_FORMAT_VERSION)
    if version != INDEX_FORMAT_VERSION:
        raise KnnlmError(f"index format {version} is not supported (this knnlm reads {INDEX_FORMAT_VERSION}): "
                         f"{d / 'index.json'}")
    if info.get("datastore_id") != ds.id:
        raise KnnlmError(
            f"index {d} was built for datastore {info.get('datastore_id')}, not for {ds.path} ({ds.id});"
            " rebuild it with `knnlm index --overwrite`"
        )
    return name, d, info


def verify_indexes(ds) -> list[str]:
    """Check every index of `ds` (each shard's too) against the sha256 its index.json
    records; returns the index files checked.  (A Flat index.faiss with a flipped byte
    reads without error and answers wrongly: only this finds it.)"""
    checked = []
    for part in [ds, *getattr(ds, "shards", [])]:
        for name in list_indexes(part):
            d = part.path / "indexes" / name
            _, _, info = index_info(part, name)
            for file, key in (("index.faiss", "sha256"), ("trained.faiss", "trained_sha256")):
                if key not in info or file == "trained.faiss" and not (d / file).exists():
                    continue  # (a shard's index records the trained index's sum; the sharded one holds it)
                if not (d / file).exists():
                    raise KnnlmError(f"index file missing: {d / file}")
                if file_sha256(d / file) != info[key]:
                    raise KnnlmError(f"{d / file} does not match its checksum: the index is corrupted "
                                     "(rebuild it with `knnlm index --overwrite`)")
                checked.append(str(d / file))
    return checked


def index_file(d: Path, ds) -> Path:
    """The FAISS file of index directory `d` for this version of the datastore: an addition
    (knnlm.core.edit) writes `index-v<version>.faiss` before it commits, and renames it to
    `index.faiss` after."""
    edited = d / f"index-v{getattr(ds, 'version', 0)}.faiss"
    return edited if edited.exists() else d / "index.faiss"


class Searcher:
    """k-nearest-neighbour search over one datastore, with exact re-ranking of the
    retrieved candidates from the full-precision keys (default for approximate indexes).

    With `mmap`, an IVF index's inverted lists stay in its file (memory-mapped, FAISS
    IO_FLAG_MMAP) and re-ranking reads the candidates' keys from the keys memmap, so the
    process holds only the coarse quantizer and codebooks: an index larger than RAM.
    Without it, keys larger than KEYS_IN_RAM_MAX are still re-ranked from the memmap.
    """

    def __init__(self, ds: Datastore, name: str | None = None, nprobe: int | None = None,
                 rerank: bool | None = None, mmap: bool = False):
        self.ds = ds
        name, d, self.info = index_info(ds, name)
        faiss = _faiss()
        try:
            flags = faiss.IO_FLAG_MMAP if mmap and self.info.get("factory") != "Flat" else 0
            self.index = faiss.read_index(str(index_file(d, ds)), flags)
        except RuntimeError as e:
            raise KnnlmError(f"cannot read {index_file(d, ds)}: {str(e).strip().splitlines()[-1]}") from None
        if self.index.ntotal != ds.count:
            raise KnnlmError(f"index {d} holds {self.index.ntotal} keys, the datastore {ds.count}")
        self.name = name
        self.nprobe = int(nprobe if nprobe is not None else self.info.get("nprobe", 32))
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = self.nprobe
        else:
            try:
                faiss.extract_index_ivf(self.index).nprobe = self.nprobe
            except (RuntimeError, AttributeError):
                pass
        self.rerank = self.info.get("rerank", False) if rerank is None else rerank
        self._refine = None
        self.scan_few = self.info["factory"] == "Flat" and not mmap  # FEW_QUERIES: the float16 scan
        self._fp16 = None
        from_file = mmap or ds.keys.nbytes > KEYS_IN_RAM_MAX
        self._rerank_keys = self.rerank and self.info["factory"] != "Flat" and from_file
        if self.rerank and self.info["factory"] != "Flat" and not from_file:
            # faiss re-ranks the k candidates of the approximate index with exact distances
            # to the stored float16 keys (a scalar quantizer whose codes ARE those keys).
            self._exact = fp16_index(ds.keys)
            self._refine = faiss.IndexRefine(self.index, self._exact)
            self._refine.k_factor = 1.0

    def settings(self) -> dict:
        return {"index": self.name, "factory": self.info["factory"], "nprobe": self.nprobe, "rerank": self.rerank}

    def search(self, queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """dists (m, k) float32 squared L2, ascending, and ids (m, k) int64 (row numbers).

        Missing neighbours (an IVF probe found fewer than k) have id -1 and distance inf.
        `exclude` (m,): each query's own entry id (-1: none); the entries of its document
        within EXCLUDE_RADIUS of it are left out (leave-own-document-out, see `search_excluding`).
        """
        if k > self.ds.count:
            raise KnnlmError(f"k={k} is larger than the datastore ({self.ds.count} entries)")
        if exclude is not None or self.ds.removed is not None:
            return search_live(self._search, self.ds, queries, k, exclude)
        return self._search(queries, k)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`search` over every entry of the index, removed ones included."""
        q = np.ascontiguousarray(self.ds.to_key_space(queries))  # (m, d) float32; refuses another d
        if self.scan_few and len(q) < FEW_QUERIES:
            if self._fp16 is None:  # made on first use (N x d x 2 bytes more RAM); batches never need it
                self._fp16 = fp16_index(self.ds.keys)
            dists, ids = self._fp16.search(q, k)
        else:
            dists, ids = (self._refine or self.index).search(q, k)
        if self._rerank_keys:
            dists, ids = rerank_from_keys(self.ds.keys, q, ids)
        return np.where(ids < 0, np.inf, dists).astype(np.float32), ids

    def exact(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact squared L2 distances (m, c) float32 from each query (m, d) to the entries
        ids (m, c) (their stored float16 keys); inf where an id is -1 or a removed entry (so
        pointers never follow one)."""
        return distances_from_keys(self.ds.keys, self.ds.to_key_space(queries), live_ids(self.ds, ids))


# Leave-own-document-out: a whole document up to this many entries (a jsonl article); inside a
# longer document (a .txt file is one stream) the entries within this distance of the query.
# 8192 rather than 2048: on WikiText-2 (one .txt stream, articles of ~4k tokens) the smaller
# radius left the rest of the query's article in, and self-tuning chose lambda 0.2 where 0.1
# was best on the test text (benchmarks/results/defaults.md).
EXCLUDE_RADIUS = 8192


def live_ids(ds, ids: np.ndarray) -> np.ndarray:
    """ids (any shape) with the entries of removed documents turned into -1."""
    ids = np.asarray(ids, dtype=np.int64)
    if ds.removed is None:
        return ids
    return np.where((ids >= 0) & ds.removed[np.maximum(ids, 0)], -1, ids)


def search_live(search, ds, queries: np.ndarray, k: int,
                exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`search_excluding` over a backend's plain `search`, leaving out the entries of the
    datastore's removed documents (`ds.removed`) and, with `exclude`, each query's own
    neighbourhood.  With r removed entries and no `exclude`, the first fetch is k + r (up
    to 2k), so an exact index answers in one round what a datastore without them would."""
    removed = ds.removed
    n_removed = ds.count - ds.live if removed is not None else 0
    own = np.full(len(queries), -1, dtype=np.int64) if exclude is None else exclude
    first = k + n_removed if exclude is None and n_removed <= k else None
    return search_excluding(search, ds.document_of, queries, k, own, ds.count, first=first, left_out=removed)


def search_excluding(search, document_of, queries: np.ndarray, k: int, own: np.ndarray, count: int,
                     radius: int = EXCLUDE_RADIUS, first: int | None = None,
                     left_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest entries of each query, leaving out its own neighbourhood.

    search(queries, n) -> (dists, ids) is any backend's plain search (global ids);
    document_of(ids) maps entry ids (>= 0) to document ids; own (m,) is each query's
    own entry id (-1: leave nothing out).  Left out: entries of the same document less
    than `radius` entries from `own` -- so, for documents up to `radius` entries, the
    whole document.  Each query over-fetches (2k at first), drops what is left out and
    keeps the k nearest left; a query still short of k asks again for four times as
    many, up to the whole datastore or until the backend returns fewer than asked (an
    IVF index sees only its probed lists), so the result equals a search over the datastore
    without those entries, whatever the backend.  Rows that run out end in -1 / inf.
    `left_out` (count,) bool: entries left out of every query's neighbours as well.
    """
    queries = np.asarray(queries)
    own = np.asarray(own, dtype=np.int64)  # (m,)
    own_doc = np.where(own >= 0, document_of(np.maximum(own, 0)), -1)  # (m,)
    m = len(queries)
    out_d = np.full((m, k), np.inf, dtype=np.float32)
    out_i = np.full((m, k), -1, dtype=np.int64)
    todo = np.arange(m)
    fetch = min(count, first or 2 * k)
    while len(todo):
        d, i = search(queries[todo], fetch)  # (t, fetch)
        real = i >= 0
        near = np.zeros(i.shape, dtype=bool)
        rows = np.nonzero(real)[0]
        if (own >= 0).any():
            near[real] = (document_of(i[real]) == own_doc[todo][rows]) & (np.abs(i[real] - own[todo][rows]) < radius)
        if left_out is not None:
            near[real] |= left_out[i[real]]
        keep = real & ~near
        exhausted = ~real.all(axis=1)  # the backend found fewer than asked (IVF probes): more would not help
        done = (keep.sum(1) >= k) | (fetch >= count) | exhausted
        for row in np.nonzero(done)[0]:
            sel = np.nonzero(keep[row])[0][:k]
            out_d[todo[row], : len(sel)], out_i[todo[row], : len(sel)] = d[row, sel], i[row, sel]
        todo = todo[~done]
        fetch = min(count, fetch * 4)
    return out_d, out_i


def distances_from_keys(keys, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact squared L2 distances (m, k) float32 of each query (m, d) float32 to its entries ids
    (m, k), inf where an id is -1.  `keys`: an (N, d) array or memmap, or the rows of several
    (an object with `parts` and `offsets`: a sharded datastore's keys); only the ids' rows are read.

    Each chunk of queries has its candidates' rows gathered by torch over the mapped file and
    cast to float32 into one reused buffer (exact: every float16 is a float32; numpy's cast was
    5-10x slower), and each query's distances to its own rows come from FAISS
    (`fvec_L2sqr_by_idx`, SIMD).  Rows are read as the candidates name them: on the novels'
    10^7 datastore 92% of a chunk's candidates are distinct, and finding the repeats to read
    each row once cost more than reading them (0.5-0.9 against 0.3 ms a query).  Gathering and
    summing this way took evaluation there from 0.39x to 0.54x the LM's tokens/s (docs/scale.md)."""
    import torch

    faiss = _faiss()
    m, k = ids.shape
    d = keys.shape[1]
    parts = [_as_tensor(p) for p in getattr(keys, "parts", [keys])]
    offsets = np.asarray(getattr(keys, "offsets", [0, keys.shape[0]]), dtype=np.int64)
    dists = np.full((m, k), np.inf, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    step = max(1, (1 << 24) // max(1, k * d))  # queries per chunk: <= 2^24 float32 key values at once (64 MB)
    buf = torch.empty((min(m, step) * k, d), dtype=torch.float32)  # the chunk's candidates' rows, float32
    pos = np.arange(min(m, step) * k, dtype=np.int64)  # query j's candidates: rows j*k .. j*k+k-1
    out = np.empty((min(m, step), k), dtype=np.float32)
    for a in range(0, m, step):
        i = np.asarray(ids[a : a + step], dtype=np.int64)
        real = i >= 0
        flat = np.where(real, i, 0).reshape(-1)  # a missing candidate reads row 0, its distance set to inf
        x = buf[: len(flat)]
        if len(parts) == 1:
            x.copy_(torch.index_select(parts[0], 0, torch.from_numpy(flat)))
        else:
            part = np.searchsorted(offsets, flat, side="right") - 1
            for p, source in enumerate(parts):
                at = np.flatnonzero(part == p)
                if len(at):
                    rows = torch.index_select(source, 0, torch.from_numpy(flat[at] - offsets[p]))
                    x[torch.from_numpy(at)] = rows.to(torch.float32)
        o = out[: len(i)]
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(o), faiss.swig_ptr(q[a : a + len(i)]), faiss.swig_ptr(x.numpy()),
                                faiss.swig_ptr(pos), d, len(i), k)
        dists[a : a + step] = np.where(real, o, np.inf)
    return dists


def rerank_from_keys(keys, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidates ids (m, k) of each query (m, d) float32 with their exact squared L2
    distances from `keys` (see distances_from_keys), sorted ascending; -1 stays last."""
    dists = distances_from_keys(keys, queries, ids)
    order = np.argsort(dists, axis=1, kind="stable")
    return np.take_along_axis(dists, order, 1), np.take_along_axis(ids, order, 1)


def _as_tensor(keys: np.ndarray):
    """A torch view of `keys` (N, d), no copy: a read-only memmap is shared as it is (torch's
    warning that it cannot mark the tensor read-only is silenced; nothing writes to it)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(keys))


def fp16_index(keys: np.ndarray):
    """An exact float16 flat index over `keys` (N, d) float16, filled by copying their bytes."""
    faiss = _faiss()
    n, d = keys.shape
    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    codes = np.ascontiguousarray(keys, dtype=np.float16).view(np.uint8).reshape(-1)  # (N * d * 2,)
    faiss.copy_array_to_vector(codes, index.codes)
    index.ntotal = n
    return index
