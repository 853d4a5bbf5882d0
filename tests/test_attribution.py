import doctest
import json

import numpy as np
import pytest

import knnlm.core.attribution as attribution
from knnlm.core.attribution import attribute, knn_weights
from knnlm.core.scoring import knn_target_logprobs


def test_docstring_example():
    assert doctest.testmod(attribution).failed == 0


def test_knn_weights_golden():
    """d = 0, ln 2, ln 4, inf at T = 1: weights 1 : 1/2 : 1/4 : 0 -> 4/7, 2/7, 1/7, 0; a merged
    entry standing for 2 weighs twice; a row that was not searched (nan) weighs nothing."""
    d = np.array([[0.0, np.log(2), np.log(4), np.inf], [0.0, 0.0, np.inf, np.inf], [np.nan] * 4])
    w = knn_weights(d, 1.0, counts=np.array([[1, 1, 1, 1], [2, 1, 1, 1], [1, 1, 1, 1]]))
    np.testing.assert_allclose(w, [[4 / 7, 2 / 7, 1 / 7, 0], [2 / 3, 1 / 3, 0, 0], [0, 0, 0, 0]])


def test_contributions_to_the_target_sum_to_the_knn_part_of_the_mixture():
    """Σ_j λ w_ij [v_ij = y_i] = λ p_kNN(y_i), for any neighbours, values and λ."""
    rng = np.random.default_rng(0)
    n, k = 50, 8
    dists = rng.uniform(0, 5, (n, k))
    dists[3, 5:] = np.inf  # a short row
    vals, targets = rng.integers(0, 4, (n, k)), rng.integers(0, 4, n)
    lams = rng.uniform(0, 1, n)
    a = attribute(rng.integers(0, 6, (n, k)), knn_weights(dists, 2.0), lams, vals == targets[:, None])
    p_knn = np.exp(knn_target_logprobs(dists, vals, targets, 2.0))
    np.testing.assert_allclose(a.to_target.sum(1), lams * p_knn, atol=1e-12)
    np.testing.assert_allclose(a.carried.sum(1), lams)  # every row's weights sum to 1


def test_document_summary_adds_up_and_is_sorted():
    rng = np.random.default_rng(1)
    n, k = 40, 6
    docs = rng.integers(-1, 5, (n, k))  # -1: empty slots
    w = knn_weights(rng.uniform(0, 3, (n, k)), 1.0)
    lams = rng.uniform(0, 1, n)
    match = rng.random((n, k)) < 0.3
    a = attribute(docs, w, lams, match)
    shares = a.documents
    assert sorted(s.document for s in shares) == sorted(set(docs[docs >= 0].tolist()))
    assert [s.weight for s in shares] == sorted((s.weight for s in shares), reverse=True)
    assert np.isclose(sum(s.weight for s in shares), a.carried[docs >= 0].sum())
    assert np.isclose(sum(s.target_weight for s in shares), a.to_target[docs >= 0].sum())
    for s in shares:  # each field against a direct count
        mine = docs == s.document
        assert s.neighbors == mine.sum()
        assert s.tokens == mine.any(1).sum()
        assert s.target_tokens == (mine & match).any(1).sum()
        assert np.isclose(s.knn_weight, w[mine].sum())
        assert np.isclose(s.weight, (lams[:, None] * w)[mine].sum())


def test_empty_slots_skipped_positions_and_titles():
    """Slot -1 carries nothing; a position adaptive retrieval skipped (λ nan) carries nothing."""
    a = attribute(np.array([[1, -1], [0, 1]]), np.array([[1.0, 0.0], [0.25, 0.75]]), np.array([np.nan, 0.4]),
                  np.array([[True, False], [False, True]]))
    assert a.carried.tolist() == [[0.0, 0.0], [0.1, 0.30000000000000004]]
    rows = a.table([{"title": "A", "source": "a.jsonl"}, {"title": "B", "source": "b.jsonl"}])
    assert [(r["document"], r["title"], r["tokens"], r["target_tokens"]) for r in rows] == [(1, "B", 2, 2),
                                                                                          (0, "A", 1, 0)]
    assert attribute(np.full((2, 3), -1), np.zeros((2, 3)), np.ones(2), np.zeros((2, 3), bool)).documents == []


@pytest.fixture(scope="module")
def docs_ds(lm, jsonl_corpus, tmp_path_factory):
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    out = build_datastore(lm, [jsonl_corpus], tmp_path_factory.mktemp("attr") / "ds", window=32, stride=16,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return out


def test_score_attribution_is_the_mixture_s_knn_part(lm, jsonl_corpus, docs_ds):
    """Through the Python API, per token: Σ_j λ w_j [v_j = y] = p_kNN-LM(y) - (1 - λ) p_LM(y) (λ fixed),
    and the documents' summary names the datastore's own documents with their titles."""
    from knnlm.run.generate import KNNLM

    knn = KNNLM(lm, {"docs": docs_ds})
    text = json.loads(jsonl_corpus.read_text().splitlines()[2])["text"]
    s = knn.score(text, datastore="docs", lam=0.4, k=8)
    a = s.attribution()
    p_mix, p_lm = np.exp([t.logprob for t in s.tokens]), np.exp([t.logprob_lm for t in s.tokens])
    np.testing.assert_allclose(a.to_target.sum(1), p_mix - 0.6 * p_lm, atol=1e-9)
    rows = s.documents(3)
    assert len(rows) == 3 and {r["title"] for r in rows[:2]} == {"doc2", "doc6"}  # the text's two copies
    assert [r["weight"] for r in rows] == sorted((r["weight"] for r in rows), reverse=True)
    assert knn.score(text, datastore=None).documents() == []


def test_attribute_command(capsys, llama_dir, jsonl_corpus, docs_ds, tmp_path):
    from knnlm.cli.main import main

    text = tmp_path / "doc5.txt"
    text.write_text(json.loads(jsonl_corpus.read_text().splitlines()[5])["text"], encoding="utf-8")
    out = tmp_path / "a.json"
    assert main(["-q", "attribute", str(text), "-d", str(docs_ds), "--model", str(llama_dir), "--dtype", "float32",
                 "--device", "cpu", "-k", "8", "--lambda", "0.5", "--window", "32", "--stride", "16", "--top", "3",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    res = json.loads(out.read_text())
    # the corpus holds the text twice (doc1, doc5): those carry the most, equally
    assert {d["title"] for d in res["documents"][:2]} == {"doc1", "doc5"} and printed[2].split()[0] == "1"
    assert len(printed) == 2 + 3 + 1  # the summary line, the header, 3 documents, `wrote`
    # every position carried λ = 0.5 of the mass between its neighbours
    assert sum(d["weight"] for d in res["documents"]) == pytest.approx(0.5 * res["tokens"])
