"""Memory Decoder: the loss, sparse p_kNN targets, training (losses go down, resume ==
uninterrupted) and the decoder's identity (plugs into a model of the same tokenizer)."""

import json
import math

import numpy as np
import pytest
import torch
from tiny import TEXT

from knnlm import RetrievalSettings
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.core.model import LM
from knnlm.errors import KnnlmError
from knnlm.memory.decoder import MemoryDecoder, init_decoder, truncated_copy
from knnlm.memory.loss import memory_loss, sparse_knn_targets
from knnlm.memory.targets import Targets, TargetSettings, build_targets
from knnlm.memory.train import TrainConfig, _Data, heldout_loss, pieces, train_decoder

K8 = RetrievalSettings(k=8, temperature=4.0)
SMALL = dict(batch_size=4, seq_len=16, heldout=0.2, lr=3e-3, save_every=2)


# ---- the math ------------------------------------------------------------------------
def test_loss_on_hand_made_distributions():
    """V = 3, q = (1/2, 1/4, 1/4), p_kNN = {0: 1/2, 2: 1/2}, next token 1, alpha = 1/2:
    KL = 1/2 ln 1 + 1/2 ln 2 = 0.346574; CE = ln 4 = 1.386294; loss = 0.866434.
    A second position with no neighbour (ids all -1) and next token 0 (CE = ln 2) adds to
    CE only: CE = (ln 4 + ln 2) / 2, KL unchanged; alpha = 1 gives KL alone, 0 CE alone."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)) + 3.0  # any shift
    loss, kl, ce = memory_loss(logits, torch.tensor([1]), torch.tensor([[0, 2, -1]]),
                               torch.tensor([[0.5, 0.5, 0.0]]), alpha=0.5)
    assert kl.item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert ce.item() == pytest.approx(math.log(4), abs=1e-6)
    assert loss.item() == pytest.approx(0.866434, abs=1e-6)
    two = torch.cat([logits, logits])
    ids = torch.tensor([[0, 2, -1], [-1, -1, -1]])
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    loss, kl, ce = memory_loss(two, torch.tensor([1, 0]), ids, probs, alpha=0.5)
    assert kl.item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert ce.item() == pytest.approx((math.log(4) + math.log(2)) / 2, abs=1e-6)
    assert memory_loss(two, torch.tensor([1, 0]), ids, probs, alpha=1.0)[0].item() == pytest.approx(kl.item())
    assert memory_loss(two, torch.tensor([1, 0]), ids, probs, alpha=0.0)[0].item() == pytest.approx(ce.item())
    with pytest.raises(KnnlmError, match=r"alpha must be in \[0, 1\]"):
        memory_loss(two, torch.tensor([1, 0]), ids, probs, alpha=1.5)


def test_sparse_targets_worked_example():
    """d = (0, 0, T ln 2), values (5, 7, 5), T = 1: weights 1, 1, 1/2, p_kNN = {5: .6, 7: .4}.
    keep = 1: [5] with 1.0 (mass .6); keep = 3: [5, 7, -1] with (.6, .4, 0), mass 1.
    A row with no neighbour (ids -1, d inf) is all padding with mass 0."""
    d = np.array([[0.0, 0.0, math.log(2)], [np.inf, np.inf, np.inf]])
    ids = np.array([[10, 11, 12], [-1, -1, -1]])
    vals = np.array([[5, 7, 5], [0, 0, 0]])
    i, p, m = sparse_knn_targets(d, ids, vals, 1.0, keep=1)
    assert i.tolist() == [[5], [-1]] and np.allclose(p, [[1.0], [0.0]]) and np.allclose(m, [0.6, 0.0])
    i, p, m = sparse_knn_targets(d, ids, vals, 1.0, keep=3)
    assert i[0].tolist() == [5, 7, -1] and np.allclose(p[0], [0.6, 0.4, 0.0]) and np.allclose(m, [1.0, 0.0])


# ---- targets from a datastore ----------------------------------------------------------
@pytest.fixture(scope="module")
def docs_ds(lm, tmp_path_factory):
    """A datastore of 8 documents (sentences of the tiny text, some repeated verbatim)."""
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    p = tmp_path_factory.mktemp("mem") / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": s}) + "\n" for i, s in enumerate(sents[:8])))
    out = tmp_path_factory.mktemp("mem") / "ds"
    build_datastore(lm, [p], out, window=32, stride=16, batch_tokens=128, progress=False)
    ds = Datastore(out)
    build_index(ds, "Flat", progress=False)
    return ds


@pytest.fixture(scope="module")
def docs_targets(docs_ds, tmp_path_factory):
    return Targets(build_targets(docs_ds.path, tmp_path_factory.mktemp("mem") / "t", TargetSettings(keep=8, chunk=16),
                                 retrieval=K8, progress=False))


def brute_force_pknn(ds, row: int, allowed: np.ndarray, k: int, temperature: float) -> dict[int, float]:
    keys = np.asarray(ds.keys, dtype=np.float32)
    d = ((keys[allowed] - keys[row]) ** 2).sum(1)
    near = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[near] - d[near].min()) / temperature)
    out: dict[int, float] = {}
    for v, x in zip(np.asarray(ds.vals)[allowed[near]], w / w.sum()):
        out[int(v)] = out.get(int(v), 0.0) + float(x)
    return out


def test_targets_round_trip_against_brute_force(docs_ds, docs_targets):
    """keep = k: every token of p_kNN is stored (mass 1) and the stored distribution is
    the brute-force p_kNN over the other documents' entries."""
    t = docs_targets
    own = docs_ds.document_of(np.arange(docs_ds.count))
    assert t.count == docs_ds.count and np.allclose(t.mass, 1.0, atol=1e-6)
    for row in range(0, docs_ds.count, 5):
        ref = brute_force_pknn(docs_ds, row, np.nonzero(own != own[row])[0], 8, 4.0)
        got = {int(i): float(p) for i, p in zip(t.ids[row], t.probs[row]) if i >= 0}
        assert got.keys() == ref.keys()
        assert all(abs(got[x] - ref[x]) < 1e-5 for x in ref)


