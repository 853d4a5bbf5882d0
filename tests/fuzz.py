"""Hostile requests for knnlm's HTTP server: generated from its own OpenAPI schema
(schemathesis, on hypothesis) and hand-made (what a generator rarely reaches: NaN and
Infinity, lone surrogates, deeply nested JSON, bodies that are not UTF-8, oversized bodies
with and without a Content-Length, datastore and memory names that are paths, streams the
client drops after one chunk).

    c = Campaign(url, headers={"Authorization": "Bearer KEY"}, forbidden=[str(unserved_datastore)])
    c.generated(app.openapi(), examples=50, seed=0)
    c.hostile(vocab)
    c.disconnects(3)
    c.healthy()
    assert not c.problems, c.problems

Every answer must be a 2xx or a 4xx; a 4xx in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}); no traceback in any body; a stream with
no error event; and a forbidden string (a path the server was not configured with) in no
answer.  Used by tests/test_fuzz.py (a few hundred requests) and
benchmarks/bench_fuzz.py (the full campaign).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx

COMPLETIONS, SCORE = "/v1/completions", "/v1/score"
FLOATS = ["lambda", "knn_temperature", "adaptive_threshold", "memory_lambda", "temperature", "top_p"]
INTS = ["k", "pointer_threshold", "return_neighbors", "max_tokens", "top_k", "seed", "logprobs"]
BIG = 10**30


def hostile_requests(forbidden: list[str], vocab: int) -> list[tuple[str, str, bytes]]:
    """(method, path, body) of hand-made bad (and edge-valid) requests."""
    out: list[tuple[str, str, bytes]] = []

    def body(path, **fields):
        out.append(("POST", path, json.dumps(fields).encode()))

    def raw(path, text: str | bytes, method="POST"):
        out.append((method, path, text if isinstance(text, bytes) else text.encode()))

    for f in FLOATS:  # JSON's NaN/Infinity extensions, the smallest and largest doubles, negatives
        for v in ("NaN", "Infinity", "-Infinity", "5e-324", "1e308", "-1", "1e400"):
            raw(COMPLETIONS, f'{{"prompt": "The quick", "max_tokens": 2, "{f}": {v}}}')
            if f not in ("temperature", "top_p"):
                raw(SCORE, f'{{"text": "The quick brown", "{f}": {v}}}')
    for f in INTS:
        for v in (-1, 0, BIG, -BIG, 2**63, 2**64, 1.5, True, "7", None, [], {}):
            body(COMPLETIONS, **{"prompt": "The", "max_tokens": 2, f: v})
    for ids in ([-1], [vocab], [BIG], [True, False], [1.0, 2.0], [[1], []], [[1], [-1]], [[BIG]], [],
                [[]], [0] * 100_000, [[0]] * 100, ["a", 1], [None], [[[1]]]):
        body(COMPLETIONS, prompt=ids, max_tokens=1)
    for text in ("\ud800", "a\udfffb", "\x00" * 64, "\u202e\u2066rtl", "\U0001f600" * 500, "e\u0301" * 200,
                 "\ufeff", "a" * 300_000, "", " ", "\n" * 1000):
        body(COMPLETIONS, prompt=text, max_tokens=2)
        body(COMPLETIONS, prompt=[text, "ok"], max_tokens=1)
        body(COMPLETIONS, prompt="x", stop=text, max_tokens=2)
        body(SCORE, text=text)
    for name in forbidden + ["../", "/etc/passwd", "~", ".", "", "text/../text", "\x00", "%2e%2e"]:
        body(COMPLETIONS, prompt="The", max_tokens=1, datastore=name)
        body(COMPLETIONS, prompt="The", max_tokens=1, memory=name)
        body(COMPLETIONS, prompt="The", max_tokens=1, model=name)
        body(SCORE, text="The quick", datastore=name)
    deep = 100_000
    for b in (b"[" * deep + b"]" * deep, b'{"prompt":' + b"[" * deep + b"]" * deep + b"}",
              b'{"a":' * deep + b"1" + b"}" * deep, b"\xff\xfe\x00\x01", b"", b"null", b"[]", b"1e999",
              b'"prompt"', b'{"prompt": "a"', b'{"prompt": "a", "prompt": [1]}', b'{"prompt": "a", "extra": 1}',
              b'{"prompt": "a", "n": 2}', b'{"prompt": "a", "stream": "yes"}', b'{"prompt": "a", "echo": 1}',
              b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', b'{"prompt": "a", "stop": [""]}',
              b'{"prompt": "a", "stream": true, "echo": true}', b'{"prompt": ["a", "b"], "stream": true}',
              b'{"prompt": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}',
              b'{"prompt": "a", "max_tokens": 0, "echo": true, "logprobs": 5, "return_neighbors": 32}',
              b'{"prompt": "a", "k": 4096, "max_tokens": 1}', b'{"text": "a", "k": 4096, "return_neighbors": 32}'):
        raw(COMPLETIONS, b)
        raw(SCORE, b)
    for method, path in (("GET", COMPLETIONS), ("PUT", SCORE), ("DELETE", "/health"), ("GET", "/v1/nope"),
                         ("POST", "/v1/models"), ("GET", "/../../etc/passwd"), ("GET", "/v1/%00"),
                         ("PATCH", "/v1/models"), ("GET", "/v1/completions/../models")):
        raw(path, b"", method)
    return out


class Campaign:
    """Sends requests to a running server and records what each answer broke."""

    def __init__(self, url: str, headers: dict | None = None, forbidden: list[str] = (), timeout: float = 120):
        self.url, self.headers, self.forbidden = url, dict(headers or {}), list(forbidden)
        self.http = httpx.Client(base_url=url, timeout=timeout)
        self.statuses: Counter = Counter()
        self.problems: list[str] = []
        self.sent = 0

    def close(self) -> None:
        self.http.close()

    # ---- judging -------------------------------------------------------------------------
    def judge(self, what: str, r: httpx.Response, sent: bytes = b"") -> None:
        self.sent += 1
        self.statuses[r.status_code] += 1
        text = r.text
        problem = None
        if r.status_code >= 500 or r.status_code < 200 or 300 <= r.status_code < 400:
            problem = f"status {r.status_code}"
        elif "Traceback (most recent call last)" in text:
            problem = "a traceback in the body"
        elif any(f in text and f.encode() not in sent for f in self.forbidden):  # (an echo of the request's own)
            problem = "a forbidden path in the body"
        elif r.status_code >= 400:
            try:
                err = r.json()["error"]
                if set(err) != {"message", "type", "param", "code"} or not isinstance(err["message"], str):
                    problem = f"error not in OpenAI's shape: {text[:200]}"
            except (ValueError, KeyError, TypeError):
                problem = f"error not in OpenAI's shape: {text[:200]}"
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            if '"server_error"' in text or not text.rstrip().endswith("data: [DONE]"):
                problem = f"a broken stream: {text[-200:]}"
        else:
            try:
                r.json()
            except ValueError:
                problem = f"a 2xx that is not JSON: {text[:200]}"
        if problem:
            self.problems.append(f"{what}: {problem} ({text[:300]!r})")

    def send(self, method: str, path: str, content: bytes | None = None, headers: dict | None = None,
             what: str | None = None) -> None:
        h = {"content-type": "application/json", **self.headers, **(headers or {})}
        try:
            r = self.http.request(method, path, content=content, headers=h)
        except httpx.HTTPError as e:  # the server dropped the connection: as bad as a 500
            self.sent += 1
            self.statuses["no answer"] += 1
            self.problems.append(f"{what or method + ' ' + path}: no answer ({type(e).__name__}: {e})")
            self.http.close()
            self.http = httpx.Client(base_url=self.url, timeout=self.http.timeout)
            return
        self.judge(what or f"{method} {path} {(content or b'')[:200]!r}", r, content or b"")

    # ---- the kinds of request ------------------------------------------------------------
    def generated(self, schema: dict, examples: int, seed: int = 0) -> None:
        """`examples` cases per route and mode (valid per the schema, and not), from the schema."""
        import schemathesis
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as with_seed
        from hypothesis.errors import Unsatisfiable
        from schemathesis import GenerationMode

        ops = [r.ok() for r in schemathesis.openapi.from_dict(schema).get_all_operations()]
        for op in ops:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @with_seed(seed)
                @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(op.as_strategy(generation_mode=mode))
                def run(case):
                    kw = case.as_transport_kwargs(base_url=self.url)
                    if "json" in kw:
                        content = json.dumps(kw["json"]).encode()
                    else:
                        content = kw.get("data")
                        content = content.encode() if isinstance(content, str) else content
                    path = httpx.URL(kw["url"]).raw_path.decode("ascii")
                    headers = {k: v for k, v in (kw.get("headers") or {}).items()
                               if k.lower() not in ("authorization", "content-length")}
                    self.send(kw["method"], path, content, headers,
                              what=f"{mode.value} {kw['method']} {path} {(content or b'')[:300]!r}")

                try:
                    run()
                except Unsatisfiable:  # a route without parameters has no invalid request
                    pass

    def hostile(self, vocab: int) -> None:
        for method, path, content in hostile_requests(self.forbidden, vocab):
            self.send(method, path, content)
        for name in self.forbidden:  # a path is no datastore's or memory's name: 404, not its contents
            for field in ("datastore", "memory"):
                for path, body in ((COMPLETIONS, {"prompt": "a", "max_tokens": 1}), (SCORE, {"text": "a b"})):
                    r = self.http.post(path, json={**body, field: name}, headers=self.headers)
                    self.judge(f"{field} {name} on {path}", r, name.encode())
                    if r.status_code != 404:
                        self.problems.append(f"{field} {name} on {path}: {r.status_code}, not 404")

    def oversized(self, limit: int) -> None:
        """Bodies past the limit, announced by a Content-Length and not (chunked)."""
        big = b'{"prompt": "' + b"a" * (limit + 10) + b'"}'
        self.send("POST", COMPLETIONS, big, what="an oversized body")

        def chunks():
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        h = {"content-type": "application/json", **self.headers}
        r = self.http.post(COMPLETIONS, content=chunks(), headers=h)
        self.judge("an oversized chunked body", r)

    def disconnects(self, n: int, tokens: int = 8) -> None:
        """Streams dropped after their first chunk: the server must cancel them."""
        for i in range(n):
            body = {"prompt": "The quick brown", "max_tokens": tokens, "stream": True, "temperature": 1.0, "seed": i}
            with httpx.Client(base_url=self.url, timeout=60) as c:
                with c.stream("POST", COMPLETIONS, json=body, headers=self.headers) as r:
                    self.sent += 1
                    self.statuses[r.status_code] += 1
                    if r.status_code != 200:
                        self.problems.append(f"stream {i}: status {r.status_code}")
                        continue
                    next(r.iter_lines())  # one event, then the client goes away

    def keys(self, good: str) -> None:
        """A server with API keys: no key, a wrong one, a malformed header all get 401."""
        for h in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {good}"},
                  {"authorization": "Bearer " + "x" * 10_000}, {"authorization": "Bearer \u00e9".encode("latin-1")},
                  {"authorization": f"Bearer {good} extra"}, {"authorization": ""}):
            for path in (COMPLETIONS, SCORE, "/v1/models"):
                r = httpx.request("POST" if path != "/v1/models" else "GET", self.url + path,
                                  json={"prompt": "a", "text": "a"}, headers=h, timeout=30)
                self.judge(f"key {h!r} on {path}", r)
                if r.status_code != 401:
                    self.problems.append(f"key {str(h)[:60]} on {path}: {r.status_code}, not 401")

    def healthy(self, wait: float = 30.0) -> dict:
        """/health answers, and the queue and batch drain (cancelled streams included)."""
        deadline = time.monotonic() + wait
        while True:
            h = httpx.get(self.url + "/health", timeout=30).json()
            idle = h["queue"]["waiting"] == 0 and h["batch"]["running"] == 0
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not idle:
            self.problems.append(f"the server did not drain: {h}")
        r = self.http.post(COMPLETIONS, json={"prompt": "The quick", "max_tokens": 2, "temperature": 0},
                           headers=self.headers)
        if r.status_code != 200:
            self.problems.append(f"after the campaign a plain completion got {r.status_code}: {r.text[:200]}")
        return h
