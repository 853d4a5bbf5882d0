"""HTTP server over a KNNLM: OpenAI-compatible completions, per-token scores, health.

    app = create_app(KNNLM.load(datastores={"wiki": "ds-wiki"}))
    uvicorn.run(app, host="127.0.0.1", port=8000)

One worker thread owns the model.  Completions are generated together, up to
`max_batch` at a time (continuous batching: one forward step and one search per datastore
for all of them per token, a waiting request joining between steps); scoring requests run
alone, in turn.  Requests wait in a bounded queue and get 503 (with Retry-After) when it
is full, so an overloaded server answers at once instead of hanging.  A streaming request
whose client goes away is cancelled at the next token.  Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed JSON, a
value out of range, too many tokens), 404 for an unknown datastore or model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from knnlm import __version__
from knnlm.errors import KnnlmError
from knnlm.run.batch import BatchGenerator
from knnlm.run.decode import GenerationRequest, StreamEvent, TokenScore
from knnlm.run.generate import DEFAULT, KNNLM

LOG = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 200_000  # a bound on the tokenizer's work for one request
MAX_NEIGHBORS = 32
MAX_LOGPROBS = 5  # as OpenAI's completions API


# ---- the worker ----------------------------------------------------------------------
class QueueFull(Exception):
    pass


class _End:
    pass


class Job:
    """Work for the model thread, answered through an asyncio queue.  Either `work`, a
    function returning an iterator whose items (then an end marker, or the exception it
    raised) are delivered, or `generation`, a function returning (info, GenerationRequest):
    info is delivered first, then the generation's StreamEvents as the batch steps it."""

    def __init__(self, work: Callable[[], Iterator[Any]] | None, loop: asyncio.AbstractEventLoop,
                 generation: Callable[[], tuple[dict, GenerationRequest]] | None = None):
        self.work, self.generation, self.loop = work, generation, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def run(self) -> None:
        try:
            for item in self.work():
                if self.cancelled.is_set():
                    LOG.info("request cancelled")
                    break
                self._deliver(item)
        except Exception as e:  # noqa: BLE001 - delivered to the request's handler
            self._deliver(e)
        self._deliver(_End)

    def _deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


class Worker:
    """The one thread that runs the model; jobs wait in a queue of at most `max_queue`.
    Generations run in a batch of up to `max_batch` (`knnlm.run.batch`): a waiting one joins
    between two steps of the running ones; other work (scoring) runs alone, in turn."""

    def __init__(self, knnlm: KNNLM, max_queue: int, max_batch: int = 8):
        if max_queue < 1:
            raise KnnlmError(f"max_queue must be >= 1, got {max_queue}")
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.batch = BatchGenerator(knnlm, max_batch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.served = 0

    def start(self) -> None:
        """Start the model's thread (again, after `stop`: an app may be served more than once)."""
        if self._thread is not None and self._thread.is_alive():
            raise KnnlmError("the model worker is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="knnlm-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, work: Callable[[], Iterator[Any]] | None = None,
               generation: Callable[[], tuple[dict, GenerationRequest]] | None = None) -> Job:
        job = Job(work, asyncio.get_running_loop(), generation)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    @property
    def running(self) -> int:
        return len(self.batch)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit()
            if len(self.batch):
                self._step()
        for job in self.batch.tags:  # shutting down: tell whoever still waits
            self._fail(job, KnnlmError("the server is shutting down"))
        self.batch.clear()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            self._fail(job, KnnlmError("the server is shutting down"))

    def _admit(self) -> None:
        """Start waiting jobs while the batch has room (wait a little only when idle)."""
        while self.batch.has_room():
            try:
                job = self.jobs.get_nowait() if len(self.batch) else self.jobs.get(timeout=0.1)
            except queue.Empty:
                return
            if job.cancelled.is_set():
                self.served += 1
            elif job.generation is None:
                job.run()
                self.served += 1
            else:
                try:
                    info, req = job.generation()  # checks the request
                    job._deliver(info)
                    self._send(job, self.batch.add(job, req))
                except Exception as e:  # noqa: BLE001 - delivered to the request's handler
                    self._fail(job, e)

    def _step(self) -> None:
        for job in self.batch.tags:
            if job.cancelled.is_set():
                LOG.info("request cancelled")
                self.batch.drop(job)
                self.served += 1
        try:
            results = self.batch.step()
        except Exception as e:  # noqa: BLE001 - the batch failed: each of its requests hears why
            for job in self.batch.tags:
                self._fail(job, e)
            self.batch.clear()
            return
        for job, events in results.items():
            self._send(job, events)

    def _send(self, job: Job, events: list[StreamEvent]) -> None:
        for ev in events:
            job._deliver(ev)
        if events and events[-1].finish_reason is not None:
            job._deliver(_End)
            self.served += 1

    def _fail(self, job: Job, e: Exception) -> None:
        job._deliver(e)
        job._deliver(_End)
        self.served += 1


# ---- requests ------------------------------------------------------------------------
class KnnFields(BaseModel):
    """The knnlm fields every endpoint takes; omitted ones take the server's defaults."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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
    return_neighbors: int = Field(default=0, ge=0, le=MAX_NEIGHBORS,
                                  description="per token, this many nearest neighbours with their source text")


class CompletionRequest(KnnFields):
    """OpenAI's completions request (n = 1, no echo) plus the knnlm fields."""

    prompt: str | list[str] = Field(description="a string, or a list of one string")
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, description="knnlm extension: sample among the top k tokens")
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the text ends before them")
    seed: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False
    user: str | None = None


