"""/v1/completions beyond plain generation: OpenAI's four prompt forms, `echo` (the prompt's
tokens scored under the kNN-LM mixture, as lm-evaluation-harness asks), `max_tokens: 0`,
`logprobs` with top alternatives for prompt and generated tokens, and `text_offset`."""

import httpx
import openai
import pytest
import torch

from knnlm.run.decode import SequenceState
from knnlm.run.generate import KNNLM
from knnlm.serve.server import create_app, serve_in_thread

MODEL = "tiny"
TEXT = "The quick brown fox jumps over the lazy dog."
KNN = {"datastore": "text", "lambda": 0.5, "k": 8}  # the request's fields
KW = {"datastore": "text", "lam": 0.5, "k": 8}  # the same, as KNNLM keywords


@pytest.fixture(scope="module")
def knn(lm, datastore, tmp_path_factory):
    """The datastore with a tuned cache λ recorded: every request mixes the continuous cache
    too, by default, and the server's numbers must be KNNLM's."""
    import shutil

    from knnlm.core.datastore import Datastore

    path = tmp_path_factory.mktemp("completions") / "ds"
    shutil.copytree(datastore.path, path)
    Datastore(path).record_settings({"k": 8, "lambda": 0.25, "temperature": 1.0, "cache_lambda": 0.3})
    return KNNLM(lm, {"text": path})


@pytest.fixture(scope="module")
def base(knn):
    with serve_in_thread(create_app(knn, max_queue=8, max_tokens=32, model_name=MODEL)) as url:
        yield url


def complete(base: str, **body) -> dict:
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_scores_equal_knnlm_score_and_the_score_endpoint(base, knn):
    """echo + max_tokens 0: the prompt's tokens, the first (BOS) without a log-prob, the others
    with the mixture's log p, the same numbers as KNNLM.score and POST /v1/score."""
    r = complete(base, prompt=TEXT, echo=True, max_tokens=0, logprobs=1, **KNN)
    s = knn.score(TEXT, **KW)
    served = httpx.post(base + "/v1/score", json={"text": TEXT, **KNN}).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    assert c["text"] == TEXT and c["finish_reason"] == "length"
    assert lp["tokens"] == [knn.lm.decode(s.ids[:1])] + [t.text for t in s.tokens]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([t.logprob for t in s.tokens], abs=1e-9)
    assert lp["token_logprobs"][1:] == pytest.approx([t["logprob"] for t in served["tokens"]], abs=1e-9)
    assert [t.logprob for t in s.tokens] != pytest.approx([t.logprob_lm for t in s.tokens], abs=1e-3)  # kNN counts
    assert r["usage"] == {"prompt_tokens": len(s.ids), "completion_tokens": 0, "total_tokens": len(s.ids)}
    assert c["knnlm"]["datastore"] == "text" and c["knnlm"]["tokens"] == []
    assert c["knnlm"]["cache_lambda"] == 0.3 and c["knnlm"]["cache_lambda_source"] == "datastore"
    assert all(t.logprob_cache is not None for t in s.tokens)  # the cache was mixed in
    assert [t["logprob_lm"] for t in c["knnlm"]["prompt_tokens"]] == pytest.approx([t.logprob_lm for t in s.tokens])
    # text_offset: where each token starts in the text; the BOS the server added takes no room
    offsets = lp["text_offset"]
    assert offsets[:2] == [0, 0] and all(TEXT[o:].startswith(t) for o, t in zip(offsets[1:], lp["tokens"][1:]))


def test_token_id_prompts_equal_string_prompts(base, knn):
    ids = knn.prompt_ids(TEXT)  # the BOS, then the text's tokens
    as_text = complete(base, prompt=TEXT, echo=True, max_tokens=5, temperature=0, logprobs=2, **KNN)
    as_ids = complete(base, prompt=ids, echo=True, max_tokens=5, temperature=0, logprobs=2, **KNN)
    nested = complete(base, prompt=[ids], echo=True, max_tokens=5, temperature=0, logprobs=2, **KNN)
    a, b, c = (x["choices"][0]["logprobs"] for x in (as_text, as_ids, nested))
    assert a["tokens"] == b["tokens"] == c["tokens"]
    assert a["token_logprobs"] == b["token_logprobs"] == c["token_logprobs"]
    assert a["top_logprobs"] == b["top_logprobs"]
    assert as_text["usage"] == as_ids["usage"]
    # the completions are the same; an id prompt's echoed text is its decoded ids
    assert as_text["choices"][0]["text"][len(TEXT):] == as_ids["choices"][0]["text"][len(knn.lm.decode(ids)):]
    g = knn.generate(ids, 5, **KW)
    assert as_ids["choices"][0]["text"].endswith(g.text) and a["token_logprobs"][-5:] == pytest.approx(
        [t.logprob for t in g.tokens], abs=1e-5)


