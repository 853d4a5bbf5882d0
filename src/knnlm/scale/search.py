"""Search over a sharded datastore behind the `Searcher` interface.

Every shard is searched with today's `knnlm.core.index.Searcher` (its part of the index,
its keys memmap for re-ranking); the shards' top-k lists, with local ids shifted to
global ones, are merged exactly.  Shards are searched in this process (`backend="local"`)
or by Ray actors (`backend="ray"`, one actor per group of shards): an actor that dies is
restarted by Ray and the query retried; if it cannot be restarted the search fails with
a KnnlmError, never a smaller neighbour set.

`open_searcher(ds, ...)` gives the right searcher for either kind of datastore.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from knnlm.core.datastore import Datastore
from knnlm.core.index import (Searcher, distances_from_keys, index_info, live_ids, rerank_from_keys,
                              search_excluding)
from knnlm.errors import KnnlmError
from knnlm.scale.manifest import ShardedDatastore

LOG = logging.getLogger(__name__)


def open_searcher(ds, index: str | None = None, nprobe: int | None = None, rerank: bool | None = None,
                  device: str = "cpu", backend: str = "local", actors: int | None = None,
                  ray_address: str | None = None, mmap: bool | None = None):
    """The one way to get a searcher for an opened datastore (`open_datastore`): a
    ShardedSearcher for a sharded one; for a single one today's Searcher (memory-mapped
    with `mmap`), or the device searcher for index `torch` (knnlm.retrieval.device)."""
    if backend not in ("local", "ray"):
        raise KnnlmError(f"search backend must be local or ray, got {backend!r}")
    if isinstance(ds, ShardedDatastore):
        return ShardedSearcher(ds, index, nprobe=nprobe, rerank=rerank, backend=backend, actors=actors,
                               ray_address=ray_address, mmap=True if mmap is None else mmap)
    if backend == "ray":
        raise KnnlmError(f"{ds.path} is a single datastore: search it in process (shard it for Ray)")
    if mmap:
        return Searcher(ds, index, nprobe=nprobe, rerank=rerank, mmap=True)
    from knnlm.retrieval.device import open_searcher as open_single

    return open_single(ds, index, nprobe=nprobe, rerank=rerank, device=device)


def merge_topk(dists: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of several (m, k_i) result lists with global ids; equal distances in
    id order, so the result does not depend on how shards are grouped."""
    d = np.concatenate(dists, axis=1)  # (m, sum k_i)
    i = np.concatenate(ids, axis=1)
    if d.shape[1] < k:  # fewer candidates than k in all: pad as a short IVF probe does
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    order = np.lexsort((i, d), axis=-1)[:, :k]  # by distance, then id
    return np.take_along_axis(d, order, 1).astype(np.float32), np.take_along_axis(i, order, 1)


class ShardGroup:
    """Searches a group of shards and merges their results (global ids).  Used in
    process and as the body of a Ray actor."""

    def __init__(self, paths: Sequence[str], offsets: Sequence[int], index: str, nprobe: int | None,
                 rerank: bool | None, mmap: bool, trained: str | None = None, threads: int | None = None,
                 removed: Sequence[Sequence[int]] | None = None):
        if threads:
            try:
                import faiss

                faiss.omp_set_num_threads(threads)
            except ImportError:
                pass
        self.offsets = [int(o) for o in offsets]
        self.searchers = []
        for n, p in enumerate(paths):
            ds = Datastore(p)
            if removed:  # the manifest's removed documents of this shard (its own ids)
                ds.set_removed(set(ds.removed_documents.tolist()) | set(removed[n]))
            s = Searcher(ds, index, nprobe=nprobe, rerank=rerank, mmap=mmap)
            if trained is not None and s.info.get("trained_sha256") != trained:
                raise KnnlmError(f"the index {index!r} of shard {p} was trained apart from the other shards' "
                                 "(another training): rebuild the sharded index")
            self.searchers.append(s)
        self._crash = False

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._crash:
            os._exit(1)  # fault injection: the process dies in the middle of a search
        ds, ids = [], []
        for s, off in zip(self.searchers, self.offsets):
            d, i = s.search(queries, min(k, s.ds.count))
            ds.append(d)
            ids.append(np.where(i >= 0, i + off, -1))
        return merge_topk(ds, ids, k)

    def settings(self) -> dict:
        return self.searchers[0].settings()

    def pid(self) -> int:
        return os.getpid()

    def crash_during_next_search(self) -> None:
        """For fault-injection tests: the next search kills this process."""
        self._crash = True


