"""Hostile input for the HTTP server: a few hundred requests generated from its OpenAPI
schema and made by hand (tests/fuzz.py; the full campaign is benchmarks/bench_fuzz.py),
and one regression test for each defect such requests found."""

import json
import math
import shutil
import warnings

import httpx
import numpy as np
import pytest
import torch
from fuzz import Campaign

from knnlm.core.scoring import knn_probabilities, knn_target_logprobs, knn_target_logprobs_all_k
from knnlm.run.decode import filter_logprobs, sample
from knnlm.run.explain import neighbor_weights
from knnlm.run.generate import KNNLM
from knnlm.serve.server import create_app, serve_in_thread

KEY = "s3cret-key"
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def knn(lm, datastore):
    return KNNLM(lm, {"text": datastore.path})


@pytest.fixture(scope="module")
def app(knn):
    return create_app(knn, max_queue=4, max_tokens=8, model_name="tiny", max_body_bytes=LIMIT)


@pytest.fixture(scope="module")
def base(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def forbidden(datastore, corpus, tmp_path_factory):
    """Paths the server was not configured with: a datastore beside the served one and the
    corpus (a request naming one may not read it)."""
    other = tmp_path_factory.mktemp("other") / "ds"
    shutil.copytree(datastore.path, other)
    return [str(other), str(corpus)]


def post(base, body, path="/v1/completions"):
    return httpx.post(base + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


# ---- the campaign (fast part) --------------------------------------------------------
def test_generated_and_hostile_requests_get_only_2xx_and_4xx(app, base, knn, forbidden):
    c = Campaign(base, forbidden=forbidden)
    c.generated(app.openapi(), examples=25, seed=0)
    c.hostile(vocab=knn.lm.vocab_size)
    c.oversized(LIMIT)
    c.disconnects(3)
    c.healthy()
    c.close()
    assert c.sent > 300 and not c.problems, "\n".join(c.problems[:20])
    assert c.statuses[200] > 20 and c.statuses[400] > 100  # both valid and invalid requests were sent


def test_with_api_keys(knn, forbidden):
    app = create_app(knn, max_queue=4, max_tokens=8, model_name="tiny", api_keys=[KEY])
    with serve_in_thread(app) as url:
        c = Campaign(url, headers={"authorization": f"Bearer {KEY}"}, forbidden=forbidden)
        c.keys(KEY)
        c.generated(app.openapi(), examples=8, seed=1)
        c.disconnects(1)
        c.healthy()
        c.close()
    assert c.statuses[401] == 21 and not c.problems, "\n".join(c.problems[:20])


# ---- the defects it found, one test each ---------------------------------------------
@pytest.mark.parametrize("field", ["knn_temperature", "lambda", "adaptive_threshold", "top_p", "temperature"])
def test_nan_and_infinity_are_refused(base, field):
    for v in ("NaN", "Infinity"):  # Infinity was accepted, then its JSON answer could not be written: a 500
        r = httpx.post(base + "/v1/completions", content=f'{{"prompt": "a", "max_tokens": 1, "{field}": {v}}}',
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text


def test_a_temperature_too_small_to_divide_by_is_greedy(base):
    greedy = post(base, {"prompt": "The quick", "max_tokens": 4, "temperature": 0})
    for body in ({"temperature": 1e-320}, {"top_p": 5e-324}, {"top_p": 1e-300, "temperature": 2.0}):
        r = post(base, {"prompt": "The quick", "max_tokens": 4, "seed": 3, **body})  # was a 500
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_sampling_at_the_edge_of_its_range():
    lp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, -1.0]), 0)
    assert sample(lp, 1e-320) == 0  # log p / T overflowed to -inf everywhere: NaN probabilities
    kept = filter_logprobs(lp, top_p=5e-324)  # compared in float32 as 0: every token was dropped
    assert torch.isfinite(kept).tolist() == [True, False, False, False]
    g = torch.Generator().manual_seed(0)
    assert sample(lp, 1.0, top_p=5e-324, generator=g) == 0


def test_a_tiny_knn_temperature_weighs_the_nearest_neighbour_alone():
    d, v = np.array([[4.0, 9.0, np.inf]]), np.array([[5, 7, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning overflow, and log p_kNN = -inf for every token
        assert knn_target_logprobs(d, v, np.array([5]), 1e-320)[0] == 0.0
        assert knn_target_logprobs(d, v, np.array([7]), 1e-320)[0] == -math.inf
        assert knn_target_logprobs_all_k(d, v, np.array([5]), 1e-320, [1, 2])[0].tolist() == [0.0, 0.0]
        assert knn_probabilities(d, v, 8, 1e-320)[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
        assert neighbor_weights(d[0], 1e-320).tolist() == [1.0, 0.0, 0.0]
    # the usual temperatures are unchanged: softmax(-d / T)
    w = np.exp(-d[0, :2] / 3) / np.exp(-d[0, :2] / 3).sum()
    assert np.allclose(np.exp(knn_target_logprobs(d, v, np.array([5]), 3.0)), w[0], rtol=1e-12)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "seed": 10**30}, "seed"),  # was a 500: torch's seed is 64 bits
    ({"prompt": "\ud800 lone"}, "prompt"),  # was a 500: the tokenizer takes no lone surrogate
    ({"prompt": ["ok", "b\udfff"]}, "prompt"),
    ({"prompt": [True, False]}, "prompt"),  # was read as token ids 1, 0
    ({"prompt": [[1], [2, 3.0]]}, "prompt"),
])
def test_bad_values_get_400(base, body, param):
    r = post(base, {**body, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("method, path, content, status", [
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),  # were {"detail": ...}
    ("POST", "/v1/completions", b"\xff\xfe\x00", 400),
    ("GET", "/v1/completions", b"", 405),
    ("GET", "/v1/nope", b"", 404),
])
def test_framework_errors_have_openai_shape(base, method, path, content, status):
    r = httpx.request(method, base + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
