"""Every scoring and decoding path mixes through one mixer (knnlm.core.mix): for the same
memories and the same λ policy they give the same per-token log-probabilities.

The reference is `KNNLM.score` of the whole text.  The paths: KV-cached generation
(`KNNLM.generate`, its prompt read as evidence), continuous batching (`generate_many`),
teacher-forced decoding one token at a time (`Decoder` + `MixState`), transformers'
`generate` with the `LogitsProcessor` (a one-token prompt: it reads no prompt), the next-token
distribution, and `evaluate` (its perplexity)."""

import json

import numpy as np
import pytest
import torch
from tiny import TEXT

from knnlm import RetrievalSettings
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.memory.targets import TargetSettings, build_targets
from knnlm.memory.train import TrainConfig, train_decoder
from knnlm.run.decode import Decoder, MixState
from knnlm.run.evaluate import evaluate
from knnlm.run.generate import KNNLM

N = 10  # tokens generated per path
MODES = ["fixed", "adaptive", "adaptive+distance", "adaptive+confidence"]  # λ policies
ATOL = 1e-4  # float32 over the vocabulary vs float64 of the targets


@pytest.fixture(scope="module")
def mem_dir(lm, tmp_path_factory):
    """A 1-layer memory decoder of the tiny llama, trained a few steps."""
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    root = tmp_path_factory.mktemp("paths")
    p = root / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": s}) + "\n" for i, s in enumerate(sents[:8])))
    build_datastore(lm, [p], root / "ds", window=32, stride=16, batch_tokens=128, progress=False)
    build_index(Datastore(root / "ds"), "Flat", progress=False)
    build_targets(root / "ds", root / "t", TargetSettings(keep=8), retrieval=RetrievalSettings(k=8, temperature=4.0),
                  progress=False)
    cfg = TrainConfig(batch_size=4, seq_len=16, heldout=0.2, lr=3e-3, epochs=1)
    return train_decoder(lm, root / "ds", root / "t", root / "mem", layers=1, config=cfg, progress=False)


@pytest.fixture(scope="module")
def tabled(datastore, tmp_path_factory):
    """The datastore with a recorded λ-by-distance table (as `knnlm build` tunes one)."""
    import shutil

    out = tmp_path_factory.mktemp("tabled") / "ds"
    shutil.copytree(datastore.path, out)
    ds = Datastore(out)
    near = np.quantile(np.load(out / "keys.npy").astype(np.float32).var(0).sum() * np.array([0.5, 1.0]), [0, 1])
    ds.record_settings({"k": 8, "lambda": 0.3, "temperature": 2.0,
                        "lambda_by_distance": {"edges": near.tolist(), "lambdas": [0.7, 0.3, 0.05]}})
    return Datastore(out)


@pytest.fixture(scope="module")
def confident(lm, tabled, tmp_path_factory):
    """The datastore with a recorded table of λ by distance and by the LM's log max p (its
    confidence), its confidence edges cutting the LM's confidences on the text in three."""
    import shutil

    out = tmp_path_factory.mktemp("confident") / "ds"
    shutil.copytree(tabled.path, out)
    _, logits = lm.forward(torch.tensor([lm.encode(TEXT)]), [], logits=True)
    conf = torch.log_softmax(logits[0].float(), -1).max(-1).values.numpy()
    table = {**tabled.settings["lambda_by_distance"], "confidence_edges": np.quantile(conf, [1 / 3, 2 / 3]).tolist(),
             "lambdas": [[0.8, 0.6, 0.4], [0.5, 0.3, 0.2], [0.1, 0.05, 0.0]]}
    ds = Datastore(out)
    ds.record_settings({"k": 8, "lambda": 0.3, "temperature": 2.0, "lambda_by_distance": table})
    return Datastore(out)


def _knn(lm, datastore, mem_dir, mode, memory, tabled=None):
    """mode: "fixed", "adaptive", "adaptive+distance" (λ from the recorded distance table) or
    "adaptive+confidence" (a table of distance and the LM's confidence); `tabled`: the
    datastore of each table mode."""
    by_distance = "+" in mode
    ds = tabled[mode] if by_distance else datastore
    return KNNLM(lm, {"ds": ds.path}, memories={"mem": mem_dir} if memory else None, lam=0.3, k=8,
                 knn_temperature=2.0, memory_lambda=0.4, lambda_mode=mode.split("+")[0],
                 lambda_by_distance=by_distance or None)


def _reference(knn, ids, start):
    """KNNLM.score's log-probs of ids[start:]."""
    return np.array([t.logprob for t in knn.score(ids).tokens[start - 1 :]])


def path_generate(knn, lm, prompt):
    g = knn.generate(prompt, N, ignore_eos=True)
    return prompt + g.ids, [t.logprob for t in g.tokens]


def path_batch(knn, lm, prompt):
    g = knn.generate_many([prompt[:1], prompt], N, ignore_eos=True, max_batch=2)[1]  # the second row
    return prompt + g.ids, [t.logprob for t in g.tokens]


