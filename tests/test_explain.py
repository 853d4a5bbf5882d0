import numpy as np
import pytest

from knnlm.core.batching import plan_files
from knnlm.core.index import Searcher
from knnlm.core.settings import Resolved
from knnlm.errors import KnnlmError
from knnlm.run.evaluate import score_plan
from knnlm.run.explain import ExplainSettings, explain, neighbor_weights, render

HALF = Resolved(4, 0.5, 1.0, "explicit")  # λ = 0.5 fixed, T = 1


def test_neighbor_weights_golden():
    """d = 0, ln 2, ln 4 at T = 1: weights 1 : 1/2 : 1/4, normalised 4/7, 2/7, 1/7."""
    w = neighbor_weights(np.array([0.0, np.log(2), np.log(4)]), 1.0)
    np.testing.assert_allclose(w, [4 / 7, 2 / 7, 1 / 7])


def test_explain_shows_biggest_gains_with_their_memories(lm, datastore, corpus):
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=4, keep_neighbors=True, progress=False)
    items = explain(lm, datastore, s, HALF, ExplainSettings(top=3, neighbors=2, min_context=4))
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
    items = explain(lm, datastore, s, HALF, ExplainSettings(top=5, neighbors=1, by="prob"))
    added = [it["p_knnlm"] - it["p_lm"] for it in items]
    assert added == sorted(added, reverse=True)
    mix = np.logaddexp(np.log(0.5) + s.knn, np.log(0.5) + s.lm)
    doc_of = np.searchsorted(plan.docs[:, 2], np.arange(len(mix)), side="right") - 1
    eligible = np.arange(len(mix)) - plan.docs[doc_of, 2] + 1 > 4
    assert np.isclose(added[0], (np.exp(mix) - np.exp(s.lm))[eligible].max())


def test_explain_takes_its_flat_keywords_too(lm, datastore, corpus):
    """The settings groups and the flat keywords they replaced give the same items; a
    misspelt keyword, a bad setting or no λ at all is refused."""
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=4, keep_neighbors=True, progress=False)
    adaptive = Resolved(4, 0.3, 2.0, "explicit", adapt=True)
    grouped = explain(lm, datastore, s, adaptive, ExplainSettings(top=4, neighbors=2, context=8, by="prob"))
    flat = explain(lm, datastore, s, lam=0.3, temperature=2.0, adapt=True, top=4, neighbors=2, context=8, by="prob")
    assert grouped == flat and len(grouped) == 4
    assert grouped != explain(lm, datastore, s, adaptive, ExplainSettings(top=4, neighbors=2, context=8))
    assert explain(lm, datastore, s, adaptive, top=4, neighbors=2, context=8, by="prob") == grouped
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamda'"):
        explain(lm, datastore, s, lamda=0.3, temperature=1.0)
    with pytest.raises(TypeError, match="needs settings"):
        explain(lm, datastore, s, top=3)
    with pytest.raises(KnnlmError, match="by must be 'log' or 'prob'"):
        ExplainSettings(by="gain")
    with pytest.raises(KnnlmError, match="need top >= 1"):
        explain(lm, datastore, s, adaptive, top=0)
    with pytest.raises(KnnlmError, match="lambda must be in"):
        explain(lm, datastore, s, lam=1.5, temperature=1.0)


def test_explain_mixes_the_continuous_cache_after_the_datastore(lm, datastore, corpus):
    """With a cache weight, each shown p_kNN-LM is the datastore then the cache on top:
    0.3 p_cache + 0.7 (0.5 p_kNN + 0.5 p_LM), λ fixed, as evaluate and generation mix them."""
    from knnlm.core.mix import Weight
    from knnlm.run.options import CacheSettings

    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=4, keep_neighbors=True, cache=CacheSettings(),
                   progress=False)
    items = explain(lm, datastore, s, HALF, ExplainSettings(top=5, neighbors=1), cache=Weight(0.3))
    assert items and all("p_cache" in it for it in items)
    for it in items:
        want = 0.3 * it["p_cache"] + 0.7 * (0.5 * it["p_knn"] + 0.5 * it["p_lm"])
        assert it["p_knnlm"] == pytest.approx(want, rel=1e-9)
    assert any(abs(it["p_knnlm"] - (0.5 * it["p_knn"] + 0.5 * it["p_lm"])) > 1e-6 for it in items)
    with pytest.raises(KnnlmError, match="no continuous cache"):
        explain(lm, datastore, score_plan(lm, plan, Searcher(datastore, "flat"), k=4, keep_neighbors=True,
                                          progress=False), HALF, cache=Weight(0.3))