def test_held_out_documents_never_reach_the_targets(docs_ds, tmp_path):
    """exclude_documents: p_kNN over the entries of neither the position's own document nor
    the left-out ones (brute force), recorded in meta.json; a bad document number is refused."""
    t = Targets(build_targets(docs_ds.path, tmp_path / "t", TargetSettings(8, exclude_documents=[5, 2], chunk=16),
                              retrieval=K8, progress=False))
    assert t.meta["exclude_documents"] == [2, 5]
    own = docs_ds.document_of(np.arange(docs_ds.count))
    for row in range(docs_ds.count):
        allowed = np.nonzero((own != own[row]) & ~np.isin(own, [2, 5]))[0]
        ref = brute_force_pknn(docs_ds, row, allowed, 8, 4.0)
        got = {int(i): float(p) for i, p in zip(t.ids[row], t.probs[row]) if i >= 0}
        assert got.keys() == ref.keys() and all(abs(got[x] - ref[x]) < 1e-5 for x in ref), row
    with pytest.raises(KnnlmError, match="exclude_documents"):
        build_targets(docs_ds.path, tmp_path / "bad", TargetSettings(exclude_documents=[99]),
                      retrieval=RetrievalSettings(k=8), progress=False)


def test_no_position_sees_its_own_memories(docs_ds, docs_targets, tmp_path):
    """Exclude 'document': a token found only in the position's own document never appears
    in its targets.  Exclude 'self': the targets are p_kNN over every entry but the
    position's own, which differs from p_kNN with it (the entry itself sits at distance 0
    and votes for the answer)."""
    vals = np.asarray(docs_ds.vals)
    own = docs_ds.document_of(np.arange(docs_ds.count))
    for row in range(docs_ds.count):
        allowed = set(vals[own != own[row]].tolist())
        assert set(docs_targets.ids[row][docs_targets.ids[row] >= 0].tolist()) <= allowed
    t = Targets(build_targets(docs_ds.path, tmp_path / "self", TargetSettings(keep=8, exclude="self"), retrieval=K8,
                              progress=False))
    differs = 0
    everyone = np.arange(docs_ds.count)
    for row in range(docs_ds.count):
        ref = brute_force_pknn(docs_ds, row, np.delete(everyone, row), 8, 4.0)
        got = {int(i): float(p) for i, p in zip(t.ids[row], t.probs[row]) if i >= 0}
        assert got.keys() == ref.keys() and all(abs(got[x] - ref[x]) < 1e-5 for x in ref)
        with_self = brute_force_pknn(docs_ds, row, everyone, 8, 4.0)
        differs += with_self.keys() != ref.keys() or any(abs(with_self[x] - ref[x]) > 1e-3 for x in ref)
    assert differs > docs_ds.count // 2


