"""Who may use the server, and how much they may send: API keys and a body-size limit.

    app.add_middleware(Guard, api_keys=["s3cret"], max_body_bytes=4 << 20)

Every `/v1/*` request must carry `Authorization: Bearer KEY` with one of the keys
(compared in constant time), else 401 in OpenAI's error shape; other paths (`/health`,
the API docs) stay open.  A body larger than `max_body_bytes` gets 413 before anything
parses it, whether or not the client sent a Content-Length.  Both run as ASGI middleware,
before routing, validation, tokenizing or the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Mapping, Sequence

from knnlm.errors import KnnlmError

ENV_VAR = "KNNLM_API_KEY"  # comma-separated keys
PROTECTED = "/v1"
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_PROMPT_CHARS = 200_000  # a bound on the tokenizer's work for one prompt (checked by the server)


def api_keys(given: Sequence[str] | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The keys from --api-key (repeatable) and the KNNLM_API_KEY variable (comma-separated)."""
    keys = list(given or []) + [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    if any(not k or k != k.strip() or " " in k for k in keys):
        raise KnnlmError("an API key must be a non-empty string without spaces")
    return list(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, keys: Sequence[str], insecure: bool) -> str | None:
    """Refuse to listen beyond loopback without a key, unless `insecure`; then a warning."""
    if is_loopback(host) or keys:
        return None
    if not insecure:
        raise KnnlmError(f"--host {host} would let anyone who reaches it use the model: give --api-key KEY "
                         f"(or {ENV_VAR}), or --insecure to serve without one")
    return f"listening on {host} without an API key (--insecure): anyone who can reach it can use the model"


def authorized(header: str | None, keys: Sequence[str]) -> bool:
    """Whether an Authorization header value is `Bearer <one of keys>`, in constant time
    (every key is compared, whatever matched)."""
    scheme, _, token = (header or "").partition(" ")
    given = token.strip().encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode())
    return ok and scheme.lower() == "bearer"


class Guard:
    """ASGI middleware: API keys on /v1/*, then the body-size limit (see the module doc)."""

    def __init__(self, app, api_keys: Sequence[str] = (), max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES):
        if max_body_bytes is not None and max_body_bytes < 1:
            raise KnnlmError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app, self.keys, self.max_body = app, list(api_keys), max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.keys and (path == PROTECTED or path.startswith(PROTECTED + "/")):
            if not authorized(headers.get("authorization"), self.keys):
                msg = ("missing API key: send the header 'Authorization: Bearer KEY'"
                       if "authorization" not in headers else "incorrect API key")
                return await _error_response(401, msg, code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if self.max_body is None:
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        body, more = [], True
        while more:  # read at most max_body bytes before anything else looks at the request
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body.append(msg.get("body", b""))
            more = msg.get("more_body", False)
            if sum(map(len, body)) > self.max_body:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # then what the client does next (a disconnect)

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await _error_response(413, f"the request body is larger than {self.max_body} bytes",
                              code="request_too_large")(scope, receive, send)


def _error_response(*args, **kwargs):
    """knnlm.serve.openai's error_response, imported when a request needs it: the command
    line reads this module's defaults without importing FastAPI."""
    from knnlm.serve.openai import error_response

    return error_response(*args, **kwargs)
