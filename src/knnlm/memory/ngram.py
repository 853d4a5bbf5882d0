"""A small interpolated Kneser-Ney n-gram LM over token ids: the kNN-LM paper's "simple
representation" baseline (Section 6: an n-gram model of the datastore text interpolated
with the LM gains almost nothing, where the kNN-LM's neural keys gain much more).

Counts are kept per document: each document's ids (its prefix token first, as a datastore
stores them) are padded on the left with order - 1 `PAD` symbols, so a context never
reaches into another document and every target has a full-length context.  The model is
interpolated Kneser-Ney (Chen & Goodman 1998), one discount per order, D = n1 / (n1 + 2 n2)
from that order's count-of-counts:

    p_N(w | h) = max(c(h w) - D_N, 0) / c(h) + D_N N1+(h .) / c(h) p_{N-1}(w | h')
    p_n(w | h) = the same with continuation counts N1+(. h w) in place of c    (1 <= n < N)
    p_0(w)     = 1 / V                                  (every id of the vocabulary)

where h' is h without its first token; a context never seen passes its whole mass down
(p_n(w | h) = p_{n-1}(w | h')).  Every id of the vocabulary gets a probability > 0 and
the probabilities of a context sum to 1 (tests/test_memory_ngram.py checks both).

    >>> m = KneserNey(order=2, vocab_size=4).fit([[0, 1, 2, 1, 2]])
    >>> round(m.prob((1,), 2), 4)   # bigram "1 2" seen twice after the context 1
    0.7656
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from knnlm.errors import KnnlmError

PAD = -1  # left padding of every document; never a target


class KneserNey:
    """Interpolated Kneser-Ney LM of `order` over ids 0..vocab_size-1."""

    def __init__(self, order: int = 4, vocab_size: int = 0):
        if order < 1:
            raise KnnlmError(f"n-gram order must be >= 1, got {order}")
        if vocab_size < 1:
            raise KnnlmError(f"vocab_size must be >= 1, got {vocab_size}")
        self.order, self.vocab_size = order, vocab_size
        # per order n (1..N): context (tuple of n-1 ids) -> {token: count}; order N holds raw
        # counts, lower orders continuation counts (distinct left extensions)
        self.counts: list[dict] = [dict() for _ in range(order + 1)]
        self.totals: list[dict] = [dict() for _ in range(order + 1)]  # context -> sum of counts
        self.types: list[dict] = [dict() for _ in range(order + 1)]  # context -> distinct followers
        self.discount = [0.0] * (order + 1)
        self.tokens = 0

    def fit(self, docs: Iterable[Sequence[int]]) -> "KneserNey":
        n_max = self.order
        raw = defaultdict(int)  # N-grams (tuple of N ids) -> count
        for doc in docs:
            ids = [int(t) for t in doc]
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise KnnlmError(f"token ids must be in [0, {self.vocab_size}); a document has "
                                 f"{min(ids)}..{max(ids)}")
            seq = [PAD] * (n_max - 1) + ids
            for i in range(n_max - 1, len(seq)):
                if seq[i] == PAD:
                    continue
                raw[tuple(seq[i - n_max + 1 : i + 1])] += 1
                self.tokens += 1
        grams = {n_max: raw}
        for n in range(n_max - 1, 0, -1):  # continuation counts: distinct left extensions
            cont = defaultdict(int)
            for g in grams[n + 1]:
                cont[g[1:]] += 1
            grams[n] = cont
        for n in range(1, n_max + 1):
            table, totals, types = defaultdict(dict), defaultdict(int), defaultdict(int)
            for g, c in grams[n].items():
                table[g[:-1]][g[-1]] = c
                totals[g[:-1]] += c
                types[g[:-1]] += 1
            self.counts[n], self.totals[n], self.types[n] = dict(table), dict(totals), dict(types)
            cc = np.bincount(np.fromiter(grams[n].values(), dtype=np.int64, count=len(grams[n])), minlength=3)
            n1, n2 = int(cc[1]), int(cc[2])
            self.discount[n] = n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else 0.75
        return self

    def prob(self, context: Sequence[int], token: int) -> float:
        """p(token | context): the last order - 1 ids of `context` (PAD before a document's start)."""
        h = tuple(int(t) for t in context)[-(self.order - 1) :] if self.order > 1 else ()
        if len(h) < self.order - 1:
            h = (PAD,) * (self.order - 1 - len(h)) + h
        p = 1.0 / self.vocab_size
        for n in range(1, self.order + 1):
            ctx = h[len(h) - (n - 1) :] if n > 1 else ()
            total = self.totals[n].get(ctx)
            if not total:
                continue  # unseen context: the lower order's mass unchanged
            d = self.discount[n]
            c = self.counts[n][ctx].get(int(token), 0)
            p = max(c - d, 0.0) / total + d * self.types[n][ctx] / total * p
        return p

    def doc_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """log p of every token of one document after its first, given the document before it."""
        ids = [int(t) for t in ids]
        return np.array([math.log(self.prob(ids[max(0, i - self.order + 1) : i], ids[i]))
                         for i in range(1, len(ids))], dtype=np.float64)

    def target_logprobs(self, tokens: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """log p of every target of a plan or datastore (tokens, docs rows: token start,
        count, first target), in target order: (n,)."""
        out = [self.doc_logprobs(tokens[int(s) : int(s) + int(n)]) for s, n, _ in np.asarray(docs)]
        return np.concatenate(out) if out else np.zeros(0)
