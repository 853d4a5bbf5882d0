"""Adaptive λ (knnlm.core.adapt): the datastore's weight follows the text being scored, so a
datastore that does not fit the text costs at most a few nats over the whole text."""

import json
import math
import shutil

import numpy as np
import pytest
from scipy.special import logsumexp

from knnlm.cli.main import main
from knnlm.core.adapt import Posterior, candidates, mix_target, mix_text, stream_lambdas
from knnlm.core.datastore import Datastore
from knnlm.core.scoring import interpolate, perplexity
from knnlm.core.settings import resolve
from knnlm.errors import KnnlmError
from knnlm.run.generate import KNNLM

WINDOWS = ["--window", "32", "--stride", "16", "--batch-tokens", "128"]


def texts(n, seed, knn_helps: float):
    """log p_LM and log p_kNN of n targets: p_kNN better by `knn_helps` nats on average."""
    rng = np.random.default_rng(seed)
    ll = np.log(rng.uniform(0.01, 0.5, n))
    lk = ll + knn_helps + rng.normal(0, 2.0, n)
    lk = np.minimum(lk, 0.0)
    lk[rng.random(n) < 0.2] = -np.inf  # no neighbour has the target
    return ll, lk


@pytest.mark.parametrize("lam0", [0.05, 0.25, 1 / 3, 0.4, 0.9])
def test_candidates_hold_zero_and_their_prior_mean_is_the_setting(lam0):
    grid, prior = candidates(lam0)
    assert grid[0] == 0.0 and lam0 in grid and grid.max() < 1.0
    assert prior.min() > 0 and prior.sum() == pytest.approx(1.0)
    assert prior @ grid == pytest.approx(lam0)
    assert Posterior(lam0).lam == pytest.approx(lam0)  # before any token: the tuned kNN-LM


@pytest.mark.parametrize("lam0", [0.0, 1.0])
def test_nothing_to_adapt_at_the_ends(lam0):
    ll, lk = texts(50, 0, 0.0)
    assert np.array_equal(stream_lambdas(ll, lk, lam0), np.full(50, lam0))


def test_the_first_position_is_the_fixed_mixture_and_later_ones_use_only_earlier_tokens():
    ll, lk = texts(200, 1, -1.0)
    lams = stream_lambdas(ll, lk, 0.25)
    assert lams[0] == pytest.approx(0.25)
    changed = lk.copy()
    changed[100:] = 0.0  # the future changes; λ up to position 100 must not
    assert np.array_equal(stream_lambdas(ll, changed, 0.25)[:101], lams[:101])


def test_reading_in_pieces_equals_reading_at_once():
    ll, lk = texts(300, 2, 0.5)
    whole = stream_lambdas(ll, lk, 0.2)
    post = Posterior(0.2)
    parts = [post.update(ll[a:b], lk[a:b]) for a, b in ((0, 1), (1, 7), (7, 7), (7, 150), (150, 300))]
    assert np.allclose(np.concatenate(parts), whole, rtol=0, atol=1e-12)


def test_it_is_the_bayesian_mixture_and_its_loss_is_bounded_by_each_candidates():
    """Σ_t log p_t = log Σ_j prior_j Π_t p_j(t) (exact), hence >= log prior_j + Σ_t log p_j(t)."""
    for helps in (-3.0, 0.0, 1.0):
        ll, lk = texts(2000, 3, helps)
        total = mix_text(ll, lk, 0.25, adapt=True)[0].sum()
        grid, prior = candidates(0.25)
        per = np.array([interpolate(ll, lk, float(g)).sum() for g in grid])
        assert total == pytest.approx(logsumexp(np.log(prior) + per), abs=1e-6)
        assert np.all(total >= np.log(prior) + per - 1e-9)
    # a useless datastore: never more than log(1 / w_0) nats worse than the LM over the whole text
    ll, lk = texts(2000, 4, -6.0)
    fixed, adaptive = interpolate(ll, lk, 0.25).sum(), mix_text(ll, lk, 0.25, adapt=True)[0].sum()
    assert fixed < ll.sum() - 50  # the fixed tuned λ hurts a lot
    assert adaptive >= ll.sum() - math.log(1 / prior[0]) - 1e-9


def test_lambda_moves_towards_the_weight_the_text_prefers():
    ll, lk = texts(3000, 5, 3.0)
    assert stream_lambdas(ll, lk, 0.2)[-1] > 0.35  # p_kNN keeps being right: towards λ_hi = 0.4
    ll, lk = texts(3000, 6, -6.0)
    assert stream_lambdas(ll, lk, 0.2)[-1] < 0.01  # p_kNN keeps being wrong: towards 0


