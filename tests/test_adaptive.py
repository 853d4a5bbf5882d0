"""Adaptive retrieval (knnlm.retrieval.adaptive): skip the search where the LM is confident;
never skipping is the plain kNN-LM exactly, skipping everywhere is the LM exactly."""

import math

import numpy as np
import pytest
import torch

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.errors import KnnlmError
from knnlm.retrieval.adaptive import Adaptive, confidence, mix_where_searched
from knnlm.retrieval.pointers import Pointers
from knnlm.run.evaluate import evaluate
from knnlm.run.generate import KNNLM


def test_confidence_worked_example():
    """p = (0.9, 0.05, 0.05): max p 0.9, entropy -(0.9 ln 0.9 + 2 * 0.05 ln 0.05) = 0.3944 nats."""
    max_lp, ent = confidence(torch.log(torch.tensor([[0.9, 0.05, 0.05]])))
    assert math.isclose(float(max_lp[0]), math.log(0.9), rel_tol=1e-6)
    assert math.isclose(float(ent[0]), 0.394398, rel_tol=1e-5)
    assert Adaptive("max_prob", 0.8).skip(max_lp.numpy(), ent.numpy()).tolist() == [True]
    assert Adaptive("entropy", 0.3).skip(max_lp.numpy(), ent.numpy()).tolist() == [False]
    assert Adaptive("entropy", 0.4).skip(max_lp.numpy(), ent.numpy()).tolist() == [True]
    assert Adaptive().skip(max_lp.numpy(), ent.numpy()).tolist() == [False]  # no threshold: never


def test_mix_where_searched_uses_the_lm_where_not_retrieved():
    lm = np.log([0.5, 0.25])
    knn = np.array([np.log(0.1), np.nan])
    out = mix_where_searched(lm, knn, 0.5)
    assert math.isclose(out[0], math.log(0.3)) and out[1] == lm[1]


def test_bad_settings():
    with pytest.raises(KnnlmError, match="signal"):
        Adaptive("margin", 0.5)
    with pytest.raises(KnnlmError, match=r"in \(0, 1\]"):
        Adaptive("max_prob", 1.5)
    with pytest.raises(KnnlmError, match="nats"):
        Adaptive("entropy", -1.0)


@pytest.fixture(scope="module")
def docs_ds(lm, jsonl_corpus, tmp_path_factory):
    out = build_datastore(lm, [jsonl_corpus], tmp_path_factory.mktemp("ada") / "ds", window=32, stride=16,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return Datastore(out)


def run(lm, corpus, ds, **kw):
    return evaluate(lm, [corpus], ds.path, k=4, lam=0.5, window=32, stride=16, progress=False, **kw)


def test_never_skip_is_plain_and_always_skip_is_the_lm(lm, jsonl_corpus, docs_ds):
    plain = run(lm, jsonl_corpus, docs_ds)
    never = run(lm, jsonl_corpus, docs_ds, adaptive=Adaptive("max_prob", None))
    assert never["ppl_knnlm"] == plain["ppl_knnlm"] and never["search_rate"] == 1.0
    always = run(lm, jsonl_corpus, docs_ds, adaptive=Adaptive("max_prob", 1e-9))
    assert always["ppl_knnlm"] == always["ppl_lm"] and always["search_rate"] == 0.0
    some = run(lm, jsonl_corpus, docs_ds, adaptive=Adaptive("max_prob", 0.0044))  # the random LM is near uniform
    assert 0 < some["search_rate"] < 1
    assert some["ppl_knnlm"] not in (plain["ppl_knnlm"], plain["ppl_lm"])
    both = run(lm, jsonl_corpus, docs_ds, adaptive=Adaptive("max_prob", 0.0044), pointers=Pointers(1))
    assert both["search_rate"] < some["search_rate"]


def test_generation_and_scoring_with_adaptive(lm, docs_ds):
    knn = KNNLM(lm, {"docs": docs_ds.path}, k=4, lam=0.5)
    plain = knn.generate("the quick", 8, ignore_eos=True)
    never = knn.generate("the quick", 8, ignore_eos=True, adaptive=Adaptive("max_prob", None))
    assert never.ids == plain.ids and [t.logprob for t in never.tokens] == [t.logprob for t in plain.tokens]
    skip = knn.generate("the quick", 8, ignore_eos=True, adaptive=Adaptive("max_prob", 1e-9))
    with knn.disabled():
        base = knn.generate("the quick", 8, ignore_eos=True)
    assert skip.ids == base.ids and all(t.logprob_knn is None for t in skip.tokens)
    assert [t.logprob for t in skip.tokens] == [t.logprob_lm for t in skip.tokens]
    s_plain, s_never = knn.score("the quick brown fox"), knn.score("the quick brown fox", adaptive=Adaptive())
    assert [t.logprob for t in s_never.tokens] == [t.logprob for t in s_plain.tokens]
    s_skip = knn.score("the quick brown fox", adaptive=Adaptive("max_prob", 1e-9))
    assert [t.logprob for t in s_skip.tokens] == [t.logprob_lm for t in s_skip.tokens]
