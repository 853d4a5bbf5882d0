"""Datastore, index and evaluation on a tiny random model: the paper's identities."""

import json

import numpy as np
import pytest
import torch

from knnlm.core.batching import plan_files
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, auto_factory, build_index
from knnlm.errors import KnnlmError
from knnlm.run.evaluate import evaluate, score_plan
from knnlm.run.tune import sweep


def test_entries_are_keys_and_next_tokens(lm, datastore, corpus):
    """Entry i = (key at token p, token p+1): recompute one window directly."""
    ids = lm.encode(corpus.read_text())
    assert datastore.count == len(ids) - 1
    assert np.array_equal(datastore.vals, np.array(ids[1:]))
    keys, _ = lm.forward(torch.tensor([ids[:32]]), logits=False)  # first window: positions 0..31
    np.testing.assert_allclose(datastore.keys[:32], keys["ffn_input"][0].cpu().numpy().astype(np.float16), atol=1e-3)
    assert datastore.meta["key_point"] == "ffn_input" and datastore.dim == 32
    doc, off = datastore.provenance(np.array([0, 5]))
    assert doc.tolist() == [0, 0] and off.tolist() == [1, 6]  # entry i predicts token i + 1


def test_jsonl_documents_never_share_a_window(lm, jsonl_corpus, tmp_path):
    out = build_datastore(lm, [jsonl_corpus], tmp_path / "ds", window=32, stride=16, progress=False)[0]
    ds = Datastore(out)
    docs = [json.loads(line)["text"] for line in jsonl_corpus.read_text().splitlines()]
    assert len(ds.docs) == len(docs) and ds.count == sum(len(lm.encode(d)) - 1 for d in docs)
    # each document's first key is the prefix token's, seen with no other context
    first = ds.docs[:, 2]
    np.testing.assert_allclose(ds.keys[first[0]], ds.keys[first[3]])
    d, off = ds.provenance(first + 1)
    assert d.tolist() == list(range(len(docs))) and off.tolist() == [2] * len(docs)
    left, value, _ = ds.context(int(first[2] + 3), before=2)
    toks = lm.encode(docs[2])
    assert left == toks[2:4] and value == toks[4]


def test_keys_same_whatever_the_batching(lm, corpus, tmp_path):
    a = build_datastore(lm, [corpus], tmp_path / "a", window=32, stride=16, batch_tokens=32, progress=False)[0]
    b = build_datastore(lm, [corpus], tmp_path / "b", window=32, stride=16, batch_tokens=256, progress=False)[0]
    np.testing.assert_allclose(np.load(a / "keys.npy"), np.load(b / "keys.npy"), atol=2e-3)


def test_one_pass_writes_several_key_points(lm, corpus, tmp_path):
    outs = build_datastore(lm, [corpus], tmp_path / "ds", window=32, stride=16, progress=False,
                           key_points=["ffn_input", "final"])
    assert [o.name for o in outs] == ["ds", "ds-final"]
    single = build_datastore(lm, [corpus], tmp_path / "f", window=32, stride=16, progress=False,
                             key_points=["final"])[0]
    assert Datastore(outs[1]).key_point == "final"
    np.testing.assert_array_equal(np.load(outs[1] / "keys.npy"), np.load(single / "keys.npy"))


