"""Who may use `knnlm serve`: API keys on every /v1/* route (401 in OpenAI's shape
otherwise, /health open), a body-size limit (413 before anything parses the body), a
prompt-length limit (400 before tokenizing), and no public --host without a key."""

import httpx
import openai
import pytest
import uvicorn

from knnlm.errors import KnnlmError
from knnlm.run.generate import KNNLM
from knnlm.serve.auth import api_keys, authorized, check_exposure
from knnlm.serve.server import create_app, serve_in_thread

MODEL = "tiny"
KEYS = ["k-first", "k-second"]
ROUTES = [("POST", "/v1/completions", {"prompt": "The quick", "max_tokens": 2, "temperature": 0}),
          ("POST", "/v1/score", {"text": "The quick brown fox."}),
          ("GET", "/v1/models", None),
          ("GET", "/v1/no-such-route", None)]


class Counting(KNNLM):
    """A KNNLM that counts the calls that tokenize or run the model."""

    calls = 0

    def prompt_ids(self, prompt):
        Counting.calls += 1
        return super().prompt_ids(prompt)


@pytest.fixture(scope="module")
def knn(lm, datastore):
    return Counting(lm, {"text": datastore.path})


@pytest.fixture(scope="module")
def base(knn):
    app = create_app(knn, max_queue=4, max_tokens=8, model_name=MODEL, api_keys=KEYS, max_body_bytes=2000,
                     max_prompt_chars=300)
    with serve_in_thread(app) as url:
        yield url


def send(base, method, path, body, key=None, header=None):
    headers = {"Authorization": header or f"Bearer {key}"} if key or header else {}
    return httpx.request(method, base + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_v1_route_needs_a_right_key(base, knn, method, path, body):
    before = Counting.calls
    for key, header in [(None, None), ("wrong", None), ("k-first-", None), ("k-firs", None), (None, "k-first"),
                        (None, "Basic k-first"), (None, "Bearer")]:
        r = send(base, method, path, body, key, header)
        assert r.status_code == 401, (key, header)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert Counting.calls == before  # refused before the model saw anything
    for key in KEYS:
        r = send(base, method, path, body, key)
        assert r.status_code == (404 if "no-such" in path else 200), r.text


def test_health_and_docs_stay_open(base):
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert httpx.get(base + "/openapi.json").status_code == 200


def test_the_official_client_with_api_key(base):
    good = openai.OpenAI(base_url=base + "/v1", api_key="k-second", max_retries=0)
    r = good.completions.create(model=MODEL, prompt="The quick", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.completions.create(model=MODEL, prompt="The quick", max_tokens=3)


def test_an_oversized_body_gets_413_without_reaching_the_model(base, knn):
    before, served = Counting.calls, httpx.get(base + "/health").json()["served"]
    big = {"prompt": "fjord " * 400, "max_tokens": 2}
    r = send(base, "POST", "/v1/completions", big, "k-first")
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit counts the bytes as they come
        yield b'{"prompt": "'
        for _ in range(200):  # 3.6 kB
            yield b"fjord fjord fjord "
        yield b'"}'

    r = httpx.post(base + "/v1/completions", content=chunks(), timeout=60,
                   headers={"Authorization": "Bearer k-first", "content-type": "application/json"})
    assert r.status_code == 413
    assert Counting.calls == before and httpx.get(base + "/health").json()["served"] == served
    r = send(base, "POST", "/v1/completions", big)  # no key: 401 comes first, the body unread
    assert r.status_code == 401


def test_a_long_prompt_gets_400_before_tokenizing(base, knn):
    before = Counting.calls
    for path, body in [("/v1/completions", {"prompt": "z" * 301}), ("/v1/completions", {"prompt": ["a", "z" * 301]}),
                       ("/v1/score", {"text": "z" * 301})]:
        r = send(base, "POST", path, body, "k-first")
        assert r.status_code == 400 and "longer than 300 characters" in r.json()["error"]["message"]
    assert Counting.calls == before


def test_keys_come_from_the_option_and_the_environment():
    assert api_keys(["a"], {"KNNLM_API_KEY": "b, c,"}) == ["a", "b", "c"]
    assert api_keys(None, {}) == []
    with pytest.raises(KnnlmError, match="non-empty"):
        api_keys([""], {})
    assert authorized("Bearer b", ["a", "b"]) and authorized("bearer a", ["a", "b"])
    assert not authorized("Bearer ", ["a"]) and not authorized(None, ["a"]) and not authorized("Bearer a", [])


def test_a_public_host_needs_a_key_or_insecure():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert check_exposure(host, [], False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(KnnlmError, match="--api-key"):
            check_exposure(host, [], False)
        assert check_exposure(host, ["k"], False) is None
        assert "without an API key" in check_exposure(host, [], True)


def test_the_serve_command_refuses_a_public_host_before_loading(monkeypatch, llama_dir, capsys):
    from knnlm.cli.main import main

    monkeypatch.delenv("KNNLM_API_KEY", raising=False)
    loaded = []
    monkeypatch.setattr("knnlm.cli.generate.load_lm", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(["serve", "--host", "0.0.0.0", "--model", str(llama_dir)]) == 1
    assert "--api-key" in capsys.readouterr().err and loaded == []


def test_the_serve_command_passes_its_keys(monkeypatch, llama_dir, datastore, caplog):
    from knnlm.cli.main import main

    seen = {}
    monkeypatch.setenv("KNNLM_API_KEY", "env-key")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["-q", "serve", "--host", "0.0.0.0", "--api-key", "cli-key", "-d", f"text={datastore.path}",
                 "--model", str(llama_dir), "--dtype", "float32", "--max-body-bytes", "100"]) == 0
    with serve_in_thread(seen["app"]) as url:
        for key in ("cli-key", "env-key"):
            assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/score", json={"text": "x" * 200}, headers={"Authorization": "Bearer env-key"})
        assert r.status_code == 413
    monkeypatch.delenv("KNNLM_API_KEY")
    assert main(["-q", "serve", "--host", "0.0.0.0", "--insecure", "--model", str(llama_dir), "--dtype",
                 "float32"]) == 0
    assert "without an API key (--insecure)" in caplog.text
