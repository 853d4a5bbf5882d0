"""The continuous cache (Grave et al., 2017): golden values, causality, the nested mixture."""

import math

import numpy as np
import pytest

from knnlm.core.batching import plan_files
from knnlm.core.index import Searcher
from knnlm.core.mix import Weight
from knnlm.core.scoring import cache_target_logprobs, cache_vocab_logprobs, interpolate, mix_cache
from knnlm.errors import KnnlmError
from knnlm.run.evaluate import CACHE_KEY_POINT, evaluate, score_plan
from knnlm.run.options import MixSettings

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


def test_vocabulary_distribution_golden():
    """The same three positions over a vocabulary of 8: at t = 2 (theta = 1) p(5) = 0.731059,
    p(7) = 1 - p(5), every other token -inf; t = 0 has an empty cache: no distribution."""
    lp = cache_vocab_logprobs(KEYS[2], KEYS[:2], TARGETS[:2], 8, theta=1.0, size=100)
    assert math.exp(lp[5]) == pytest.approx(0.731059, abs=1e-6)
    assert math.exp(lp[7]) == pytest.approx(1 - 0.731059, abs=1e-6)
    assert np.isinf(np.delete(lp, [5, 7])).all()
    assert cache_vocab_logprobs(KEYS[0], KEYS[:0], TARGETS[:0], 8, 1.0, 100) is None
    assert cache_vocab_logprobs(KEYS[2], KEYS[:2], TARGETS[:2], 8, 1.0, size=1)[7] == 0.0  # only h1 -> 7


def test_vocabulary_distribution_is_the_targets_one():
    """Over random keys, two documents, a small window: each position's distribution over
    the vocabulary gives its target exactly cache_target_logprobs' value and sums to 1."""
    rng = np.random.default_rng(1)
    n, d, v = 60, 6, 11
    keys, targets = rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, v, size=n)
    for size in (7, 100):
        want = cache_target_logprobs(keys, targets, [0, 25], 0.7, size)
        for t in range(n):
            a = 25 if t >= 25 else 0
            lp = cache_vocab_logprobs(keys[t], keys[a:t], targets[a:t], v, 0.7, size)
            if lp is None:
                assert t == a and np.isnan(want[t])
                continue
            assert np.logaddexp.reduce(lp) == pytest.approx(0.0, abs=1e-9)
            assert lp[targets[t]] == pytest.approx(want[t], abs=1e-6) if np.isfinite(want[t]) else \
                lp[targets[t]] == -np.inf


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


def test_cache_keys_of_documents_of_different_lengths(lm, jsonl_corpus):
    """Windows of documents of different lengths share a batch: each one's cache keys are
    its own positions' (a batch once took every window's keys up to the last window's end)."""
    import torch

    plan = plan_files(lm, [jsonl_corpus], 32, 16, 128)
    assert len(set(plan.docs[:, 1].tolist())) > 1 and len(plan.batches) < len(plan.docs)
    s = score_plan(lm, plan, keep_cache_keys=True, progress=False)
    for start, count, first in plan.docs.tolist():
        ids = torch.from_numpy(plan.tokens[start : start + count].astype(np.int64))[None]
        keys, _ = lm.forward(ids, [CACHE_KEY_POINT], logits=False)
        m = min(count - 1, 32)
        np.testing.assert_allclose(s.cache_keys[first : first + m], keys[CACHE_KEY_POINT][0, :m].numpy(),
                                   rtol=1e-4, atol=1e-4)


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