def test_positions_without_a_search_are_the_lm_and_carry_no_evidence():
    ll, lk = texts(100, 7, -2.0)
    gaps = lk.copy()
    gaps[::2] = np.nan
    lams = stream_lambdas(ll, gaps, 0.3)
    assert np.allclose(lams[1::2], stream_lambdas(ll[1::2], lk[1::2], 0.3), atol=1e-12)
    out = mix_target(ll, gaps, lams)
    assert np.array_equal(out[::2], ll[::2])


def test_resolve_adapts_unless_lambda_is_given_or_the_papers_are_asked_for():
    meta = {"settings": {"k": 4, "lambda": 0.4, "temperature": 2.0}}
    assert resolve(meta).mode == "adaptive" and resolve({}).mode == "adaptive"
    assert resolve(meta, lam=0.1).mode == "fixed" and resolve(meta, paper=True).mode == "fixed"
    assert resolve(meta, lam=0.1, lambda_mode="adaptive").mode == "adaptive"
    assert resolve(meta, lambda_mode="fixed").mode == "fixed"
    with pytest.raises(KnnlmError, match="lambda mode"):
        resolve(meta, lambda_mode="sometimes")


@pytest.fixture
def mismatched(datastore, tmp_path):
    """The session datastore told that λ = 0.9 is right, and a text it knows nothing of."""
    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    Datastore(path).record_settings({"k": 4, "lambda": 0.9, "temperature": 1.0, "how": "test"})
    text = tmp_path / "other.txt"
    rng = np.random.default_rng(0)
    words = ["zebra", "quartz", "violin", "harbor", "maple", "neon", "orbit", "saffron"]
    text.write_text(" ".join(rng.choice(words, 400)), encoding="utf-8")
    return path, text


def test_eval_with_a_datastore_that_does_not_fit_the_text(capsys, mismatched, llama_dir, tmp_path):
    path, text = mismatched
    model = ["--model", str(llama_dir), "--dtype", "float32", "--device", "cpu"]
    out = tmp_path / "r.json"
    res = {}
    for mode in ("adaptive", "fixed"):
        assert main(["-q", "eval", str(text), "-d", str(path), *model, *WINDOWS, "-o", str(out),
                     "--lambda-mode", mode]) == 0
        res[mode] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "lambda=0.9 adaptive (ended at" in printed
    n = res["fixed"]["tokens"]
    assert res["fixed"]["lambda_mode"] == "fixed" and res["fixed"]["ppl_knnlm"] > res["fixed"]["ppl_lm"] * 1.05
    a = res["adaptive"]
    assert a["lambda_mode"] == "adaptive" and a["lambda_adapted"] < 0.9
    w0 = candidates(0.9)[1][0]
    assert math.log(a["ppl_knnlm"] / a["ppl_lm"]) <= math.log(1 / w0) / n + 1e-9  # the bound, per token
    assert a["ppl_knnlm"] < res["fixed"]["ppl_knnlm"]


def test_knnlm_score_adapts_like_eval(lm, mismatched):
    path, text = mismatched
    words = text.read_text().split()[:25]
    fixed = KNNLM(lm, {"ds": path}, lambda_mode="fixed").score(" ".join(words), neighbors=0)
    adaptive = KNNLM(lm, {"ds": path}).score(" ".join(words), top_logprobs=3)
    assert adaptive.settings["lambda_mode"] == "adaptive" and fixed.settings["lambda_mode"] == "fixed"
    ll = np.array([t.logprob_lm for t in adaptive.tokens])
    lk = np.array([t.logprob_knn for t in adaptive.tokens])
    got = np.array([t.logprob for t in adaptive.tokens])
    assert np.allclose(got, mix_text(ll, lk, 0.9, adapt=True)[0], atol=1e-9)
    assert np.allclose([t.logprob for t in fixed.tokens], interpolate(ll, lk, 0.9), atol=1e-9)
    assert got[0] == pytest.approx(fixed.tokens[0].logprob)  # the first token: λ = 0.9 either way
    assert perplexity(got) < perplexity([t.logprob for t in fixed.tokens])
    for t in adaptive.tokens:  # top_logprobs use each position's own λ
        if t.text in t.top:
            assert t.top[t.text] == pytest.approx(t.logprob, abs=1e-4)
