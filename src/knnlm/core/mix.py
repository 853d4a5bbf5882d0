"""One mixer for the LM and any set of memories: pure math, no I/O.

A *memory* is any source of next-token probabilities besides the LM: the kNN datastore,
the continuous cache, a Memory Decoder, an n-gram model.  At position t memory j gives
log p_j(token) (of the target when scoring, over the vocabulary when decoding) or nothing
(NaN / None: a skipped search, an empty cache); nothing means λ_j = 0 there.  Memories are
mixed in order, each on top of the mixture before it,

    p^(0) = p_LM,    p^(j) = λ_j p_j + (1 - λ_j) p^(j-1),

so a memory with λ_j = 0 leaves the mixture exactly as it was (λ = 0 everywhere: the LM,
bit for bit).  The same mixture with flat weights: ω_j = λ_j Π_{i>j} (1 - λ_i) for memory j
and 1 - Σ_j ω_j for the LM (`chain_weights`); scoring and decoding both mix with ω.

Each memory's λ comes from a `Weight`: `lam`, its base value (the tuned one, or given), and
`adapt`.  A fixed weight uses λ_j = lam.  An adaptive one is a Bayesian mixture over three
values Λ_j = {0, lam, lam_hi} (lam_hi = min(2 lam, (1 + lam) / 2)) with prior weights
(w0, 1/2, w_hi) whose mean is lam (`candidates`): before the first token the mixture is the
tuned one.  Several memories adapt jointly over the product grid Λ_1 × ... × Λ_J (prior:
the product of theirs).  After each token every candidate vector g is weighted by the
probability its mixture gave that token, and position t mixes with the posterior mean of
the candidates' flat weights,

    ω(t) = Σ_g w_g(t) ω(λ_g),   w_g(t) ∝ prior_g Π_{s<t} p_{λ_g}(x_s),

which is exactly the Bayesian predictive (each mixture is linear in its flat weights).  Its
total log-loss over a text is at most that of the best candidate plus -log(its prior
weight); the all-zero candidate is the LM, so with every memory adaptive the mixture is
never more than Σ_j log(1/w0_j) nats worse than the LM over a whole text (log 4 for one
memory with lam <= 1/3, log 16 for two).  Only earlier tokens are used: nothing is peeked at.

Neighbour-aware λ: the base value may differ per position (`base`, e.g. λ read from the
nearest neighbour's distance, knnlm.core.neighbor); the candidates are then {0, b_t,
hi(b_t)} at position t with the prior fixed by `lam`, and the bound above still holds (the
zero candidate is the LM at every position).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from knnlm.errors import KnnlmError

MODES = ("adaptive", "fixed")


def candidates(lam0: float) -> tuple[np.ndarray, np.ndarray]:
    """The values Λ and their prior (both (G,)), prior mean = lam0.  lam0 of 0 or 1 has
    nothing to adapt between: Λ = {lam0}."""
    if lam0 <= 0.0 or lam0 >= 1.0:
        return np.array([float(lam0)]), np.array([1.0])
    hi = min(2.0 * lam0, (1.0 + lam0) / 2.0)
    w_hi = 0.5 * lam0 / hi
    return np.array([0.0, lam0, hi]), np.array([0.5 - w_hi, 0.5, w_hi])


def _hi(lam: np.ndarray) -> np.ndarray:
    return np.minimum(2.0 * lam, (1.0 + lam) / 2.0)


@dataclass(frozen=True)
class Weight:
    """How one memory's λ is chosen: `lam` fixed, or adapting from it (`adapt`)."""

    lam: float
    adapt: bool = False

    def __post_init__(self):
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0):
            raise KnnlmError(f"lambda must be in [0, 1], got {self.lam!r}")

    @property
    def mode(self) -> str:
        return "adaptive" if self.adapt else "fixed"


def chain_weights(lams: np.ndarray) -> np.ndarray:
    """Flat weights ω (..., J) of memories mixed in order with λ (..., J): ω_j = λ_j Π_{i>j} (1 - λ_i)."""
    lams = np.asarray(lams, dtype=np.float64)
    keep = np.cumprod((1.0 - lams)[..., ::-1], axis=-1)[..., ::-1]  # Π_{i>=j} (1 - λ_i)
    after = np.concatenate([keep[..., 1:], np.ones(lams.shape[:-1] + (1,))], axis=-1)  # Π_{i>j}
    return lams * after


