"""RetoMaton pointers (knnlm.retrieval.pointers): fewer searches, never across a document's
end, the plain kNN-LM exactly when every step must search, per-sequence state in batches."""

import numpy as np
import pytest
from test_batch import assert_same
from test_generate import nonsense_text, split_nonsense

from knnlm.core.batching import plan_files
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index
from knnlm.errors import KnnlmError
from knnlm.retrieval.pointers import Pointers, PointerState, lookup, simulate, successors
from knnlm.run.evaluate import evaluate, score_plan
from knnlm.run.generate import KNNLM

# 3 documents: tokens counts 4, 2, 5 -> entries 0-2, 3, 4-7 (first entry column 2)
DOCS = np.array([[0, 4, 0], [4, 2, 3], [6, 5, 4]])


def test_successors_worked_example():
    """Neighbours [1, 2, 5, 3, 7] with values [7, 7, 9, 7, 7], token 7: entry 1 -> 2; entry 2
    is document 0's last entry (no successor); 5 has another value; 3 is document 1's only
    entry (none); 7 is the last of document 2 (none)."""
    ids = np.array([1, 2, 5, 3, 7])
    vals = np.array([7, 7, 9, 7, 7])
    assert successors(ids, vals, 7, DOCS).tolist() == [2]
    assert successors(np.array([4, 5, -1]), np.array([1, 1, 1]), 1, DOCS).tolist() == [5, 6]  # -1: missing


def test_state_searches_for_want_of_candidates_and_every_n():
    s = PointerState(Pointers(threshold=2, every=3))
    assert s.must_search()  # nothing to follow yet
    s.stepped(True)
    s.follow(np.array([4, 5, 0]), np.array([1, 1, 1]), 1, DOCS)  # -> 5, 6, 1
    assert s.candidates.tolist() == [5, 6, 1] and not s.must_search()
    s.stepped(False)  # one pointer step
    assert not s.must_search()
    s.stepped(False)  # two in a row: the third step must search (every=3)
    assert s.must_search()
    s.follow(np.array([4]), np.array([1]), 1, DOCS)  # one candidate < threshold 2
    s.stepped(True)
    assert s.must_search()
    with pytest.raises(KnnlmError, match="threshold"):
        Pointers(threshold=0)
    with pytest.raises(KnnlmError, match="every"):
        Pointers(every=-1)


