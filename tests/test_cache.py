"""The continuous cache (Grave et al., 2017): golden values, causality, the nested mixture."""

import math

import numpy as np
import pytest

from knnlm.core.batching import plan_files
from knnlm.core.index import Searcher
from knnlm.core.scoring import cache_target_logprobs, interpolate, mix_cache
from knnlm.errors import KnnlmError
from knnlm.run.evaluate import CACHE_KEY_POINT, evaluate, score_plan

# three positions of one document: keys h0 = (1, 0), h1 = (0, 1), h2 = (2, 1); each
# position predicts the token after it: targets 5, 7, 5
KEYS = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
TARGETS = np.array([5, 7, 5])


def test_golden_three_positions():
    """theta = 1, cache of any size:
    t = 0: empty cache                      -> NaN
    t = 1: cache {h0 -> 5}; target 7         -> p = 0, log = -inf
    t = 2: cache {h0 -> 5, h1 -> 7}; h2.h0 = 2, h2.h1 = 1; target 5
           p = e^2 / (e^2 + e^1) = 1 / (1 + e^-1) = 0.731059"""
    lp = cache_target_logprobs(KEYS, TARGETS, [0], theta=1.0, size=100)
    assert np.isnan(lp[0]) and lp[1] == -np.inf
    assert math.exp(lp[2]) == pytest.approx(0.731059, abs=1e-6)


def test_golden_theta_and_size():
    """theta = 0.5: p(5 | t=2) = e^1 / (e^1 + e^0.5) = 1 / (1 + e^-0.5) = 0.622459.
    theta = 0: the cache is a unigram of the cached values: p(5 | t=2) = 1/2.
    size = 1: t = 2 sees only h1 -> 7, so p(5) = 0; t = 1 sees h0 -> 5, p(7) = 0."""
    assert math.exp(cache_target_logprobs(KEYS, TARGETS, [0], 0.5, 100)[2]) == pytest.approx(0.622459, abs=1e-6)
    assert math.exp(cache_target_logprobs(KEYS, TARGETS, [0], 0.0, 100)[2]) == pytest.approx(0.5)
    lp = cache_target_logprobs(KEYS, TARGETS, [0], 1.0, size=1)
    assert lp[1] == -np.inf and lp[2] == -np.inf


def test_documents_never_share_a_cache():
    """Two documents [h0, h1] and [h2]: h2 is a document's first position, so its cache is
    empty even though h0 predicts its target."""
    lp = cache_target_logprobs(KEYS, TARGETS, [0, 2], 1.0, 100)
    assert np.isnan(lp[0]) and lp[1] == -np.inf and np.isnan(lp[2])


def test_blocks_and_causality():
    """Any block size gives the same numbers as a direct loop over positions, and
    changing a later position's key or target never changes an earlier position's p."""
    rng = np.random.default_rng(0)
    n, d = 70, 6
    keys, targets = rng.normal(size=(n, d)), rng.integers(0, 5, size=n)
    starts = [0, 31]
    want = np.full(n, np.nan)
    for t in range(n):
        a = max(s for s in starts if s <= t)
        cache = range(max(a, t - 9), t)
        if not cache:
            continue
        w = np.array([math.exp(0.7 * keys[t] @ keys[i]) for i in cache])
        hit = sum(wi for wi, i in zip(w, cache) if targets[i] == targets[t])
        want[t] = math.log(hit / w.sum()) if hit else -np.inf
    for block in (1, 4, 64):
        got = cache_target_logprobs(keys, targets, starts, 0.7, size=9, block=block)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    keys2, targets2 = keys.copy(), targets.copy()
    keys2[50:] += 3.0
    targets2[50:] = 4
    got2 = cache_target_logprobs(keys2, targets2, starts, 0.7, size=9)
    np.testing.assert_array_equal(got2[:50], cache_target_logprobs(keys, targets, starts, 0.7, size=9)[:50])


