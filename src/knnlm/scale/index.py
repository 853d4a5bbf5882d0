"""One index over many shards: trained once, filled shard by shard.

An approximate index (IVF-PQ) is trained once, on a random sample of keys drawn from
all shards; each shard's keys are then added to a copy of that trained index (in
parallel on Ray where asked) and written to the shard's own `indexes/<name>/`, with the
trained index's sha256 in its index.json, so the shards' codes and distances are
comparable and their results merge exactly.  The sharded datastore's
`indexes/<name>/` holds the trained (empty) index and an index.json naming the manifest.
Searching reads each shard's index memory-mapped (see `Searcher(mmap=True)`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore, publish, write_json_atomic
from knnlm.core.index import build_index, index_target, train_index, train_sample_size
from knnlm.errors import KnnlmError
from knnlm.scale.manifest import ShardedDatastore

LOG = logging.getLogger(__name__)


def _add_shard(shard: str, trained_path: str, factory: str, name: str, nprobe: int, extra: dict) -> int:
    """Fill a copy of the trained index with one shard's keys; returns the keys added."""
    import faiss

    trained = faiss.read_index(trained_path) if trained_path else None
    ds = Datastore(shard)
    build_index(ds, factory, name=name, nprobe=nprobe, overwrite=True, progress=False, trained=trained, extra=extra)
    return ds.count


def build_sharded_index(ds: ShardedDatastore, kind: str = "auto", name: str | None = None,
                        train_size: int | None = None, nprobe: int = 32, overwrite: bool = False, seed: int = 0,
                        backend: str = "local", ray_address: str | None = None, progress: bool = True) -> Path:
    """Train once on a sample across shards, add every shard's keys; returns the index directory."""
    import faiss

    factory, name, final = index_target(ds, kind, name, overwrite)
    partial = final.with_name(name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    t0 = time.time()
    try:
        index = faiss.index_factory(ds.dim, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise KnnlmError(f"invalid FAISS factory string {factory!r}: {str(e).strip().splitlines()[-1]}") from None
    n_train, trained_path, extra = 0, "", {}
    if not index.is_trained:
        n_train = min(ds.count, train_size or train_sample_size(factory))
        sample = np.sort(np.random.default_rng(seed).choice(ds.count, size=n_train, replace=False))
        LOG.info("training %s once on %d keys from all %d shards", factory, n_train, len(ds.shards))
        xs = np.asarray(ds.keys[sample], dtype=np.float32)  # (n_train, d)
        try:
            train_index(index, xs, factory)
        except RuntimeError as e:
            raise KnnlmError(f"cannot train {factory} on {n_train} keys: {str(e).strip().splitlines()[-1]}") from None
        del xs
        trained_path = str(partial / "trained.faiss")
        faiss.write_index(index, trained_path)
        extra = {"trained_sha256": file_sha256(trained_path), "train_size": n_train, "sharded": ds.id}
    t_train = time.time() - t0
    shards = [str(s.path) for s in ds.shards]
    if backend == "ray":
        from knnlm.scale.cluster import session

        with session(ray_address) as ray:
            add = ray.remote(max_retries=3)(_add_shard)
            refs = [add.remote(s, trained_path, factory, name, nprobe, extra) for s in shards]
            ray.get(refs)
    else:
        for i, s in enumerate(shards):
            LOG.info("adding shard %d/%d to %s", i + 1, len(shards), name)
            _add_shard(s, trained_path, factory, name, nprobe, extra)
    info = {
        "factory": factory,
        "metric": "l2",
        "dim": ds.dim,
        "ntotal": ds.count,
        "train_size": n_train,
        "nprobe": nprobe,
        "rerank": factory != "Flat",
        "datastore_id": ds.id,
        "datastore_version": ds.version,
        "shards": [json.loads((Path(s) / "indexes" / name / "index.json").read_text())["datastore_id"]
                   for s in shards],
        "train_seconds": round(t_train, 2),
        "build_seconds": round(time.time() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"trained_sha256": extra["trained_sha256"]} if extra else {}),
    }
    write_json_atomic(partial / "index.json", info)
    publish(partial, final)
    return final
