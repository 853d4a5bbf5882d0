"""Training and filling an index read the keys with file reads: the process holds the
training sample and the index, never the whole memory-mapped keys file."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from knnlm.core.datastore import Datastore
from knnlm.core.index import train_sample_size

N, DIM = 1_000_000, 128  # keys.npy: 256 MB of float16


def synthetic_datastore(path, n=N, dim=DIM, seed=0):
    """A datastore directory with clustered random keys (one document)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    keys = np.lib.format.open_memmap(path / "keys.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for a in range(0, n, 1 << 18):
        b = min(n, a + (1 << 18))
        keys[a:b] = centres[rng.integers(0, 64, b - a)] + 0.3 * rng.normal(size=(b - a, dim))
    keys.flush()
    del keys
    tokens = rng.integers(0, 1000, n + 1).astype(np.int32)
    np.save(path / "tokens.npy", tokens)
    np.save(path / "vals.npy", tokens[1:])
    np.save(path / "docs.npy", np.array([[0, n + 1, 0]], dtype=np.int64))
    (path / "docs.jsonl").write_text(json.dumps({"source": "synthetic", "line": 0, "title": "s"}) + "\n")
    meta = {"format_version": 1, "id": f"synthetic-{n}", "created": "2026-01-01T00:00:00Z",
            "identity": {"model": "synthetic", "model_fingerprint": "synthetic", "weights_sample": [],
                         "tokenizer_fingerprint": "synthetic", "key_point": "ffn_input"},
            "key_point": "ffn_input", "model_dtype": "none", "dim": dim, "count": n, "documents": 1,
            "window": 1024, "stride": 512, "corpora": [], "sha256": {}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_read_keys_and_iter_keys_equal_the_memory_map(tmp_path):
    ds = Datastore(synthetic_datastore(tmp_path / "ds", n=5000, dim=8))
    rows = np.array([0, 3, 4, 999, 4999])
    np.testing.assert_array_equal(ds.read_keys(rows), ds.keys[rows])
    chunks = list(ds.iter_keys(chunk=1024))
    assert [i for i, _ in chunks] == [0, 1024, 2048, 3072, 4096]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), ds.keys[:])


def test_train_sample_size_follows_the_lists():
    assert train_sample_size("IVF4096,PQ64") == 64 * 4096
    assert train_sample_size("IVF256,PQ16") == 65_536
    assert train_sample_size("IVF65536_HNSW32,PQ64") == 64 * 65536
    assert train_sample_size("Flat") == 65_536


def test_building_an_ivf_pq_index_holds_far_less_than_the_keys(tmp_path):
    path = synthetic_datastore(tmp_path / "ds")
    code = textwrap.dedent(f"""
        import resource, sys
        import faiss
        from knnlm.core.datastore import Datastore
        from knnlm.core.index import build_index
        ds = Datastore({str(path)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        build_index(ds, "IVF256,PQ8", train_size=16384, chunk=4096, progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.split()[-1])
    keys_bytes = N * DIM * 2
    # the sample (16,384 keys, 12 MB as float16 + float32), a chunk being added with FAISS's
    # buffers for its codes, codes and ids (16 MB, up to twice that while their lists grow):
    # about 80 MB; reading the keys through the memory map instead keeps every page of keys.npy
    # resident (checked: +432 MiB for 244 MiB of keys)
    assert growth < 0.5 * keys_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB for {keys_bytes / 2**20:.0f} MiB of keys"


def test_large_keys_are_reranked_from_the_file_with_the_same_results(tmp_path, monkeypatch):
    import knnlm.core.index as index_mod

    path = synthetic_datastore(tmp_path / "ds", n=20_000, dim=32)
    ds = Datastore(path)
    index_mod.build_index(ds, "IVF16,PQ8", train_size=5000, progress=False)
    queries = np.asarray(ds.read_keys(np.arange(0, 20_000, 997)), np.float32) + 0.01
    in_ram = index_mod.Searcher(ds)
    assert not in_ram._rerank_keys and in_ram._refine is not None  # small keys: the float16 copy
    monkeypatch.setattr(index_mod, "KEYS_IN_RAM_MAX", ds.keys.nbytes - 1)
    from_file = index_mod.Searcher(ds)
    assert from_file._rerank_keys and from_file._refine is None
    d0, i0 = in_ram.search(queries, 50)
    d1, i1 = from_file.search(queries, 50)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-5, atol=1e-4)


def search_growth(path, bound: str) -> int:
    """Growth of anonymous resident memory (bytes; file pages of the memory-mapped keys that
    the kernel maps around each read are the page cache's, not the process's) of a fresh
    process that opens the index and searches it, with KEYS_IN_RAM_MAX set to `bound` (a
    Python expression of ds)."""
    code = textwrap.dedent(f"""
        import numpy as np
        import faiss
        import knnlm.core.index as ix
        from knnlm.core.datastore import Datastore

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

        import torch  # loaded in every process that searches (the LM's; re-ranking gathers with it)

        ds = Datastore({str(path)!r})
        ix.KEYS_IN_RAM_MAX = {bound}
        q = np.asarray(ds.read_keys(np.arange(0, ds.count, 9973)), np.float32)
        before = anon()
        s = ix.Searcher(ds)
        d, i = s.search(q, 64)
        assert (i >= 0).all()
        print(anon() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_searching_large_keys_does_not_copy_them(tmp_path):
    from knnlm.core.index import build_index

    path = synthetic_datastore(tmp_path / "ds")
    build_index(Datastore(path), "IVF256,PQ8", train_size=16384, progress=False)
    # keys 4x the bound, as a 10^7-entry datastore against the default: the IVF-PQ index
    # (1M x (8 code + 8 id) bytes: 16 MB) and the candidates' rows
    growth = search_growth(path, "ds.keys.nbytes // 4")
    assert growth < 0.25 * N * DIM * 2, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    # keys under the bound are copied for re-ranking: the check above can see a copy
    assert search_growth(path, "ds.keys.nbytes * 4") > 0.9 * N * DIM * 2
