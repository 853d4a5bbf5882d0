"""The one mixer (knnlm.core.mix): the LM and any set of memories, fixed or adaptive λ,
per-position (neighbour-aware) base λ; scoring and decoding give the same numbers."""

import itertools
import math

import numpy as np
import pytest
import torch

from knnlm.core.mix import Mixture, Weight, candidates, chain_weights, mix_targets, mix_text, mix_vocab
from knnlm.core.scoring import interpolate
from knnlm.errors import KnnlmError


def _text(n=300, J=2, seed=0, gaps=True):
    rng = np.random.default_rng(seed)
    ll = np.log(rng.uniform(0.01, 1.0, n))
    mem = np.log(rng.uniform(0.0, 1.0, (n, J)))  # some -inf-like: p can be tiny
    mem[rng.uniform(size=(n, J)) < 0.05] = -np.inf  # no neighbour has the token
    if gaps:
        mem[rng.uniform(size=(n, J)) < 0.2] = np.nan  # a silent memory: skipped search, empty cache
    return ll, mem


def _brute(ll, mem, weights, base=None):
    """The Bayesian predictive written out: a loop over positions and candidate vectors."""
    grids = [candidates(w.lam) if w.adapt else (np.array([w.lam]), np.array([1.0])) for w in weights]
    combos = list(itertools.product(*[range(len(g[0])) for g in grids]))
    log_w = np.array([sum(math.log(grids[j][1][c[j]]) for j in range(len(c))) for c in combos])
    out = []
    for t in range(len(ll)):
        ps = []
        for c in combos:
            lams = []
            for j, w in enumerate(weights):
                b = w.lam if base is None else base[t, j]
                vals = [0.0, b, min(2 * b, (1 + b) / 2)] if len(grids[j][0]) == 3 else [b]
                lams.append(0.0 if np.isnan(mem[t, j]) else vals[c[j]])
            p = math.exp(ll[t])
            for j, lam in enumerate(lams):  # memories in order, each on top of the mixture before it
                if lam:
                    p = lam * math.exp(mem[t, j]) + (1 - lam) * p
            ps.append(p)
        ps = np.array(ps)
        post = np.exp(log_w - log_w.max())
        post /= post.sum()
        out.append(math.log(post @ ps))
        log_w = log_w + np.log(ps)
    return np.array(out)


@pytest.mark.parametrize("weights", [
    [Weight(0.25, adapt=True)],
    [Weight(0.25, adapt=True), Weight(0.4, adapt=True)],
    [Weight(0.3, adapt=False), Weight(0.1, adapt=True)],
    [Weight(0.2), Weight(0.5)],
])
def test_it_is_the_bayesian_predictive(weights):
    ll, mem = _text(120, len(weights))
    got = mix_text(ll, mem, weights)[0]
    assert np.allclose(got, _brute(ll, mem, weights), atol=1e-10)


def test_neighbour_aware_base_is_the_bayesian_predictive_too():
    ll, mem = _text(120, 2, seed=3)
    base = np.random.default_rng(4).uniform(0.0, 0.6, (120, 2))
    weights = [Weight(0.25, adapt=True), Weight(0.3, adapt=False)]
    assert np.allclose(mix_text(ll, mem, weights, base)[0], _brute(ll, mem, weights, base), atol=1e-10)


def test_lambda_zero_is_the_lm_exactly():
    ll, mem = _text(200, 3)
    for adapt in (False, True):
        out = mix_text(ll, mem, [Weight(0.0, adapt)] * 3)[0]
        assert np.array_equal(out, ll)
    assert not np.array_equal(mix_text(ll, mem, [Weight(0.1)] * 3)[0], ll)


def test_fixed_chain_is_the_nested_mixture():
    """knn at 0.3, then a cache at 0.2 on top: flat weights (0.7 * 0.8, 0.3 * 0.8, 0.2)."""
    assert np.allclose(chain_weights(np.array([0.3, 0.2])), [0.3 * 0.8, 0.2])
    ll, mem = _text(200, 2, gaps=False)
    nested = interpolate(interpolate(ll, mem[:, 0], 0.3), mem[:, 1], 0.2)
    assert np.allclose(mix_text(ll, mem, [Weight(0.3), Weight(0.2)])[0], nested, atol=1e-12)


