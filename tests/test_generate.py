"""The Python generation API (knnlm.run.generate) and `knnlm generate`, on the tiny random llama."""

import random

import numpy as np
import pytest
import torch

from knnlm.cli.main import main
from knnlm.errors import KnnlmError
from knnlm.run.decode import filter_logprobs, sample
from knnlm.run.generate import KNNLM

N_PROMPT_WORDS = 6


def nonsense_text(words: int = 20, seed: int = 7) -> str:
    """Made-up words no model can know: only a datastore holding them can continue them."""
    rng = random.Random(seed)
    syll = ["zor", "bla", "qui", "fen", "mox", "tur", "vel", "dri", "ka", "sno", "pli", "gru", "wem", "yst", "hax"]
    return " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(words)).capitalize()


@pytest.fixture(scope="module")
def nonsense_ds(lm, tmp_path_factory):
    """A datastore over one nonsense document, in a single window (its keys are exactly
    the ones generation computes from the same prefix)."""
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    root = tmp_path_factory.mktemp("nonsense")
    (root / "nonsense.txt").write_text(nonsense_text(), encoding="utf-8")
    out = build_datastore(lm, [root / "nonsense.txt"], root / "ds", window=128, stride=64, progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return Datastore(out)


@pytest.fixture(scope="module")
def knn(lm, datastore, nonsense_ds):
    return KNNLM(lm, {"text": datastore.path, "nonsense": nonsense_ds.path})


def split_nonsense(lm):
    """(prompt, the true continuation's token ids) for the nonsense document."""
    text = nonsense_text()
    cut = [i for i, c in enumerate(text) if c == " "][N_PROMPT_WORDS - 1]
    prompt, ids = text[:cut], lm.encode(text)
    p = lm.encode(prompt)
    assert ids[: len(p)] == p  # the prompt's tokens are a prefix of the text's
    return prompt, ids[len(p):]


def hf_greedy(lm, prompt: str, n: int, **kwargs) -> list[int]:
    """transformers' own greedy generation, cut before EOS."""
    x = torch.tensor([lm.encode(prompt)])
    out = lm.model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x),
                            pad_token_id=lm.tokenizer.eos_token_id, **kwargs)[0, x.shape[1]:].tolist()
    eos = lm.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


# ---- identities ----------------------------------------------------------------------
def test_lambda_zero_is_the_base_model_greedy_output(lm, knn):
    prompt, n = "The quick brown", 24
    base = hf_greedy(lm, prompt, n)
    assert len(base) >= 8
    assert knn.generate(prompt, n, datastore="text", lam=0.0, k=4).ids == base
    assert knn.generate(prompt, n, datastore=None).ids == base
    with knn.disabled():
        g = knn.generate(prompt, n, datastore="text", lam=0.9, k=4)
        assert g.ids == base and g.settings == {"datastore": None}
        assert all(t.logprob == t.logprob_lm and t.logprob_knn is None for t in g.tokens)
    with knn.logits_processor(datastore="text", lam=0.0, k=4) as proc:
        assert hf_greedy(lm, prompt, n, logits_processor=[proc]) == base
    # and the datastore does change the output when it weighs something (and is back on)
    assert knn.generate(prompt, n, datastore="text", lam=0.9, k=4).ids != base


def test_lambda_zero_distribution_is_the_lm_log_softmax_exactly(lm, knn):
    prefix = "A kNN language"
    nt = knn.next_token_distribution(prefix, datastore="text", lam=0.0, k=4)
    _, logits = lm.forward(torch.tensor([lm.encode(prefix)]), [], logits=True)
    assert torch.equal(nt.mix, nt.lm)
    torch.testing.assert_close(nt.lm, torch.log_softmax(logits[0, -1].float(), -1), rtol=0, atol=1e-5)
    mixed = knn.next_token_distribution(prefix, datastore="text", lam=0.5, k=4)
    expected = torch.log(0.5 * mixed.knn.exp() + 0.5 * mixed.lm.exp())
    torch.testing.assert_close(mixed.mix, expected, rtol=0, atol=1e-5)
    assert abs(float(mixed.mix.exp().sum()) - 1) < 1e-4


def test_knn_greedy_continues_a_memorised_text_verbatim(lm, knn):
    prompt, truth = split_nonsense(lm)
    n = 30
    assert len(truth) > n
    base = knn.generate(prompt, n, datastore=None)
    assert base.ids != truth[:n]  # the random model cannot know it
    for lam, k, temp in [(1.0, 1, 1.0), (0.9, 1, 1.0), (0.9, 8, 0.01)]:  # the exact memory wins
        g = knn.generate(prompt, n, datastore="nonsense", lam=lam, k=k, knn_temperature=temp)
        assert g.ids == truth[:n], (lam, k, temp)
        assert g.text == lm.decode(truth[:n])
    with knn.logits_processor(datastore="nonsense", lam=0.9, k=1) as proc:  # same through HF generate
        assert hf_greedy(lm, prompt, n, logits_processor=[proc]) == truth[:n]