def test_targets_resume_after_an_interruption(docs_ds, docs_targets, tmp_path):
    def stop(ci):
        if ci == 1:
            raise KeyboardInterrupt

    out = tmp_path / "t"
    with pytest.raises(KnnlmError, match="interrupted"):
        build_targets(docs_ds.path, out, TargetSettings(keep=8, chunk=16), retrieval=K8, progress=False, on_chunk=stop)
    assert not out.exists() and (tmp_path / "t.partial" / "progress.json").exists()
    seen = []
    build_targets(docs_ds.path, out, TargetSettings(keep=8, chunk=16), retrieval=K8, progress=False,
                  on_chunk=seen.append)
    assert seen[0] == 2  # chunks 0 and 1 were not searched again
    for name in ("ids.npy", "probs.npy", "mass.npy"):
        assert (out / name).read_bytes() == (docs_targets.path / name).read_bytes()
    assert not (tmp_path / "t.partial").exists()


def test_targets_take_their_flat_keywords_too(docs_ds, docs_targets, tmp_path):
    """The settings groups and the flat keywords they replaced write the same targets; a
    misspelt keyword or a retrieval setting that does not apply is refused before any work."""
    flat = Targets(build_targets(docs_ds.path, tmp_path / "t", k=8, temperature=4.0, keep=8, chunk=16, progress=False))
    for name in ("ids.npy", "probs.npy", "mass.npy"):
        assert (flat.path / name).read_bytes() == (docs_targets.path / name).read_bytes()
    assert {f: flat.meta[f] for f in ("k", "temperature", "keep", "exclude")} == {
        f: docs_targets.meta[f] for f in ("k", "temperature", "keep", "exclude")}
    assert Targets(build_targets(docs_ds.path, tmp_path / "t4", retrieval=K8, keep=4, progress=False)).keep == 4
    with pytest.raises(TypeError, match="unexpected keyword argument 'kep'"):
        build_targets(docs_ds.path, tmp_path / "bad", kep=8)
    with pytest.raises(KnnlmError, match="RetrievalSettings.actors does not apply to memory targets"):
        build_targets(docs_ds.path, tmp_path / "bad", retrieval=RetrievalSettings(k=8, actors=2))
    with pytest.raises(TypeError, match="retrieval must be a RetrievalSettings"):
        build_targets(docs_ds.path, tmp_path / "bad", retrieval={"k": 8})
    with pytest.raises(KnnlmError, match="exclude must be 'document'"):
        build_targets(docs_ds.path, tmp_path / "bad", exclude="near")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_inside_one_long_document_the_radius_is_left_out(datastore, tmp_path):
    """The tiny .txt datastore is one document: 'document' would leave nothing at the
    searcher's radius (2048 > its size); radius:16 leaves out the 31 entries around each
    position, and no token only they hold appears in its targets."""
    with pytest.raises(KnnlmError, match="k=4 is more than the 0 entries"):
        build_targets(datastore.path, tmp_path / "t", retrieval=RetrievalSettings(k=4), progress=False)
    t = Targets(build_targets(datastore.path, tmp_path / "t", TargetSettings(keep=4, exclude="radius:16"),
                              retrieval=RetrievalSettings(k=4), progress=False))
    vals = np.asarray(datastore.vals)
    pos = np.arange(datastore.count)
    for row in range(datastore.count):
        allowed = set(vals[np.abs(pos - row) >= 16].tolist())
        assert set(t.ids[row][t.ids[row] >= 0].tolist()) <= allowed
    assert not (tmp_path / "t.partial").exists()


# ---- the decoder -----------------------------------------------------------------------
def test_pieces_cut_documents():
    """docs: 6 tokens (5 entries) from token 0 / entry 0, 3 tokens (2 entries) from token 6 /
    entry 5; seq_len 2: pieces (0,0,2) (2,2,2) (4,4,1) | (6,5,2)."""
    docs = np.array([[0, 6, 0], [6, 3, 5]])
    assert pieces(docs, 2, 7).tolist() == [[0, 0, 2], [2, 2, 2], [4, 4, 1], [6, 5, 2]]
    assert pieces(docs, 2, 4).tolist() == [[0, 0, 2], [2, 2, 2]]  # targets for entries < 4 only


def test_truncated_copy_keeps_the_first_layers(lm):
    model = truncated_copy(lm.model, 1)
    base = lm.model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, base[name]), name
    assert len(model.model.layers) == 1
    with pytest.raises(KnnlmError, match="L=3 layers cannot be cut from .* which has 2"):
        truncated_copy(lm.model, 3, lm.name)


