"""Leave-own-document-out search: a query never gets an entry of its own document."""

import json

import numpy as np
import pytest
from tiny import TEXT

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index, search_excluding


@pytest.fixture(scope="module")
def twins(lm, tmp_path_factory):
    """Documents that repeat each other verbatim: doc 2i+1 is a copy of doc 2i."""
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()][:4]
    docs = [s for s in sents for _ in range(2)]
    p = tmp_path_factory.mktemp("twins") / "twins.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path_factory.mktemp("ds") / "twins"
    build_datastore(lm, [p], out, window=32, stride=16, batch_tokens=128, progress=False)
    ds = Datastore(out)
    build_index(ds, "Flat", progress=False)
    return ds


def test_plain_search_finds_the_copy_excluded_search_never_the_own_document(twins):
    s = Searcher(twins)
    q = np.asarray(twins.keys, dtype=np.float32)  # every entry queries with its own key
    own = twins.document_of(np.arange(twins.count))
    d, i = s.search(q, 4)
    # itself and its twin at distance 0 (a document's first key, after BOS alone, ties with every document's)
    assert (twins.document_of(i[:, :2]) == own[:, None]).any(1).mean() > 0.9
    d, i = s.search(q, 8, exclude=np.arange(twins.count))
    assert (i >= 0).all()
    assert not (twins.document_of(i) == own[:, None]).any()
    twin = own ^ 1  # the copy is found instead: distance 0 (same text, same key)
    assert (twins.document_of(i[:, 0]) == twin).mean() > 0.9
    assert np.allclose(d[:, 0], 0.0, atol=1e-3)


def test_excluded_search_equals_brute_force_without_the_document(twins):
    s = Searcher(twins)
    keys = np.asarray(twins.keys, dtype=np.float32)
    own = twins.document_of(np.arange(twins.count))
    k = 5
    d, i = s.search(keys, k, exclude=np.arange(twins.count))
    for row in range(0, twins.count, 7):
        allowed = np.nonzero(own != own[row])[0]
        ref = ((keys[allowed] - keys[row]) ** 2).sum(1)
        assert np.allclose(np.sort(ref)[:k], d[row], rtol=1e-4, atol=1e-4)


def test_exclusion_refetches_until_enough_neighbours_remain():
    """10 entries in docs [0,0,0,0,0,0,1,1,2,2]; a query of entry 0 first fetches 2k = 4, all
    of its own document, then 16 (capped at 10) and keeps the k = 2 nearest others."""
    docs = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    pts = np.arange(10, dtype=np.float32)[:, None]  # entry j sits at x = j
    calls = []

    def search(q, n):
        calls.append(n)
        dist = (pts[None, :, 0] - q[:, None, 0]) ** 2  # (m, 10)
        order = np.argsort(dist, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(dist, order, 1), order

    def doc_of(ids):
        return docs[ids]

    d, i = search_excluding(search, doc_of, np.array([[0.0]]), 2, np.array([0]), 10)
    assert i.tolist() == [[6, 7]] and d.tolist() == [[36.0, 49.0]]
    assert calls == [4, 10]
    d, i = search_excluding(search, doc_of, np.array([[0.0]]), 2, np.array([-1]), 10)
    assert i.tolist() == [[0, 1]]  # -1 leaves nothing out


def test_inside_a_long_document_only_the_neighbourhood_is_left_out():
    """One document of 10 entries, radius 3: entry 5 loses entries 3..7 and keeps 2 and 8."""
    pts = np.arange(10, dtype=np.float32)[:, None]

    def search(q, n):
        dist = (pts[None, :, 0] - q[:, None, 0]) ** 2
        order = np.argsort(dist, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(dist, order, 1), order

    d, i = search_excluding(search, lambda ids: np.zeros_like(ids), np.array([[5.0]]), 2, np.array([5]), 10,
                            radius=3)
    assert sorted(i[0].tolist()) == [2, 8] and d[0].tolist() == [9.0, 9.0]


def test_exclusion_stops_asking_a_backend_that_has_no_more():
    """An IVF-like backend that sees only 3 entries (0, 1, 2; the rest -1) however many are
    asked: one call, then the row ends in -1 / inf instead of asking for ever more."""
    calls = []

    def search(q, k):
        calls.append(k)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        ids[:, :3] = [0, 1, 2]
        return np.where(ids >= 0, 1.0, np.inf).astype(np.float32), ids

    d, i = search_excluding(search, lambda e: np.asarray(e) // 2, np.zeros((1, 1)), 2, np.array([0]), 1000)
    assert calls == [4] and i.tolist() == [[2, -1]] and d[0, 1] == np.inf