@pytest.mark.parametrize("J", [1, 2, 3])
def test_adaptive_bound_holds_for_several_memories(J):
    """Memories that are always wrong (p = 1e-6 of the token): the adaptive mixture loses at
    most Σ_j log(1/w0_j) nats over the whole text against the LM; fixed λ loses far more."""
    n = 2000
    ll = np.full(n, math.log(0.3))
    mem = np.full((n, J), math.log(1e-6))
    lams = [0.25, 0.1, 0.3][:J]
    weights = [Weight(lam, adapt=True) for lam in lams]
    bound = sum(-math.log(candidates(lam)[1][0]) for lam in lams)
    loss = -(mix_text(ll, mem, weights)[0].sum() - ll.sum())
    assert 0 < loss <= bound + 1e-9
    assert -(mix_text(ll, mem, [Weight(lam) for lam in lams])[0].sum() - ll.sum()) > 100 * bound
    # and against any candidate: total loss <= the candidate's + log(1/its prior)
    ll, mem = _text(n, J, seed=5)
    total = mix_text(ll, mem, weights)[0].sum()
    grids = [candidates(lam) for lam in lams]
    for c in itertools.product(range(3), repeat=J):
        fixed = mix_text(ll, mem, [Weight(float(grids[j][0][c[j]])) for j in range(J)])[0].sum()
        prior = np.prod([grids[j][1][c[j]] for j in range(J)])
        assert total >= fixed + math.log(prior) - 1e-9


def test_streaming_equals_reading_at_once():
    """Decoding: `omega` before each token, `observe` after it: the weights `step` gives."""
    ll, mem = _text(150, 2, seed=7)
    weights = [Weight(0.25, adapt=True), Weight(0.2, adapt=True)]
    whole = Mixture(weights).step(ll, mem)
    m = Mixture(weights)
    for t in range(len(ll)):
        om = m.omega(~np.isnan(mem[t]))
        assert np.allclose(om, whole[t], atol=1e-12)
        m.observe(ll[t], mem[t])


def test_vocabulary_mixture_gives_the_targets_numbers():
    """mix_vocab over (V,) at the target token equals mix_targets; a sparse memory (hits)
    equals the dense one; all-zero weights return the LM's tensor itself."""
    g = torch.Generator().manual_seed(0)
    V = 50
    lm = torch.log_softmax(torch.randn(V, generator=g), -1)
    dense = torch.log_softmax(torch.randn(V, generator=g), -1)
    sparse = torch.full((V,), -math.inf)
    hit = torch.tensor([3, 7, 11])
    sparse[hit] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    om = [0.2, 0.15]
    full = mix_vocab(lm, [sparse, dense], om)
    assert torch.allclose(mix_vocab(lm, [sparse, dense], om, hits=[hit, None]), full)
    assert torch.allclose(full.exp().sum(), torch.tensor(1.0), atol=1e-5)
    for tok in (3, 5):
        want = mix_targets([float(lm[tok])], [[float(sparse[tok]), float(dense[tok])]], om)[0]
        assert float(full[tok]) == pytest.approx(want, abs=1e-5)
    assert mix_vocab(lm, [sparse, None], [0.0, 0.0]) is lm


# ---- λ by the nearest neighbour's distance (knnlm.core.neighbor) ----------------------
def test_distance_table_golden():
    """The module doc's worked example."""
    from knnlm.core.neighbor import DistanceLambda

    t = DistanceLambda((10.0, 20.0), (0.6, 0.3, 0.05))
    assert t([4.0, 15.0, 20.0, np.nan]).tolist() == [0.6, 0.3, 0.05, 0.0]
    assert DistanceLambda.from_dict(t.as_dict()) == t
    assert DistanceLambda.from_dict({"edges": [2, 1], "lambdas": [0, 0, 0]}) is None  # not ascending: unreadable


