"""Large IVF indexes get their coarse centroids by two-level k-means: as good lists as one
flat k-means (by the k-means objective), used by build_index from TWO_LEVEL_FROM lists on."""

import faiss
import numpy as np
import pytest

import knnlm.core.index as index_mod
from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher, build_index, train_index

from test_index_memory import synthetic_datastore


def clustered(n, dim=32, blobs=300, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, dim)).astype(np.float32) * 3
    return (centres[rng.integers(0, blobs, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def objective(index, x):
    """Mean squared distance of each key to its nearest coarse centroid."""
    d, _ = faiss.extract_index_ivf(index).quantizer.search(x, 1)
    return float(d.mean())


@pytest.mark.parametrize("factory", ["IVF256,Flat", "IVF256_HNSW32,PQ8"])
def test_two_level_lists_are_as_good_as_flat_kmeans(monkeypatch, factory):
    x = clustered(256 * 64)
    flat = faiss.index_factory(32, factory)
    flat.train(x)
    monkeypatch.setattr(index_mod, "TWO_LEVEL_FROM", 256)
    two = faiss.index_factory(32, factory)
    train_index(two, x, factory)
    assert two.is_trained and faiss.extract_index_ivf(two).quantizer.ntotal == 256
    assert objective(two, x) < 1.05 * objective(flat, x)
    # and clearly better than lists that are not trained at all: the first 256 keys as centroids
    raw = faiss.IndexFlatL2(32)
    raw.add(x[:256])
    assert objective(two, x) < 0.95 * float(raw.search(x, 1)[0].mean())


def test_build_index_trains_large_ivf_in_two_levels(tmp_path, monkeypatch):
    import faiss.contrib.clustering as clustering

    calls = []
    real = clustering.two_level_clustering

    def spy(xs, nc1, nc2, **kw):
        calls.append((len(xs), nc1, nc2))
        return real(xs, nc1, nc2, **kw)

    monkeypatch.setattr(clustering, "two_level_clustering", spy)
    ds = Datastore(synthetic_datastore(tmp_path / "ds", n=40_000, dim=32))
    monkeypatch.setattr(index_mod, "TWO_LEVEL_FROM", 1 << 20)
    build_index(ds, "IVF64,Flat", name="one", progress=False)
    assert calls == []  # below the threshold: FAISS's own k-means
    monkeypatch.setattr(index_mod, "TWO_LEVEL_FROM", 64)
    build_index(ds, "IVF64,Flat", name="two", progress=False)
    assert calls == [(min(ds.count, index_mod.train_sample_size("IVF64,Flat")), 8, 64)]
    # every list probed: the same exact neighbours as the other index
    q = np.asarray(ds.keys[:50], np.float32)
    a = Searcher(ds, "one", nprobe=64, rerank=False).search(q, 5)[1]
    b = Searcher(ds, "two", nprobe=64, rerank=False).search(q, 5)[1]
    assert (np.sort(a, 1) == np.sort(b, 1)).mean() > 0.99
