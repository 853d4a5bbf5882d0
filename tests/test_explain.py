import numpy as np

from knnlm.core.batching import plan_files
from knnlm.core.index import Searcher
from knnlm.run.evaluate import score_plan
from knnlm.run.explain import explain, neighbor_weights, render


def test_neighbor_weights_golden():
    """d = 0, ln 2, ln 4 at T = 1: weights 1 : 1/2 : 1/4, normalised 4/7, 2/7, 1/7."""
    w = neighbor_weights(np.array([0.0, np.log(2), np.log(4)]), 1.0)
    np.testing.assert_allclose(w, [4 / 7, 2 / 7, 1 / 7])


def test_explain_shows_biggest_gains_with_their_memories(lm, datastore, corpus):
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=4, keep_neighbors=True, progress=False)
    items = explain(lm, datastore, s, lam=0.5, temperature=1.0, top=3, neighbors=2, min_context=4)
    assert len(items) == 3
    gains = [np.log(it["p_knnlm"]) - np.log(it["p_lm"]) for it in items]
    assert gains == sorted(gains, reverse=True)
    for it in items:
        assert it["offset"] > 4
        assert abs(it["p_knnlm"] - (0.5 * it["p_knn"] + 0.5 * it["p_lm"])) < 1e-9
        assert len(it["neighbors"]) == 2
        n = it["neighbors"][0]
        assert n["weight"] >= it["neighbors"][1]["weight"]
        left, value, _ = datastore.context(n["entry"], before=24)
        assert n["value"] == lm.decode([value]) and n["context"] == lm.decode(left)
        assert n["matches_target"] == (value == s.targets[it["position"]])
    # the query's own context is the text before the target
    it = items[0]
    ids = lm.encode(corpus.read_text())
    assert it["context"] == lm.decode(ids[max(1, it["offset"] - 24): it["offset"]])
    md = render(items)
    assert md.count("### ") == 3 and "p_kNN" in md


def test_explain_by_probability_ranks_the_probability_added(lm, datastore, corpus):
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=4, keep_neighbors=True, progress=False)
    items = explain(lm, datastore, s, lam=0.5, temperature=1.0, top=5, neighbors=1, by="prob")
    added = [it["p_knnlm"] - it["p_lm"] for it in items]
    assert added == sorted(added, reverse=True)
    mix = np.logaddexp(np.log(0.5) + s.knn, np.log(0.5) + s.lm)
    doc_of = np.searchsorted(plan.docs[:, 2], np.arange(len(mix)), side="right") - 1
    eligible = np.arange(len(mix)) - plan.docs[doc_of, 2] + 1 > 4
    assert np.isclose(added[0], (np.exp(mix) - np.exp(s.lm))[eligible].max())
