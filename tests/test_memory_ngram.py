"""The n-gram baseline (knnlm.memory.ngram) and the document-level held-out split of
memory-decoder / fine-tuning training (knnlm.memory.train.split_pieces)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from knnlm.errors import KnnlmError
from knnlm.memory.ngram import KneserNey
from knnlm.memory.train import TrainConfig, pieces, split_pieces


def test_bigram_by_hand():
    # document 0 1 2 1 2 padded to PAD 0 1 2 1 2; bigram counts (PAD 0) 1, (0 1) 1, (1 2) 2, (2 1) 1:
    # n1 = 3, n2 = 1 -> D2 = 3/5.  Continuation counts of the unigrams: 0 <- {PAD}, 1 <- {0, 2}, 2 <- {1}
    # = 1, 2, 1 (total 4, 3 types): n1 = 2, n2 = 1 -> D1 = 1/2.
    m = KneserNey(order=2, vocab_size=4).fit([[0, 1, 2, 1, 2]])
    assert m.discount[1:] == pytest.approx([0.5, 0.6])
    p1 = {w: max(c - 0.5, 0) / 4 + 0.5 * 3 / 4 / 4 for w, c in {0: 1, 1: 2, 2: 1, 3: 0}.items()}
    assert p1[2] == pytest.approx(0.21875)
    assert m.prob((1,), 2) == pytest.approx((2 - 0.6) / 2 + 0.6 * 1 / 2 * p1[2])  # 0.765625
    assert m.prob((1,), 3) == pytest.approx(0.6 * 1 / 2 * p1[3])  # unseen after 1: from the unigram
    assert m.prob((3,), 1) == pytest.approx(p1[1])  # unseen context: all mass from the unigram
    assert m.prob((), 0) == pytest.approx((1 - 0.6) / 1 + 0.6 * 1 / 1 * p1[0])  # start: context PAD


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_every_context_sums_to_one_and_nothing_is_zero(order):
    rng = np.random.default_rng(order)
    v = 13
    docs = [list(rng.integers(0, v, size=n)) for n in (30, 7, 50, 2)]
    m = KneserNey(order=order, vocab_size=v).fit(docs)
    contexts = [(), tuple(docs[0][:4]), tuple(docs[2][10:14]), (12, 12, 12, 12), tuple(docs[1][-3:])]
    for ctx in contexts:
        ps = np.array([m.prob(ctx, w) for w in range(v)])
        assert ps.sum() == pytest.approx(1.0, abs=1e-12)
        assert (ps > 0).all()


def test_more_order_fits_seen_text_better_and_targets_line_up():
    rng = np.random.default_rng(0)
    doc = list(rng.integers(0, 50, size=400))
    docs = [doc[:200], doc[200:]]
    lp = {n: KneserNey(order=n, vocab_size=50).fit(docs).doc_logprobs(doc[:200]).mean() for n in (1, 3)}
    assert lp[3] > lp[1] + 1.0  # the trigram model remembers the text it counted
    m = KneserNey(order=3, vocab_size=50).fit(docs)
    tokens = np.array(doc, dtype=np.int64)
    table = np.array([[0, 200, 0], [200, 200, 199]])
    got = m.target_logprobs(tokens, table)
    assert got.shape == (398,)
    assert got[199] == pytest.approx(math.log(m.prob([doc[200]], doc[201])))
    assert got[0] == pytest.approx(math.log(m.prob([doc[0]], doc[1])))


def test_bad_input():
    with pytest.raises(KnnlmError):
        KneserNey(order=0, vocab_size=5)
    with pytest.raises(KnnlmError):
        KneserNey(order=2, vocab_size=5).fit([[1, 2, 5]])


def test_document_split_keeps_documents_whole():
    docs = np.array([[0, 600, 0], [600, 5, 599], [605, 300, 603], [905, 40, 902], [945, 700, 941]])
    ps = pieces(docs, 256, 10_000)
    held, train, held_docs = split_pieces(ps, docs, 0.4, "document", seed=3)
    assert len(held_docs) == 2
    doc_of = lambda rows: set(np.searchsorted(docs[:, 0], rows[:, 0], side="right") - 1)  # noqa: E731
    assert doc_of(held) == set(held_docs.tolist())
    assert not doc_of(held) & doc_of(train)
    assert len(held) + len(train) == len(ps)
    # whole documents: every piece of a held-out document is held out
    assert sum(int(r[2]) for r in held) == sum(int(docs[d, 1]) - 1 for d in held_docs)
    again = split_pieces(ps, docs, 0.4, "document", seed=3)
    assert np.array_equal(again[0], held)
    # the piece split is the one training always used: a seeded share of the pieces
    h2, t2, d2 = split_pieces(ps, docs, 0.25, "piece", seed=0)
    order = np.random.default_rng(0).permutation(len(ps))
    assert np.array_equal(h2, ps[np.sort(order[: round(0.25 * len(ps))])]) and len(d2) == 0
    with pytest.raises(KnnlmError):
        TrainConfig(heldout_unit="sentence")
