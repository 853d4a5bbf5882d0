"""Adaptive λ: the datastore's weight learned from the text being scored, as it is read.

A datastore tuned on its own corpus knows its best λ for text like that corpus, not for
the text a user brings.  On text of another kind (a datastore of encyclopedia leads, a test
set with WikiText's ` @-@ ` tokenisation) any fixed λ > 0 can make perplexity worse than
the LM alone.  So the weight is a Bayesian mixture over three fixed weights

    Λ = {0, λ0, λ_hi}      (λ0: the datastore's tuned λ; λ_hi = min(2 λ0, (1 + λ0) / 2))

with prior weights (w_0, 1/2, w_hi) chosen so that the prior mean is exactly λ0: before the
first token the mixture is the tuned kNN-LM.  After each scored token every candidate's
weight is multiplied by the probability it gave that token, so position t uses

    λ_t = Σ_j w_j(t) λ_j,   w_j(t) ∝ prior_j Π_{s<t} (λ_j p_kNN(x_s) + (1 - λ_j) p_LM(x_s))

and, since the mixture is linear in λ, p_t = λ_t p_kNN + (1 - λ_t) p_LM is exactly the
Bayesian predictive.  Its total log-loss over a text is at most that of the best candidate
plus -log(its prior weight): never more than log(1/w_0) nats (log 4 = 1.39 for λ0 <= 1/3)
worse than the LM alone over the whole text, and never more than log 2 worse than the fixed
tuned λ0.  Only earlier tokens are used: nothing is peeked at.

Pure array math; positions whose p_kNN is NaN (no search there: pointers, adaptive
retrieval) carry no evidence and leave the weights unchanged.
"""

from __future__ import annotations

import numpy as np

MODES = ("adaptive", "fixed")


def candidates(lam0: float) -> tuple[np.ndarray, np.ndarray]:
    """The weights Λ and their prior (both (G,)), prior mean = lam0.  λ0 of 0 or 1 has
    nothing to adapt between: Λ = {λ0}."""
    if lam0 <= 0.0 or lam0 >= 1.0:
        return np.array([float(lam0)]), np.array([1.0])
    hi = min(2.0 * lam0, (1.0 + lam0) / 2.0)
    w_hi = 0.5 * lam0 / hi
    return np.array([0.0, lam0, hi]), np.array([0.5 - w_hi, 0.5, w_hi])


class Posterior:
    """The weights' posterior over one text, read left to right (`update` in order)."""

    def __init__(self, lam0: float):
        self.grid, prior = candidates(lam0)
        self.log_w = np.log(prior)

    @property
    def lam(self) -> float:
        """λ for the next position: the posterior mean."""
        w = np.exp(self.log_w - self.log_w.max())
        return float(w @ self.grid / w.sum())

    def update(self, lm_logprobs, knn_logprobs) -> np.ndarray:
        """λ_t for each of these positions (n,), in order, each from the positions before it
        (earlier `update`s included); then takes their tokens in as evidence."""
        ll = np.atleast_1d(np.asarray(lm_logprobs, dtype=np.float64))
        lk = np.atleast_1d(np.asarray(knn_logprobs, dtype=np.float64))
        if len(self.grid) == 1 or not len(ll):
            return np.full(len(ll), self.lam)
        none = np.isnan(lk)
        with np.errstate(divide="ignore"):
            lg = np.log(self.grid)[None, :]
            l1 = np.log1p(-self.grid)[None, :]
            mix = np.logaddexp(lg + np.where(none, -np.inf, lk)[:, None], l1 + ll[:, None])  # (n, G)
        gain = np.where(none[:, None], 0.0, mix - ll[:, None])  # relative to the LM: same argmax, no overflow
        before = np.vstack([np.zeros((1, len(self.grid))), np.cumsum(gain, axis=0)[:-1]])  # (n, G)
        log_w = self.log_w[None, :] + before
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        lams = (w @ self.grid) / w.sum(axis=1)
        self.log_w = self.log_w + before[-1] + gain[-1]
        self.log_w -= self.log_w.max()
        return lams


def stream_lambdas(lm_logprobs, knn_logprobs, lam0: float, adapt: bool = True) -> np.ndarray:
    """λ_t at every position of one text read in order (n,): adapting from lam0, or lam0
    throughout when not `adapt`."""
    if not adapt:
        return np.full(len(np.atleast_1d(lm_logprobs)), float(lam0))
    return Posterior(lam0).update(lm_logprobs, knn_logprobs)


def mix_target(lm_logprobs, knn_logprobs, lams) -> np.ndarray:
    """log(λ_t p_kNN + (1 - λ_t) p_LM) per position (n,), λ_t an array; p_LM alone where
    p_kNN is NaN (not retrieved) or λ_t = 0."""
    ll = np.asarray(lm_logprobs, dtype=np.float64)
    lk = np.asarray(knn_logprobs, dtype=np.float64)
    lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), ll.shape)
    none = np.isnan(lk) | (lams == 0.0)
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log(lams) + np.where(none, -np.inf, lk), np.log1p(-lams) + ll)
    return np.where(none, ll, mixed)


def mix_text(lm_logprobs, knn_logprobs, lam0: float, adapt: bool) -> tuple[np.ndarray, float]:
    """The kNN-LM's log p(target) over one text read in order (n,), and the λ it ends with:
    λ adapting from lam0 (`adapt`) or lam0 throughout."""
    if not adapt:
        return mix_target(lm_logprobs, knn_logprobs, lam0), float(lam0)
    post = Posterior(lam0)
    lams = post.update(lm_logprobs, knn_logprobs)
    return mix_target(lm_logprobs, knn_logprobs, lams), post.lam