def _train(lm, docs_ds, docs_targets, out, **kw):
    cfg = TrainConfig(**{**SMALL, **{k: v for k, v in kw.items() if k != "on_step"}})
    return train_decoder(lm, docs_ds.path, docs_targets.path, out, layers=1, config=cfg, progress=False,
                         on_step=kw.get("on_step"))


def test_training_lowers_both_losses(lm, docs_ds, docs_targets, tmp_path):
    out = _train(lm, docs_ds, docs_targets, tmp_path / "mem", epochs=6)
    cfg = TrainConfig(**SMALL)
    data = _Data(np.asarray(docs_ds.tokens), docs_targets, cfg.seq_len)
    rows = pieces(docs_ds.docs, cfg.seq_len, docs_targets.count)
    before = heldout_loss(init_decoder(lm, 1)[0], data, rows, cfg)
    mem = MemoryDecoder.load(out)
    after = heldout_loss(mem.lm.model, data, rows, cfg)
    assert after["kl"] < 0.8 * before["kl"] and after["ce"] < 0.8 * before["ce"], (before, after)
    meta = mem.meta
    assert meta["layers"] == 1 and meta["alpha"] == 0.5 and meta["k"] == 8 and meta["temperature"] == 4.0
    assert meta["datastore_id"] == docs_ds.id and meta["tokenizer_fingerprint"] == lm.tokenizer_fingerprint
    assert meta["steps"] > 0 and meta["heldout"]["loss"] > 0 and meta["corpora"] == docs_ds.meta["corpora"]
    assert not (tmp_path / "mem.partial").exists()


def test_resumed_training_equals_uninterrupted(lm, docs_ds, docs_targets, tmp_path):
    whole = _train(lm, docs_ds, docs_targets, tmp_path / "whole", epochs=2)

    def stop(step, losses):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KnnlmError, match="interrupted at step 3"):
        _train(lm, docs_ds, docs_targets, tmp_path / "cut", epochs=2, on_step=stop)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "checkpoint.pt").exists()
    steps = []
    resumed = _train(lm, docs_ds, docs_targets, tmp_path / "cut", epochs=2, on_step=lambda s, _: steps.append(s))
    assert steps[0] == 4
    a, b = MemoryDecoder.load(whole), MemoryDecoder.load(resumed)
    for (name, p), q in zip(a.lm.model.state_dict().items(), b.lm.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.meta["history"] == b.meta["history"]


def test_a_spent_time_budget_ends_a_resumed_run_with_its_best_weights(lm, docs_ds, docs_targets, tmp_path):
    def stop(step, losses):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KnnlmError, match="interrupted at step 5"):
        _train(lm, docs_ds, docs_targets, tmp_path / "cut", epochs=4, eval_every=2, on_step=stop)
    best = tmp_path / "cut.partial" / "best"
    from transformers import AutoModelForCausalLM

    kept = AutoModelForCausalLM.from_pretrained(best).state_dict()  # the best of steps 2 and 4
    steps = []
    out = _train(lm, docs_ds, docs_targets, tmp_path / "cut", epochs=4, eval_every=2, max_seconds=0.0,
                 on_step=lambda s, _: steps.append(s))  # same run (the budget is not part of it): no new step
    assert steps == []
    mem = MemoryDecoder.load(out)
    assert mem.meta["stopped"] == "time" and mem.meta["steps"] == 5 and mem.meta["best_step"] in (2, 4)
    for (name, p), q in zip(mem.lm.model.state_dict().items(), kept.values()):
        assert torch.equal(p, q), name
    whole = MemoryDecoder.load(_train(lm, docs_ds, docs_targets, tmp_path / "whole", epochs=1))
    assert whole.meta["stopped"] == "steps"
    with pytest.raises(KnnlmError, match="max_seconds"):
        TrainConfig(max_seconds=-1)


def test_decoder_plugs_into_a_model_of_the_same_tokenizer_only(lm, docs_ds, docs_targets, model_dirs, tmp_path):
    """Trained from the tiny llama: plugs into the tiny GPT-2 (other architecture and
    weights, same tokenizer); the tiny Qwen2's tokenizer pre-tokenizes differently."""
    out = _train(lm, docs_ds, docs_targets, tmp_path / "mem", max_steps=1)
    mem = MemoryDecoder.load(out)
    mem.check_compatible(LM.load(str(model_dirs["gpt2"]), dtype="float32"))
    qwen = LM.load(str(model_dirs["qwen2"]), dtype="float32")
    with pytest.raises(KnnlmError, match=r"memory decoder .*mem .* has another tokenizer .* than the LM .*qwen2"):
        mem.check_compatible(qwen)
