"""Adaptive retrieval (He et al., EMNLP 2021): skip the search where the LM is sure enough.

The signal is the LM's own next-token distribution at the position, known before any
search: its largest probability (`max_prob`: skip where max p_LM >= threshold) or its
entropy in nats (`entropy`: skip where H(p_LM) <= threshold).  A skipped position uses
p_LM alone (its p_kNN is NaN in evaluation, None in generation).  threshold None never
skips, which is the plain kNN-LM exactly.

Worked example: p_LM = (0.9, 0.05, 0.05) has max_prob 0.9 and entropy
-(0.9 ln 0.9 + 2 * 0.05 ln 0.05) = 0.394 nats; `Adaptive("max_prob", 0.8)` skips it,
`Adaptive("entropy", 0.3)` does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from knnlm.core.adapt import mix_target
from knnlm.errors import KnnlmError

SIGNALS = ("max_prob", "entropy")


@dataclass(frozen=True)
class Adaptive:
    """Skip the search where `signal` says the LM is confident (see the module doc)."""

    signal: str = "max_prob"
    threshold: float | None = None

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise KnnlmError(f"adaptive signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        t = self.threshold
        if t is not None and (not isinstance(t, (int, float)) or math.isnan(t)
                              or (self.signal == "max_prob" and not 0.0 < t <= 1.0)
                              or (self.signal == "entropy" and t < 0)):
            want = "in (0, 1]" if self.signal == "max_prob" else ">= 0 (nats)"
            raise KnnlmError(f"adaptive {self.signal} threshold must be {want}, got {t!r}")

    def skip(self, max_logprob: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """(n,) bool: positions that do not search, from log max p_LM and H(p_LM) (n,)."""
        max_logprob = np.asarray(max_logprob, dtype=np.float64)
        if self.threshold is None:
            return np.zeros(max_logprob.shape, dtype=bool)
        if self.signal == "max_prob":
            return max_logprob >= math.log(self.threshold)
        return np.asarray(entropy, dtype=np.float64) <= self.threshold

    def settings(self) -> dict:
        return {"adaptive_signal": self.signal, "adaptive_threshold": self.threshold}


def confidence(logits):
    """log max p and entropy (nats) of softmax(logits) over the last axis: two (...,) float32
    torch tensors (the LM's own confidence, no target involved)."""
    import torch

    lg = logits.float()
    lse = torch.logsumexp(lg, -1, keepdim=True)
    logp = lg - lse  # (..., V)
    max_lp = logp.max(-1).values
    ent = -(logp.exp() * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum(-1)
    return max_lp, ent


def mix_where_searched(lm_logprobs: np.ndarray, knn_logprobs: np.ndarray, lam: float) -> np.ndarray:
    """The kNN-LM's log p(target) (n,), with p_LM alone where p_kNN is NaN (not retrieved)."""
    return mix_target(lm_logprobs, knn_logprobs, lam)