def test_cache_weight_resolves_like_the_datastores_lambda():
    """A number is used fixed (unless the mode says adaptive); "auto" is the datastore's
    recorded cache λ, else the default, adapting (unless the mode says fixed)."""
    from knnlm.core.settings import DEFAULT_CACHE_LAMBDA, cache_weight

    meta = {"settings": {"k": 8, "lambda": 0.2, "temperature": 1.0, "cache_lambda": 0.15}}
    assert cache_weight(meta, 0.3) == (Weight(0.3, False), "explicit")
    assert cache_weight(meta, 0.3, "adaptive") == (Weight(0.3, True), "explicit")
    assert cache_weight(meta, "auto") == (Weight(0.15, True), "datastore")
    assert cache_weight(meta, "auto", "fixed") == (Weight(0.15, False), "datastore")
    old = {"settings": {"k": 8, "lambda": 0.2, "temperature": 1.0}}  # tuned before the cache's λ was
    assert cache_weight(old, "auto") == (Weight(DEFAULT_CACHE_LAMBDA, True), "default")
    assert cache_weight(None, "auto") == (Weight(DEFAULT_CACHE_LAMBDA, True), "default")
    with pytest.raises(KnnlmError, match="cache lambda"):
        MixSettings(cache_lambda="sometimes")
    with pytest.raises(KnnlmError, match="cache lambda"):
        MixSettings(cache_lambda=1.5)


def test_self_tuned_cache_lambda_is_recorded_and_used(lm, datastore, corpus, tmp_path):
    """Self-tuning sweeps the cache's λ on top of the tuned kNN-LM and records it; "auto"
    uses it, adapting; on this repeated passage the cache helps, so it is above 0."""
    import shutil

    from knnlm.core.datastore import Datastore
    from knnlm.core.settings import CACHE_LAMBDAS
    from knnlm.run.selftune import self_tune

    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    s = self_tune(lm, Datastore(path), sample_tokens=4096, k=8, batch_tokens=128, progress=False)
    assert s["cache_lambda"] in CACHE_LAMBDAS and s["cache_lambda"] > 0
    assert Datastore(path).settings["cache_lambda"] == s["cache_lambda"]
    kw = dict(index="flat", window=32, stride=16, progress=False)
    auto = evaluate(lm, [corpus], path, cache_lambda="auto", **kw)
    assert (auto["cache_lambda"], auto["cache_lambda_mode"], auto["cache_lambda_source"]) == \
        (s["cache_lambda"], "adaptive", "datastore")
    assert auto["ppl_cache"] < auto["ppl_knnlm"]
    fixed = evaluate(lm, [corpus], path, cache_lambda=s["cache_lambda"], **kw)
    assert fixed["cache_lambda_mode"] == "fixed" and "cache_lambda_adapted" not in fixed
    assert fixed["ppl_knnlm"] == auto["ppl_knnlm"]


def test_auto_cache_falls_back_to_the_knnlm(lm, datastore, corpus, tmp_path):
    """A recorded cache λ of 0 (the cache did not help the datastore's own text) gives the
    kNN-LM exactly; with the default λ adapting, the cache can cost at most log(1/w0) =
    log 4 nats over the whole text against the kNN-LM alone (knnlm.core.mix)."""
    import shutil

    from knnlm.core.datastore import Datastore

    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    ds = Datastore(path)
    base = {"k": 8, "lambda": 0.25, "temperature": 1.0}
    kw = dict(index="flat", window=32, stride=16, progress=False)
    ds.record_settings({**base, "cache_lambda": 0.0})
    off = evaluate(lm, [corpus], path, cache_lambda="auto", **kw)
    assert off["cache_lambda"] == 0.0 and off["ppl_cache"] == off["ppl_knnlm"]
    ds.record_settings(base)  # tuned before the cache's λ was: the default, adapting
    old = evaluate(lm, [corpus], path, cache_lambda="auto", **kw)
    assert old["cache_lambda_source"] == "default" and old["cache_lambda_mode"] == "adaptive"
    n = old["tokens"]
    assert n * math.log(old["ppl_cache"]) <= n * math.log(old["ppl_knnlm"]) + math.log(4) + 1e-6


def test_cache_lambda_option_takes_auto():
    import argparse

    from knnlm.cli.common import cache_lambda_arg

    assert cache_lambda_arg("auto") == "auto" and cache_lambda_arg("0.1") == 0.1
    with pytest.raises(argparse.ArgumentTypeError, match="'auto'"):
        cache_lambda_arg("often")


