"""`gptkit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web chat page.

    GET  /health                 liveness and the model's name
    GET  /v1/models              the one model served
    POST /v1/completions         text completion (stream, n, stop, seed, usage ...)
    POST /v1/chat/completions    chat through the run's chat template
    GET  /                       a small chat page that streams from /v1/chat/completions

Generation runs on one engine thread, never on the event loop. Requests waiting together are
decoded together in one batch when their sampling settings match (prompts of different lengths
are left-padded, see GPT.forward); others wait their turn in a bounded queue, and a request
that would overflow it gets 429. Each request keeps its own seed. A streaming client that
disconnects stops its rows at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.errors import GptkitError
from gptkit.generate import Detokenizer, SamplingParams, generate_ids, seeded_generator
from gptkit.model import GPT
from gptkit.runtime import resolve_device
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

# --- the engine: batched decoding on one thread ---


@dataclass(eq=False)  # identity, not field-by-field comparison: two choices may be alike
class Job:
    """One sample (one choice) of one request."""

    index: int  # the choice's index in its request
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    stops: list[str]
    emit: Callable[[Job, str, bool], None]  # (job, text delta, finished); called on the engine thread
    skip_ids: frozenset[int] = frozenset()  # tokens not written as text (special tokens)
    cancelled: bool = False
    detok: Detokenizer | None = None
    error: str = ""  # set when generation failed for this sample; it finishes with no text of the failure
    solo: bool = False  # retried alone after its batch failed, so that a failure stays with its own row
    emitted: bool = False

    def key(self) -> tuple:
        return ("solo", id(self)) if self.solo else self.params.batch_key()

    def send(self, delta: str, done: bool) -> None:
        self.emitted = self.emitted or bool(delta)
        self.emit(self, delta, done)


class QueueFull(Exception):
    pass


class Engine:
    def __init__(self, model: GPT, tok: Tokenizer, max_batch: int = 16, queue_limit: int = 64) -> None:
        self.model, self.tok = model, tok
        self.max_batch, self.queue_limit = max_batch, queue_limit
        self.queue: deque[Job] = deque()
        self.active = 0  # jobs queued or running
        self.cv = threading.Condition()
        self.batches = 0  # decoded batches, their total rows and tokens (for /health and the load test)
        self.rows = 0
        self.tokens = 0
        self.failures = 0  # samples that ended with an error
        self.thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self.cv:
            if self.active + len(jobs) > self.queue_limit:
                raise QueueFull
            self.active += len(jobs)
            self.queue.extend(jobs)
            self.cv.notify()

    def _take_batch(self) -> list[Job]:
        with self.cv:
            while not self.queue:
                self.cv.wait()
            first = self.queue.popleft()
            batch = [first]
            for job in list(self.queue):
                if len(batch) >= self.max_batch:
                    break
                if job.key() == first.key():
                    self.queue.remove(job)
                    batch.append(job)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            retry: list[Job] = []
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 -- never let one bad row end the server, or its batch
                unfinished = [j for j in batch if j.detok is None or not j.detok.done]
                for job in unfinished:
                    if len(batch) > 1 and not job.emitted:
                        job.solo, job.detok = True, None  # run it again alone: only the culprit fails
                        retry.append(job)
                    else:
                        job.error = f"generation failed: {type(e).__name__}: {e}"
                        self.failures += 1
                        job.send("", True)
            finally:
                with self.cv:
                    self.active -= len(batch) - len(retry)
                    self.queue.extendleft(reversed(retry))

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.rows += len(jobs)
        for job in jobs:
            job.detok = Detokenizer(self.tok, job.params, job.stop_ids, job.stops, job.skip_ids)
        live = [j for j in jobs if not j.cancelled and j.params.max_new_tokens > 0]
        for job in jobs:
            if job not in live:
                job.detok.finish_reason = "length"
                job.send("", True)
        if not live:
            return
        width = max(len(j.prompt) for j in live)
        pad = torch.tensor([width - len(j.prompt) for j in live])
        ids = torch.tensor([[self.tok.eot_id] * (width - len(j.prompt)) + j.prompt for j in live])
        gens = [seeded_generator(j.params.seed) for j in live]
        params = replace(live[0].params, max_new_tokens=max(j.params.max_new_tokens for j in live))
        pending = set(range(len(live)))
        for nxt in generate_ids(self.model, ids, params, gens if any(gens) else None, pad if pad.any() else None):
            for i in list(pending):
                job = live[i]
                if job.cancelled:
                    pending.discard(i)
                    continue
                delta = job.detok.feed(int(nxt[i]))
                self.tokens += 1
                if delta or job.detok.done:
                    job.send(delta, job.detok.done)
                if job.detok.done:
                    pending.discard(i)
            if not pending:
                break


# --- requests and responses ---

Role = Literal["system", "developer", "user", "assistant"]


def _integral(v: Any) -> Any:
    """OpenAI accepts 1.0 where it documents an integer: so do we (1.5 stays an error)."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