def test_distance_and_confidence_table_golden():
    """The module doc's worked example with the LM's confidence; tables recorded before it
    (one λ per distance bucket) read as before, and need no confidence."""
    from knnlm.core.neighbor import DistanceLambda

    t = DistanceLambda((10.0, 20.0), ((0.6, 0.4), (0.3, 0.2), (0.05, 0.0)), (-1.0,))
    assert t([4.0, 4.0, 15.0, 20.0, np.nan], [math.log(0.2), math.log(0.9), -2.0, -0.5, -2.0]).tolist() == \
        [0.6, 0.4, 0.3, 0.0, 0.0]
    assert t.reads_confidence and DistanceLambda.from_dict(t.as_dict()) == t
    assert t.as_dict()["lambdas"] == [[0.6, 0.4], [0.3, 0.2], [0.05, 0.0]]
    with pytest.raises(KnnlmError, match="confidence"):
        t([4.0])
    old = DistanceLambda.from_dict({"edges": [10.0, 20.0], "lambdas": [0.6, 0.3, 0.05]})
    assert not old.reads_confidence and old([4.0, 15.0]).tolist() == old([4.0, 15.0], [-3.0, -0.1]).tolist() == [0.6, 0.3]
    bad = {"edges": [10.0], "lambdas": [[0.6, 0.4], [0.3]], "confidence_edges": [-1.0]}  # a short row: unreadable
    assert DistanceLambda.from_dict(bad) is None


def test_fit_reads_the_lms_confidence():
    """Near neighbours help only where the LM hesitates (its top token's p is low): the cells
    of a confident LM get a small λ, those of a hesitant one a large λ, and the fitted
    mixture beats the distance-only table on the same positions."""
    from knnlm.core.neighbor import fit

    rng = np.random.default_rng(1)
    n = 8000
    d = rng.uniform(0, 100, n)
    conf = rng.uniform(-4.0, 0.0, n)
    ll = np.where(conf > -2.0, math.log(0.8), math.log(0.05))
    lk = np.where(d < 50, np.where(conf > -2.0, math.log(0.01), math.log(0.9)), math.log(1e-4))
    t = fit(ll, lk, d, fallback=0.25, confidence=conf)
    plain = fit(ll, lk, d, fallback=0.25)
    assert t.reads_confidence and not plain.reads_confidence
    lam = t(d, conf)
    assert lam[(d < 40) & (conf < -2.5)].min() >= 0.9 and lam[(d < 40) & (conf > -1.5)].max() <= 0.05
    assert mix_targets(ll, lk[:, None], lam[:, None]).sum() > mix_targets(ll, lk[:, None], plain(d)[:, None]).sum()


def test_fit_checked_keeps_the_confidence_only_where_it_helps_held_out():
    """Self-tuning's choice: where the LM's confidence tells when the memory helps, the held-out
    check keeps it; where it is noise (the memory helps alike at every confidence), the table
    reads the distance alone."""
    from knnlm.core.neighbor import fit_checked

    rng = np.random.default_rng(2)
    n = 8000
    d, conf, groups = rng.uniform(0, 100, n), rng.uniform(-4.0, 0.0, n), np.arange(n) // 100
    ll = np.where(conf > -2.0, math.log(0.8), math.log(0.05))
    helps = np.where(d < 50, np.where(conf > -2.0, math.log(0.01), math.log(0.9)), math.log(1e-4))
    t, check = fit_checked(ll, helps, d, 0.25, conf, groups)
    assert t.reads_confidence and check["distance_and_confidence"] < check["distance"]
    alike = np.where(d < 50, math.log(0.3), math.log(1e-4)) + rng.normal(0, 0.5, n)
    t, check = fit_checked(np.full(n, math.log(0.2)), alike, d, 0.25, conf, groups)
    assert not t.reads_confidence and check["distance"] <= check["distance_and_confidence"]


def test_fit_finds_the_buckets_where_the_memory_helps():
    """Near neighbours are right (p_kNN = 0.9), far ones wrong (1e-4): the table trusts the near."""
    from knnlm.core.neighbor import fit

    rng = np.random.default_rng(0)
    n = 4000
    d = rng.uniform(0, 100, n)
    ll = np.full(n, math.log(0.2))
    lk = np.where(d < 50, math.log(0.9), math.log(1e-4))
    t = fit(ll, lk, d, fallback=0.25)
    lam = t(d)
    assert lam[d < 40].min() >= 0.9 and lam[d > 60].max() == 0.0
    assert mix_targets(ll, lk[:, None], lam[:, None]).sum() > mix_targets(ll, lk[:, None], [0.25]).sum()