class ScoreRequest(KnnFields):
    """A text to score: log p of each of its tokens under the LM, p_kNN and the mixture."""

    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "server_overloaded"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _num(x: float | None) -> float | None:
    """JSON has no infinity: log p = -inf (no neighbour predicts the token) becomes null."""
    return x if x is not None and math.isfinite(x) else None


# ---- the app -------------------------------------------------------------------------
def create_app(knnlm: KNNLM, max_queue: int = 16, max_tokens: int = 512, model_name: str | None = None,
               max_batch: int = 8) -> FastAPI:
    """The FastAPI app; the model worker starts and stops with the app's lifespan.

    max_queue: requests waiting for the model beyond which new ones get 503;
    max_tokens: the most tokens one completion may ask for;
    max_batch: completions generated together (1: one at a time).
    """
    worker = Worker(knnlm, max_queue, max_batch)
    name = model_name or knnlm.lm.name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        LOG.info("serving %s with datastores %s", name, ", ".join(knnlm.searchers) or "none")
        yield
        worker.stop()

    app = FastAPI(title="knnlm", version=__version__, lifespan=lifespan,
                  description="kNN-LM (Khandelwal et al. 2020) behind an OpenAI-compatible completions API.")
    app.state.worker = worker
    app.state.knnlm = knnlm

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}",
                          code="json_invalid")
        parts = []
        for e in errs:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return _error(400, "invalid request: " + "; ".join(parts), param=loc[0] if loc else None)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    def settings(req: KnnFields) -> dict:
        """The request's retrieval settings as KNNLM keyword arguments; unknown names are 404."""
        if req.model is not None and req.model != name:
            raise HTTPError(404, f"model {req.model!r} is not served here (GET /v1/models lists: {name})",
                            "model", "model_not_found")
        ds = req.datastore if "datastore" in req.model_fields_set else DEFAULT
        if ds is not DEFAULT and ds is not None and ds not in knnlm.searchers:
            raise HTTPError(404, f"unknown datastore {ds!r} (loaded: {', '.join(knnlm.searchers) or 'none'})",
                            "datastore", "datastore_not_found")
        return {"datastore": ds, "lam": req.lambda_, "k": req.k}

    async def submit(work: Callable[[], Iterator[Any]] | None = None,
                     generation: Callable[[], tuple[dict, GenerationRequest]] | None = None) -> Job:
        try:
            return worker.submit(work, generation)
        except QueueFull:
            raise HTTPError(503, f"the server is busy ({worker.max_queue} requests waiting); retry later",
                            code="queue_full", headers={"Retry-After": "1"}) from None

    async def first_item(job: Job):
        """The job's first result; a KnnlmError becomes a 400."""
        try:
            item = await job.out.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if item is _End:
            raise HTTPError(500, "the request ended without a result")
        if isinstance(item, KnnlmError):
            job.cancelled.set()
            too_long = str(item).startswith("too many tokens")
            raise HTTPError(400, str(item), code="too_many_tokens" if too_long else None)
        if isinstance(item, Exception):
            job.cancelled.set()
            LOG.error("request failed", exc_info=item)
            raise HTTPError(500, f"internal error: {type(item).__name__}: {item}")
        return item

    @app.get("/health", summary="liveness and load")
    async def health():
        return {"status": "ok", "model": name, "datastores": list(knnlm.searchers), "default_datastore": knnlm.default,
                "queue": {"waiting": worker.waiting, "max": worker.max_queue},
                "batch": {"running": worker.running, "max": worker.batch.max_batch}, "served": worker.served}

    @app.get("/v1/models", summary="the served model and its datastores")
    async def models():
        dss = {n: {"path": str(ds.path), "entries": ds.count, "key_point": ds.key_point}
               for n, ds in knnlm.datastores.items()}
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "knnlm",
                                            "datastores": dss, "default_datastore": knnlm.default}]}

    @app.post("/v1/completions", summary="OpenAI-compatible completion, with the knnlm fields")
    async def completions(req: CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise HTTPError(400, f"prompt must be a string or a list of one string, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if len(prompt) > MAX_PROMPT_CHARS:
            raise HTTPError(400, f"prompt is longer than {MAX_PROMPT_CHARS} characters", "prompt")
        if req.max_tokens > max_tokens:
            raise HTTPError(400, f"too many tokens: max_tokens is {req.max_tokens}, this server allows {max_tokens}",
                            "max_tokens", "too_many_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > 4 or not all(stop):
            raise HTTPError(400, "stop must be at most 4 non-empty strings", "stop")
        options = dict(settings(req), knn_temperature=req.knn_temperature, temperature=req.temperature,
                       top_k=req.top_k, top_p=req.top_p, stop=stop, seed=req.seed,
                       neighbors=req.return_neighbors, top_logprobs=req.logprobs or 0)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name}
        detail = req.return_neighbors > 0 or req.logprobs is not None

        def generation():
            prepared = knnlm.prepare(prompt, req.max_tokens, **options)  # checks everything first
            return {"prompt_tokens": len(prepared.ids), "settings": prepared.settings}, prepared

        job = await submit(generation=generation)
        info = await first_item(job)  # the request is valid (or a 400 was raised)
        if req.stream:
            return StreamingResponse(_sse(job, meta, info, detail, req.logprobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        events = [await first_item(job)]
        while events[-1].finish_reason is None:
            events.append(await first_item(job))
        return _completion(meta, info, events, detail, req.logprobs)

    @app.post("/v1/score", summary="per-token log-probs of a text under the LM, p_kNN and the mixture")
    async def score(req: ScoreRequest):
        kw = dict(settings(req), knn_temperature=req.knn_temperature, neighbors=req.return_neighbors)
        job = await submit(lambda: iter([knnlm.score(req.text, **kw)]))
        s = await first_item(job)
        return {"object": "score", "model": name, **s.settings, "ppl": _num(s.ppl), "ppl_lm": _num(s.ppl_lm),
                "tokens": [_token(t, req.return_neighbors > 0) for t in s.tokens],
                "usage": {"prompt_tokens": len(s.ids), "total_tokens": len(s.ids)}}

    return app


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn from a background thread (port 0: an ephemeral one); yields
    its base URL and stops the server on exit.  For tests, benchmarks and notebooks."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise KnnlmError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _token(t: TokenScore, neighbors: bool) -> dict:
    out = {"token": t.text, "id": t.id, "logprob": _num(t.logprob), "logprob_lm": _num(t.logprob_lm),
           "logprob_knn": _num(t.logprob_knn)}
    if neighbors:
        out["neighbors"] = [{k: _num(v) if isinstance(v, float) else v for k, v in vars(n).items()}
                            for n in t.neighbors]
    return out


def _logprobs(tokens: list[TokenScore], offset: int = 0, top: int | None = None) -> dict:
    """OpenAI's completion `logprobs` object for these tokens."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [_num(t.logprob) for t in tokens],
            "top_logprobs": [{k: _num(v) for k, v in t.top.items()} for t in tokens] if top else None,
            "text_offset": offsets}


def _completion(meta: dict, info: dict, events: list[StreamEvent], detail: bool, logprobs: int | None) -> dict:
    tokens = [e.token for e in events if e.token is not None]
    choice = {"text": "".join(e.text for e in events), "index": 0,
              "logprobs": _logprobs(tokens, 0, logprobs) if logprobs is not None else None,
              "finish_reason": events[-1].finish_reason,
              "knnlm": {**info["settings"], **({"tokens": [_token(t, True) for t in tokens]} if detail else {})}}
    n_prompt = info["prompt_tokens"]
    return {**meta, "object": "text_completion", "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                      "total_tokens": n_prompt + len(tokens)}}


async def _sse(job: Job, meta: dict, info: dict, detail: bool, logprobs: int | None):
    """Server-sent events: one chunk per token (OpenAI's shape), a last one with the
    finish reason and usage, then `data: [DONE]`."""
    n, offset = 0, 0
    try:
        while True:
            item = await job.out.get()
            if item is _End:
                break
            if isinstance(item, Exception):
                LOG.error("streaming request failed", exc_info=item)
                yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
                break
            choice = {"text": item.text, "index": 0, "logprobs": None, "finish_reason": item.finish_reason}
            if item.token is not None:
                n += 1
                if logprobs is not None:
                    choice["logprobs"] = _logprobs([item.token], offset, logprobs)
                offset += len(item.token.text)
                if detail:
                    choice["knnlm"] = {"token": _token(item.token, True)}
            chunk = {**meta, "object": "text_completion", "choices": [choice]}
            if item.finish_reason is not None:
                chunk["usage"] = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": n,
                                  "total_tokens": info["prompt_tokens"] + n}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away, or we are done: nothing more to compute