@pytest.mark.parametrize("wrong_on_half", [False, True])
def test_self_tuned_cache_lambda_must_help_held_out(wrong_on_half):
    """Four tuning pieces; the cache is right (p 0.9) on pieces 0 and 2 and, on 1 and 3, also
    right or else a little wrong (p 0.05 vs the base's 0.1).  Swept on all of them a λ above 0
    wins either way; held out (λ swept on alternate pieces, the cache adapting on the others)
    it helps only where it is right everywhere, and is recorded as 0 where it is not."""
    from types import SimpleNamespace

    from knnlm.run.selftune import cache_lambda

    n, starts = 400, [0, 100, 200, 300]
    piece = np.searchsorted(starts, np.arange(n), "right") - 1
    cache = np.where(piece % 2 == 0, np.log(0.9), np.log(0.05 if wrong_on_half else 0.9))
    cache[starts] = np.nan  # each piece's first position: an empty cache
    scores = SimpleNamespace(plan=SimpleNamespace(docs=np.array([[0, 0, s] for s in starts])),
                             lm=np.full(n, np.log(0.1)), cache=cache, targets=np.zeros(n, dtype=np.int64),
                             dists=np.zeros((n, 1)), vals=np.zeros((n, 1), dtype=np.int64), lm_max=np.zeros(n))
    out = cache_lambda(scores, {"k": 1, "temperature": 1.0, "lambda": 0.0}, None, {0.05: cache})
    check = out["cache_lambda_heldout_ppl"]
    assert out["ppl_knnlm_cache"] < check["without"]  # on all the positions the sweep's λ helps
    if wrong_on_half:
        assert check["with"] > check["without"] and out["cache_lambda"] == 0.0
    else:
        assert check["with"] < check["without"] and out["cache_lambda"] > 0


def test_self_tuning_picks_the_cache_theta_that_fits():
    """Targets drawn from the cache's own distribution at θ = 0.02 (and from the base, a
    uniform LM, otherwise): swept over CACHE_THETAS with λ, self-tuning picks 0.02, and keeps
    it held out; the recorded θ is that one.  Keys of norm ~17 in 8 dimensions: θ h.h' of a
    few units at 0.02, so neighbouring θ give clearly different distributions."""
    from types import SimpleNamespace

    from knnlm.core.settings import CACHE_THETAS
    from knnlm.run.selftune import cache_by_theta, cache_lambda

    rng = np.random.default_rng(0)
    V, docs, length, theta = 50, 16, 200, 0.02
    n = docs * length
    keys = rng.normal(size=(n, 8)).astype(np.float32) * 6.0
    targets = np.empty(n, dtype=np.int64)
    for d in range(docs):
        a = d * length
        targets[a] = rng.integers(V)
        for t in range(a + 1, a + length):  # from the cache at θ (prob 0.5) or uniform
            if rng.random() < 0.5:
                w = np.exp(theta * (keys[a:t] @ keys[t]).astype(np.float64))
                targets[t] = targets[a:t][rng.choice(t - a, p=w / w.sum())]
            else:
                targets[t] = rng.integers(V)
    starts = np.arange(0, n, length)
    scores = SimpleNamespace(plan=SimpleNamespace(docs=np.array([[0, 0, s] for s in starts])), cache_keys=keys,
                             lm=np.full(n, -np.log(V)), targets=targets, dists=np.zeros((n, 1)),
                             vals=np.zeros((n, 1), dtype=np.int64), lm_max=np.zeros(n))
    caches = cache_by_theta(scores)
    assert set(caches) == set(CACHE_THETAS)
    out = cache_lambda(scores, {"k": 1, "temperature": 1.0, "lambda": 0.0}, None, caches)
    grid = out["ppl_knnlm_cache_by_theta"]
    assert out["cache_theta"] == theta and min(grid, key=grid.get) == str(theta)
    check = out["cache_lambda_heldout_ppl"]
    assert out["cache_lambda"] > 0 and check["with"] < check["without"]


