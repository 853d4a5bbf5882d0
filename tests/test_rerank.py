"""Exact re-ranking from memory-mapped keys (`rerank_from_keys`, the search of a shard or
of a memory-mapped index): each candidate's squared L2 distance to its query, computed from
the stored float16 keys, sorted ascending, missing candidates (-1) last at inf."""

import numpy as np

from knnlm.core.index import rerank_from_keys


def test_rerank_from_keys_gives_each_querys_exact_distances_sorted(tmp_path):
    rng = np.random.default_rng(0)
    n, d, k, m = 3000, 512, 256, 600  # 600 queries: three chunks of 256 (2^25 / (k d))
    keys = np.lib.format.open_memmap(tmp_path / "keys.npy", mode="w+", dtype=np.float16, shape=(n, d))
    keys[:] = rng.normal(size=(n, d))
    keys.flush()
    keys = np.load(tmp_path / "keys.npy", mmap_mode="r")
    q = rng.normal(size=(m, d)).astype(np.float32)
    ids = rng.integers(0, n, size=(m, k))  # shared and repeated candidates
    ids[7, 200:] = -1
    ids[300, :] = -1
    dists, out = rerank_from_keys(keys, q, ids)

    want = ((np.asarray(keys, dtype=np.float64)[np.maximum(ids, 0)] - q[:, None, :].astype(np.float64)) ** 2).sum(-1)
    want = np.where(ids >= 0, want, np.inf)
    order = np.argsort(want, axis=1, kind="stable")
    np.testing.assert_allclose(dists, np.take_along_axis(want, order, 1), rtol=1e-5)
    assert dists.dtype == np.float32
    assert (np.diff(np.delete(dists, 300, 0)[:, :200], axis=1) >= 0).all()  # (row 300: no candidate)
    np.testing.assert_array_equal(np.sort(out, axis=1), np.sort(ids, axis=1))  # the same candidates, reordered
    assert (out[7, 200:] == -1).all() and np.isinf(dists[7, 200:]).all()
    assert (out[300] == -1).all() and np.isinf(dists[300]).all()
    got = ((np.asarray(keys, dtype=np.float64)[np.maximum(out, 0)] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(np.where(out >= 0, got, np.inf), dists, rtol=1e-5)  # each id with its own distance


def _rerank_per_query_cast(keys, queries, ids):
    """An earlier rerank_from_keys (each query's float16 rows cast inside its subtraction,
    summed by numpy), kept as the reference its faster forms must match."""
    m, k = ids.shape
    dists = np.full((m, k), np.inf, dtype=np.float32)
    q = np.asarray(queries, dtype=np.float32)
    step = max(1, (1 << 25) // max(1, k * keys.shape[1]))
    for a in range(0, m, step):
        i = ids[a : a + step]
        real = i >= 0
        rows = np.unique(i[real])
        if not len(rows):
            continue
        x = np.asarray(keys[rows])
        pos = np.searchsorted(rows, np.where(real, i, rows[0]))
        for r in range(len(i)):
            diff = np.subtract(x[pos[r]], q[a + r], dtype=np.float32)
            dists[a + r] = np.einsum("kd,kd->k", diff, diff)
        dists[a : a + step][~real] = np.inf
    order = np.argsort(dists, axis=1, kind="stable")
    return np.take_along_axis(dists, order, 1), np.take_along_axis(ids, order, 1)


def test_rerank_from_keys_matches_the_per_query_cast(tmp_path):
    """Each chunk's rows gathered and cast once, the distances summed by FAISS: the same
    distances as casting inside each query's subtraction and summing with numpy, up to float32
    rounding (another order of the sums), for the same candidates (chunks of other sizes)."""
    rng = np.random.default_rng(1)
    n, d, k, m = 4000, 576, 1024, 70  # 70 queries: more than one chunk of 2^24 / (k d) = 28
    keys = np.lib.format.open_memmap(tmp_path / "keys.npy", mode="w+", dtype=np.float16, shape=(n, d))
    keys[:] = rng.normal(size=(n, d)) * 3
    keys.flush()
    keys = np.load(tmp_path / "keys.npy", mmap_mode="r")
    q = (rng.normal(size=(m, d)) * 3).astype(np.float32)
    ids = rng.integers(0, n, size=(m, k))
    ids[5, 900:] = -1
    ids[40, :] = -1
    got, want = rerank_from_keys(keys, q, ids), _rerank_per_query_cast(keys, q, ids)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)  # both sorted: the same distances in order
    assert np.array_equal(np.isinf(got[0]), np.isinf(want[0])) and np.isinf(got[0][40]).all()
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(want[1], axis=1))


def test_rerank_reads_the_rows_of_several_files_without_joining_them(tmp_path, monkeypatch):
    """A sharded datastore's keys (one memmap per shard, as one row space): each candidate read
    from its own shard's file, the distances those of the joined keys, and the shards' keys
    never joined in memory (at 10^7 entries that would be 12.6 GB on every search)."""
    import pytest

    from knnlm.core.index import distances_from_keys
    from knnlm.scale.manifest import _Rows

    rng = np.random.default_rng(3)
    d, k, m = 64, 32, 50
    parts = []
    for s, n in enumerate((700, 1, 1299)):  # a one-row shard too
        a = np.lib.format.open_memmap(tmp_path / f"keys{s}.npy", mode="w+", dtype=np.float16, shape=(n, d))
        a[:] = rng.normal(size=(n, d))
        a.flush()
        parts.append(np.load(tmp_path / f"keys{s}.npy", mmap_mode="r"))
    joined = np.concatenate(parts)
    rows = _Rows(parts, np.array([0, 700, 701, 2000]))
    q = rng.normal(size=(m, d)).astype(np.float32)
    ids = rng.integers(0, 2000, size=(m, k))
    ids[:, 0] = 700  # the one-row shard's entry
    ids[5, 10:] = -1
    monkeypatch.setattr(_Rows, "__array__", lambda *a, **kw: pytest.fail("the shards' keys were joined in memory"))
    np.testing.assert_array_equal(distances_from_keys(rows, q, ids), distances_from_keys(joined, q, ids))
    got, want = rerank_from_keys(rows, q, ids), rerank_from_keys(joined, q, ids)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    exact = ((joined[np.maximum(ids, 0)].astype(np.float64) - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(distances_from_keys(rows, q, ids), np.where(ids >= 0, exact, np.inf), rtol=1e-5)
