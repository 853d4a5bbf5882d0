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

The mixing itself (several memories at once) is `knnlm.core.mix`; this module is its
one-memory case under the names the kNN-LM's code has used.  Pure array math; positions whose p_kNN is NaN (no search there: pointers, adaptive
retrieval) carry no evidence and leave the weights unchanged.
"""

from __future__ import annotations

import numpy as np

from knnlm.core.mix import MODES, Mixture, Weight, candidates, mix_targets  # noqa: F401  (MODES, candidates: here before core.mix)
from knnlm.core.mix import mix_text as _mix_text


class Posterior:
    """The weights' posterior over one text, read left to right (`update` in order): the
    one-memory case of `knnlm.core.mix.Mixture`."""

    def __init__(self, lam0: float):
        self.mixture = Mixture([Weight(float(lam0), adapt=True)])
        self.grid = self.mixture.grid[:, 0]

    @property
    def lam(self) -> float:
        """λ for the next position: the posterior mean."""
        return float(self.mixture.lams[0])

    def update(self, lm_logprobs, knn_logprobs) -> np.ndarray:
        """λ_t for each of these positions (n,), in order, each from the positions before it
        (earlier `update`s included); then takes their tokens in as evidence."""
        ll = np.atleast_1d(np.asarray(lm_logprobs, dtype=np.float64))
        if not len(ll):
            return np.empty(0)
        self.mixture.step(ll, np.atleast_1d(np.asarray(knn_logprobs, dtype=np.float64))[:, None])
        return self.mixture.last_lams[:, 0]


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
    return mix_targets(ll, lk[:, None], np.where(np.isnan(lk), 0.0, lams)[:, None])


def mix_text(lm_logprobs, knn_logprobs, lam0: float, adapt: bool) -> tuple[np.ndarray, float]:
    """The kNN-LM's log p(target) over one text read in order (n,), and the λ it ends with:
    λ adapting from lam0 (`adapt`) or lam0 throughout."""
    lp, _, lams = _mix_text(lm_logprobs, np.asarray(knn_logprobs, dtype=np.float64)[:, None],
                               [Weight(float(lam0), adapt)])
    return lp, float(lams[0])
