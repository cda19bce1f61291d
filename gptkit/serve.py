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
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gptkit.errors import GptkitError
from gptkit.generate import Detokenizer, SamplingParams, generate_ids, seeded_generator
from gptkit.model import GPT
from gptkit.template import ChatTemplate, Message, check_messages
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
    cancelled: bool = False
    detok: Detokenizer | None = None

    def key(self) -> tuple:
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty)


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
            try:
                self._run(batch)
            except Exception as e:  # never let one bad batch kill the server
                for job in batch:
                    if job.detok is None or not job.detok.done:
                        job.emit(job, f"[generation failed: {e}]", True)
            finally:
                with self.cv:
                    self.active -= len(batch)

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.rows += len(jobs)
        for job in jobs:
            job.detok = Detokenizer(self.tok, job.params, job.stop_ids, job.stops)
        live = [j for j in jobs if not j.cancelled and j.params.max_new_tokens > 0]
        for job in jobs:
            if job not in live:
                job.detok.finish_reason = "length"
                job.emit(job, "", True)
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
                    job.emit(job, delta, job.detok.done)
                if job.detok.done:
                    pending.discard(i)
            if not pending:
                break


# --- requests and responses ---

Role = Literal["system", "developer", "user", "assistant"]


class _Base(BaseModel):
    # strict: "5" is not a number; unknown OpenAI fields (logprobs, user ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    top_k: int = Field(default=0, ge=0)  # extensions beyond OpenAI's parameters
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    truncate: bool = False  # keep the last tokens of a prompt longer than the context instead of a 400


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int]
    echo: bool = False


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
    max_completion_tokens: int | None = Field(default=None, ge=0)


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
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


CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