class ShardedSearcher:
    """k-NN search over all shards of a sharded datastore, merged exactly; global ids."""

    def __init__(self, ds: ShardedDatastore, index: str | None = None, nprobe: int | None = None,
                 rerank: bool | None = None, backend: str = "local", actors: int | None = None,
                 ray_address: str | None = None, mmap: bool = True, retries: int = 3):
        self.ds, self.backend, self.retries = ds, backend, retries
        self.name, self.info = resolve_index(ds, index)
        trained = self.info.get("trained_sha256")
        n = len(ds.shards)
        groups = min(actors or n, n) if backend == "ray" else n
        self.groups = [list(range(g, n, groups)) for g in range(groups)]  # shards round-robin over groups
        gone = ds.shard_removed()
        args = [([str(ds.shards[s].path) for s in g], [int(ds.offsets[s]) for s in g], [gone[s] for s in g])
                for g in self.groups]
        # In process, the shards' approximate candidates (comparable: one training) are merged
        # first and only the k best re-ranked, as in one index; Ray actors re-rank their own.
        want = self.info.get("rerank", False) if rerank is None else rerank
        self._rerank = backend == "local" and want and self.info.get("factory") != "Flat"
        common = dict(index=self.name, nprobe=nprobe, rerank=False if self._rerank else rerank, mmap=mmap,
                      trained=trained)
        self._started_ray = False
        if backend == "local":
            self.parts = [ShardGroup(p, o, removed=r, **common) for p, o, r in args]
            self._settings = {**self.parts[0].settings(), "rerank": bool(want)}
        else:
            from knnlm.scale.cluster import connect, ray_module

            ray = ray_module()
            self._started_ray = connect(ray_address)
            actor = ray.remote(num_cpus=0, max_restarts=retries, max_task_retries=retries)(ShardGroup)
            threads = max(1, (os.cpu_count() or 1) // groups)
            self.parts = [actor.remote(p, o, threads=threads, removed=r, **common) for p, o, r in args]
            self._settings = self._get(0, self.parts[0].settings.remote())
        LOG.info("sharded search over %d shards (%s, %d group(s))", n, backend, len(self.groups))

    def settings(self) -> dict:
        return {**self._settings, "shards": len(self.ds.shards), "backend": self.backend,
                "groups": len(self.groups)}

    def search(self, queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """dists (m, k) float32 ascending, ids (m, k) int64 global entry ids; as Searcher.search
        (`exclude`: each query's own global entry id, -1 none; see search_excluding)."""
        if k > self.ds.count:
            raise KnnlmError(f"k={k} is larger than the datastore ({self.ds.count} entries)")
        if exclude is not None:
            return search_excluding(self.search, self.ds.document_of, queries, k, exclude, self.ds.count)
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (m, d)
        if self.backend == "local":
            results = [p.search(q, k) for p in self.parts]
        else:
            import ray

            ref = ray.put(q)
            pending = [p.search.remote(ref, k) for p in self.parts]
            results = [self._get(g, r, lambda g=g: self.parts[g].search.remote(ref, k))
                       for g, r in enumerate(pending)]
        d, i = merge_topk([d for d, _ in results], [i for _, i in results], k)
        if self._rerank:
            d, i = rerank_from_keys(self.ds.keys, self.ds.to_key_space(q), i)
        return d, i

    def exact(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact squared L2 distances (m, c) float32 to the global entries ids (m, c); inf where -1
        or removed (a removed entry is as far as none)."""
        return distances_from_keys(self.ds.keys, self.ds.to_key_space(queries), live_ids(self.ds, ids))

    def _get(self, g: int, ref, again=None):
        """ray.get with the actor's death turned into a retry (Ray restarts it), then an error."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(self.retries + 1):
            try:
                return ray.get(ref)
            except (RayActorError, ActorUnavailableError) as e:
                if again is None or attempt == self.retries:
                    shards = ", ".join(str(s) for s in self.groups[g])
                    raise KnnlmError(f"the search actor of shard(s) {shards} died and could not be restarted "
                                     f"({type(e).__name__}); no result rather than fewer neighbours") from None
                LOG.warning("search actor of shard group %d died; retrying (%d/%d)", g, attempt + 1, self.retries)
                ref = again()

    def close(self) -> None:
        if self.backend == "ray":
            import ray

            for p in self.parts:
                ray.kill(p, no_restart=True)
            if self._started_ray:
                ray.shutdown()
        self.parts = []


def resolve_index(ds: ShardedDatastore, name: str | None) -> tuple[str, dict]:
    """The sharded index `name` (or the only one) and its index.json, checked to be this datastore's."""
    name, _, info = index_info(ds, name)
    return name, info
