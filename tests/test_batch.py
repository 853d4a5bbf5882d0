"""Batched generation (knnlm.run.batch): several generations stepped together must give each
the tokens and scores it gets alone, whatever joins or leaves the batch around it."""

import numpy as np
import pytest
from test_generate import nonsense_text, split_nonsense

from knnlm.errors import KnnlmError
from knnlm.run.batch import BatchGenerator
from knnlm.run.generate import KNNLM

PROMPTS = ["the cat", "a quick brown fox jumps over the", "one", "memory is what the model keeps of the text it read"]


@pytest.fixture(scope="module")
def knn(lm, datastore, tmp_path_factory):
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    root = tmp_path_factory.mktemp("nonsense-batch")
    (root / "nonsense.txt").write_text(nonsense_text(), encoding="utf-8")
    out = build_datastore(lm, [root / "nonsense.txt"], root / "ds", window=128, stride=64, progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return KNNLM(lm, {"text": datastore.path, "nonsense": out}, lam=0.5, k=8)


def assert_same(batched, alone):
    """Same tokens, same finish, log-probs equal up to float rounding (padding changes sums' order)."""
    assert batched.ids == alone.ids
    assert batched.text == alone.text
    assert batched.finish_reason == alone.finish_reason
    for name in ("logprob", "logprob_lm", "logprob_knn"):
        a = np.array([getattr(t, name) if getattr(t, name) is not None else np.nan for t in batched.tokens])
        b = np.array([getattr(t, name) if getattr(t, name) is not None else np.nan for t in alone.tokens])
        np.testing.assert_allclose(a, b, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("name", ["text", None])
def test_generate_many_equals_one_at_a_time(knn, name):
    alone = [knn.generate(p, 12, datastore=name, ignore_eos=True) for p in PROMPTS]
    together = knn.generate_many(PROMPTS, 12, max_batch=3, datastore=name, ignore_eos=True)
    assert len(together) == len(PROMPTS)
    for b, a in zip(together, alone):
        assert_same(b, a)


def test_rows_with_their_own_settings_join_and_leave(knn, lm):
    """Different datastores, λ, k, lengths and sampling seeds in one batch; rows join between
    steps and leave when done; each row's result equals its own solo run."""
    prompt, _ = split_nonsense(lm)
    calls = [  # (prompt, options)
        (prompt, dict(max_new_tokens=10, datastore="nonsense", lam=0.9, ignore_eos=True)),
        (PROMPTS[1], dict(max_new_tokens=4, datastore="text", k=4, ignore_eos=True)),
        (PROMPTS[0], dict(max_new_tokens=7, datastore=None, ignore_eos=True)),
        (PROMPTS[3], dict(max_new_tokens=6, datastore="text", temperature=1.0, seed=3, ignore_eos=True)),
        (prompt, dict(max_new_tokens=5, datastore="nonsense", lam=0.3, knn_temperature=2.0, neighbors=2,
                      ignore_eos=True)),
    ]
    alone = [knn.generate(p, **o) for p, o in calls]

    batch = BatchGenerator(knn, max_batch=3)
    events: dict[int, list] = {i: [] for i in range(len(calls))}
    waiting, steps, sizes = list(range(len(calls))), 0, []
    while waiting or len(batch):
        if waiting and batch.has_room() and (steps % 2 == 0 or not len(batch)):  # join every other step
            i = waiting.pop(0)
            p, o = calls[i]
            o = dict(o)
            events[i] += batch.add(i, knn.prepare(p, o.pop("max_new_tokens"), **o))
        sizes.append(len(batch))
        for i, evs in batch.step().items():
            events[i] += evs
        steps += 1
    assert max(sizes) == 3  # the batch did fill up
    for i, a in enumerate(alone):
        evs = events[i]
        assert evs[-1].finish_reason is not None and all(e.finish_reason is None for e in evs[:-1])
        tokens = [e.token for e in evs if e.token is not None]
        assert [t.id for t in tokens] == a.ids, f"call {i}"
        assert "".join(e.text for e in evs) == a.text
        np.testing.assert_allclose([t.logprob for t in tokens], [t.logprob for t in a.tokens], atol=2e-4)
        if calls[i][1].get("neighbors"):
            assert [[n.entry for n in t.neighbors] for t in tokens] == [[n.entry for n in t.neighbors]
                                                                      for t in a.tokens]


def test_the_datastore_still_drives_batched_generation(knn, lm):
    """Next to other rows, the nonsense row still continues its text verbatim."""
    prompt, truth = split_nonsense(lm)
    outs = knn.generate_many([PROMPTS[3], prompt, PROMPTS[0]], 20, datastore="nonsense", lam=0.9, k=1,
                             ignore_eos=True)
    assert outs[1].ids == truth[:20]
    assert knn.generate(prompt, 20, datastore=None, ignore_eos=True).ids != truth[:20]  # the LM alone cannot


def test_drop_leaves_the_others_untouched(knn):
    alone = knn.generate(PROMPTS[1], 8, datastore="text", ignore_eos=True)
    batch = BatchGenerator(knn, max_batch=4)
    events = batch.add("keep", knn.prepare(PROMPTS[1], 8, datastore="text", ignore_eos=True))
    batch.add("drop", knn.prepare(PROMPTS[3], 8, datastore="text", ignore_eos=True))  # the longer prompt
    events += batch.step()["keep"]
    batch.drop("drop")
    assert batch.tags == ["keep"]
    assert batch.mask.shape[1] == len(knn.prompt_ids(PROMPTS[1])) + 1  # its padding went with it
    while len(batch):
        events += batch.step()["keep"]
    assert [e.token.id for e in events if e.token is not None] == alone.ids


def test_bad_use(knn):
    with pytest.raises(KnnlmError, match="max_batch"):
        BatchGenerator(knn, max_batch=0)
    batch = BatchGenerator(knn, max_batch=1)
    batch.add("a", knn.prepare("the", 5, ignore_eos=True))
    with pytest.raises(KnnlmError, match="full"):
        batch.add("b", knn.prepare("the", 5, ignore_eos=True))
    batch.clear()
    assert len(batch) == 0 and batch.step() == {}
    with pytest.raises(KnnlmError, match="too many tokens"):  # every prompt is checked before any runs
        knn.generate_many(["the", "the " * 400], 5)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gpt_neox", "opt", "gemma", "phi"])
def test_batched_equals_alone_on_every_architecture(arch, model_dirs):
    """Left padding with a mask and per-row positions is right for each architecture (the
    base LM alone: no datastore needed)."""
    from knnlm.core.model import LM

    knn = KNNLM(LM.load(str(model_dirs[arch]), dtype="float32"))
    alone = [knn.generate(p, 6, ignore_eos=True) for p in PROMPTS]
    for b, a in zip(knn.generate_many(PROMPTS, 6, ignore_eos=True), alone):
        assert_same(b, a)
