import math

import numpy as np
import pytest

from knnlm.core.scoring import interpolate, knn_distribution, knn_target_logprobs, knn_target_logprobs_all_k, perplexity


def test_golden_three_neighbours():
    """Neighbours at d = 1, 2, 3 with values 7, 5, 7, T = 1, target 7:
    p_kNN(7) = (e^-1 + e^-3) / (e^-1 + e^-2 + e^-3) = 0.41767 / 0.55300 = 0.75527."""
    lp = knn_target_logprobs(np.array([[1.0, 2.0, 3.0]]), np.array([[7, 5, 7]]), np.array([7]), 1.0)
    assert math.exp(lp[0]) == pytest.approx(0.755272, abs=1e-6)


def test_golden_temperature_and_absent_target():
    """Same neighbours, T = 2, target 5: e^-1 / (e^-0.5 + e^-1 + e^-1.5) = 0.36788 / 1.19754 = 0.30720.
    Target 9 is no neighbour's value: p_kNN = 0, log = -inf."""
    d, v = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), np.array([[7, 5, 7], [7, 5, 7]])
    lp = knn_target_logprobs(d, v, np.array([5, 9]), 2.0)
    assert math.exp(lp[0]) == pytest.approx(0.307196, abs=1e-6)
    assert lp[1] == -np.inf


def test_huge_distances_do_not_underflow():
    """d = 1e5 and 1e5 + 1: weights e^0 : e^-1 after shifting, p(first) = 1 / (1 + e^-1) = 0.73106."""
    lp = knn_target_logprobs(np.array([[1e5, 1e5 + 1]]), np.array([[1, 2]]), np.array([1]), 1.0)
    assert math.exp(lp[0]) == pytest.approx(0.731059, abs=1e-6)


def test_missing_neighbours_have_no_weight():
    lp = knn_target_logprobs(np.array([[1.0, np.inf]]), np.array([[3, 3]]), np.array([3]), 1.0)
    assert lp[0] == pytest.approx(0.0)
    lp = knn_target_logprobs(np.array([[np.inf, np.inf]]), np.array([[3, 3]]), np.array([3]), 1.0)
    assert lp[0] == -np.inf


def test_all_k_matches_direct_computation():
    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0, 50, size=(20, 16)), axis=1)
    v = rng.integers(0, 4, size=(20, 16))
    t = rng.integers(0, 4, size=20)
    for temp in (0.5, 1.0, 7.0):
        got = knn_target_logprobs_all_k(d, v, t, temp, [1, 3, 16])
        for j, k in enumerate([1, 3, 16]):
            np.testing.assert_allclose(got[:, j], knn_target_logprobs(d[:, :k], v[:, :k], t, temp), rtol=1e-10)


def test_interpolation_golden():
    """lam = 0.25, p_LM = 0.1, p_kNN = 0.5: 0.25 * 0.5 + 0.75 * 0.1 = 0.2."""
    got = interpolate(np.log([0.1]), np.log([0.5]), 0.25)
    assert math.exp(got[0]) == pytest.approx(0.2)


def test_lambda_zero_is_exactly_the_lm():
    lm = np.log(np.array([0.1, 0.3, 1e-9]))
    knn = np.array([-np.inf, np.log(0.9), 0.0])
    assert np.array_equal(interpolate(lm, knn, 0.0), lm)
    assert not np.array_equal(interpolate(lm, knn, 0.5), lm)
    assert np.array_equal(interpolate(lm, knn, 1.0), knn)


def test_knn_distribution_sums_per_token():
    """Values 7, 5, 7 at d = 1, 2, 3: p(7) = 0.75527, p(5) = e^-2 / 0.55300 = 0.24473, others 0."""
    lp = knn_distribution(np.array([[1.0, 2.0, 3.0]]), np.array([[7, 5, 7]]), vocab_size=10).numpy()
    p = np.exp(lp[0])
    assert p[7] == pytest.approx(0.755272, abs=1e-6) and p[5] == pytest.approx(0.244728, abs=1e-6)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)


def test_perplexity():
    assert perplexity(np.log([0.5, 0.5])) == pytest.approx(2.0)


def test_chunked_rows_give_the_same_result():
    rng = np.random.default_rng(1)
    d = np.sort(rng.uniform(0, 9, (100, 8)), axis=1)
    v, t = rng.integers(0, 3, (100, 8)), rng.integers(0, 3, 100)
    assert np.array_equal(knn_target_logprobs(d, v, t, 1.0, chunk=7), knn_target_logprobs(d, v, t, 1.0))


def test_one_positions_sparse_p_knn_and_mixture_equal_the_full_vocabulary_math():
    import torch

    from knnlm.core.scoring import knn_distribution
    from knnlm.run.decode import mix_at, mix_distributions, sparse_knn_distribution

    rng = np.random.default_rng(0)
    V, k = 500, 64
    for trial in range(20):
        d = np.sort(rng.exponential(5.0, (1, k)).astype(np.float32), 1)
        d[0, k - trial % 5 :] = np.inf  # missing neighbours (an IVF probe found fewer)
        vals = rng.integers(0, 40 if trial % 2 else V, (1, k))  # many repeated values on odd trials
        counts = rng.integers(1, 4, (1, k)) if trial % 3 == 0 else None
        t = float(rng.choice([0.5, 1.0, 4.0]))
        full = knn_distribution(d, vals, V, t, counts)[0]
        sparse, hit = sparse_knn_distribution(d, vals, V, t, counts)
        # the same numbers up to the last bit (torch's vectorized and scalar loops may round apart)
        assert torch.equal(torch.isfinite(sparse), torch.isfinite(full))
        torch.testing.assert_close(sparse, full, rtol=1e-6, atol=1e-6)
        assert set(hit.tolist()) == set(torch.nonzero(torch.isfinite(full)).squeeze(1).tolist())
        lm = torch.log_softmax(torch.as_tensor(rng.normal(0, 3, V), dtype=torch.float32), -1)
        for lam in (0.0, 0.05, 0.5, 1.0):
            got, want = mix_at(lm, sparse, hit, lam), mix_distributions(lm, full, lam)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            if lam in (0.0, 1.0):
                assert torch.equal(got, want)
            else:  # where no neighbour predicts the token, exactly log(1 - λ) + log p_LM
                miss = ~torch.isfinite(full)
                assert torch.equal(got[miss], want[miss])
    d = np.full((1, k), np.inf, np.float32)  # no neighbour at all: p_kNN is -inf everywhere, nothing hit
    sparse, hit = sparse_knn_distribution(d, np.zeros((1, k), np.int64), V, 1.0)
    assert len(hit) == 0 and torch.equal(sparse, knn_distribution(d, np.zeros((1, k), np.int64), V, 1.0)[0])