def test_kv_cached_generation_scores_equal_scoring_the_whole_text(lm, knn):
    """Sampled tokens so that the text is not the datastore's; every score of the
    KV-cached, one-token-a-step path equals the one-pass score of the final text."""
    opts = dict(datastore="text", lam=0.5, k=8, knn_temperature=2.0)
    g = knn.generate("Memory helps the", 24, temperature=1.0, seed=3, ignore_eos=True, **opts)
    assert len(g.tokens) == 24
    s = knn.score(g.prompt_ids + g.ids, **opts)
    scored = s.tokens[-24:]
    assert [t.id for t in scored] == g.ids
    for name in ("logprob", "logprob_lm", "logprob_knn"):
        a = np.array([getattr(t, name) for t in g.tokens])
        b = np.array([getattr(t, name) for t in scored])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=name)
    assert any(t.logprob != t.logprob_lm for t in g.tokens)
    # the next-token distribution after the whole text but its last token agrees too
    nt = knn.next_token_distribution(g.prompt_ids + g.ids[:-1], **opts)
    assert abs(float(nt.mix[g.ids[-1]]) - scored[-1].logprob) < 1e-4


def test_score_of_a_string(lm, knn):
    text = "The quick brown fox jumps over the lazy dog."
    s = knn.score(text, datastore="text", lam=0.25, k=8)
    ids = lm.encode(text)
    assert s.ids == ids and [t.id for t in s.tokens] == ids[1:]
    assert s.settings == {"datastore": "text", "lambda": 0.25, "lambda_mode": "fixed", "k": 8, "knn_temperature": 1.0}
    assert s.ppl < s.ppl_lm  # the datastore holds this sentence
    assert knn.score(text, datastore=None).ppl == pytest.approx(s.ppl_lm, rel=1e-6)


# ---- streaming and stopping ----------------------------------------------------------
def test_stream_yields_the_same_text_as_generate(lm, knn):
    for opts in [dict(), dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=1.0, seed=1, stop=["e", "o"])]:
        events = list(knn.stream("The quick", 20, datastore="text", k=4, **opts))
        g = knn.generate("The quick", 20, datastore="text", k=4, **opts)
        assert "".join(e.text for e in events) == g.text
        assert [e.token.id for e in events if e.token is not None] == g.ids
        assert events[-1].token is None and events[-1].finish_reason == g.finish_reason
        if g.finish_reason == "length":
            assert g.text == lm.decode(g.ids)


def test_stop_string_ends_generation_and_is_trimmed(knn):
    full = knn.generate("A kNN", 30, datastore="text", lam=0.9, k=4)
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = full.text[8:11]
    cut = full.text.find(stop)
    g = knn.generate("A kNN", 30, datastore="text", lam=0.9, k=4, stop=["@@never@@", stop])
    assert g.finish_reason == "stop" and g.text == full.text[:cut]
    assert len(g.ids) < len(full.ids)
    shown = "".join(e.text for e in knn.stream("A kNN", 30, datastore="text", lam=0.9, k=4, stop=stop))
    assert shown == full.text[:cut]


def test_seeded_sampling_is_reproducible(knn):
    opts = dict(datastore="text", k=8, temperature=1.5, ignore_eos=True)
    a = knn.generate("The", 16, seed=11, **opts).ids
    assert a == knn.generate("The", 16, seed=11, **opts).ids
    assert a != knn.generate("The", 16, seed=12, **opts).ids
    greedy = knn.generate("The", 16, datastore="text", k=8, ignore_eos=True).ids
    assert knn.generate("The", 16, seed=11, top_k=1, **opts).ids == greedy
    assert knn.generate("The", 16, seed=11, top_p=1e-6, **opts).ids == greedy


def test_filter_logprobs_golden():
    """p = (.5, .3, .15, .05): top_k = 3 drops .05; top_p = .7 keeps .5 and .3 (.5 < .7 <= .8);
    top_p = .5 keeps .5 alone."""
    lp = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logprobs(lp, top_k=3)) == [0, 1, 3]
    assert kept(filter_logprobs(lp, top_p=0.7)) == [1, 3]
    assert kept(filter_logprobs(lp, top_p=0.5)) == [1]
    assert kept(filter_logprobs(lp, top_k=2, top_p=0.99)) == [1, 3]
    assert sample(lp) == 1
    g = torch.Generator().manual_seed(0)
    draws = [sample(lp, 1.0, top_k=2, generator=g) for _ in range(200)]
    assert set(draws) == {1, 3}