def test_flat_search_is_exact(datastore):
    s = Searcher(datastore, "flat")
    q = np.asarray(datastore.keys[[3, 40, 77]], dtype=np.float32) + 0.01
    d, i = s.search(q, 5)
    brute = ((np.asarray(datastore.keys, dtype=np.float32)[None] - q[:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(i[:, 0], [3, 40, 77])
    np.testing.assert_allclose(d, np.sort(brute, axis=1)[:, :5], rtol=1e-4, atol=1e-4)


def exact_distances(q, keys, ids):
    """Oracle: squared L2 from each query to its neighbours' stored keys; inf for id -1."""
    want = ((np.asarray(keys, dtype=np.float64)[np.maximum(ids, 0)] - q[:, None]) ** 2).sum(-1)
    return np.where(ids < 0, np.inf, want)


def test_doc_of_names_each_targets_document(lm, jsonl_corpus):
    """A plan's targets run document by document; doc_of gives each target's document, and
    the datastore's document table the same."""
    plan = plan_files(lm, [jsonl_corpus], 32, 16, 128)
    want = np.concatenate([np.full(int(n) - 1, d) for d, n in enumerate(plan.docs[:, 1])])
    assert len(plan.docs) > 1 and len(want) == plan.count
    assert np.array_equal(plan.doc_of(np.arange(plan.count)), want)
    assert int(plan.doc_of(int(plan.docs[1, 2]))) == 1 and int(plan.doc_of(int(plan.docs[1, 2]) - 1)) == 0


def test_self_retrieval(lm, datastore, corpus):
    """Built on X, evaluated on X, k=1, exact index: the nearest key is the same context,
    so p_kNN(true token) ~ 1 (a little less where the text repeats itself)."""
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=1, progress=False)
    p = np.exp(s.knn)
    assert np.median(p) == 1.0 and p.mean() > 0.95
    # and the kNN-LM at lambda=1 beats the random LM by far
    res = evaluate(lm, [corpus], datastore.path, index="flat", k=1, lam=0.99, window=32, stride=16,
                   progress=False)
    assert res["ppl_knnlm"] < 1.2 < res["ppl_lm"]


def test_lambda_zero_gives_the_base_lm_exactly(lm, datastore, corpus):
    base = evaluate(lm, [corpus], window=32, stride=16, progress=False)
    zero = evaluate(lm, [corpus], datastore.path, index="flat", k=8, lam=0.0, window=32, stride=16,
                    progress=False)
    some = evaluate(lm, [corpus], datastore.path, index="flat", k=8, lam=0.25, window=32, stride=16,
                    progress=False)
    assert zero["ppl_knnlm"] == zero["ppl_lm"] == base["ppl_lm"]
    assert some["ppl_knnlm"] != base["ppl_lm"]


def test_lm_scores_match_one_long_window(lm, corpus):
    """Rolling windows with stride = window - 1 vs the whole text in one window: the same
    tokens scored; with a window as long as the text the log-probs are identical."""
    ids = lm.encode(corpus.read_text())
    keys, logits = lm.forward(torch.tensor([ids]), logits=True)
    want = torch.log_softmax(logits[0, :-1].float().cpu(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    plan = plan_files(lm, [corpus], len(ids), len(ids), 10_000)
    s = score_plan(lm, plan, progress=False)
    np.testing.assert_allclose(s.lm, want.numpy(), rtol=1e-5, atol=1e-5)


def test_ivfpq_with_reranking_matches_exact(lm, corpus, tmp_path):
    """IVF-PQ candidates re-ranked from full-precision keys: same top-8 as exact search
    for >= 90% of neighbours, and the kNN-LM perplexity within 1% of the exact index's."""
    out = build_datastore(lm, [corpus], tmp_path / "ds", window=32, stride=16, progress=False)[0]
    ds = Datastore(out)
    build_index(ds, "Flat", progress=False)
    build_index(ds, "IVF4,PQ8", name="ivfpq", nprobe=4, train_size=ds.count, progress=False)
    q = np.asarray(ds.keys, dtype=np.float32) + np.random.default_rng(0).normal(0, 0.05, (ds.count, ds.dim)).astype(
        np.float32)
    _, exact = Searcher(ds, "flat").search(q, 8)
    _, approx = Searcher(ds, "ivfpq").search(q, 64)  # re-rank 64 candidates, keep the best 8
    recall = np.mean([len(set(a[:8]) & set(b)) / 8 for a, b in zip(approx, exact)])
    assert recall >= 0.9
    kw = dict(k=32, lam=0.5, window=32, stride=16, progress=False)
    e = evaluate(lm, [corpus], out, index="flat", **kw)["ppl_knnlm"]
    r = evaluate(lm, [corpus], out, index="ivfpq", **kw)["ppl_knnlm"]
    assert abs(r / e - 1) < 0.01
    pq_only = Searcher(ds, "ivfpq", rerank=False)
    assert not pq_only.rerank and Searcher(ds, "ivfpq").rerank


def test_auto_factory():
    assert auto_factory(5_000, 576) == "Flat"
    assert auto_factory(250_000, 576) == "IVF2048,PQ64"
    assert auto_factory(946_078, 576) == "IVF4096,PQ64"  # the novels' 10^6 datastore
    assert auto_factory(3_000_000, 576) == "IVF8192_HNSW32,PQ64"  # from 8,192 lists: an HNSW quantizer
    assert auto_factory(10_971_280, 576) == "IVF16384_HNSW32,PQ64"  # all the novels
    assert auto_factory(103_000_000, 1024) == "IVF32768_HNSW32,PQ64"


def test_sweep_matches_direct_evaluation(lm, datastore, corpus):
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=16, keep_neighbors=True, progress=False)
    res = sweep(s.lm, s.dists, s.vals, s.targets, lambdas=[0.0, 0.3], temperatures=[0.5, 2.0], ks=[4, 16])
    assert len(res["grid"]) == 8
    row = next(r for r in res["grid"] if r["k"] == 4 and r["temperature"] == 2.0 and r["lambda"] == 0.3)
    direct = evaluate(lm, [corpus], datastore.path, index="flat", k=4, lam=0.3, temperature=2.0, window=32,
                      stride=16, progress=False)
    assert row["ppl"] == pytest.approx(direct["ppl_knnlm"], rel=1e-6)
    assert res["best"]["ppl"] == min(r["ppl"] for r in res["grid"])


def test_index_refuses_another_datastore(lm, corpus, tmp_path, datastore):
    import shutil

    out = build_datastore(lm, [corpus], tmp_path / "other", window=32, stride=16, progress=False)[0]
    shutil.copytree(datastore.path / "indexes", out / "indexes")
    with pytest.raises(KnnlmError, match="was built for datastore"):
        Searcher(Datastore(out))


def test_fp16_index_holds_the_keys_exactly(datastore):
    from knnlm.core.index import fp16_index

    idx = fp16_index(datastore.keys)
    assert idx.ntotal == datastore.count
    np.testing.assert_array_equal(idx.reconstruct_n(0, 5), np.asarray(datastore.keys[:5], dtype=np.float32))


def test_reranked_distances_are_exact(lm, corpus, tmp_path):
    """IVF-PQ + re-ranking returns exact squared L2 to the stored keys, sorted; PQ-only
    distances are approximations; probing too few lists leaves id -1 with distance inf."""
    out = build_datastore(lm, [corpus], tmp_path / "ds", window=32, stride=16, progress=False)[0]
    ds = Datastore(out)
    build_index(ds, "IVF4,PQ8", name="ivfpq", nprobe=4, train_size=ds.count, progress=False)
    q = np.asarray(ds.keys[:20], dtype=np.float32) + 0.05
    d, i = Searcher(ds, "ivfpq").search(q, 16)
    np.testing.assert_allclose(d, exact_distances(q, ds.keys, i), rtol=1e-4, atol=1e-4)
    assert (np.diff(d, axis=1) >= 0).all()
    d_pq, i_pq = Searcher(ds, "ivfpq", rerank=False).search(q, 16)
    assert not np.allclose(d_pq, exact_distances(q, ds.keys, i_pq), rtol=1e-3)
    d1, i1 = Searcher(ds, "ivfpq", nprobe=1).search(q, ds.count)
    assert (i1 == -1).any() and np.isinf(d1[i1 == -1]).all() and np.isfinite(d1[i1 >= 0]).all()
