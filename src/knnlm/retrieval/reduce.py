"""Smaller datastores: keys reduced to fewer dimensions (PCA), and near-duplicate entries
merged (pruning).  Each writes a new datastore beside the source, which is left as it is.

PCA: the mean and the top `dim` principal directions of a sample of keys are saved with
the new datastore (`reduction.npz`) and recorded in its meta.json ("reduction"); its keys
are (key - mean) @ components.T in float16.  Searching it takes the model's keys, which
it transforms itself (`Datastore.to_key_space`); queries of any other dimension, already
reduced ones included, are refused, and an un-reduced datastore refuses reduced queries.

Pruning: entries with the same value whose keys lie within squared distance `radius` of
an earlier kept entry are merged into it (greedy, in entry order, per value); a kept
entry keeps its own key and provenance (`origin.npy`: its entry id in the source) and
counts for the entries merged into it (`counts.npy`), weighing count * exp(-d / T) in
p_kNN.  Pointers (RetoMaton) need the full entry order and refuse a pruned datastore.

Both publish like a build: written under `<out>.partial/`, checksummed, renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from knnlm import __version__
from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import _FILES, KEY_DTYPE, Datastore, publish, write_json_atomic
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

_SHARED = ("vals.npy", "tokens.npy", "docs.npy", "docs.jsonl")  # what a reduced datastore copies unchanged


def fit_pca(sample: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """mean (d,), components (dim, d) float32 (rows: principal directions, largest
    variance first) and the share of variance they keep, from a sample (n, d)."""
    x = np.asarray(sample, dtype=np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)  # (d, d)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(evals)[::-1][:dim]
    kept = float(evals[order].sum() / evals.sum()) if evals.sum() > 0 else 1.0
    comp = evecs[:, order].T  # (dim, d)
    comp *= np.where(comp[np.arange(dim), np.abs(comp).argmax(1)] < 0, -1.0, 1.0)[:, None]  # a fixed sign
    return mean.astype(np.float32), comp.astype(np.float32), kept


def _start(ds: Datastore, out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise KnnlmError(f"{out} already exists (use --overwrite to replace it)")
    if out.resolve() == ds.path.resolve():
        raise KnnlmError("the reduced datastore must go to a new directory, not over its source")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _finish(ds: Datastore, partial: Path, out: Path, files: list[str], **changes) -> Path:
    meta = {k: v for k, v in ds.meta.items() if k not in ("settings", "sha256")}  # tuned settings: for the source
    meta.update(id=uuid.uuid4().hex, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                knnlm_version=__version__, source={"path": str(ds.path), "id": ds.id}, **changes)
    meta["sha256"] = {name: file_sha256(partial / name) for name in files}
    write_json_atomic(partial / "meta.json", meta)
    publish(partial, out)
    return out


def reduce_datastore(ds: Datastore, out: str | Path, dim: int, sample: int = 200_000, seed: int = 0,
                     chunk: int = 65536, overwrite: bool = False) -> Path:
    """A copy of `ds` with its keys reduced by PCA to `dim` dimensions (see the module doc)."""
    out = Path(out)
    if ds.reduction or ds.pruning:
        raise KnnlmError(f"{ds.path} is already reduced or pruned: reduce its source instead")
    if not 1 <= dim < ds.dim:
        raise KnnlmError(f"a PCA reduction needs 1 <= dim < {ds.dim} (the keys' dimension), got {dim}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ds.count, size=min(sample, ds.count), replace=False))
    mean, comp, kept = fit_pca(np.asarray(ds.keys[rows], dtype=np.float32), dim)
    LOG.info("PCA %d -> %d keeps %.1f%% of the variance (fit on %d keys)", ds.dim, dim, 100 * kept, len(rows))
    partial = _start(ds, out, overwrite)
    np.savez(partial / "reduction.npz", mean=mean, components=comp)
    keys = np.lib.format.open_memmap(partial / "keys.npy", mode="w+", dtype=KEY_DTYPE, shape=(ds.count, dim))
    for a in range(0, ds.count, chunk):
        keys[a : a + chunk] = (np.asarray(ds.keys[a : a + chunk], dtype=np.float32) - mean) @ comp.T
    keys.flush()
    del keys
    for name in _SHARED:
        shutil.copyfile(ds.path / name, partial / name)
    reduction = {"method": "pca", "from_dim": ds.dim, "dim": dim, "file": "reduction.npz",
                 "variance_kept": round(kept, 6), "fit_sample": len(rows)}
    return _finish(ds, partial, out, list(_FILES) + ["reduction.npz"], dim=dim, reduction=reduction)


def prune_datastore(ds: Datastore, out: str | Path, radius: float, overwrite: bool = False) -> Path:
    """A copy of `ds` where entries with the same value within squared L2 `radius` of an
    earlier kept entry are merged into it (see the module doc)."""
    import faiss

    out = Path(out)
    if ds.pruning:
        raise KnnlmError(f"{ds.path} is already pruned")
    if not radius >= 0:
        raise KnnlmError(f"the pruning radius must be >= 0, got {radius}")
    vals = np.asarray(ds.vals)
    order = np.argsort(vals, kind="stable")  # entries grouped by value, in entry order within a group
    bounds = np.flatnonzero(np.diff(vals[order])) + 1
    owner = np.arange(ds.count)  # the kept entry each entry is merged into
    for group in np.split(order, bounds):
        if len(group) < 2:
            continue
        x = np.asarray(ds.keys[group], dtype=np.float32)  # (g, d)
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        lims, _, nbr = index.range_search(x, float(radius))  # pairs within the radius (squared L2)
        taken = np.zeros(len(group), dtype=bool)
        for j in range(len(group)):  # greedy, in entry order: an entry not yet merged is kept
            if taken[j]:
                continue
            near = nbr[lims[j] : lims[j + 1]]
            near = near[~taken[near]]
            taken[near] = True
            taken[j] = True
            owner[group[near]] = group[j]
    keep = np.flatnonzero(owner == np.arange(ds.count))  # (N',) ascending
    counts = np.bincount(owner, minlength=ds.count)[keep].astype(np.int32)
    LOG.info("pruning at radius %g keeps %d of %d entries", radius, len(keep), ds.count)
    partial = _start(ds, out, overwrite)
    np.save(partial / "keys.npy", np.asarray(ds.keys[keep], dtype=KEY_DTYPE))
    np.save(partial / "vals.npy", vals[keep])
    np.save(partial / "counts.npy", counts)
    np.save(partial / "origin.npy", keep.astype(np.int64))
    for name in ("tokens.npy", "docs.npy", "docs.jsonl"):
        shutil.copyfile(ds.path / name, partial / name)
    pruning = {"radius": float(radius), "from_count": ds.count, "count": int(len(keep))}
    return _finish(ds, partial, out, list(_FILES) + ["counts.npy", "origin.npy"], count=int(len(keep)),
                   pruning=pruning)


def bytes_per_entry(ds: Datastore, index: str | None = None) -> dict:
    """Bytes per entry of what a search reads: the keys (re-ranking), the values, the
    counts/origin of a pruned datastore, and an index's file."""
    per = {name: (ds.path / name).stat().st_size / ds.count
           for name in ("keys.npy", "vals.npy", "counts.npy", "origin.npy") if (ds.path / name).exists()}
    if index is not None:
        per["index"] = (ds.path / "indexes" / index / "index.faiss").stat().st_size / ds.count
    per["total"] = sum(per.values())
    return per
