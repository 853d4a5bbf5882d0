"""The continuous cache (Grave et al. 2017) as one more memory of a sequence being decoded
or scored: its λ policy (`CacheUse`) and its entries so far (`CacheState`).

Its keys are the final hidden states (the input of the output embedding, the key point
"final"), read from the same forward pass as the logits; each position's entry is its key
and the token that followed it.  The distribution at a position (knnlm.core.scoring:
`cache_vocab_logprobs`, `cache_target_logprobs` when scoring a text) comes from the last
`size` entries of the same sequence (its document: the prompt and the generated tokens);
the first position has an empty cache, where the cache's λ is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from knnlm.core.mix import Weight
from knnlm.core.scoring import cache_target_logprobs, cache_vocab_logprobs
from knnlm.core.settings import cache_params, cache_weight
from knnlm.run.options import CacheSettings

CACHE_KEY_POINT = "final"  # the cache's keys: the final hidden states, as Grave et al. use


@dataclass(frozen=True)
class CacheUse:
    """A call's continuous cache: its λ (`lam`, adapting when `adapt`), where the λ came
    from (`source`: "datastore", "default" or "explicit"), and its similarity scale `theta`
    and `size` (knnlm.run.options.CacheSettings)."""

    lam: float
    adapt: bool
    theta: float
    size: int
    source: str = "explicit"

    @property
    def weight(self) -> Weight:
        return Weight(self.lam, self.adapt)

    def settings(self) -> dict:
        return {"cache_lambda": self.lam, "cache_lambda_mode": "adaptive" if self.adapt else "fixed",
                "cache_lambda_source": self.source, "cache_theta": self.theta, "cache_size": self.size}


class CacheState:
    """One sequence's cache entries: `feed` the final hidden states of the tokens just fed
    (and those tokens); `logprobs` is the next position's distribution, `targets` the fed
    tokens' own (the evidence of an adaptive λ)."""

    def __init__(self, use: CacheUse):
        self.use = use
        self.keys: np.ndarray | None = None  # (capacity, d) float32; rows [:n] hold entries, oldest first
        self.vals = np.zeros(0, dtype=np.int64)
        self.n = 0
        self.pending: np.ndarray | None = None  # (d,) the last position's key: its next token is not known yet

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        lo = max(0, self.n - self.use.size)
        if self.keys is None:
            return np.zeros((0, 0), dtype=np.float32), self.vals[:0]
        return self.keys[lo : self.n], self.vals[lo : self.n]

    def _add(self, keys: np.ndarray, vals: Sequence[int]) -> None:
        m = len(keys)
        if m == 0:
            return
        if self.keys is None:
            cap = max(16, 2 * m)
            self.keys, self.vals = np.empty((cap, keys.shape[1]), dtype=np.float32), np.empty(cap, dtype=np.int64)
        if self.n + m > len(self.keys):
            keep = min(self.n, self.use.size)  # only the last `size` entries are ever read again
            self.keys[:keep], self.vals[:keep] = (self.keys[self.n - keep : self.n].copy(),
                                                    self.vals[self.n - keep : self.n].copy())
            self.n = keep
            if self.n + m > len(self.keys):
                cap = 2 * (self.n + m)
                keys_, vals_ = np.empty((cap, self.keys.shape[1]), dtype=np.float32), np.empty(cap, dtype=np.int64)
                keys_[: self.n], vals_[: self.n] = self.keys[: self.n], self.vals[: self.n]
                self.keys, self.vals = keys_, vals_
        self.keys[self.n : self.n + m], self.vals[self.n : self.n + m] = keys, vals
        self.n += m

    def feed(self, keys: np.ndarray, ids: Sequence[int]) -> None:
        """The final hidden states (t, d) of the tokens `ids` (t,) just fed: the last
        position's key gets ids[0] as its next token, each fed position but the last the token after it."""
        keys = np.asarray(keys, dtype=np.float32).reshape(len(ids), -1)
        if self.pending is not None:
            self._add(self.pending[None], [ids[0]])
        self._add(keys[:-1], ids[1:])
        self.pending = keys[-1].copy()

    def targets(self, keys: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        """log p_cache(ids[j+1]) at each fed position j < t-1 (t-1,) (NaN: an empty cache),
        before `feed` takes these positions in."""
        keys = np.asarray(keys, dtype=np.float32).reshape(len(ids), -1)
        old_k, old_v = self._entries()
        ks = [old_k] if len(old_v) else []
        vs = [old_v] if len(old_v) else []
        if self.pending is not None:
            ks.append(self.pending[None])
            vs.append(np.array([ids[0]]))
        ks.append(keys[:-1])
        vs.append(np.asarray(ids[1:], dtype=np.int64))
        all_k, all_v = np.concatenate(ks), np.concatenate(vs)
        return cache_target_logprobs(all_k, all_v, [0], self.use.theta, self.use.size)[len(all_v) - (len(ids) - 1):]

    def logprobs(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """log p_cache (V,) at the next position, float32 on `like`'s device, and the token
        ids where it is > 0; (None, None) with an empty cache."""
        if self.pending is None:
            return None, None
        keys, vals = self._entries()
        lp = cache_vocab_logprobs(self.pending, keys, vals, like.shape[-1], self.use.theta, self.use.size)
        if lp is None:
            return None, None
        hit = torch.as_tensor(np.unique(vals[vals < like.shape[-1]]), device=like.device)
        return torch.as_tensor(lp.astype(np.float32), device=like.device), hit


def vocab_rows(keys: np.ndarray, ids: Sequence[int], use: CacheUse, vocab_size: int) -> torch.Tensor:
    """log p_cache over the vocabulary (T-1, V) at each position of a scored text (keys
    (T, d) its final hidden states, ids (T,) its tokens): -inf rows where the cache is empty."""
    keys = np.asarray(keys, dtype=np.float32)
    vals = np.asarray(ids[1:], dtype=np.int64)
    out = torch.full((len(ids) - 1, vocab_size), -float("inf"))
    for t in range(1, len(ids) - 1):
        lp = cache_vocab_logprobs(keys[t], keys[:t], vals[:t], vocab_size, use.theta, use.size)
        if lp is not None:
            out[t] = torch.as_tensor(lp.astype(np.float32))
    return out


def cache_use(meta: dict | None, lam: float | str | None, lambda_mode: str | None = None,
              cache: CacheSettings | None = None) -> CacheUse | None:
    """A call's cache: λ as knnlm.core.settings.cache_weight resolves it from the datastore's
    `meta` (None: no datastore), θ and size from `cache` where given, else the datastore's
    tuned ones, else the defaults (knnlm.core.settings.cache_params); None when no cache is
    mixed (not recorded, or λ 0, which would leave the mixture exactly as it is)."""
    w, source = cache_weight(meta, lam, lambda_mode)
    if w is None or w.lam == 0.0:
        return None
    cache = cache if cache is not None else CacheSettings()
    theta, size = cache_params(meta, cache.theta, cache.size)
    return CacheUse(w.lam, w.adapt, theta, size, source)