def mix_targets(lm_logprobs, mem_logprobs, omega) -> np.ndarray:
    """log(ω_LM p_LM + Σ_j ω_j p_j) of each position's target (n,): lm (n,), mem (n, J)
    (NaN: the memory is silent there, and its ω must be 0), ω (n, J) or (J,); ω_LM = 1 - Σ ω.
    Where every ω_j is 0 the LM's log-prob itself."""
    ll = np.asarray(lm_logprobs, dtype=np.float64)
    lm_ = np.asarray(mem_logprobs, dtype=np.float64).reshape(len(ll), -1)
    om = np.broadcast_to(np.asarray(omega, dtype=np.float64), lm_.shape)
    total = om.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log1p(-total) + ll
        for j in range(lm_.shape[1]):
            on = om[:, j] > 0
            out = np.where(on, np.logaddexp(out, np.log(np.where(on, om[:, j], 1.0)) + np.where(on, lm_[:, j], 0.0)),
                           out)
    return np.where(total == 0.0, ll, out)


class Mixture:
    """The mixing state of one text read left to right (one generation, one scored text).

    `step` mixes several positions at once (scoring) and takes their tokens in as evidence;
    `omega` gives the next position's flat weights and `observe` its token's evidence
    (decoding, one token at a time).  Both give the same weights for the same text."""

    def __init__(self, weights: Sequence[Weight]):
        self.weights = list(weights)
        grids, priors, self.scaled = [], [], []
        for w in self.weights:
            g, p = candidates(w.lam) if w.adapt else (np.array([w.lam]), np.array([1.0]))
            grids.append(g)
            priors.append(p)
            self.scaled.append(len(g) == 3)  # per-position base b: (0, b, hi(b)); else (b,)
        combos = list(itertools.product(*[range(len(g)) for g in grids]))
        self.index = np.array(combos, dtype=np.int64).reshape(len(combos), len(grids))  # (G, J)
        self.grid = np.stack([grids[j][self.index[:, j]] for j in range(len(grids))], axis=1) if grids else \
            np.zeros((1, 0))  # (G, J)
        with np.errstate(divide="ignore"):
            self.log_prior = np.sum([np.log(priors[j][self.index[:, j]]) for j in range(len(grids))], axis=0) \
                if grids else np.zeros(1)
        self.log_w = np.array(self.log_prior, dtype=np.float64).reshape(-1)  # (G,)
        self.last_lams: np.ndarray | None = None  # after `step`: each memory's posterior mean λ (n, J)

    @property
    def adapts(self) -> bool:
        return len(self.log_w) > 1

    @property
    def lams(self) -> np.ndarray:
        """Each memory's posterior mean λ now (J,) (at its base value)."""
        w = np.exp(self.log_w - self.log_w.max())
        return (w / w.sum()) @ self.grid

    def _cand(self, present: np.ndarray, base: np.ndarray | None) -> np.ndarray:
        """λ of every candidate at every position (n, G, J): the grid, or the grid's index
        applied to per-position base values (n, J); 0 where a memory is silent."""
        n = len(present)
        if base is None:
            lam = np.broadcast_to(self.grid[None], (n,) + self.grid.shape).copy()
        else:
            b = np.asarray(base, dtype=np.float64).reshape(n, -1)
            lam = np.empty((n,) + self.grid.shape)
            for j in range(self.grid.shape[1]):
                if self.scaled[j]:
                    opts = np.stack([np.zeros(n), b[:, j], _hi(b[:, j])], axis=1)  # (n, 3)
                    lam[:, :, j] = opts[:, self.index[:, j]]
                else:
                    lam[:, :, j] = b[:, j : j + 1]
        return np.where(present[:, None, :], lam, 0.0)

    def step(self, lm_logprobs, mem_logprobs, base=None) -> np.ndarray:
        """Flat weights ω (n, J) of these positions, in order, each from the positions before
        it; then takes their tokens in as evidence.  lm (n,), mem (n, J) log-probs of the
        targets (NaN: silent), base (n, J): per-position base λ (None: the weights' own)."""
        ll = np.atleast_1d(np.asarray(lm_logprobs, dtype=np.float64))
        lm_ = np.asarray(mem_logprobs, dtype=np.float64).reshape(len(ll), -1)
        present = ~np.isnan(lm_)
        flat = chain_weights(self._cand(present, base))  # (n, G, J)
        every = self._cand(np.ones_like(present), base)  # (n, G, J): λ as if every memory spoke
        if not self.adapts or not len(ll):
            self.last_lams = every[:, 0, :]
            return flat[:, 0, :]
        filled = np.where(present, lm_, -np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = np.log1p(-flat.sum(axis=2)) + ll[:, None]  # (n, G)
            for j in range(flat.shape[2]):
                cand = np.logaddexp(cand, np.log(flat[:, :, j]) + filled[:, j : j + 1])
        gain = cand - ll[:, None]  # relative to the LM: same posterior, no overflow
        gain = np.where(np.isnan(gain), 0.0, gain)
        before = np.vstack([np.zeros((1, gain.shape[1])), np.cumsum(gain, axis=0)[:-1]])  # (n, G)
        log_w = self.log_w[None, :] + before
        post = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        post /= post.sum(axis=1, keepdims=True)
        self.log_w = self.log_w + before[-1] + gain[-1]
        self.log_w -= self.log_w.max()
        self.last_lams = np.einsum("ng,ngj->nj", post, every)  # each memory's posterior mean λ (n, J)
        return np.einsum("ng,ngj->nj", post, flat)

    def omega(self, present: Sequence[bool], base: Sequence[float] | None = None) -> np.ndarray:
        """Flat weights (J,) at the next position, where memories `present` (J,) speak."""
        pres = np.asarray(present, dtype=bool)[None]
        flat = chain_weights(self._cand(pres, None if base is None else np.asarray(base)[None]))[0]  # (G, J)
        w = np.exp(self.log_w - self.log_w.max())
        return (w / w.sum()) @ flat

    def observe(self, lm_logprob: float, mem_logprobs: Sequence[float], base: Sequence[float] | None = None) -> None:
        """Take one position's token in as evidence (after `omega` gave its weights)."""
        if self.adapts:
            self.step([lm_logprob], np.asarray(mem_logprobs, dtype=np.float64)[None],
                      None if base is None else np.asarray(base)[None])


def mix_text(lm_logprobs, mem_logprobs, weights: Sequence[Weight], base=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole text read in order: log p(target) (n,), the flat weights used (n, J) and each
    memory's λ at the end (J,)."""
    mix = Mixture(weights)
    mem = np.asarray(mem_logprobs, dtype=np.float64).reshape(len(np.atleast_1d(lm_logprobs)), -1)
    omega = mix.step(lm_logprobs, mem, base)
    return mix_targets(lm_logprobs, mem, omega), omega, mix.lams


def best_lambda(base_logprobs, mem_logprobs, lambdas: Sequence[float]) -> dict:
    """One memory mixed on top of `base` (n,) at each fixed λ of `lambdas`, mem (n,) NaN where
    silent: {"grid": [{lambda, ppl}], "best": the lowest perplexity (the first of equals, so
    list 0 first to prefer the base alone on a tie)}."""
    base = np.asarray(base_logprobs, dtype=np.float64)
    mem = np.asarray(mem_logprobs, dtype=np.float64)
    present = ~np.isnan(mem)
    grid = []
    for lam in lambdas:
        lp = mix_targets(base, mem, np.where(present, float(lam), 0.0)[:, None])
        grid.append({"lambda": float(lam), "ppl": float(np.exp(-lp.mean())) if len(lp) else float("nan")})
    return {"grid": grid, "best": min(grid, key=lambda r: r["ppl"])}


def mix_vocab(lm_logprobs, mem_logprobs: Sequence, omega: Sequence[float], hits: Sequence | None = None):
    """log(ω_LM p_LM + Σ_j ω_j p_j) over the vocabulary, torch (..., V): mem_logprobs a list
    of (..., V) log-probs (None: silent, its ω must be 0), omega (J,) floats, or (m, J) for
    (m, V) rows each with its own weights.  hits[j], when
    given, the token ids where p_j > 0 (p_j = 0 elsewhere): the logaddexp runs only there.
    Every ω_j = 0 returns lm_logprobs itself."""
    import torch

    if np.ndim(omega) == 2:  # one row of weights per row of (m, V)
        return torch.stack([mix_vocab(lm_logprobs[i], [None if x is None else x[i] for x in mem_logprobs], omega[i],
                                      None if hits is None else [None if h is None else h[i] for h in hits])
                            for i in range(len(omega))])
    om = [float(x) for x in omega]
    total = sum(om)
    if total == 0.0:
        return lm_logprobs
    mix = math.log1p(-total) + lm_logprobs if total < 1.0 else torch.full_like(lm_logprobs, -math.inf)
    for j, (w, mem) in enumerate(zip(om, mem_logprobs)):
        if w == 0.0 or mem is None:
            continue
        hit = None if hits is None else hits[j]
        if hit is None:
            mix = torch.logaddexp(mix, math.log(w) + mem)
        else:
            mix[..., hit] = torch.logaddexp(mix[..., hit], math.log(w) + mem[..., hit])
    return mix

