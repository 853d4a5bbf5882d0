"""The HTTP server (knnlm.serve.server), run with uvicorn on 127.0.0.1 and an ephemeral port,
driven by the official `openai` client and by httpx."""

import gc
import json
import threading
import time

import httpx
import openai
import psutil
import pytest
import uvicorn

from knnlm.run.generate import KNNLM
from knnlm.serve.server import create_app
from knnlm.serve.server import serve_in_thread as running

MODEL = "tiny"


@pytest.fixture(scope="module")
def docs_ds(lm, jsonl_corpus, tmp_path_factory):
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    out = build_datastore(lm, [jsonl_corpus], tmp_path_factory.mktemp("docs") / "ds", window=32, stride=16,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return Datastore(out)


@pytest.fixture(scope="module")
def knn(lm, datastore, docs_ds):
    return KNNLM(lm, {"text": datastore.path, "docs": docs_ds.path})


@pytest.fixture(scope="module")
def base(knn):
    with running(create_app(knn, max_queue=4, max_tokens=64, model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


# ---- the OpenAI API ------------------------------------------------------------------
def test_openai_client_gets_the_python_api_completion(client, knn):
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0,
                                  extra_body={"datastore": "text", "lambda": 0.9, "k": 4})
    g = knn.generate("The quick brown", 12, datastore="text", lam=0.9, k=4)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == g.text and r.choices[0].finish_reason == g.finish_reason
    assert r.usage.prompt_tokens == len(g.prompt_ids) and r.usage.completion_tokens == len(g.tokens)
    assert r.choices[0].model_extra["knnlm"] == {"datastore": "text", "lambda": 0.9, "lambda_mode": "fixed", "k": 4,
                                                 "knn_temperature": 1.0}


def test_streaming_yields_the_same_text_as_non_streaming(client, base):
    opts = dict(model=MODEL, prompt="Memory helps", max_tokens=24, temperature=0.9, top_p=0.95, seed=4,
                stop=["zz"], extra_body={"datastore": "text", "k": 8})
    whole = client.completions.create(**opts)
    chunks = list(client.completions.create(stream=True, **opts))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len(chunks) - 1 == whole.usage.completion_tokens  # a chunk per token, then the finish
    # the wire format: server-sent events ending in [DONE]
    body = {k: v for k, v in opts.items() if k != "extra_body"} | opts["extra_body"] | {"stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == whole.choices[0].text


def test_logprobs_and_neighbours(client, knn):
    r = client.completions.create(model=MODEL, prompt="A kNN", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"datastore": "docs", "k": 4, "return_neighbors": 2})
    g = knn.generate("A kNN", 6, datastore="docs", k=4, neighbors=2, top_logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [t.text for t in g.tokens]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in g.tokens], abs=1e-6)
    for top, mine in zip(lp.top_logprobs, g.tokens):  # greedy: the token is the likeliest
        assert 1 <= len(top) <= 3 and top == pytest.approx(mine.top) and top[mine.text] == max(top.values())
    tokens = r.choices[0].model_extra["knnlm"]["tokens"]
    for t, mine in zip(tokens, g.tokens):
        assert t["logprob_lm"] == pytest.approx(mine.logprob_lm, abs=1e-6)
        assert [n["entry"] for n in t["neighbors"]] == [n.entry for n in mine.neighbors]
        n = t["neighbors"][0]
        assert n["source"] == "docs.jsonl" and n["title"].startswith("doc") and n["datastore"] == "docs"
        assert 0 < n["weight"] <= 1 and {"document", "offset", "context", "after", "distance"} <= set(n)


def test_each_request_names_its_datastore(client, knn):
    def text(**extra):
        r = client.completions.create(model=MODEL, prompt="The quick", max_tokens=10, temperature=0,
                                      extra_body={"lambda": 0.9, "k": 4, **extra})
        return r.choices[0].text, r.choices[0].model_extra["knnlm"]

    assert text(datastore="text") == (knn.generate("The quick", 10, datastore="text", lam=0.9, k=4).text,
                                      {"datastore": "text", "lambda": 0.9, "lambda_mode": "fixed", "k": 4,
                                       "knn_temperature": 1.0})
    assert text(datastore="docs")[0] == knn.generate("The quick", 10, datastore="docs", lam=0.9, k=4).text
    assert text()[1]["datastore"] == "text"  # omitted: the server's default
    assert text(datastore=None) == (knn.generate("The quick", 10, datastore=None).text, {"datastore": None})


def test_score_endpoint(base, knn):
    body = {"text": "The quick brown fox jumps over the lazy dog.", "datastore": "text", "lambda": 0.5, "k": 8,
            "return_neighbors": 1}
    r = httpx.post(base + "/v1/score", json=body).json()
    s = knn.score(body["text"], datastore="text", lam=0.5, k=8, neighbors=1)
    assert [t["id"] for t in r["tokens"]] == [t.id for t in s.tokens]
    assert [t["logprob"] for t in r["tokens"]] == pytest.approx([t.logprob for t in s.tokens], abs=1e-9)
    assert r["ppl"] == pytest.approx(s.ppl) and r["ppl_lm"] == pytest.approx(s.ppl_lm) and r["ppl"] < r["ppl_lm"]
    assert r["tokens"][5]["neighbors"][0]["entry"] == s.tokens[5].neighbors[0].entry
    assert [(d["title"], d["tokens"]) for d in r["documents"]] == [(d["title"], d["tokens"]) for d in s.documents()]
    assert r["documents"][0]["weight"] == pytest.approx(s.documents()[0]["weight"]) and r["documents"][0]["tokens"]
    base_only = httpx.post(base + "/v1/score", json={"text": body["text"], "datastore": None}).json()
    assert base_only["datastore"] is None and all(t["logprob_knn"] is None for t in base_only["tokens"])
    assert base_only["ppl"] == pytest.approx(s.ppl_lm, rel=1e-6)


def test_models_health_and_schema(client, base):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert set(models.data[0].model_extra["datastores"]) == {"text", "docs"}
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["queue"]["max"] == 4 and health["default_datastore"] == "text"
    schema = httpx.get(base + "/openapi.json").json()
    assert {"/v1/completions", "/v1/score", "/v1/models", "/health"} <= set(schema["paths"])
    req = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"datastore", "k", "knn_temperature", "return_neighbors"} <= set(req)
    assert {"type": "number", "minimum": 0.0, "maximum": 1.0} in req["lambda"]["anyOf"]  # or null