def _datastore(lm, path, docs: list[str]):
    """A Flat datastore of `docs` (a .jsonl), window 32."""
    import json

    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    path.mkdir()
    src = path / "docs.jsonl"
    src.write_text("".join(json.dumps({"title": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    build_datastore(lm, [src], path / "ds", window=32, stride=16, batch_tokens=1024, progress=False)
    ds = Datastore(path / "ds")
    build_index(ds, "Flat", progress=False)
    return ds


def _tuned(lm, ds) -> tuple[dict, list]:
    """self_tune's settings (not recorded), and every score_plan call's retrieval k and Scores."""
    import knnlm.run.selftune as st

    calls = []

    def spy(*a, **k):
        calls.append((k["retrieval"].k, score_plan(*a, **k)))
        return calls[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(st, "score_plan", spy)
        s = st.self_tune(lm, ds, sample_tokens=2048, k=32, batch_tokens=1024, progress=False, record=False)
    return s, calls


def test_cache_is_tuned_on_long_pieces_where_documents_are_long(lm, tmp_path, monkeypatch):
    """Eight documents, each its own name (12 characters no other document has) then a passage
    all of them share (129 tokens), six times over: the other documents predict the passage,
    only the document's own earlier positions its name, never within a piece shorter than the
    gap.  Pieces scaled to the tiny model (window 32): 64 tokens, and 512 for the cache.  Tuned
    on the short pieces the cache never helps (λ 0); the documents being longer than a piece, it
    is tuned on long ones (a second pass, at the tuned k) and helps there held out."""
    import knnlm.run.selftune as st
    from tiny import TEXT

    rng = np.random.default_rng(0)
    pool = list("0123456789BCDEFGHIJKLOPQRSUVWXY")  # one token each, none in the shared passage
    docs = []
    for _ in range(8):
        name = "".join(rng.choice(pool, 12, replace=False))
        docs.append("".join(name + ". " + TEXT[:240] for _ in range(6)))
    ds = _datastore(lm, tmp_path / "long", docs)
    monkeypatch.setattr(st, "PIECE", 64)
    monkeypatch.setattr(st, "CACHE_PIECE", 64, raising=False)
    short, _ = _tuned(lm, ds)
    assert short["cache_lambda"] == 0.0
    monkeypatch.setattr(st, "CACHE_PIECE", 512, raising=False)
    s, calls = _tuned(lm, ds)
    assert [k for k, _ in calls] == [32, s["k"]] and (s["k"], s["lambda"]) == (short["k"], short["lambda"])
    assert s["cache_lambda"] > 0 and s["cache_lambda_heldout_ppl"]["with"] < s["cache_lambda_heldout_ppl"]["without"]
    assert s["cache_tuned_on"] == {"positions": calls[1][1].plan.count, "pieces": len(calls[1][1].plan.docs),
                                   "piece_tokens": 513}


def test_short_documents_tune_the_cache_on_the_same_positions(lm, tmp_path):
    """Documents no longer than a piece: one pass, the cache tuned on its positions, as before."""
    import knnlm.run.selftune as st
    from tiny import TEXT

    docs = [t.strip() + "." for t in TEXT.split(".") if t.strip()]
    s, calls = _tuned(lm, _datastore(lm, tmp_path / "short", docs))
    assert len(calls) == 1
    scores = calls[0][1]
    table = st.DistanceLambda.from_dict(s["lambda_by_distance"]) if "lambda_by_distance" in s else None
    again = st.cache_lambda(scores, s, table)
    assert {k: s[k] for k in again} == again
    assert s["cache_tuned_on"] == {"positions": s["tokens"], "pieces": s["pieces"], "piece_tokens": st.PIECE + 1}
