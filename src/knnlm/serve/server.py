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
value out of range, too many tokens), 401 without a right API key, 404 for an unknown
datastore or model, 413 for a body over the limit (knnlm.serve.auth).  The request and
response shapes (prompt forms, echo, logprobs) live in knnlm.serve.openai.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from knnlm import __version__
from knnlm.errors import KnnlmError
from knnlm.retrieval.adaptive import Adaptive
from knnlm.retrieval.pointers import Pointers
from knnlm.run.batch import BatchGenerator
from knnlm.run.decode import GenerationRequest, SequenceState, StreamEvent, settings_of
from knnlm.run.generate import DEFAULT, KNNLM
from knnlm.run.inspect import knn_rows
from knnlm.serve.auth import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROMPT_CHARS, Guard
from knnlm.serve.edits import add_edit_routes
from knnlm.serve.openai import (
    DOCUMENTS_SHOWN,
    CompletionRequest,
    Echo,
    HTTPError,
    KnnFields,
    ScoreRequest,
    choice_json,
    completion_json,
    error_response,
    num,
    prompts_of,
    sse,
    sse_chunk,
    token_json,
)
from knnlm.serve.page import add_routes

LOG = logging.getLogger(__name__)

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
    def free(self) -> int:
        """Places left in the queue (only the event loop's thread submits: it may count on them)."""
        return self.max_queue - self.jobs.qsize()

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


