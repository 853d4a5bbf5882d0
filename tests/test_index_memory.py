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