# ---- several datastores, attribution -------------------------------------------------
def test_each_call_names_its_datastore(lm, knn):
    prompt, truth = split_nonsense(lm)
    assert knn.default == "text" and set(knn.datastores) == {"text", "nonsense"}
    assert knn.generate(prompt, 12, datastore="nonsense", lam=0.9, k=1).ids == truth[:12]
    other = knn.generate(prompt, 12, datastore="text", lam=0.9, k=1)
    assert other.ids != truth[:12] and other.settings["datastore"] == "text"
    assert knn.generate(prompt, 12, lam=0.9, k=1).ids == other.ids  # omitted: the default datastore
    with pytest.raises(KnnlmError, match=r"unknown datastore 'law' \(loaded: text, nonsense\)"):
        knn.generate(prompt, 4, datastore="law")
    with pytest.raises(KnnlmError, match="larger than datastore 'nonsense'"):
        knn.generate(prompt, 4, datastore="nonsense", k=10_000)
    assert knn.retrieval("nonsense").k == len(knn.datastores["nonsense"])  # default k shrinks to fit


def test_every_token_can_show_its_neighbours(lm, knn, nonsense_ds):
    """Self-retrieval: scoring the memorised text, token i's nearest neighbour is entry
    i - 1 (key at token i - 1, value token i), shown in its document's context."""
    text = nonsense_text()
    s = knn.score(text, datastore="nonsense", k=4, neighbors=3, knn_temperature=1.0)
    ids = lm.encode(text)
    for i, t in enumerate(s.tokens, start=1):
        assert len(t.neighbors) == 3
        w = [n.weight for n in t.neighbors]
        d = np.array([n.distance for n in t.neighbors])
        assert w == sorted(w, reverse=True) and sum(w) <= 1 + 1e-9
        first = t.neighbors[0]
        assert (first.entry, first.document, first.offset, first.token_id) == (i - 1, 0, i, ids[i])
        assert first.source == "nonsense.txt" and first.datastore == "nonsense"
        assert first.context == lm.decode(ids[max(1, i - knn.context):i])
        assert first.after == lm.decode(ids[i + 1:i + 9])
        # weight = softmax(-d / T) over all k = 4 neighbours: the 3 shown carry at most their share
        assert w[1] / w[0] == pytest.approx(np.exp(d[0] - d[1]), rel=1e-5)
    g = knn.generate(split_nonsense(lm)[0], 5, datastore="nonsense", lam=0.9, k=4, knn_temperature=0.01,
                     neighbors=2)
    assert all(len(t.neighbors) == 2 and t.neighbors[0].token == t.text for t in g.tokens)


def test_bad_settings_are_clear_errors(knn):
    cases = [
        (dict(lam=1.5), "lambda must be in"),
        (dict(k=0), "k must be >= 1"),
        (dict(knn_temperature=0), "temperature must be > 0"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0), "top_p must be in"),
        (dict(stop=[""]), "non-empty strings"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=10_000), "too many tokens"),
    ]
    for opts, message in cases:
        with pytest.raises(KnnlmError, match=message):
            knn.stream("The", **{"max_new_tokens": 4, **opts})  # checked before the first token


# ---- CLI -----------------------------------------------------------------------------
def test_cli_generate_streams_the_api_text(lm, knn, llama_dir, nonsense_ds, capsys, monkeypatch):
    prompt, truth = split_nonsense(lm)
    args = ["-q", "generate", "-d", str(nonsense_ds.path), "--model", str(llama_dir), "--dtype", "float32",
            "--device", "cpu", "-k", "1", "--lambda", "0.9", "--max-new-tokens", "10"]
    assert main(args + [prompt]) == 0
    assert capsys.readouterr().out == lm.decode(truth[:10]) + "\n"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(prompt + "\n"))
    assert main(args) == 0  # prompt from standard input
    assert capsys.readouterr().out == lm.decode(truth[:10]) + "\n"


def test_cli_errors(llama_dir, capsys):
    assert main(["-q", "generate", "x", "--model", str(llama_dir), "--device", "cpu", "--top-p", "2"]) == 1
    assert capsys.readouterr().err == "error: top_p must be in (0, 1], got 2.0\n"
    assert main(["-q", "serve", "--datastore", "a=x", "--default-datastore", "b"]) == 1
    assert "--default-datastore 'b' is not one of the --datastore names (a)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--datastore", "no-equals-sign"])
    assert "expected NAME=PATH" in capsys.readouterr().err
