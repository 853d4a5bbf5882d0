"""The kNN-LM inside transformers' own `generate`: a LogitsProcessor (made by
`KNNLM.logits_processor()`) that turns the LM's next-token scores into the mixture's log-probs."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor

from knnlm.core.scoring import knn_distribution
from knnlm.run.continuous import CACHE_KEY_POINT, CacheUse
from knnlm.run.decode import MixState, Retrieval


class KNNLogitsProcessor(LogitsProcessor):
    """Turns the LM's next-token scores into kNN-LM log-probs inside HF `generate`.

    The query key is the one the model computed at the last position in its own forward
    pass (captured by a hook that `KNNLM.logits_processor()` installs), and so is the
    continuous cache's key, the final hidden state.  Custom processors run before HF's
    temperature/top-k/top-p warpers, so sampling applies to the mixture, as in
    `KNNLM.generate`.  Use a batch of one or left padding.  Each row's λ adapts to the
    tokens generated, and its cache holds the positions from the prompt's last one on: the
    processor reads no prompt (`KNNLM.generate` does).
    """

    def __init__(self, lm, r: Retrieval | None, c: CacheUse | None = None):
        self.lm, self.r, self.c = lm, r, c
        self.captured: dict[str, torch.Tensor] = {}
        self.mixing: list[MixState] = []  # one per row: λ adapts to the tokens generated (not the prompt)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lm_lp = torch.log_softmax(scores.float(), -1)  # (B, V)
        if self.r is None and self.c is None:
            return lm_lp
        b = scores.shape[0]
        if len(self.mixing) != b:
            self.mixing = [MixState(self.r, None, self.c) for _ in range(b)]
        for row, state in enumerate(self.mixing):  # the token chosen after the last call is its evidence
            state.observe(int(input_ids[row, -1]))
            if state.cache is not None:  # ... and the next token of the cache's last entry
                h = self.captured[CACHE_KEY_POINT].reshape(b, -1, self.captured[CACHE_KEY_POINT].shape[-1])
                state.cache.feed(h[row, -1:].float().cpu().numpy(), [int(input_ids[row, -1])])
        rows = [(None, None)] * b
        if self.r is not None:
            key = self.captured[self.r.ds.key_point].reshape(b, -1, self.r.ds.dim)  # (B, t, d)
            dists, ids = self.r.searcher.search(key[:, -1].float().cpu().numpy(), self.r.k)  # (B, k)
            vals = self.r.ds.vals[np.maximum(ids, 0)]
            knn_lp = knn_distribution(dists, vals, lm_lp.shape[-1], self.r.temperature,
                                      self.r.ds.counts_of(ids)).to(lm_lp.device)  # (B, V)
            rows = [(knn_lp[row], float(dists[row, 0])) if (ids[row] >= 0).any() else (None, None) for row in range(b)]
        return torch.stack([state.mix(lm_lp[row], rows[row][0], None, None, rows[row][1])
                            for row, state in enumerate(self.mixing)])
