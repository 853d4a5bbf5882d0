"""The kNN step in torch on the model's device (knnlm.retrieval.device): the same neighbours,
distances and p_kNN as the CPU path (FAISS Flat + numpy).  Runs on CPU in CI; set
KNNLM_TEST_DEVICE=cuda to run it on a GPU."""

import numpy as np
import pytest
import torch
from conftest import DEVICE

from knnlm.core.index import Searcher
from knnlm.core.scoring import knn_target_logprobs
from knnlm.errors import KnnlmError
from knnlm.retrieval.device import DeviceSearcher, open_searcher
from knnlm.run.evaluate import evaluate
from knnlm.run.generate import KNNLM


@pytest.fixture(scope="module")
def queries(datastore):
    rng = np.random.default_rng(0)
    own = np.asarray(datastore.keys[::3], dtype=np.float32)  # keys of the datastore itself (distance 0)
    noisy = own[:20] + rng.normal(0, 0.3, own[:20].shape).astype(np.float32)
    return np.concatenate([own, noisy])


@pytest.mark.parametrize("chunk", [65536, 7])  # one block, and a running top-k merged over many
def test_device_neighbours_equal_the_cpu_paths(datastore, queries, chunk):
    cpu = Searcher(datastore)  # Flat: exact
    dev = DeviceSearcher(datastore, DEVICE, chunk=chunk)
    for k in (1, 8, 40):
        d0, i0 = cpu.search(queries, k)
        d1, i1 = dev.search(queries, k)
        np.testing.assert_allclose(d1, d0, rtol=1e-4, atol=1e-4)
        same = (i1 == i0).mean()
        # ties (equal keys: repeated text) may come in another order; everything else is identical
        tie = np.isclose(np.take_along_axis(d0, np.argsort(i0, 1), 1), np.take_along_axis(d1, np.argsort(i1, 1), 1))
        assert same > 0.9 and tie.mean() > 0.9
        for row in range(len(queries)):  # the same set of neighbours up to ties at the k-th distance
            kth = d0[row, -1]
            assert set(i0[row][d0[row] < kth - 1e-4]) <= set(i1[row])
    cand = np.asarray(cpu.search(queries, 5)[1])
    np.testing.assert_allclose(dev.exact(queries, cand), cpu.exact(queries, cand), rtol=1e-5, atol=1e-5)


def test_device_p_knn_equals_the_cpu_math(datastore, queries):
    dev = DeviceSearcher(datastore, DEVICE)
    targets = np.asarray(datastore.vals[::3].tolist() + datastore.vals[:20].tolist(), dtype=np.int64)
    for t in (0.5, 2.0):
        d, i = Searcher(datastore).search(queries, 8)
        want = knn_target_logprobs(d, datastore.vals[np.maximum(i, 0)], targets, t)
        got = dev.target_logprobs(torch.from_numpy(queries), torch.from_numpy(targets), 8, t).cpu().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_eval_and_generation_on_the_device_path(lm, datastore, corpus):
    kw = dict(k=8, lam=0.5, temperature=1.0, window=32, stride=16, progress=False)
    cpu = evaluate(lm, [corpus], datastore.path, **kw)
    dev = evaluate(lm, [corpus], datastore.path, index="torch", **kw)
    assert dev["factory"].startswith("exact (torch")
    assert abs(dev["ppl_knnlm"] - cpu["ppl_knnlm"]) / cpu["ppl_knnlm"] < 1e-5
    a = KNNLM(lm, {"t": datastore.path}, k=8, lam=0.5)
    b = KNNLM(lm, {"t": datastore.path}, k=8, lam=0.5, index="torch")
    assert isinstance(b.searchers["t"], DeviceSearcher)
    assert a.generate("the quick", 8, ignore_eos=True).ids == b.generate("the quick", 8, ignore_eos=True).ids