# ---- the app -------------------------------------------------------------------------
def create_app(knnlm: KNNLM, max_queue: int = 16, max_tokens: int = 512, model_name: str | None = None,
               max_batch: int = 8, api_keys: list[str] | tuple[str, ...] = (),
               max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
               max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> FastAPI:
    """The FastAPI app; the model worker starts and stops with the app's lifespan.

    max_queue: requests waiting for the model beyond which new ones get 503;
    max_tokens: the most tokens one completion may ask for;
    max_batch: completions generated together (1: one at a time);
    api_keys: if any, every /v1/* request needs `Authorization: Bearer <one of them>`;
    max_body_bytes: larger request bodies get 413 unread (None: no limit);
    max_prompt_chars: longer prompts (or texts to score) get 400 before tokenizing.
    """
    if max_prompt_chars < 1:
        raise KnnlmError(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
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
    app.add_middleware(Guard, api_keys=list(api_keys), max_body_bytes=max_body_bytes)
    app.state.worker = worker
    app.state.knnlm = knnlm
    add_routes(app)  # GET /: the inspector page (knnlm.serve.page)
    add_edit_routes(app, api_keys)  # /v1/datastores/{name}: live edits (knnlm.serve.edits)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}",
                                  code="json_invalid")
        parts = []
        for e in errs[:8]:  # a prompt in no valid form fails every form of the union: say it once
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body" and not isinstance(x, int)
                           and not str(x).startswith(("list[", "str")))
            part = f"{loc}: {e.get('msg')}" if loc else str(e.get("msg"))
            if part not in parts:
                parts.append(part)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error_response(400, "invalid request: " + "; ".join(parts), param=loc[0] if loc else None)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException):
        """FastAPI's own errors (an unknown path, a wrong method, a body that is not
        JSON at all) in OpenAI's shape too."""
        message = {404: f"no such route: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code)
        if message is None and exc.status_code == 400:
            message, code = "malformed JSON: cannot parse the body (invalid UTF-8, or nested too deeply)", "json_invalid"
        else:
            code = None
        return error_response(exc.status_code, message or str(exc.detail), code=code, headers=exc.headers)

    def settings(req: KnnFields) -> dict:
        """The request's retrieval settings as KNNLM keyword arguments; unknown names are 404."""
        if req.model is not None and req.model != name:
            raise HTTPError(404, f"model {req.model!r} is not served here (GET /v1/models lists: {name})",
                            "model", "model_not_found")
        ds = req.datastore if "datastore" in req.model_fields_set else DEFAULT
        if ds is not DEFAULT and ds is not None and ds not in knnlm.searchers:
            raise HTTPError(404, f"unknown datastore {ds!r} (loaded: {', '.join(knnlm.searchers) or 'none'})",
                            "datastore", "datastore_not_found")
        mem = req.memory if "memory" in req.model_fields_set else DEFAULT
        if mem is not DEFAULT and mem is not None and mem not in knnlm.memories:
            raise HTTPError(404, f"unknown memory decoder {mem!r} (loaded: {', '.join(knnlm.memories) or 'none'})",
                            "memory", "memory_not_found")
        out = {"datastore": ds, "lam": req.lambda_, "k": req.k, "knn_temperature": req.knn_temperature,
               "memory": mem, "memory_lambda": req.memory_lambda}
        if req.pointer_threshold is not None:
            out["pointers"] = Pointers(req.pointer_threshold) if req.pointer_threshold > 0 else None
        if req.adaptive_threshold is not None:
            out["adaptive"] = Adaptive("max_prob", req.adaptive_threshold) if req.adaptive_threshold > 0 else None
        return out

    def check_prompt(p: str | list[int]) -> None:
        """Limits checked before any tokenizing or model work: a string's length in
        characters; a list of ids' length (the model's context) and range (the vocabulary)."""
        if isinstance(p, str):
            if len(p) > max_prompt_chars:
                raise HTTPError(400, f"prompt is longer than {max_prompt_chars} characters", "prompt")
            if not p.isascii():
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate (JSON's \ud800): no text to tokenize
                    raise HTTPError(400, f"prompt is not valid Unicode: {e.reason} at character {e.start}",
                                    "prompt") from None
            return
        limit = knnlm.lm.max_positions
        if limit and len(p) > limit:
            raise HTTPError(400, f"too many tokens: the prompt has {len(p)}, but {name} reads at most {limit}",
                            "prompt", "too_many_tokens")
        try:
            knnlm.prompt_ids(p)
        except KnnlmError as e:
            raise HTTPError(400, str(e), "prompt", "invalid_token_id") from None

    async def submit(work: Callable[[], Iterator[Any]] | None = None,
                     generation: Callable[[], tuple[dict, GenerationRequest]] | None = None) -> Job:
        try:
            return worker.submit(work, generation)
        except QueueFull:
            raise busy() from None

    def busy() -> HTTPError:
        return HTTPError(503, f"the server is busy ({worker.max_queue} requests waiting); retry later",
                         code="queue_full", headers={"Retry-After": "1"})

    async def first_item(job: Job):
        """The job's next result; a KnnlmError becomes a 400."""
        try:
            item = await job.out.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if item is _End:
            raise HTTPError(500, "the request ended without a result")
        if isinstance(item, KnnlmError):
            job.cancelled.set()
            message = str(item).replace(knnlm.lm.name, name)  # the model as served, never its local path
            raise HTTPError(400, message, code="too_many_tokens" if message.startswith("too many tokens") else None)
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
        prompts = prompts_of(req.prompt)
        if len(prompts) > worker.max_queue:
            raise HTTPError(400, f"too many prompts: {len(prompts)}, this server takes at most {worker.max_queue} "
                            "a request", "prompt")
        for p in prompts:
            check_prompt(p)
        if req.max_tokens > max_tokens:
            raise HTTPError(400, f"too many tokens: max_tokens is {req.max_tokens}, this server allows {max_tokens}",
                            "max_tokens", "too_many_tokens")
        if req.stream and (req.echo or len(prompts) > 1 or req.max_tokens == 0):
            what = "echo" if req.echo else "several prompts" if len(prompts) > 1 else "max_tokens 0"
            raise HTTPError(400, f"stream is not supported with {what}: send \"stream\": false",
                            "echo" if req.echo else "stream")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > 4 or not all(stop):
            raise HTTPError(400, "stop must be at most 4 non-empty strings", "stop")
        retrieval = settings(req)
        options = dict(retrieval, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, stop=stop,
                       seed=req.seed, neighbors=req.return_neighbors, top_logprobs=req.logprobs or 0,
                       report_eos=req.echo)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name}
        scores = req.echo and (req.logprobs is not None or req.return_neighbors > 0)

        def prompt_info(p: str | list[int]) -> tuple[int, Echo | None, dict, list[StreamEvent] | None]:
            """On the model's thread: the prompt's length, its echo (scored when asked), the
            settings, and for echo with max_tokens 1 the generated token, picked from the
            same forward pass (lm-evaluation-harness's request: one pass instead of two)."""
            ids = knnlm.prompt_ids(p)
            knnlm.check_length(len(ids), req.max_tokens)
            r = knnlm.retrieval(**{key: v for key, v in retrieval.items() if not key.startswith("memory")})
            c = knnlm.cache_use(r)
            shown = {**settings_of(r), **(c.settings() if c is not None else {})}
            if not req.echo:
                return len(ids), None, shown, None
            plain = r is None or (r.pointers is None and r.adaptive is None)  # else: the generation's own steps
            tokens, events, one = [], None, req.max_tokens == 1 and len(ids) > 1 and plain
            if (scores or one) and len(ids) > 1:
                s = knnlm.score(ids, **retrieval, neighbors=req.return_neighbors, top_logprobs=req.logprobs or 0,
                                following=one)  # the mixture /v1/score gives
                tokens = s.tokens if scores else []
                if one:
                    events, _ = SequenceState(knnlm, knnlm.prepare(ids, 1, **options)).advance(*s.following)
            prefix = isinstance(p, str) and ids[0] == knnlm.lm.prefix_token_id
            return len(ids), Echo(p if isinstance(p, str) else knnlm.lm.decode(ids), knnlm.lm.decode(ids[:1]),
                                  tokens, prefix), shown, events

        def generation(p):
            def prepare():
                prepared = knnlm.prepare(p, req.max_tokens, **options)  # checks everything first
                return {"prompt_tokens": len(prepared.ids), "settings": prepared.settings}, prepared
            return prepare

        info_job = req.echo or req.max_tokens == 0
        if worker.free < info_job + (req.max_tokens > 0) * len(prompts):
            raise busy()
        jobs: list[Job] = []
        try:
            infos = [None] * len(prompts)
            if info_job:
                jobs.append(await submit(lambda: (prompt_info(p) for p in prompts)))
                infos = [await first_item(jobs[0]) for _ in prompts]
            todo = [i for i, info in enumerate(infos) if req.max_tokens > 0 and (info is None or info[3] is None)]
            gen_jobs = [await submit(generation=generation(prompts[i])) for i in todo]
            jobs += gen_jobs
            starts = [await first_item(job) for job in gen_jobs]  # each request is valid (or a 400 was raised)
            if req.stream:
                return StreamingResponse(_stream(gen_jobs[0], meta, starts[0], req.logprobs,
                                                 req.return_neighbors > 0 or req.logprobs is not None),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            outs = {i: info[3] or [] for i, info in enumerate(infos) if info is not None}
            for i, job, start in zip(todo, gen_jobs, starts):
                events = [await first_item(job)]
                while events[-1].finish_reason is None:
                    events.append(await first_item(job))
                outs[i] = events
                if infos[i] is None:
                    infos[i] = (start["prompt_tokens"], None, start["settings"], None)
        except BaseException:
            for job in jobs:
                job.cancelled.set()
            raise
        choices, n_prompt, n_out = [], 0, 0
        for i in range(len(prompts)):
            n_ids, echo, used, _ = infos[i]
            events = outs[i]
            choices.append(choice_json(i, echo, events, used, req.logprobs, req.return_neighbors > 0,
                                       None if events else "length"))
            n_prompt += n_ids
            n_out += sum(e.token is not None for e in events)
        return completion_json(meta, choices, n_prompt, n_out)

    @app.post("/v1/score", summary="per-token log-probs of a text under the LM, p_kNN and the mixture")
    async def score(req: ScoreRequest):
        if len(req.text) > max_prompt_chars:
            raise HTTPError(400, f"text is longer than {max_prompt_chars} characters", "text")
        kw = dict(settings(req), neighbors=req.return_neighbors)
        def scored():
            s = knnlm.score(req.text, **kw)
            yield s, s.documents(DOCUMENTS_SHOWN) if req.return_neighbors > 0 else None

        s, documents = await first_item(await submit(scored))
        tokens = [token_json(t, req.return_neighbors > 0) for t in s.tokens]
        if req.return_knn:
            for t, row in zip(tokens, knn_rows(s.search, len(tokens), [x.logprob_lm_max for x in s.tokens])):
                t["knn"] = row
        return {"object": "score", "model": name, **s.settings, "ppl": num(s.ppl), "ppl_lm": num(s.ppl_lm),
                "tokens": tokens,
                **({"documents": documents} if documents is not None else {}),
                "usage": {"prompt_tokens": len(s.ids), "total_tokens": len(s.ids)}}

    return app


async def _stream(job: Job, meta: dict, info: dict, logprobs: int | None, detail: bool):
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
                yield sse({"error": {"message": str(item), "type": "server_error"}})
                break
            chunk = sse_chunk(meta, item, offset, logprobs, detail)
            if item.token is not None:
                n += 1
                offset += len(item.token.text)
            if item.finish_reason is not None:
                chunk["usage"] = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": n,
                                  "total_tokens": info["prompt_tokens"] + n}
            yield sse(chunk)
        yield sse("[DONE]")
    finally:
        job.cancelled.set()  # the client went away, or we are done: nothing more to compute


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