def path_teacher_forced(knn, lm, prompt):
    """The text's own tokens fed one at a time: each token's log-prob before it is fed."""
    ids = lm.encode(TEXT[:120])
    r, m = knn.retrieval(), knn.memory_use()
    mixing = MixState(r, m)
    dec = Decoder(lm, r, m, mixing)
    dec.feed(prompt)
    out = []
    for t in ids[len(prompt):][:N]:
        mix, _, _ = dec.distribution()
        out.append(float(mix[t]))
        mixing.observe(t)
        dec.feed([t])
    return prompt + ids[len(prompt):][:N], out


def path_next_token(knn, lm, prompt):
    ids = lm.encode(TEXT[:120])[: len(prompt) + N]
    return ids, [float(knn.next_token_distribution(ids[:i]).mix[ids[i]]) for i in range(len(prompt), len(ids))]


def path_logits_processor(knn, lm, prompt):
    prompt = prompt[:1]  # the processor sees no prompt evidence: a one-token prompt has none
    x = torch.tensor([prompt])
    with knn.logits_processor() as proc:
        out = lm.model.generate(x, max_new_tokens=N, do_sample=False, attention_mask=torch.ones_like(x),
                                pad_token_id=lm.tokenizer.eos_token_id, logits_processor=[proc],
                                output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, 1:].tolist()
    return prompt + new, [float(s[0, t]) for s, t in zip(out.scores, new)]


PATHS = {"generate": path_generate, "batch": path_batch, "teacher_forced": path_teacher_forced,
         "next_token": path_next_token, "logits_processor": path_logits_processor}


@pytest.mark.parametrize("memory", [False, True], ids=["knn", "knn+decoder"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_same_logprobs(lm, datastore, tabled, confident, mem_dir, path, mode, memory):
    if path == "logits_processor" and memory:
        pytest.skip("transformers' generate takes the datastore only")
    knn = _knn(lm, datastore, mem_dir, mode, memory, {"adaptive+distance": tabled, "adaptive+confidence": confident})
    if "+" in mode:
        table = knn.retrieval().settings()["lambda_by_distance"]
        assert ("confidence_edges" in table) == mode.endswith("+confidence")
    prompt = lm.encode(TEXT[:40])
    ids, got = PATHS[path](knn, lm, prompt)
    start = len(ids) - len(got)
    want = _reference(knn, ids, start)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    lm_only = np.array([t.logprob_lm for t in knn.score(ids).tokens[start - 1 :]])
    assert np.abs(want - lm_only).max() > 1e-3  # the memories did change the numbers


@pytest.mark.parametrize("memory", [False, True], ids=["knn", "knn+decoder"])
@pytest.mark.parametrize("mode", MODES)
def test_evaluate_gives_scores_perplexity(lm, datastore, tabled, confident, mem_dir, corpus, tmp_path, mode, memory):
    """`evaluate` of a text read in one window: the perplexity of KNNLM.score's log-probs."""
    text = TEXT[:300]
    f = tmp_path / "t.txt"
    f.write_text(text)
    tables = {"adaptive+distance": tabled, "adaptive+confidence": confident}
    knn = _knn(lm, datastore, mem_dir, mode, memory, tables)
    ids = lm.encode(text)
    by_distance = "+" in mode
    res = evaluate(lm, [f], (tables[mode] if by_distance else datastore).path, mem_dir if memory else None, index="flat",
                   k=8, lam=0.3, temperature=2.0, lambda_mode=mode.split("+")[0], memory_lambda=0.4,
                   lambda_by_distance=by_distance or None, window=len(ids), stride=len(ids),
                   batch_tokens=len(ids), progress=False)
    assert ("lambda_by_distance" in res) == by_distance
    want = float(np.exp(-np.mean(_reference(knn, ids, 1))))
    assert res["ppl_knnlm_memory" if memory else "ppl_knnlm"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_lambda_zero_is_the_lm_on_every_path(lm, datastore, mem_dir, mode):
    """λ = 0 for the datastore and the decoder: every path's mixture is its LM log-softmax, bit for bit."""
    knn = KNNLM(lm, {"ds": datastore.path}, memories={"mem": mem_dir}, lam=0.0, k=8, memory_lambda=0.0,
                lambda_mode=mode)
    prompt = lm.encode(TEXT[:40])
    g = knn.generate(prompt, N, ignore_eos=True)
    b = knn.generate_many([prompt[:1], prompt], N, ignore_eos=True)[1]
    s = knn.score(prompt + g.ids)
    for tokens in (g.tokens, b.tokens, s.tokens):
        assert [t.logprob for t in tokens] == [t.logprob_lm for t in tokens]
    nt = knn.next_token_distribution(prompt)
    assert torch.equal(nt.mix, nt.lm)
    with knn.logits_processor() as proc:
        scores = torch.randn(1, lm.vocab_size)
        proc.captured = {datastore.key_point: torch.randn(1, 1, datastore.dim)}
        assert torch.equal(proc(torch.tensor([prompt]), scores), torch.log_softmax(scores, -1))