Int = Annotated[int, BeforeValidator(_integral)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Base(BaseModel):
    # strict: "5" is not a number. Fields OpenAI defines that this server does not implement are
    # declared, so that a value other than their neutral one is refused by name (unsupported()).
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None
    top_k: Int = Field(default=0, ge=0)  # extensions beyond OpenAI's parameters
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100.0)
    truncate: bool = False  # keep the last tokens of a prompt longer than the context instead of a 400
    skip_special_tokens: bool = True  # special tokens (the chat template's) are not written into the text
    # Declared to be refused when used (see UNSUPPORTED); the neutral values pass.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None


class CompletionRequest(_Base):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Role
    content: str | list[TextPart]


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=0)


# Each declared-but-unimplemented field, with the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class ApiError(HTTPException):
    """An error with OpenAI's shape. An HTTPException, so that FastAPI passes it through unchanged
    even when it is raised while the body is being read (the size limit)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_cap: int = 1024  # largest max_tokens a request may ask for
    max_request_bytes: int = 1 << 20
    max_batch: int = 16
    queue_limit: int = 64  # samples queued or running; beyond it, 429
    default_max_tokens: int = 256  # chat requests that name no max_tokens
    max_request_work: int = 4096  # samples x max_tokens one request may ask for (its fair share)
    allowed_hosts: list[str] | None = None  # Host header names accepted; None: loopback names only
    timeout_keep_alive: int = 5  # seconds an idle connection stays open
    timeout_headers: float = 10.0  # seconds a new connection has to send its request's headers
    max_connections: int = 256  # beyond it, new connections get 503


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_allowed(host_header: str, allowed: list[str] | None) -> bool:
    """DNS rebinding: a page elsewhere reaches a loopback server under its own host name. Only
    names we serve under are accepted ("*" in the list: any)."""
    if allowed is not None and "*" in allowed:
        return True
    name = host_header.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":")[0]
    return name in (LOOPBACK_NAMES if allowed is None else [*LOOPBACK_NAMES, *(a.lower() for a in allowed)])


class Guard:
    """What every request passes before the app (plain ASGI, so that streaming and disconnects
    reach the app untouched): the Host header (DNS rebinding), the API key on /v1, and the body
    size, counted as the bytes arrive, Content-Length or chunked alike (a chunked body once went
    unchecked). Past the size limit the app is told the client has gone, so it stops reading,
    its answer is dropped, and 413 is sent."""

    def __init__(self, app: Any, sc: ServeConfig) -> None:
        self.app, self.sc = app, sc

    def refusal(self, scope: dict) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        sc = self.sc
        if not host_allowed(headers.get("host", ""), sc.allowed_hosts):
            return _error(400, "the Host header names a host this server does not serve (DNS rebinding?); start it with "
                          "--allowed-hosts NAME to accept that name", "invalid_host")  # fmt: skip
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > sc.max_request_bytes):
            return _error(413, f"the request body is larger than {sc.max_request_bytes} bytes", "request_too_large")
        if scope["path"].startswith("/v1") and sc.api_key is not None:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), sc.api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            return await refused(scope, receive, send)
        limit = self.sc.max_request_bytes
        seen, over, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict) -> None:
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, guarded)
        if over and not started:
            await _error(413, f"the request body is larger than {limit} bytes", "request_too_large")(scope, receive, send)


ERRORS = {
    400: "invalid request (message, param and code say what)",
    401: "missing or wrong API key",
    404: "no such model or path",
    413: "request body too large",
    429: "the server's queue is full; retry shortly",
    500: "generation failed",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {k: {"model": ErrorResponse, "description": v} for k, v in ERRORS.items()}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "a JSON object; with stream: true, server-sent events ending in data: [DONE]",
          # Each event's data is a chunk object, or [DONE] at the end.
          "content": {"application/json": {}, "text/event-stream": {"schema": {}}}},
}  # fmt: skip


CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


def create_app(model: GPT, tok: Tokenizer, sc: ServeConfig) -> FastAPI:
    """The FastAPI application serving `model` (call from Python to embed it elsewhere)."""
    # No /docs: Swagger UI loads its scripts from a CDN, blank offline. /openapi.json describes the API.
    app = FastAPI(title="gptkit", version="1", docs_url=None, redoc_url=None)
    engine = Engine(model, tok, sc.max_batch, sc.queue_limit)
    app.state.engine = engine
    template = ChatTemplate(tok)
    block = model.config.block_size
    created = int(time.time())
    special_ids = frozenset(tok.special_tokens.values()) - {tok.eot_id}

    @app.exception_handler(StarletteHTTPException)  # ours, FastAPI's and the router's 404 / 405
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e, ApiError):
            return _error(e.status, e.message, e.code, e.param)
        if e.status_code == 400:  # FastAPI could not read the body: bad UTF-8, nesting too deep ...
            return _error(400, f"the request body could not be read as JSON ({e.detail})", "invalid_json")
        resp = _error(e.status_code, str(e.detail), {404: "not_found", 405: "method_not_allowed"}.get(e.status_code))
        resp.headers.update(e.headers or {})  # 405's Allow header
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_json")
        return _error(400, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", "invalid_value", loc or None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(e).__name__}")

    app.add_middleware(Guard, sc=sc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": sc.model_name, "active_samples": engine.active, "batches": engine.batches,
                "rows": engine.rows, "tokens": engine.tokens, "failures": engine.failures}  # fmt: skip

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": sc.model_name, "object": "model", "created": created, "owned_by": "gptkit"}]}

    chat_page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return chat_page

    def check_text(text: str, param: str) -> str:
        """JSON can carry lone surrogates (\\ud800), which no tokenizer can encode: say where."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{param}: a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character {e.start} "
                           "is not text; send valid Unicode", "invalid_value", param) from None  # fmt: skip
        return text

    def check_common(r: _Base, default_max: int, n_prompts: int = 1) -> SamplingParams:
        if r.model != sc.model_name:
            msg = f"model {r.model!r} does not exist; this server has {sc.model_name!r}"
            raise ApiError(404, msg, "model_not_found", "model")
        for name, neutral in UNSUPPORTED.items():
            value = getattr(r, name, None)
            if value not in neutral:
                raise ApiError(400, f"{name} is not supported by this server (got {json.dumps(value)[:80]}); leave it out",
                               "unsupported_parameter", name)  # fmt: skip
        max_tokens = r.max_tokens if r.max_tokens is not None else default_max
        if isinstance(r, ChatRequest) and r.max_completion_tokens is not None:
            max_tokens = r.max_completion_tokens
        if max_tokens > sc.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {sc.max_tokens_cap}", "invalid_value",
                           "max_tokens")  # fmt: skip
        samples = r.n * n_prompts
        if samples > sc.queue_limit:  # never fits: 429 would be retried forever
            raise ApiError(400, f"the request asks for {samples} samples; this server's queue holds {sc.queue_limit} "
                           "(--queue-limit)", "invalid_value", "n")  # fmt: skip
        if samples * max_tokens > sc.max_request_work:
            raise ApiError(400, f"the request asks for {samples} samples x {max_tokens} tokens = {samples * max_tokens}; "
                           f"one request may ask for at most {sc.max_request_work} (--max-request-work), so that it "
                           "leaves room for others", "invalid_value", "n")  # fmt: skip
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "invalid_value", "stop")
        stops = [check_text(s, "stop") for s in stops]  # the Detokenizer ignores empty ones, as OpenAI does
        bias: dict[int, float] = {}
        for key, value in (r.logit_bias or {}).items():
            if not key.isdigit():
                raise ApiError(400, f"logit_bias: {key!r} is not a token id", "invalid_value", "logit_bias")
            if int(key) < tok.vocab_size:  # ids past this model's vocabulary bias nothing
                bias[int(key)] = value
        params = SamplingParams(
            max_tokens, r.temperature, r.top_k, r.top_p, r.repetition_penalty, stops, r.seed,
            frequency_penalty=r.frequency_penalty, presence_penalty=r.presence_penalty, logit_bias=bias,
        )  # fmt: skip
        try:
            return params.validate()
        except GptkitError as e:
            raise ApiError(400, str(e), "invalid_value", str(e).split(" ")[0]) from None

    def fit(ids: list[int], r: _Base) -> list[int]:
        if not ids:
            ids = [tok.eot_id]
        if len(ids) > block:
            if not r.truncate:
                msg = (f"the prompt is {len(ids)} tokens, longer than the model's context of {block}; shorten it or send "
                       '"truncate": true to keep its last tokens')  # fmt: skip
                raise ApiError(400, msg, "context_length_exceeded", "prompt")
            ids = ids[-block:]
        return ids

    async def run(
        prompts: list[list[int]], params: SamplingParams, stop_ids: set[int], stops: list[str], n: int, skip: frozenset[int]
    ) -> Any:
        """Submit n samples per prompt; returns (jobs, an async iterator of (index, delta, finished))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(job: Job, delta: str, done: bool) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (job.index, delta, done))

        jobs = [
            Job(
                i * n + k, p, replace(params, seed=None if params.seed is None else params.seed + k), stop_ids, stops, emit, skip
            )  # fmt: skip
            for i, p in enumerate(prompts)
            for k in range(n)
        ]
        try:
            engine.submit(jobs)
        except QueueFull:
            raise ApiError(429, "the server is busy (its queue is full); retry shortly", "rate_limit_exceeded") from None

        async def stream() -> AsyncIterator[tuple[int, str, bool]]:
            left = len(jobs)
            try:
                while left:
                    i, delta, done = await events.get()
                    left -= done
                    yield i, delta, done
            finally:  # the client went away (or we are done): stop any rows still decoding
                for j in jobs:
                    j.cancelled = True

        return jobs, stream()

    async def drain(request: Request, jobs: list[Job], events: AsyncIterator) -> None:
        """Wait for every sample of a non-streaming request, checking that its client is still
        there: one that has gone frees its rows at the next token."""

        async def consume() -> None:
            async for _ in events:
                pass

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    for j in jobs:
                        j.cancelled = True
                    task.cancel()
                    raise ApiError(499, "client closed the request")
        finally:
            if not task.done():
                task.cancel()
        failed = next((j.error for j in jobs if j.error), "")
        if failed:
            raise ApiError(500, failed, "generation_failed")

    def usage(jobs: list[Job], prompts: list[list[int]]) -> dict[str, int]:
        p = sum(len(x) for x in prompts)
        c = sum(j.detok.completion_tokens for j in jobs if j.detok is not None)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream_end(r: _Base, obj: str, rid: str, now: int, jobs: list[Job], prompts: list[list[int]]) -> str:
        """The end of a stream: OpenAI's usage chunk (no choices) when asked for, then [DONE]."""
        end = "data: [DONE]\n\n"
        if r.stream_options is not None and r.stream_options.include_usage:
            usage_chunk = {"id": rid, "object": obj, "created": now, "model": sc.model_name, "choices": [],
                           "usage": usage(jobs, prompts)}  # fmt: skip
            end = sse(usage_chunk) + end
        return end

    def stream_error(job: Job) -> str:
        """A failed sample in a stream: an error event, never text presented as the model's."""
        return sse({"error": {"message": job.error, "type": "server_error", "param": None, "code": "generation_failed"}})

    @app.post("/v1/completions", responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
    async def completions(r: CompletionRequest, request: Request) -> Any:
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            texts: list[str | list[int]] = [list(prompt)]  # type: ignore[arg-type]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, list) for x in prompt):
            texts = [list(x) for x in prompt]  # type: ignore[union-attr]
        else:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)  # type: ignore[list-item]
        if not texts:
            raise ApiError(400, "prompt: give a string, a list of strings or a list of token ids", "invalid_value", "prompt")
        params = check_common(r, 16, len(texts))
        for t in texts:
            if isinstance(t, list) and any(not 0 <= x < tok.vocab_size for x in t):
                raise ApiError(400, f"prompt: token ids must be in [0, {tok.vocab_size})", "invalid_value", "prompt")
        prompts = [fit(_encode(tok, check_text(t, "prompt") if isinstance(t, str) else t), r) for t in texts]
        # The end-of-turn token ends a completion as end-of-text does; special tokens are not text.
        stop_ids = {tok.eot_id, *template.stop_ids}
        jobs, events = await run(
            prompts, params, stop_ids, params.stop, r.n, special_ids if r.skip_special_tokens else frozenset()
        )
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = [tok.decode(p) if r.echo else "" for p in prompts]

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": now, "model": sc.model_name, "choices": [choice]}

        if r.stream:

            async def body() -> AsyncIterator[str]:
                started: set[int] = set()
                async for i, delta, done in events:
                    if done and jobs[i].error:
                        yield stream_error(jobs[i])
                        return
                    prefix = echo[i // r.n] if i not in started else ""
                    started.add(i)
                    if delta or prefix:
                        yield sse(chunk(i, prefix + delta, None))
                    if done:
                        yield sse(chunk(i, "", jobs[i].detok.finish_reason))
                yield stream_end(r, "text_completion", rid, now, jobs, prompts)

            return StreamingResponse(body(), media_type="text/event-stream")
        await drain(request, jobs, events)
        choices = [
            {"index": i, "text": echo[i // r.n] + j.detok.text, "logprobs": None, "finish_reason": j.detok.finish_reason}
            for i, j in enumerate(jobs)
        ]
        return {"id": rid, "object": "text_completion", "created": now, "model": sc.model_name, "choices": choices,
                "usage": usage(jobs, prompts)}  # fmt: skip

    @app.post("/v1/chat/completions", responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
    async def chat(r: ChatRequest, request: Request) -> Any:
        params = check_common(r, min(sc.default_max_tokens, sc.max_tokens_cap))
        msgs = [
            Message("system" if m.role == "developer" else m.role,
                    check_text(m.content if isinstance(m.content, str) else "".join(p.text for p in m.content), "messages"))
            for m in r.messages
        ]  # fmt: skip
        try:  # roles are checked by the request model; a system message may come anywhere, as OpenAI allows
            ids, _ = template.encode(msgs, generation_prompt=True)
        except GptkitError as e:
            raise ApiError(400, f"messages: {e}", "invalid_value", "messages") from None
        prompts = [fit(ids, r)]
        skip = special_ids if r.skip_special_tokens else frozenset()
        jobs, events = await run(
            prompts, params, set(template.stop_ids) | {tok.eot_id}, params.stop + template.stop_strings, r.n, skip
        )
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(i: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": sc.model_name, "choices": [choice]}

        if r.stream:

            async def body() -> AsyncIterator[str]:
                for i in range(len(jobs)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}, None))
                async for i, delta, done in events:
                    if done and jobs[i].error:
                        yield stream_error(jobs[i])
                        return
                    if delta:
                        yield sse(chunk(i, {"content": delta}, None))
                    if done:
                        yield sse(chunk(i, {}, jobs[i].detok.finish_reason))
                yield stream_end(r, "chat.completion.chunk", rid, now, jobs, prompts)

            return StreamingResponse(body(), media_type="text/event-stream")
        await drain(request, jobs, events)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": j.detok.text.strip()}, "logprobs": None,
             "finish_reason": j.detok.finish_reason}
            for i, j in enumerate(jobs)
        ]  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": now, "model": sc.model_name, "choices": choices,
                "usage": usage(jobs, prompts)}  # fmt: skip

    app.openapi = lambda: _openapi(app, sc, tok, template, block)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, sc: ServeConfig, tok: Tokenizer, template: ChatTemplate, block: int) -> dict[str, Any]:
    """The schema as this server behaves, so that a request valid by it is accepted: 400 (not
    FastAPI's 422) for invalid bodies, bearer auth on /v1 when a key is set, errors in OpenAI's
    shape, and this model's own limits (its name, max_tokens cap, prompts that fit its context
    and, for a character-level model, only the characters it knows)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if path.startswith("/v1") and sc.api_key is not None:
                op["security"] = [{"bearer": []}]
    comps = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.get("schemas", {}).pop(name, None)
    if sc.api_key is not None:
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}

    # Text that surely fits: a byte-level BPE token covers at least one byte, a character at most four.
    per_char = 1 if tok.kind == "char" else 4
    text: dict[str, Any] = {"type": "string", "maxLength": block // per_char}
    if tok.kind == "char":
        known = "".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in getattr(tok, "chars", []) if ord(c) < 0x10000)
        text["pattern"] = f"^[{known}]*$"
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": tok.vocab_size - 1}, "minItems": 1,
           "maxItems": block}  # fmt: skip
    most = 4  # prompts per request, messages per conversation (as the schema promises; the API takes more)
    n_max = max(1, min(16, sc.queue_limit // most))
    marker = max(len(v) for k, v in template.marker.items() if k != "end") + len(template.marker["end"])
    chat_text = {**text, "maxLength": max(0, (block - len(template.marker["assistant"]) - most * marker) // most // per_char)}
    schemas = comps["schemas"]
    common = {
        "model": {"type": "string", "enum": [sc.model_name]},
        "max_tokens": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": sc.max_tokens_cap}, {"type": "null"}]},
        "n": {"type": "integer", "minimum": 1, "maximum": n_max, "default": 1,
              "description": f"samples per prompt; n x prompts x max_tokens may be at most {sc.max_request_work}"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}]},
        "logit_bias": {"anyOf": [{"type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                  "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                                 {"type": "null"}]},
    }  # fmt: skip
    neutral = {name: {"enum": [v for v in values if not isinstance(v, (dict, list))]} for name, values in UNSUPPORTED.items()}
    neutral["response_format"] = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"enum": ["text"]}},
                                                               "required": ["type"], "additionalProperties": False}]}  # fmt: skip
    for name in ("tools", "functions"):
        neutral[name] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
    neutral["suffix"] = {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}
    common["max_completion_tokens"] = common["max_tokens"]
    for model_name in ("CompletionRequest", "ChatRequest"):
        props = schemas[model_name]["properties"]
        props.update({k: v for k, v in {**common, **neutral}.items() if k in props})
    schemas["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        text, {"type": "array", "items": text, "minItems": 1, "maxItems": most}, ids,
        {"type": "array", "items": ids, "minItems": 1, "maxItems": most},
    ]}  # fmt: skip
    schemas["ChatRequest"]["properties"]["messages"].update(maxItems=most)
    schemas["ChatMessage"]["properties"]["content"] = {"anyOf": [
        chat_text, {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}, "maxItems": 1},
    ]}  # fmt: skip
    schemas["TextPart"]["properties"]["text"] = chat_text
    app.openapi_schema = schema
    return schema


def _encode(tok: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    try:
        return tok.encode(prompt)
    except GptkitError as e:
        raise ApiError(400, f"prompt: {e}", "invalid_value", "prompt") from None


def _header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that
    opens and then sends nothing, or its headers a byte at a time, is closed after `seconds`
    (uvicorn's own keep-alive timeout only starts after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._tail = b""
            self._deadline: asyncio.TimerHandle | None = self.loop.call_later(seconds, self._too_slow)

        def data_received(self, data: bytes) -> None:
            if self._deadline is not None:
                seen = self._tail + data
                if b"\r\n\r\n" in seen:  # the header block is complete
                    self._deadline.cancel()
                    self._deadline = None
                self._tail = seen[-3:]
            super().data_received(data)

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadline


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, sc: ServeConfig | None = None,
          device: str = "auto", dtype: str = "float32") -> None:  # fmt: skip
    """Load the run and serve it until interrupted; prints the address once it is listening."""
    import socket

    import uvicorn

    from gptkit.checkpoint import load_model

    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    sc = sc or ServeConfig(model_name=Path(run).resolve().name)
    if sc.allowed_hosts is None and not is_loopback(host):
        sc = replace(sc, allowed_hosts=["*"])  # bound to a public address on purpose: any name reaches it
    app = create_app(model, tok, sc)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        msg = f"cannot listen on {host}:{port} ({e.strerror}); choose another --port, or --port 0 for a free one"
        raise GptkitError(msg) from None
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            shown = f"[{host}]" if ":" in host else host
            print(f"gptkit: serving {sc.model_name} at http://{shown}:{bound} (OpenAI API under /v1, chat page at /)", flush=True)

    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=2, http=_header_timeout_protocol(sc.timeout_headers),
        timeout_keep_alive=sc.timeout_keep_alive, limit_concurrency=sc.max_connections,
    )  # fmt: skip
    _Server(config).run(sockets=[sock])