@pytest.fixture(scope="module")
def docs_ds(lm, jsonl_corpus, tmp_path_factory):
    out = build_datastore(lm, [jsonl_corpus], tmp_path_factory.mktemp("ptr") / "ds", window=32, stride=16,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return Datastore(out)


def test_pointers_never_cross_a_documents_end(docs_ds):
    ds = docs_ds
    ends = ds.docs[:, 2] + ds.docs[:, 1] - 1
    ids = np.arange(ds.count)
    for e in ids:  # each entry as a lone neighbour with its own value
        nxt = successors(ids[e : e + 1], ds.vals[e : e + 1], int(ds.vals[e]), ds.docs)
        last = e + 1 in ends
        assert nxt.tolist() == ([] if last else [e + 1]), e
    # a replay over the datastore's own text: every candidate followed the previous position's document
    q = np.asarray(ds.keys, dtype=np.float32)
    s = Searcher(ds)
    seen = []

    def exact(queries, cand):
        seen.append(cand)
        return s.exact(queries, cand)

    run = simulate(q, ds.vals.astype(np.int64), ds.docs[:, 2], ds.vals, ds, lambda p, x, k: s.search(x, k),
                   exact, 4, Pointers(threshold=1))
    assert not run.searched.all()  # pointers did replace searches
    cands = np.concatenate([c[c >= 0] for c in seen])
    assert not np.isin(cands, ds.docs[:, 2]).any()  # no pointer ever lands on a document's first entry


def test_lockstep_replay_equals_one_position_at_a_time(lm, docs_ds, jsonl_corpus):
    plan = plan_files(lm, [jsonl_corpus], 32, 16, 128)
    s = Searcher(docs_ds)
    ptr = Pointers(threshold=2, every=4)
    full = score_plan(lm, plan, s, k=4, keep_neighbors=True, progress=False)
    base = score_plan(lm, plan, s, k=4, progress=False)
    fast = score_plan(lm, plan, s, k=4, pointers=ptr, progress=False)
    assert 0 < fast.searched.mean() < 1
    # the same, position after position, one document at a time
    keys = np.empty((plan.count, lm.dim()), dtype=np.float32)
    import torch

    for b in range(len(plan.batches)):
        feats, _ = lm.forward(plan.batch_input(b), [docs_ds.key_point], logits=False)
        for row, c0, c1, t in plan.scored(b):
            keys[t : t + c1 - c0] = feats[docs_ds.key_point][row, c0:c1].float().numpy()
    from knnlm.core.scoring import knn_target_logprobs

    bounds = list(plan.docs[:, 2]) + [plan.count]
    want = np.empty(plan.count)
    for a, z in zip(bounds[:-1], bounds[1:]):
        state = PointerState(ptr)
        for t in range(a, z):
            d, i, _ = lookup(lambda rows, x, k: s.search(x, k), s.exact, keys[t : t + 1], [state], 4)
            want[t] = knn_target_logprobs(d, docs_ds.vals[np.maximum(i, 0)], full.targets[t : t + 1])[0]
            state.follow(i[0], docs_ds.vals[np.maximum(i[0], 0)], int(full.targets[t]), docs_ds.docs)
    np.testing.assert_array_equal(fast.knn, want)
    assert not np.array_equal(fast.knn, base.knn)  # pointers changed something
    del torch


def test_threshold_above_k_is_the_plain_knnlm_exactly(lm, docs_ds, jsonl_corpus):
    plain = evaluate(lm, [jsonl_corpus], docs_ds.path, k=4, lam=0.5, window=32, stride=16, progress=False)
    every = evaluate(lm, [jsonl_corpus], docs_ds.path, k=4, lam=0.5, window=32, stride=16, progress=False,
                     pointers=Pointers(threshold=5))
    assert every["ppl_knnlm"] == plain["ppl_knnlm"] and every["search_rate"] == 1.0
    fewer = evaluate(lm, [jsonl_corpus], docs_ds.path, k=4, lam=0.5, window=32, stride=16, progress=False,
                     pointers=Pointers(threshold=1))
    assert fewer["search_rate"] < 1.0 and fewer["ppl_knnlm"] != plain["ppl_knnlm"]
    every1 = evaluate(lm, [jsonl_corpus], docs_ds.path, k=4, lam=0.5, window=32, stride=16, progress=False,
                      pointers=Pointers(threshold=1, every=1))  # every=1: a search at every step
    assert every1["ppl_knnlm"] == plain["ppl_knnlm"]


@pytest.fixture(scope="module")
def knn(lm, datastore, tmp_path_factory):
    root = tmp_path_factory.mktemp("nonsense-ptr")
    (root / "nonsense.txt").write_text(nonsense_text(), encoding="utf-8")
    out = build_datastore(lm, [root / "nonsense.txt"], root / "ds", window=128, stride=64, progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return KNNLM(lm, {"text": datastore.path, "nonsense": out}, lam=0.5, k=8)


def counting(searcher):
    """Count the queries the searcher answers."""
    calls = []
    plain = searcher.search

    def search(q, k, *a, **kw):
        calls.append(len(q))
        return plain(q, k, *a, **kw)

    searcher.search = search
    return calls


def test_generation_with_pointers(knn, lm):
    prompt, truth = split_nonsense(lm)
    plain = knn.generate(prompt, 12, datastore="nonsense", lam=0.9, ignore_eos=True)
    s = knn.searchers["nonsense"]
    calls = counting(s)
    try:
        every = knn.generate(prompt, 12, datastore="nonsense", lam=0.9, ignore_eos=True, pointers=Pointers(9))
        assert sum(calls) == 12  # threshold 9 > k = 8: every token searched ...
        assert_same(every, plain)  # ... and it is the plain kNN-LM
        np.testing.assert_array_equal([t.logprob for t in every.tokens], [t.logprob for t in plain.tokens])
        calls.clear()
        # a sharp kNN softmax: the nearest memory (the text itself, distance 0) decides
        fast = knn.generate(prompt, 12, datastore="nonsense", lam=0.9, ignore_eos=True, pointers=Pointers(1),
                            knn_temperature=1e-3)
        assert sum(calls) < 6  # the nonsense text is followed verbatim: pointers replace most searches
        assert fast.ids == truth[:12]
        assert fast.settings["pointer_threshold"] == 1
    finally:
        del s.search


def test_pointer_state_survives_batching(knn, lm):
    """Rows with and without pointers join and leave a batch; each equals its solo run."""
    from knnlm.run.batch import BatchGenerator

    prompt, _ = split_nonsense(lm)
    calls = [
        (prompt, dict(max_new_tokens=10, datastore="nonsense", lam=0.9, pointers=Pointers(1))),
        ("the cat", dict(max_new_tokens=6, datastore="text", k=4, pointers=Pointers(2, every=3))),
        (prompt, dict(max_new_tokens=8, datastore="nonsense", lam=0.5)),
        ("a quick brown fox", dict(max_new_tokens=7, datastore="text", pointers=Pointers(1), temperature=1.0,
                                   seed=2)),
    ]
    alone = [knn.generate(p, ignore_eos=True, **o) for p, o in calls]
    batch = BatchGenerator(knn, max_batch=3)
    events = {i: [] for i in range(len(calls))}
    waiting, steps = list(range(len(calls))), 0
    while waiting or len(batch):
        if waiting and batch.has_room() and (steps % 2 == 0 or not len(batch)):
            i = waiting.pop(0)
            p, o = calls[i]
            o = dict(o)
            events[i] += batch.add(i, knn.prepare(p, o.pop("max_new_tokens"), ignore_eos=True, **o))
        for i, evs in batch.step().items():
            events[i] += evs
        steps += 1
    for i, a in enumerate(alone):
        tokens = [e.token for e in events[i] if e.token is not None]
        assert [t.id for t in tokens] == a.ids, f"call {i}"
        np.testing.assert_allclose([t.logprob for t in tokens], [t.logprob for t in a.tokens], atol=2e-4)


def test_score_with_pointers(knn, lm):
    text = nonsense_text()
    plain = knn.score(text, datastore="nonsense", k=8)
    every = knn.score(text, datastore="nonsense", k=8, pointers=Pointers(9))
    np.testing.assert_array_equal([t.logprob for t in every.tokens], [t.logprob for t in plain.tokens])
    fast = knn.score(text, datastore="nonsense", k=8, pointers=Pointers(1))
    assert fast.settings["pointer_threshold"] == 1
    assert abs(fast.ppl - plain.ppl) / plain.ppl < 0.5  # the verbatim text: pointers find the same memories


def test_eval_command_takes_pointers(docs_ds, jsonl_corpus, llama_dir, capsys):
    from knnlm.cli.main import main

    assert main(["-q", "eval", str(jsonl_corpus), "-d", str(docs_ds.path), "-k", "4", "--window", "32",
                 "--stride", "16", "--pointers", "1", "--model", str(llama_dir), "--dtype", "float32",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "searches" in out and "% of tokens" in out
    assert main(["-q", "eval", str(jsonl_corpus), "-d", str(docs_ds.path), "--pointer-every", "3"]) == 1
    assert "--pointer-every needs --pointers" in capsys.readouterr().err


def test_server_takes_pointers_per_request(knn, lm):
    import httpx

    from knnlm.serve.server import create_app, serve_in_thread

    prompt, _ = split_nonsense(lm)
    want = knn.generate(prompt, 10, datastore="nonsense", lam=0.9, knn_temperature=1e-3, pointers=Pointers(2))
    plain = knn.generate(prompt, 10, datastore="nonsense", lam=0.9, knn_temperature=1e-3)
    with serve_in_thread(create_app(knn, max_queue=4, max_tokens=32)) as url:
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "datastore": "nonsense", "lambda": 0.9,
                "knn_temperature": 1e-3}
        r = httpx.post(f"{url}/v1/completions", json={**body, "pointer_threshold": 2}, timeout=60).json()
        assert r["choices"][0]["text"] == want.text and r["choices"][0]["knnlm"]["pointer_threshold"] == 2
        r = httpx.post(f"{url}/v1/completions", json={**body, "pointer_threshold": 0}, timeout=60).json()
        assert r["choices"][0]["text"] == plain.text and "pointer_threshold" not in r["choices"][0]["knnlm"]
        r = httpx.post(f"{url}/v1/completions", json={**body, "pointer_threshold": -1}, timeout=60)
        assert r.status_code == 400


def test_generate_command_takes_pointers(docs_ds, llama_dir, capsys):
    import json

    from knnlm.cli.main import main

    assert main(["-q", "generate", "the quick", "-d", str(docs_ds.path), "-k", "4", "--max-new-tokens", "3",
                 "--pointers", "2", "--pointer-every", "3", "--adaptive", "0.9", "--json", "--model", str(llama_dir),
                 "--dtype", "float32", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pointer_threshold"] == 2 and out["pointer_every"] == 3 and out["adaptive_threshold"] == 0.9
