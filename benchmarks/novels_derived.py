"""Datastores made from the novels datastore for the variants phase: its keys reduced by PCA
(`knnlm reduce --pca`), and its entries split into shards (`knnlm shard`), each with the index
`knnlm build` would pick.  Each is made once, beside its source, step by step (a stopped run
goes on at the first step not done), and recorded with the time of every step and its bytes
on disk in derived-<size>.json of the cache.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

LOG = logging.getLogger("bench_novels")

# name -> what it is; PCA to 144 dimensions kept the perplexity of exact search on WikiText-2
# (results/datastore-size.md), 4 shards are what the out-of-core run searched
DERIVED = {"pca144": "keys reduced from 576 to 144 dimensions by PCA, its own index and self-tuned settings",
           "shards4": "the same entries in 4 shards cut at novel boundaries, one index trained for all shards"}


def derived_path(ds_path: Path, name: str) -> Path:
    return ds_path.with_name(f"{ds_path.name}-{name}")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_derived(lm, ds_path: Path, name: str, record: Path) -> Path:
    """The datastore `name` of DERIVED made from `ds_path` (the steps not yet done), its record
    (seconds per step, entries, dimension, index, bytes) saved in `record`."""
    from knnlm.core.index import index_info, list_indexes
    from knnlm.scale import open_datastore

    if name not in DERIVED:
        raise ValueError(f"no derived datastore {name!r} (known: {', '.join(DERIVED)})")
    out = derived_path(ds_path, name)
    rows = json.loads(record.read_text("utf-8")) if record.exists() else {}
    row = rows.setdefault(name, {"what": DERIVED[name], "seconds": {}})

    def save() -> None:
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n", "utf-8")
        tmp.replace(record)

    def step(what: str, fn) -> None:
        t0 = time.perf_counter()
        LOG.info("%s: %s", out.name, what)
        fn()
        row["seconds"][what] = round(time.perf_counter() - t0, 1)
        save()

    pca = name.startswith("pca")
    if not (out / "meta.json").exists() and not (out / "manifest.json").exists():
        step("copy", lambda: _copy(ds_path, out, name))
    ds = open_datastore(out)
    if not list_indexes(ds):
        step("index", lambda: _index(ds, pca))
        ds = open_datastore(out)
    if pca and not ds.settings:  # distances of 144 dimensions: λ and T tuned again; shards keep the source's
        from knnlm.run.selftune import self_tune

        step("self-tune", lambda: self_tune(lm, ds, progress=False))
        ds = open_datastore(out)
    row.update(entries=ds.count, dim=ds.dim, factory=index_info(ds)[2]["factory"], bytes=dir_bytes(out),
               variance_kept=ds.meta.get("reduction", {}).get("variance_kept") if pca else None)
    save()
    return out


def _copy(ds_path: Path, out: Path, name: str) -> None:
    from knnlm.core.datastore import Datastore

    if name.startswith("pca"):
        from knnlm.retrieval.reduce import reduce_datastore

        reduce_datastore(Datastore(ds_path), out, int(name[3:]))
    else:
        from knnlm.scale.split import split_datastore

        split_datastore(ds_path, out, int(name[6:]))


def _index(ds, pca: bool) -> None:
    if pca:
        from knnlm.core.index import build_index

        build_index(ds, "auto", progress=False)
    else:
        from knnlm.scale.index import build_sharded_index

        build_sharded_index(ds, "auto", progress=False)