def test_max_tokens_zero_generates_nothing(base, knn):
    r = complete(base, prompt=["The quick", "A kNN language"], max_tokens=0, **KNN)
    assert [c["text"] for c in r["choices"]] == ["", ""]
    assert [c["finish_reason"] for c in r["choices"]] == ["length", "length"]
    n = len(knn.prompt_ids("The quick")) + len(knn.prompt_ids("A kNN language"))
    assert r["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    r = complete(base, prompt="The quick", max_tokens=0, echo=True)  # echo, no logprobs: the text alone
    assert r["choices"][0]["text"] == "The quick" and r["choices"][0]["logprobs"] is None


def test_several_prompts_get_one_choice_each_in_order(base, knn):
    prompts = ["The quick brown", "Memory helps", "A"]
    r = complete(base, prompt=prompts, max_tokens=6, temperature=0, **KNN)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    alone = [knn.generate(p, 6, **KW) for p in prompts]
    assert [c["text"] for c in r["choices"]] == [g.text for g in alone]
    assert r["usage"]["completion_tokens"] == sum(len(g.tokens) for g in alone)
    assert r["usage"]["prompt_tokens"] == sum(len(g.prompt_ids) for g in alone)


def test_top_logprobs_are_the_mixtures_most_likely_tokens(base, knn):
    """logprobs: 3 gives, for every prompt token, the 3 likeliest tokens of the kNN-LM
    mixture after the tokens before it: those of next_token_distribution."""
    prompt = "Zorblat the purple"
    r = complete(base, prompt=prompt, echo=True, max_tokens=2, temperature=0, logprobs=3, **KNN)
    lp = r["choices"][0]["logprobs"]
    ids = knn.prompt_ids(prompt)
    for i in range(1, len(ids)):
        nt = knn.next_token_distribution(ids[:i], **KW)
        want = knn.top_tokens(nt.mix, 3)
        assert lp["top_logprobs"][i] == pytest.approx(want, abs=1e-5), i
    greedy = lp["top_logprobs"][len(ids)]  # the first generated token is the likeliest one, exactly
    assert lp["token_logprobs"][len(ids)] == max(greedy.values())


def test_the_official_client_reads_echo_and_logprobs(base, knn):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=MODEL, prompt=[TEXT, "Memory helps"], echo=True, max_tokens=0, logprobs=0,
                                  extra_body=KNN)
    assert len(r.choices) == 2 and r.choices[0].text == TEXT
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx([t.logprob for t in knn.score(TEXT, **KW).tokens])
    assert r.choices[1].logprobs.top_logprobs is None


def test_an_eos_that_ends_a_generation_is_reported_when_asked(knn):
    """With report_eos (what echo sets), the end-of-text token is the generation's last
    token (text ""), so an echo with max_tokens 1 always lists prompt + 1 tokens."""
    eos = knn.lm.tokenizer.eos_token_id
    mix = torch.full((knn.lm.vocab_size,), -20.0)
    mix[eos] = 0.0  # the model is sure the text ends here
    for report in (False, True):
        req = knn.prepare("The quick", 4, datastore=None, report_eos=report)
        events, nxt = SequenceState(knn, req).advance(mix, mix, None, None, None)
        assert nxt is None and events[-1].token is None and events[-1].finish_reason == "stop"
        reported = [e.token for e in events if e.token is not None]
        assert [(t.id, t.text, t.logprob) for t in reported] == ([(eos, "", 0.0)] if report else [])


def test_echo_with_one_token_equals_generating_it(base, knn):
    """echo + max_tokens 1 (lm-eval's request) picks the token from the scoring pass itself:
    the same token and log-probs as generating it, with a datastore and without."""
    for knn_fields, kw in [(KNN, KW), ({"datastore": None}, {"datastore": None})]:
        for prompt in [TEXT, "Memory helps the model predict rare words such as"]:
            r = complete(base, prompt=prompt, echo=True, max_tokens=1, temperature=0, logprobs=2, **knn_fields)
            lp = r["choices"][0]["logprobs"]
            g = knn.generate(prompt, 1, report_eos=True, top_logprobs=2, **kw)
            n = len(knn.prompt_ids(prompt))
            assert len(lp["tokens"]) == n + 1 and r["usage"]["completion_tokens"] == 1
            assert lp["tokens"][n] == g.tokens[0].text and r["choices"][0]["text"] == prompt + g.text
            assert lp["token_logprobs"][n] == pytest.approx(g.tokens[0].logprob, abs=1e-5)
            assert lp["top_logprobs"][n] == pytest.approx(g.tokens[0].top, abs=1e-5)
            assert lp["token_logprobs"][1:n] == pytest.approx([t.logprob for t in knn.score(prompt, **kw).tokens])