def create_app(model: GPT, tok: Tokenizer, sc: ServeConfig) -> FastAPI:
    """The FastAPI application serving `model` (call from Python to embed it elsewhere)."""
    app = FastAPI(title="gptkit", version="1", docs_url="/docs")
    engine = Engine(model, tok, sc.max_batch, sc.queue_limit)
    app.state.engine = engine
    template = ChatTemplate(tok)
    block = model.config.block_size
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_json")
        return _error(400, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", "invalid_value", loc or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(e).__name__}")

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable) -> Any:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > sc.max_request_bytes):
            return _error(413, f"the request body is larger than {sc.max_request_bytes} bytes", "request_too_large")
        if request.url.path.startswith("/v1") and sc.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), sc.api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": sc.model_name, "active_samples": engine.active, "batches": engine.batches,
                "rows": engine.rows, "tokens": engine.tokens}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": sc.model_name, "object": "model", "created": created, "owned_by": "gptkit"}]}

    chat_page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return chat_page

    def check_common(r: _Base, default_max: int) -> SamplingParams:
        if r.model != sc.model_name:
            msg = f"model {r.model!r} does not exist; this server has {sc.model_name!r}"
            raise ApiError(404, msg, "model_not_found", "model")
        max_tokens = r.max_tokens if r.max_tokens is not None else default_max
        if isinstance(r, ChatRequest) and r.max_completion_tokens is not None:
            max_tokens = r.max_completion_tokens
        if max_tokens > sc.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {sc.max_tokens_cap}", "invalid_value",
                           "max_tokens")  # fmt: skip
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "invalid_value", "stop")
        return SamplingParams(max_tokens, r.temperature, r.top_k, r.top_p, r.repetition_penalty, stops, r.seed)

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

    async def run(prompts: list[list[int]], params: SamplingParams, stop_ids: set[int], stops: list[str], n: int) -> Any:
        """Submit n samples per prompt; returns (jobs, an async iterator of (index, delta, finished))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(job: Job, delta: str, done: bool) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (job.index, delta, done))

        jobs = [
            Job(i * n + k, p, replace(params, seed=None if params.seed is None else params.seed + k), stop_ids, stops, emit)
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

    def usage(jobs: list[Job], prompts: list[list[int]]) -> dict[str, int]:
        p = sum(len(x) for x in prompts)
        c = sum(j.detok.completion_tokens for j in jobs if j.detok is not None)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest) -> Any:
        params = check_common(r, 16)
        if isinstance(r.prompt, list) and r.prompt and all(isinstance(x, int) for x in r.prompt):
            if any(not 0 <= x < tok.vocab_size for x in r.prompt):  # type: ignore[operator]
                raise ApiError(400, f"prompt: token ids must be in [0, {tok.vocab_size})", "invalid_value", "prompt")
            texts: list[str | list[int]] = [list(r.prompt)]  # type: ignore[arg-type]
        else:
            texts = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt)  # type: ignore[list-item]
            if not texts:
                raise ApiError(400, "prompt: give a string, a list of strings or a list of token ids", "invalid_value", "prompt")
        prompts = [fit(_encode(tok, t), r) for t in texts]
        jobs, events = await run(prompts, params, {tok.eot_id}, params.stop, r.n)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = [tok.decode(p) if r.echo else "" for p in prompts]

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": now, "model": sc.model_name, "choices": [choice]}

        if r.stream:

            async def body() -> AsyncIterator[str]:
                started: set[int] = set()
                async for i, delta, done in events:
                    prefix = echo[i // r.n] if i not in started else ""
                    started.add(i)
                    if delta or prefix:
                        yield sse(chunk(i, prefix + delta, None))
                    if done:
                        yield sse(chunk(i, "", jobs[i].detok.finish_reason))
                yield "data: [DONE]\n\n"

            return StreamingResponse(body(), media_type="text/event-stream")
        async for _ in events:
            pass
        choices = [
            {"index": i, "text": echo[i // r.n] + j.detok.text, "logprobs": None, "finish_reason": j.detok.finish_reason}
            for i, j in enumerate(jobs)
        ]
        return {"id": rid, "object": "text_completion", "created": now, "model": sc.model_name, "choices": choices,
                "usage": usage(jobs, prompts)}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest) -> Any:
        params = check_common(r, min(sc.default_max_tokens, sc.max_tokens_cap))
        msgs = [
            Message("system" if m.role == "developer" else m.role,
                    m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
            for m in r.messages
        ]  # fmt: skip
        try:
            check_messages(msgs, need_assistant=False)
            ids, _ = template.encode(msgs, generation_prompt=True)
        except GptkitError as e:
            raise ApiError(400, f"messages: {e}", "invalid_value", "messages") from None
        prompts = [fit(ids, r)]
        jobs, events = await run(prompts, params, set(template.stop_ids) | {tok.eot_id}, params.stop + template.stop_strings, r.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(i: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": sc.model_name, "choices": [choice]}

        if r.stream:

            async def body() -> AsyncIterator[str]:
                for i in range(len(jobs)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}, None))
                async for i, delta, done in events:
                    if delta:
                        yield sse(chunk(i, {"content": delta}, None))
                    if done:
                        yield sse(chunk(i, {}, jobs[i].detok.finish_reason))
                yield "data: [DONE]\n\n"

            return StreamingResponse(body(), media_type="text/event-stream")
        async for _ in events:
            pass
        choices = [
            {"index": i, "message": {"role": "assistant", "content": j.detok.text.strip()}, "logprobs": None,
             "finish_reason": j.detok.finish_reason}
            for i, j in enumerate(jobs)
        ]  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": now, "model": sc.model_name, "choices": choices,
                "usage": usage(jobs, prompts)}  # fmt: skip

    return app


def _encode(tok: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    try:
        return tok.encode(prompt)
    except GptkitError as e:
        raise ApiError(400, f"prompt: {e}", "invalid_value", "prompt") from None


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, sc: ServeConfig | None = None,
          device: str = "auto", dtype: str = "float32") -> None:  # fmt: skip
    """Load the run and serve it until interrupted; prints the address once it is listening."""
    import socket

    import uvicorn

    from gptkit.checkpoint import load_model
    from gptkit.train import resolve_device

    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    sc = sc or ServeConfig(model_name=Path(run).resolve().name)
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

    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
