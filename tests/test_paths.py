"""Every scoring and decoding path mixes through one mixer (knnlm.core.mix): for the same
memories and the same λ policy they give the same per-token log-probabilities.

The reference is `KNNLM.score` of the whole text.  The paths: KV-cached generation
(`KNNLM.generate`, its prompt read as evidence), continuous batching (`generate_many`),
teacher-forced decoding one token at a time (`Decoder` + `MixState`), transformers'
`generate` with the `LogitsProcessor` (a one-token prompt: it reads no prompt), the next-token
distribution, and `evaluate` (its perplexity).  The memories: the datastore, the continuous
cache (its keys the final hidden states of the same pass) and a memory decoder, mixed in
that order."""

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
MEMORIES = ["knn", "knn+decoder", "knn+cache", "knn+cache+decoder"]  # the memories mixed with the LM
ATOL = 1e-4  # float32 over the vocabulary vs float64 of the targets
CACHE_LAMBDA = 0.3  # the continuous cache's λ where it is mixed


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
    datastore of each table mode; memory: one of MEMORIES."""
    by_distance = "+" in mode
    ds = tabled[mode] if by_distance else datastore
    return KNNLM(lm, {"ds": ds.path}, memories={"mem": mem_dir} if "decoder" in memory else None, lam=0.3, k=8,
                 knn_temperature=2.0, memory_lambda=0.4, lambda_mode=mode.split("+")[0],
                 lambda_by_distance=by_distance or None, cache_lambda=CACHE_LAMBDA if "cache" in memory else 0.0)


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
    mixing = MixState(r, m, knn.cache_use(r))
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


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_same_logprobs(lm, datastore, tabled, confident, mem_dir, path, mode, memory):
    if path == "logits_processor" and "decoder" in memory:
        pytest.skip("transformers' generate takes the datastore and the cache only")
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
    if "cache" in memory:  # and the cache did too: the same memories without it differ
        without = _knn(lm, datastore, mem_dir, mode, memory.replace("+cache", ""),
                       {"adaptive+distance": tabled, "adaptive+confidence": confident})
        assert np.abs(_reference(knn, ids, 1) - _reference(without, ids, 1)).max() > 1e-3


@pytest.mark.parametrize("memory", MEMORIES)
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
    res = evaluate(lm, [f], (tables[mode] if by_distance else datastore).path,
                   mem_dir if "decoder" in memory else None, index="flat",
                   k=8, lam=0.3, temperature=2.0, lambda_mode=mode.split("+")[0], memory_lambda=0.4,
                   cache_lambda=CACHE_LAMBDA if "cache" in memory else 0.0,
                   lambda_by_distance=by_distance or None, window=len(ids), stride=len(ids),
                   batch_tokens=len(ids), progress=False)
    assert ("lambda_by_distance" in res) == by_distance
    want = float(np.exp(-np.mean(_reference(knn, ids, 1))))
    assert res["ppl"] == pytest.approx(want, rel=1e-5)  # the headline: every memory mixed
    named = {"knn": "ppl_knnlm", "knn+decoder": "ppl_knnlm_memory", "knn+cache": "ppl_cache"}
    if memory in named:
        assert res[named[memory]] == pytest.approx(want, rel=1e-5)


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


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_cache_lambda_zero_is_no_cache_on_every_path(lm, datastore, mode):
    """A cache with λ = 0 (asked for, or mixed through the mixer) leaves the kNN-LM exactly
    as it is without a cache, bit for bit."""
    from knnlm.run.continuous import CacheUse

    prompt = lm.encode(TEXT[:40])
    kw = dict(lam=0.3, k=8, knn_temperature=2.0, lambda_mode=mode)
    without, zero = KNNLM(lm, {"ds": datastore.path}, **kw), KNNLM(lm, {"ds": datastore.path}, cache_lambda=0.0, **kw)
    g = without.generate(prompt, N, ignore_eos=True)
    ids = prompt + g.ids
    assert [t.logprob for t in zero.generate(prompt, N, ignore_eos=True).tokens] == [t.logprob for t in g.tokens]
    assert [t.logprob for t in zero.score(ids).tokens] == [t.logprob for t in without.score(ids).tokens]
    r = without.retrieval()
    runs = []
    for c in (None, CacheUse(0.0, mode == "adaptive", 0.05, 2000)):  # the zero weight through the mixer itself
        mixing = MixState(r, None, c)
        dec = Decoder(lm, r, None, mixing)
        dec.feed(prompt)
        out = []
        for t in ids[len(prompt):]:
            out.append(dec.distribution()[0])
            mixing.observe(t)
            dec.feed([t])
        runs.append(torch.stack(out))
    assert torch.equal(runs[0], runs[1])


def test_adaptive_bound_holds_with_the_cache(lm, datastore, mem_dir, tmp_path):
    """The datastore, the cache and a memory decoder all adapting (λ's far too high for
    this text): the mixture is never more than the sum of log(1/w0) of the three worse
    than the LM over the whole text (knnlm.core.mix), and the cache is among them."""
    import math

    from knnlm.core.mix import candidates

    f = tmp_path / "t.txt"
    f.write_text(TEXT[:300])
    lams = {"lam": 0.3, "cache_lambda": 0.3, "memory_lambda": 0.3}
    res = evaluate(lm, [f], datastore.path, mem_dir, index="flat", k=8, temperature=2.0, lambda_mode="adaptive",
                   window=64, stride=32, batch_tokens=128, progress=False, **lams)
    assert res["cache_lambda_mode"] == "adaptive" and "ppl_knnlm_memory" in res
    bound = sum(-math.log(candidates(lam)[1][0]) for lam in lams.values())
    n = res["tokens"]
    assert n * (math.log(res["ppl"]) - math.log(res["ppl_lm"])) <= bound + 1e-6


@pytest.fixture(scope="module")
def cache_tuned(datastore, tmp_path_factory):
    """The datastore as `knnlm build` tunes it now: its settings with a cache λ above 0."""
    import shutil

    out = tmp_path_factory.mktemp("cache_tuned") / "ds"
    shutil.copytree(datastore.path, out)
    Datastore(out).record_settings({"k": 8, "lambda": 0.3, "temperature": 2.0, "cache_lambda": CACHE_LAMBDA})
    return Datastore(out)


@pytest.mark.parametrize("recorded", [CACHE_LAMBDA, 0.0, None], ids=["tuned", "zero", "old"])
def test_the_recorded_cache_lambda_is_every_paths_default(lm, datastore, recorded, tmp_path):
    """A datastore that recorded a cache λ above 0 mixes the cache by default, adapting, on
    every path (KNNLM.score, generate, batch, the LogitsProcessor, evaluate's headline);
    one that recorded 0, or none (tuned before the cache's λ was), mixes none: its numbers
    are the kNN-LM's alone, bit for bit; cache_lambda=0 turns a recorded one off."""
    import shutil

    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    settings = {"k": 8, "lambda": 0.3, "temperature": 2.0}
    Datastore(path).record_settings({**settings, **({} if recorded is None else {"cache_lambda": recorded})})
    default, off = KNNLM(lm, {"ds": path}), KNNLM(lm, {"ds": path}, cache_lambda=0.0)
    explicit = KNNLM(lm, {"ds": path}, cache_lambda=CACHE_LAMBDA, lambda_mode="adaptive")
    prompt = lm.encode(TEXT[:40])
    g = default.generate(prompt, N, ignore_eos=True)
    ids = prompt + g.ids
    got = [t.logprob for t in default.score(ids).tokens]
    if recorded:
        c = default.cache_use(default.retrieval())
        assert (c.lam, c.adapt, c.source) == (CACHE_LAMBDA, True, "datastore")
        assert got == [t.logprob for t in explicit.score(ids).tokens]
        assert np.abs(np.array(got) - [t.logprob for t in off.score(ids).tokens]).max() > 1e-3
        assert g.settings["cache_lambda"] == CACHE_LAMBDA
    else:
        assert default.cache_use(default.retrieval()) is None and "cache_lambda" not in g.settings
        assert got == [t.logprob for t in off.score(ids).tokens]
    start = len(prompt)
    np.testing.assert_allclose([t.logprob for t in g.tokens], got[start - 1 :], rtol=0, atol=ATOL)
    batch = default.generate_many([prompt[:1], prompt], N, ignore_eos=True, max_batch=2)[1]
    np.testing.assert_allclose([t.logprob for t in batch.tokens], got[start - 1 :], rtol=0, atol=ATOL)
    with default.logits_processor() as proc:
        assert (proc.c is not None) == bool(recorded)
    f = tmp_path / "t.txt"
    f.write_text(TEXT[:300])
    n = len(lm.encode(TEXT[:300]))
    kw = dict(index="flat", window=n, stride=n, batch_tokens=n, progress=False)
    res = evaluate(lm, [f], path, **kw)
    assert res["mixed"] == (["datastore", "cache"] if recorded else ["datastore"])
    assert res["ppl"] == (res["ppl_cache"] if recorded else res["ppl_knnlm"])
    none = evaluate(lm, [f], path, cache_lambda=0.0, **kw)
    assert none["mixed"] == ["datastore"] and none["ppl"] == none["ppl_cache"] == res["ppl_knnlm"]
    full = default.score(TEXT[:300])
    assert res["ppl"] == pytest.approx(full.ppl, rel=1e-5)


THETA, SIZE = 0.5, 12  # a recorded cache θ and size, not the defaults (0.05, 2000)


@pytest.mark.parametrize("recorded", ["tuned", "old"])
def test_the_recorded_cache_theta_is_every_paths_default(lm, datastore, recorded, tmp_path):
    """A datastore that tuned its cache's θ and size uses them by default on every path
    (KNNLM.score, generate, batch, teacher-forced decoding, the LogitsProcessor, evaluate):
    the same per-token log-probs as that θ and size given explicitly, different from the
    default θ's; one tuned before θ was recorded gives exactly the defaults' numbers; a θ
    given explicitly overrides the record."""
    import shutil

    from knnlm import CacheSettings
    from knnlm.core.settings import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_THETA

    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    settings = {"k": 8, "lambda": 0.3, "temperature": 2.0, "cache_lambda": CACHE_LAMBDA}
    if recorded == "tuned":
        settings.update(cache_theta=THETA, cache_size=SIZE)
    Datastore(path).record_settings(settings)
    want_theta, want_size = (THETA, SIZE) if recorded == "tuned" else (DEFAULT_CACHE_THETA, DEFAULT_CACHE_SIZE)
    default = KNNLM(lm, {"ds": path})
    given = KNNLM(lm, {"ds": path}, cache=CacheSettings(want_theta, want_size))
    plain = KNNLM(lm, {"ds": path}, cache=CacheSettings(DEFAULT_CACHE_THETA, DEFAULT_CACHE_SIZE))
    c = default.cache_use(default.retrieval())
    assert (c.theta, c.size) == (want_theta, want_size)
    prompt = lm.encode(TEXT[:40])
    g = default.generate(prompt, N, ignore_eos=True)
    assert (g.settings["cache_theta"], g.settings["cache_size"]) == (want_theta, want_size)
    ids = prompt + g.ids
    got = [t.logprob for t in default.score(ids).tokens]
    assert got == [t.logprob for t in given.score(ids).tokens]
    if recorded == "tuned":
        assert np.abs(np.array(got) - [t.logprob for t in plain.score(ids).tokens]).max() > 1e-3
        # an explicit θ overrides the record (the recorded size stays)
        over = KNNLM(lm, {"ds": path}, cache=CacheSettings(theta=DEFAULT_CACHE_THETA))
        assert [t.logprob for t in over.score(ids).tokens] == \
            [t.logprob for t in KNNLM(lm, {"ds": path}, cache=CacheSettings(DEFAULT_CACHE_THETA, SIZE))
             .score(ids).tokens]
    start = len(prompt)
    for name in ("generate", "batch", "teacher_forced", "logits_processor"):
        ids_p, lp = PATHS[name](default, lm, prompt)
        np.testing.assert_allclose(lp, [t.logprob for t in default.score(ids_p).tokens][len(ids_p) - len(lp) - 1 :],
                                   rtol=0, atol=ATOL, err_msg=name)
    np.testing.assert_allclose([t.logprob for t in g.tokens], got[start - 1 :], rtol=0, atol=ATOL)
    f = tmp_path / "t.txt"
    f.write_text(TEXT[:300])
    n = len(lm.encode(TEXT[:300]))
    kw = dict(index="flat", window=n, stride=n, batch_tokens=n, progress=False)
    res = evaluate(lm, [f], path, **kw)
    assert (res["cache_theta"], res["cache_size"]) == (want_theta, want_size)
    assert res["ppl"] == pytest.approx(default.score(TEXT[:300]).ppl, rel=1e-5)
    assert res["ppl"] == evaluate(lm, [f], path, cache_theta=want_theta, cache_size=want_size, **kw)["ppl"]
    fixed = evaluate(lm, [f], path, cache_lambda=CACHE_LAMBDA, **kw)  # fixed: θ shows in the perplexity
    assert fixed["ppl"] == evaluate(lm, [f], path, cache_lambda=CACHE_LAMBDA, cache_theta=want_theta,
                                    cache_size=want_size, **kw)["ppl"]
    if recorded == "tuned":
        assert evaluate(lm, [f], path, cache_lambda=CACHE_LAMBDA, cache_theta=DEFAULT_CACHE_THETA,
                        cache_size=DEFAULT_CACHE_SIZE, **kw)["ppl"] != pytest.approx(fixed["ppl"], rel=1e-4)