def test_mix_golden():
    """cache_lambda = 0.25, p_cache = 0.8, p_base = 0.2: 0.25 * 0.8 + 0.75 * 0.2 = 0.35.
    An empty cache (NaN) leaves p_base; cache_lambda = 0 returns the base exactly."""
    base = np.log([0.2, 0.2, 1e-9])
    cache = np.array([math.log(0.8), np.nan, -np.inf])
    got = mix_cache(base, cache, 0.25)
    assert math.exp(got[0]) == pytest.approx(0.35)
    assert got[1] == base[1]
    assert got[2] == pytest.approx(math.log(0.75) + base[2])
    assert np.array_equal(mix_cache(base, cache, 0.0), base)
    with pytest.raises(KnnlmError):
        mix_cache(base, cache, 1.5)


def test_bad_settings_are_refused():
    with pytest.raises(KnnlmError, match="cache size"):
        cache_target_logprobs(KEYS, TARGETS, [0], 1.0, size=0)
    with pytest.raises(KnnlmError, match="theta"):
        cache_target_logprobs(KEYS, TARGETS, [0], -1.0, size=5)


def test_cache_keys_are_the_final_hidden_states(lm, corpus):
    """score_plan reads the cache keys in the same forward pass; they are the input of the
    output embedding at each scored position."""
    import torch

    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, keep_cache_keys=True, progress=False)
    ids = torch.from_numpy(plan.tokens[:32].astype(np.int64))[None]  # (1, 32)
    keys, _ = lm.forward(ids, [CACHE_KEY_POINT], logits=False)
    np.testing.assert_allclose(s.cache_keys[:32], keys[CACHE_KEY_POINT][0].numpy(), rtol=1e-4, atol=1e-5)
    assert s.cache is None


def test_cache_lambda_zero_is_exactly_the_knnlm(lm, datastore, corpus):
    kw = dict(index="flat", k=8, lam=0.25, window=32, stride=16, progress=False)
    plain = evaluate(lm, [corpus], datastore.path, **kw)
    zero = evaluate(lm, [corpus], datastore.path, cache_lambda=0.0, **kw)
    some = evaluate(lm, [corpus], datastore.path, cache_lambda=0.3, **kw)
    assert zero["ppl_cache"] == zero["ppl_knnlm"] == plain["ppl_knnlm"]
    assert some["ppl_cache"] != some["ppl_knnlm"]
    # per token, through the library: the nested mixture at cache_lambda = 0 is the kNN-LM
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(datastore, "flat"), k=8, cache_theta=0.5, progress=False)
    knnlm = interpolate(s.lm, s.knn, 0.25)
    assert np.array_equal(mix_cache(knnlm, s.cache, 0.0), knnlm)
    assert np.isnan(s.cache[0]) and np.isfinite(s.cache[1:]).mean() > 0.5


def test_cache_helps_on_repeated_text(lm, corpus):
    """The corpus is one passage said three times: from the second copy on, the cache
    holds the same contexts with the right next tokens.  With the random tiny LM
    (perplexity near its vocabulary) the cache cuts perplexity by far, and the
    similarity matters: theta > 0 beats a plain unigram cache (theta = 0) on the copies."""
    kw = dict(window=32, stride=16, progress=False)
    base = evaluate(lm, [corpus], **kw)
    with_cache = evaluate(lm, [corpus], cache_lambda=0.5, cache_theta=1.0, cache_size=1000, **kw)
    assert with_cache["ppl_lm"] == base["ppl_lm"]
    assert with_cache["ppl_cache"] < 0.2 * base["ppl_lm"]
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, keep_cache_keys=True, progress=False)
    copies = slice(plan.count // 3 + 1, None)  # targets of the second and third copies
    p = {th: np.exp(cache_target_logprobs(s.cache_keys, s.targets, [0], th, 1000)[copies]).mean()
         for th in (0.0, 1.0)}
    assert p[1.0] > 0.5 > p[0.0]
