"""The shapes of the HTTP API: OpenAI's completion request and response (plus the knnlm
fields), /v1/score's, and OpenAI's error object.  No model work here: the server
(knnlm.serve.server) fills these from the worker's results.

Prompts come in OpenAI's four forms (a string, a list of strings, a list of token ids, a
list of lists of token ids); `prompts_of` turns any of them into a list of prompts, each
a string or a list of ids.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

if TYPE_CHECKING:
    from knnlm.run.decode import StreamEvent, TokenScore

MAX_NEIGHBORS = 32
DOCUMENTS_SHOWN = 100  # /v1/score with return_neighbors: the documents that carried the most weight
MAX_LOGPROBS = 5  # as OpenAI's completions API


# ---- requests ------------------------------------------------------------------------
class KnnFields(BaseModel):
    """The knnlm fields every endpoint takes; omitted ones take the server's defaults.
    Numbers must be finite (JSON's NaN and Infinity extensions are refused)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    model: str | None = Field(default=None, description="the served model's id (GET /v1/models); may be omitted")
    datastore: str | None = Field(
        default=None,
        description="datastore name (GET /v1/models lists them); omitted: the server's default; "
        "null: the base LM alone",
    )
    lambda_: float | None = Field(default=None, alias="lambda", ge=0.0, le=1.0,
                                  description="weight of p_kNN: p = λ p_kNN + (1-λ) p_LM")
    k: int | None = Field(default=None, ge=1, le=4096, description="neighbours retrieved per token")
    knn_temperature: float | None = Field(default=None, gt=0.0, description="temperature of the kNN softmax")
    pointer_threshold: int | None = Field(
        default=None, ge=0, le=4096,
        description="RetoMaton pointers: search only when fewer than this many of the last step's neighbours lead "
                    "on (0: off; omitted: the server's default)")
    adaptive_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="adaptive retrieval: skip the search where the LM's max probability is at least this "
                    "(0: off; omitted: the server's default)")
    return_neighbors: int = Field(default=0, ge=0, le=MAX_NEIGHBORS,
                                  description="per token, this many nearest neighbours with their source text")
    memory: str | None = Field(default=None, description="memory decoder name (knnlm serve --memory); omitted: "
                               "the server's default; null: none")
    memory_lambda: float | None = Field(default=None, ge=0.0, le=1.0,
                                        description="weight of p_mem, mixed on top: p = λm p_mem + (1-λm) p")


Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]  # a token id is an integer, not true or 2.0


class CompletionRequest(KnnFields):
    """OpenAI's completions request (n = 1) plus the knnlm fields."""

    prompt: Prompt = Field(description="a string, a list of strings, a list of token ids or a list of lists of ids")
    max_tokens: int = Field(default=16, ge=0, description="0 with echo: score the prompt, generate nothing")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, description="knnlm extension: sample among the top k tokens")
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the text ends before them")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="a 64-bit integer")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="log p of each token (prompt's too with echo) and its top N rivals")
    echo: bool = Field(default=False, description="the prompt (and its tokens' log-probs) before the completion")
    user: str | None = None


class ScoreRequest(KnnFields):
    """A text to score: log p of each of its tokens under the LM, p_kNN and the mixture."""

    text: str = Field(min_length=1)
    return_knn: bool = Field(default=False, description="per token, all k neighbours' distances and which of them "
                             "predict the token (`knn`): enough to recompute p_kNN and the mixture at any λ, T "
                             "or smaller k")


# ---- errors --------------------------------------------------------------------------
class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


KINDS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": KINDS.get(status, "server_error"), "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def prompts_of(prompt: Prompt) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts, each a string or a list of token ids.

    "a" -> ["a"];  ["a", "b"] -> ["a", "b"];  [1, 2] -> [[1, 2]];  [[1, 2], [3]] -> [[1, 2], [3]]
    """
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise HTTPError(400, "prompt is an empty list", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if any(isinstance(p, list) and not p for p in prompt):
        raise HTTPError(400, "prompt has an empty list of token ids", "prompt")
    return list(prompt)


# ---- responses -----------------------------------------------------------------------
def num(x: float | None) -> float | None:
    """JSON has no infinity: log p = -inf (no neighbour predicts the token) becomes null."""
    return x if x is not None and math.isfinite(x) else None


def token_json(t: TokenScore, neighbors: bool) -> dict:
    out = {"token": t.text, "id": t.id, "logprob": num(t.logprob), "logprob_lm": num(t.logprob_lm),
           "logprob_knn": num(t.logprob_knn)}
    if neighbors:
        out["neighbors"] = [{k: num(v) if isinstance(v, float) else v for k, v in vars(n).items()}
                            for n in t.neighbors]
    return out


class Echo:
    """A prompt as echoed: its text, its tokens (the first has no log-prob: nothing before
    it) and their scores; `prefix` is True when the first token is the BOS the server put
    before a string prompt (it is not part of the text: it takes no room in text_offset)."""

    def __init__(self, text: str, first: str, tokens: list[TokenScore], prefix: bool):
        self.text, self.first, self.tokens, self.prefix = text, first, tokens, prefix


def logprobs_json(echo: Echo | None, tokens: list[TokenScore], top: int | None) -> dict:
    """OpenAI's completion `logprobs` object: the echoed prompt's tokens (if any), then the
    generated ones; text_offset is each token's start in the choice's text."""
    texts, lps, tops, offsets, pos = [], [], [], [], 0
    if echo is not None:
        texts, lps, tops, offsets = [echo.first], [None], [None], [0]
        pos = 0 if echo.prefix else len(echo.first)
        for t in echo.tokens:
            texts.append(t.text), lps.append(num(t.logprob)), tops.append(t.top), offsets.append(pos)
            pos += len(t.text)
        pos = len(echo.text)
    for t in tokens:
        texts.append(t.text), lps.append(num(t.logprob)), tops.append(t.top), offsets.append(pos)
        pos += len(t.text)
    return {"tokens": texts, "token_logprobs": lps,
            "top_logprobs": [None if d is None else {k: num(v) for k, v in d.items()} for d in tops] if top else None,
            "text_offset": offsets}


def choice_json(index: int, echo: Echo | None, events: list[StreamEvent], settings: dict, logprobs: int | None,
                neighbors: bool, finish_reason: str | None = None) -> dict:
    """One choice of a text_completion: the echoed prompt (if asked), then the completion."""
    tokens = [e.token for e in events if e.token is not None]
    detail = neighbors or logprobs is not None
    extra = {"tokens": [token_json(t, True) for t in tokens]} if detail else {}
    if echo is not None and detail:
        extra["prompt_tokens"] = [token_json(t, True) for t in echo.tokens]
    return {"text": (echo.text if echo is not None else "") + "".join(e.text for e in events), "index": index,
            "logprobs": logprobs_json(echo, tokens, logprobs) if logprobs is not None else None,
            "finish_reason": finish_reason or events[-1].finish_reason, "knnlm": {**settings, **extra}}


def completion_json(meta: dict, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {**meta, "object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def sse_chunk(meta: dict, event: StreamEvent, offset: int, logprobs: int | None, detail: bool) -> dict:
    """One server-sent chunk (OpenAI's shape) for one generated token or the finish."""
    choice = {"text": event.text, "index": 0, "logprobs": None, "finish_reason": event.finish_reason}
    if event.token is not None:
        if logprobs is not None:
            lp = logprobs_json(None, [event.token], logprobs)
            lp["text_offset"] = [offset]
            choice["logprobs"] = lp
        if detail:
            choice["knnlm"] = {"token": token_json(event.token, True)}
    return {**meta, "object": "text_completion", "choices": [choice]}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