def test_bad_use(datastore):
    dev = open_searcher(datastore, "torch")
    with pytest.raises(KnnlmError, match="larger than the datastore"):
        dev.search(np.zeros((1, datastore.dim), np.float32), datastore.count + 1)
    with pytest.raises(KnnlmError, match="3-d"):
        dev.search(np.zeros((1, 3), np.float32), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA is absent")
def test_absent_cuda_falls_back_to_the_cpu_with_the_same_neighbours(datastore, queries, caplog):
    cpu = Searcher(datastore)
    with caplog.at_level("WARNING", logger="knnlm.retrieval.device"):
        dev = open_searcher(datastore, "torch", device="cuda")
    assert dev.device.type == "cpu" and "not available" in caplog.text
    d0, i0 = cpu.search(queries, 8)
    d1, i1 = dev.search(queries, 8)
    np.testing.assert_allclose(d1, d0, rtol=1e-4, atol=1e-4)
    assert (i1 == i0).mean() > 0.9


def test_faiss_index_without_gpu_support_stays_on_the_cpu(datastore, queries, monkeypatch):
    import faiss

    from knnlm.retrieval import device as mod

    cpu = Searcher(datastore)
    want = cpu.search(queries, 8)
    monkeypatch.setattr(mod, "faiss_gpus", lambda: 0)  # the faiss-cpu wheel
    s = open_searcher(datastore, None, device="cuda")
    assert isinstance(s, Searcher) and not hasattr(s, "gpu_resources")
    np.testing.assert_array_equal(s.search(queries, 8)[1], want[1])
    # a GPU build that cannot move this index: the CPU index is kept, the same neighbours
    monkeypatch.setattr(mod, "faiss_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", lambda: type("Opts", (), {})(), raising=False)

    def refuse(res, gpu, index, opts):
        raise RuntimeError("Error in ...: not supported on the GPU")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", refuse, raising=False)
    s = open_searcher(datastore, None, device="cuda:0")
    assert not hasattr(s, "gpu_resources")
    np.testing.assert_array_equal(s.search(queries, 8)[1], want[1])
    # one that can (stood in for by a copy of the index): the moved index answers every search
    moved = []
    monkeypatch.setattr(faiss, "index_cpu_to_gpu",
                        lambda res, gpu, index, opts: moved.append(gpu) or faiss.clone_index(index), raising=False)
    s = open_searcher(datastore, None, device="cuda:0")
    assert moved == [0] and hasattr(s, "gpu_resources")
    d, i = s.search(queries, 8)
    np.testing.assert_array_equal(i, want[1])
    np.testing.assert_allclose(d, want[0], rtol=1e-6)
    assert open_searcher(datastore, None, device="cpu").index is not s.index and moved == [0]  # CPU: never moved


def test_few_queries_scan_the_float16_keys_with_the_flat_indexs_neighbours(datastore, queries):
    from knnlm.core.index import FEW_QUERIES

    s = Searcher(datastore)
    assert s.scan_few
    for k in (1, 8, 40):
        scanned = [s.search(queries[j : j + 1], k) for j in range(len(queries))]  # one at a time: the scan
        assert s._fp16 is not None
        s.scan_few = False
        flat = [s.search(queries[j : j + 1], k) for j in range(len(queries))]  # the Flat index itself
        s.scan_few = True
        for (d0, i0), (d1, i1) in zip(flat, scanned):
            np.testing.assert_allclose(d1, d0, rtol=1e-6, atol=1e-5)
            np.testing.assert_array_equal(i1[d0 < d0[:, -1:]], i0[d0 < d0[:, -1:]])  # ties at the k-th may swap
    assert len(queries) >= FEW_QUERIES  # a batch goes to the Flat index (matrix products), never the scan

    class Refuse:
        def search(self, *a):
            raise AssertionError("a batch was scanned")

    s._fp16 = Refuse()
    d, i = s.search(queries, 8)
    one = d[:, 0] < d[:, 1]  # the nearest neighbour is unique
    np.testing.assert_array_equal(i[one, 0], np.concatenate([f[1][:, 0] for f in flat])[one])