# ---- bad requests --------------------------------------------------------------------
BAD = [
    (b'{"prompt": "x",', 400, "malformed JSON", None),
    ({"prompt": "x", "lambda": 1.5}, 400, "lambda: Input should be less than or equal to 1", "lambda"),
    ({"prompt": "x", "lambda": -0.1}, 400, "lambda: Input should be greater than or equal to 0", "lambda"),
    ({"prompt": "x", "datastore": "law"}, 404, "unknown datastore 'law' (loaded: text, docs)", "datastore"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model 'gpt-4' is not served here", "model"),
    ({"prompt": "x", "max_tokens": 65}, 400, "too many tokens: max_tokens is 65, this server allows 64", "max_tokens"),
    ({"prompt": "fjord " * 120, "max_tokens": 64}, 400, "max_new_tokens is 64, but tiny reads at most 256", None),
    ({"prompt": "x", "k": 100_000}, 400, "k: Input should be less than or equal to 4096", "k"),
    ({"prompt": "x", "datastore": "docs", "k": 4000}, 400, "larger than datastore 'docs'", None),
    ({"prompt": "x", "knn_temperature": 0}, 400, "knn_temperature: Input should be greater than 0", "knn_temperature"),
    ({"prompt": "x", "lamda": 0.5}, 400, "lamda: Extra inputs are not permitted", "lamda"),
    ({"prompt": "x", "n": 2}, 400, "n: Input should be 1", "n"),
    ({"prompt": []}, 400, "prompt is an empty list", "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "empty list of token ids", "prompt"),
    ({"prompt": [5, 100_000]}, 400, "token id 100000 is outside the vocabulary (0 to ", "prompt"),
    ({"prompt": [[5], [-1]]}, 400, "token id -1 is outside the vocabulary", "prompt"),
    ({"prompt": ["a", 3]}, 400, "prompt: Input should be", "prompt"),
    ({"prompt": [7] * 300}, 400, "too many tokens: the prompt has 300, but tiny reads at most 256", "prompt"),
    ({"prompt": ["a"] * 5}, 400, "too many prompts: 5, this server takes at most 4", "prompt"),
    ({"prompt": "x", "echo": True, "stream": True}, 400, "stream is not supported with echo", "echo"),
    ({"prompt": ["a", "b"], "stream": True}, 400, "stream is not supported with several prompts", "stream"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens: Input should be greater than or equal to 0", "max_tokens"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs: Input should be less than or equal to 5", "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ({"max_tokens": 4}, 400, "prompt: Field required", "prompt"),
]


@pytest.mark.parametrize("body,status,message,param", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_requests_get_clear_errors(base, body, status, message, param):
    if isinstance(body, bytes):
        r = httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(base + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param


def test_bad_requests_through_the_openai_client(client, base):
    with pytest.raises(openai.BadRequestError, match="lambda"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"lambda": 2})
    with pytest.raises(openai.NotFoundError, match="unknown datastore"):
        client.completions.create(model=MODEL, prompt="x", stream=True, extra_body={"datastore": "law"})
    r = httpx.post(base + "/v1/score", json={"text": ""})
    assert r.status_code == 400 and "text: String should have at least 1 character" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/score", json={"text": "fjord " * 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_tokens"
    assert "but tiny reads at most 256" in r.json()["error"]["message"]  # the served name, not the model's path


# ---- overload ------------------------------------------------------------------------
def test_a_full_queue_answers_503_at_once(lm, datastore):
    """One request holds the model, one waits (max_queue = 1): the third gets 503."""
    gated = KNNLM(lm, {"text": datastore.path})
    started, release = threading.Event(), threading.Event()

    def prepare(*args, **kwargs):  # runs on the model's thread: holding it holds the model
        started.set()
        assert release.wait(30)
        return KNNLM.prepare(gated, *args, **kwargs)

    gated.prepare = prepare
    app = create_app(gated, max_queue=1, max_tokens=8, model_name=MODEL, max_batch=1)
    results = {}

    def post(key):
        results[key] = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 4, "temperature": 0}, timeout=60)

    with running(app) as url:
        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert started.wait(30)
        second = threading.Thread(target=post, args=("second",))
        second.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        third = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert time.monotonic() - t0 < 5
        release.set()
        first.join(60)
        second.join(60)
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert third.json()["error"]["code"] == "queue_full"
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert results["first"].json()["choices"][0]["text"] == results["second"].json()["choices"][0]["text"]


def test_concurrent_completions_are_batched_and_answered_as_alone(lm, datastore, docs_ds):
    """Four requests wait while the model is held; then they run as one batch of four, each
    with its own settings, and each answer is the one the Python API gives alone."""
    knn = KNNLM(lm, {"text": datastore.path, "docs": docs_ds.path})
    app = create_app(knn, max_queue=8, max_tokens=16, model_name=MODEL, max_batch=4)
    worker, sizes, held = app.state.worker, [], []
    step = worker.batch.step

    def counted_step():
        sizes.append(len(worker.batch))
        return step()

    def prepare(*args, **kwargs):
        if not held:  # the first request waits for the other three to queue
            held.append(True)
            deadline = time.monotonic() + 30
            while worker.waiting < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        return KNNLM.prepare(knn, *args, **kwargs)

    worker.batch.step, knn.prepare = counted_step, prepare
    bodies = [{"prompt": "The quick brown", "max_tokens": 10, "temperature": 0, "datastore": "text", "k": 4},
              {"prompt": "Memory", "max_tokens": 6, "temperature": 0, "datastore": "docs", "lambda": 0.7},
              {"prompt": "A fox jumps over the lazy", "max_tokens": 12, "temperature": 0, "datastore": None},
              {"prompt": "The", "max_tokens": 8, "temperature": 0.9, "seed": 5, "datastore": "text", "stream": True}]
    answers = {}

    def post(i):
        body = bodies[i]
        if body.get("stream"):
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            answers[i] = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            answers[i] = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with running(app) as url:
        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert max(sizes) == 4  # all four stepped together
    for i, body in enumerate(bodies):
        alone = KNNLM.generate(knn, body["prompt"], body["max_tokens"], datastore=body["datastore"],
                               k=body.get("k"), lam=body.get("lambda"), temperature=body["temperature"],
                               seed=body.get("seed"))
        assert answers[i] == alone.text, i


def _hammer(url: str, clients: int, seconds: float) -> tuple[int, list[int], list[str]]:
    """`clients` threads send completions (some streamed) back to back for `seconds`,
    pausing briefly after a 503; returns (requests sent, status of each answer, errors)."""
    sent, statuses, errors, lock = [0], [], [], threading.Lock()

    def loop(i: int) -> None:
        end = time.monotonic() + seconds
        j = 0
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < end:
                j += 1
                body = {"prompt": "The quick", "max_tokens": 6, "temperature": 0.8, "seed": i * 1000 + j,
                        "datastore": ["text", "docs", None][j % 3], "k": 4, "stream": j % 2 == 0}
                with lock:
                    sent[0] += 1
                try:
                    if body["stream"]:
                        with c.stream("POST", "/v1/completions", json=body) as r:
                            lines = [line for line in r.iter_lines() if line]
                            if r.status_code == 200 and lines[-1] != "data: [DONE]":
                                raise AssertionError(f"stream ended without [DONE]: {lines[-2:]}")
                    else:
                        r = c.post("/v1/completions", json=body)
                        if r.status_code == 200 and r.json()["usage"]["completion_tokens"] < 1:
                            raise AssertionError(f"empty completion: {r.text}")
                    with lock:
                        statuses.append(r.status_code)
                    if r.status_code == 503:
                        time.sleep(0.02)  # a client backing off (the answer says Retry-After)
                except Exception as e:  # noqa: BLE001 - every failure is reported by the test
                    with lock:
                        errors.append(repr(e))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return sent[0], statuses, errors


def test_load_on_loopback(knn):
    """8 concurrent clients for 3 s against a queue of 3: every request is answered,
    200 or 503 (full queue), every accepted one is computed once, and memory stays flat."""
    app = create_app(knn, max_queue=3, max_tokens=16, model_name=MODEL)
    worker = app.state.worker
    proc = psutil.Process()
    with running(app) as url:
        _hammer(url, clients=8, seconds=1.0)  # warm-up: allocator pools, connections
        gc.collect()
        rss0, served0 = proc.memory_info().rss, worker.served
        sent, statuses, errors = _hammer(url, clients=8, seconds=3.0)
        ok = statuses.count(200)
        deadline = time.monotonic() + 10
        while worker.served - served0 < ok and time.monotonic() < deadline:
            time.sleep(0.01)
        gc.collect()
        rss1 = proc.memory_info().rss
        health = httpx.get(url + "/health").json()
    print(f"load: {sent} requests, {ok} answered 200, {statuses.count(503)} refused 503, "
          f"RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB")  # shown with pytest -s
    assert errors == []
    assert len(statuses) == sent  # no request lost
    assert set(statuses) <= {200, 503} and ok >= 10
    assert worker.served - served0 == ok  # accepted requests ran once each; refused ones never queued
    assert health["queue"]["waiting"] == 0
    assert rss1 - rss0 < 64 * 2**20, f"memory grew by {(rss1 - rss0) / 2**20:.1f} MiB"


def test_the_serve_command_serves_what_it_was_asked(monkeypatch, datastore, llama_dir):
    """`knnlm serve` with its options: the app it hands to uvicorn has them."""
    from knnlm.cli.main import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["-q", "serve", "--datastore", f"text={datastore.path}", "--model", str(llama_dir), "--dtype",
                 "float32", "--max-batch", "3", "--max-queue", "5", "--port", "8123", "-k", "4"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    with running(seen["app"]) as url:
        health = httpx.get(url + "/health").json()
        r = httpx.post(url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 3, "temperature": 0})
    assert health["batch"] == {"running": 0, "max": 3} and health["queue"]["max"] == 5
    assert health["datastores"] == ["text"] and health["default_datastore"] == "text"
    assert r.status_code == 200 and r.json()["choices"][0]["knnlm"]["k"] == 4


def test_an_app_can_be_served_again(knn):
    app = create_app(knn, max_queue=2, max_tokens=4, model_name=MODEL, max_batch=2)
    for _ in range(2):  # the model's thread stops with the first server and starts with the second
        with running(app) as url:
            r = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
