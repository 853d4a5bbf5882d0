import doctest

import numpy as np

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
