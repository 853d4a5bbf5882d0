"""Smaller datastores (knnlm.retrieval.reduce): PCA-reduced keys with the transform saved
beside them, and near-duplicate entries merged with counts."""

import numpy as np
import pytest

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index
from knnlm.core.scoring import knn_target_logprobs
from knnlm.errors import KnnlmError
from knnlm.retrieval.device import DeviceSearcher
from knnlm.retrieval.pointers import Pointers
from knnlm.retrieval.reduce import bytes_per_entry, fit_pca, prune_datastore, reduce_datastore
from knnlm.run.evaluate import evaluate
from knnlm.run.generate import KNNLM


@pytest.fixture(scope="module")
def docs_ds(lm, jsonl_corpus, tmp_path_factory):
    out = build_datastore(lm, [jsonl_corpus], tmp_path_factory.mktemp("red") / "ds", window=32, stride=16,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return Datastore(out)


@pytest.fixture(scope="module")
def pca(docs_ds, tmp_path_factory):
    out = reduce_datastore(docs_ds, tmp_path_factory.mktemp("red") / "pca8", 8)
    ds = Datastore(out)
    build_index(ds, "Flat", progress=False)
    return ds


def test_fit_pca_finds_the_directions_of_a_flat_cloud():
    """Points spread along x (variance 100) and y (variance 1), none along z: the first
    component is +-x, the second +-y, and two components keep all the variance."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 10, 5000), rng.normal(0, 1, 5000), np.zeros(5000)], 1) + [3, 4, 5]
    mean, comp, kept = fit_pca(x, 2)
    np.testing.assert_allclose(mean, [3, 4, 5], atol=0.5)
    np.testing.assert_allclose(np.abs(comp), [[1, 0, 0], [0, 1, 0]], atol=1e-2)
    assert kept == pytest.approx(1.0)


def test_a_reduced_datastore_records_its_reduction_and_transforms_queries(docs_ds, pca):
    assert pca.dim == 8 and pca.query_dim == docs_ds.dim
    assert pca.meta["reduction"]["method"] == "pca" and pca.meta["source"]["id"] == docs_ds.id
    assert (pca.path / "reduction.npz").exists()
    pca.verify()  # its checksums cover the transform
    q = np.asarray(docs_ds.keys[:10], dtype=np.float32)  # the model's keys
    d, i = Searcher(pca).search(q, 3)
    z = np.load(pca.path / "reduction.npz")
    manual = (q - z["mean"]) @ z["components"].T  # what the datastore does to them
    ref = ((np.asarray(pca.keys, dtype=np.float32)[None] - manual[:, None]) ** 2).sum(-1)  # (10, N)
    np.testing.assert_allclose(d, np.sort(ref, 1)[:, :3], rtol=1e-4, atol=1e-4)
    assert (i[:, 0] == np.arange(10)).mean() >= 0.8  # its own entry is (mostly) still the nearest
    dev = DeviceSearcher(pca)  # the device path transforms the same way
    np.testing.assert_allclose(dev.search(q, 3)[0], d, rtol=1e-4, atol=1e-4)


def test_reduced_and_unreduced_queries_are_refused_where_they_do_not_belong(docs_ds, pca):
    reduced = pca.to_key_space(np.asarray(docs_ds.keys[:4], dtype=np.float32))  # (4, 8)
    with pytest.raises(KnnlmError, match="reduced by pca from d=32 to d=8.*already reduced"):
        Searcher(pca).search(reduced, 2)  # a reduced datastore takes the model's keys, not reduced ones
    with pytest.raises(KnnlmError, match="un-reduced 32-d keys.*reduced queries belong to a reduced datastore"):
        Searcher(docs_ds).search(reduced, 2)  # an un-reduced datastore refuses reduced queries
    with pytest.raises(KnnlmError, match="un-reduced"):
        DeviceSearcher(docs_ds).search(reduced, 2)
    with pytest.raises(KnnlmError, match="already reduced"):
        Searcher(pca).exact(reduced, np.zeros((4, 1), dtype=np.int64))
    with pytest.raises(KnnlmError, match="already reduced or pruned"):
        reduce_datastore(pca, pca.path.parent / "again", 4)
    with pytest.raises(KnnlmError, match="1 <= dim < 32"):
        reduce_datastore(docs_ds, pca.path.parent / "bad", 32)


def test_eval_and_generation_on_a_reduced_datastore(lm, jsonl_corpus, docs_ds, pca):
    kw = dict(k=8, lam=0.5, temperature=1.0, window=32, stride=16, progress=False)
    full = evaluate(lm, [jsonl_corpus], docs_ds.path, **kw)
    small = evaluate(lm, [jsonl_corpus], pca.path, **kw)
    ptr = evaluate(lm, [jsonl_corpus], pca.path, pointers=Pointers(2), **kw)  # pointers work on it
    assert small["ppl_knnlm"] < small["ppl_lm"] and small["ppl_knnlm"] != full["ppl_knnlm"]
    assert ptr["search_rate"] < 1
    knn = KNNLM(lm, {"small": pca.path}, k=4)
    assert len(knn.generate("the quick", 4, ignore_eos=True).ids) == 4
    assert bytes_per_entry(pca)["keys.npy"] < bytes_per_entry(docs_ds)["keys.npy"] / 3


def test_pruning_merges_duplicates_with_counts(docs_ds, tmp_path):
    """At a tiny radius only identical keys with the same value merge (the corpus repeats its
    sentences: documents 4-7 are copies of 0-3); with every entry as a neighbour, p_kNN is unchanged."""
    out = prune_datastore(docs_ds, tmp_path / "pruned", radius=1e-6)
    p = Datastore(out)
    build_index(p, "Flat", progress=False)
    assert p.count <= 0.6 * docs_ds.count and int(p.counts.sum()) == docs_ds.count
    assert p.meta["pruning"]["from_count"] == docs_ds.count
    p.verify()
    q = np.asarray(docs_ds.keys[:12], dtype=np.float32)
    targets = np.asarray(docs_ds.vals[1:13], dtype=np.int64)
    d0, i0 = Searcher(docs_ds).search(q, docs_ds.count)
    d1, i1 = Searcher(p).search(q, p.count)
    want = knn_target_logprobs(d0, docs_ds.vals[i0], targets, 2.0)
    got = knn_target_logprobs(d1, p.vals[i1], targets, 2.0, counts=p.counts_of(i1))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # provenance still names the original document and offset
    assert p.provenance(np.arange(p.count))[0].tolist() == docs_ds.provenance(p.origin)[0].tolist()
    more = Datastore(prune_datastore(docs_ds, tmp_path / "more", radius=1e9))  # everything of a value merges
    assert more.count == len(np.unique(docs_ds.vals))


def test_pointers_refuse_a_pruned_datastore(lm, jsonl_corpus, docs_ds, tmp_path):
    p = Datastore(prune_datastore(docs_ds, tmp_path / "pruned", radius=1e-6))
    build_index(p, "Flat", progress=False)
    with pytest.raises(KnnlmError, match="was pruned"):
        evaluate(lm, [jsonl_corpus], p.path, k=4, lam=0.5, window=32, stride=16, progress=False,
                 pointers=Pointers(1))
    knn = KNNLM(lm, {"p": p.path}, k=4)
    with pytest.raises(KnnlmError, match="was pruned"):
        knn.generate("the", 2, pointers=Pointers(1))
    res = evaluate(lm, [jsonl_corpus], p.path, k=4, lam=0.5, window=32, stride=16, progress=False)
    assert np.isfinite(res["ppl_knnlm"])


def test_reduce_command(docs_ds, tmp_path, capsys):
    from knnlm.cli.main import main

    assert main(["-q", "reduce", str(docs_ds.path), "-o", str(tmp_path / "r"), "--pca", "8", "--index", "Flat"]) == 0
    assert "d=8" in capsys.readouterr().out and Datastore(tmp_path / "r").reduction["dim"] == 8
    assert main(["-q", "reduce", str(docs_ds.path), "-o", str(tmp_path / "r2")]) == 1
    assert "exactly one of --pca" in capsys.readouterr().err


def test_counts_weigh_the_sweep_as_they_weigh_p_knn():
    """Neighbours at d = (0, 1, 1) with values (5, 6, 5) and counts (1, 3, 2), T = 1:
    p(5) = (1 + 2/e) / (1 + 5/e) = 0.6070."""
    from knnlm.core.scoring import knn_target_logprobs_all_k

    d, v, c = np.array([[0.0, 1.0, 1.0]]), np.array([[5, 6, 5]]), np.array([[1, 3, 2]])
    e = np.e
    want = np.log((1 + 2 / e) / (1 + 5 / e))
    assert knn_target_logprobs(d, v, np.array([5]), 1.0, counts=c)[0] == pytest.approx(want)
    assert knn_target_logprobs_all_k(d, v, np.array([5]), 1.0, [3], counts=c)[0, 0] == pytest.approx(want)
