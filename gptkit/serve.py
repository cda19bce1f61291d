"""`gptkit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web chat page.

    GET  /health                 liveness and the model's name
    GET  /v1/models              the one model served
    POST /v1/completions         text completion (stream, n, stop, seed, usage ...)
    POST /v1/chat/completions    chat through the run's chat template
    GET  /                       a small chat page that streams from /v1/chat/completions

This module is the HTTP layer only: request models and their checks, auth and limits (Guard),
server-sent events and OpenAI's error shapes. Generation runs on the engine's thread
(gptkit/engine.py), never on the event loop; a request that would overflow its queue gets 429.
A streaming client that disconnects stops its rows at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.checkpoint import load_model
from gptkit.engine import Engine, Job, QueueFull, TokenLogprob
from gptkit.errors import GptkitError
from gptkit.generate import SamplingParams
from gptkit.model import GPT
from gptkit.runtime import resolve_device
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

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
    # a prompt longer than the context: true keeps its last tokens instead of a 400
    truncate: bool = False
    # special tokens (the chat template's) are not written into the text
    skip_special_tokens: bool = True
    # Declared to be refused when used (see UNSUPPORTED); the neutral values pass.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_Base):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: bool = False
    logprobs: Int | None = Field(default=None, ge=0, le=20)  # per token: its own and the top N
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
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: Int | None = Field(default=None, ge=0)
    # or "oldest_turns": drop the oldest exchanges, system messages kept (ChatTemplate.fit)
    truncate: bool | Literal["oldest_turns"] = False


# Each declared-but-unimplemented field, with the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
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


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
    )


class ApiError(HTTPException):
    """An error with OpenAI's shape. An HTTPException, so that FastAPI passes it through unchanged
    even when it is raised while the body is being read (the size limit)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
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
    scheduler: str = "continuous"  # or "static": batches of requests that arrived together
    cuda_graph: bool = False  # continuous decode steps captured in a CUDA graph (Engine static)
    prefix_cache_tokens: int | None = None  # Engine's prefix cache; None: the pool's size, 0: off
    prefill_chunk: int = 256  # prompt positions prefilled between two decode steps


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
    return name in (
        LOOPBACK_NAMES if allowed is None else [*LOOPBACK_NAMES, *(a.lower() for a in allowed)]
    )


class Guard:
    """What every request passes before the app (plain ASGI, so that streaming and disconnects
    reach the app untouched): the Host header (DNS rebinding), the API key on /v1, and the body
    size, counted as the bytes arrive, Content-Length or chunked alike (a chunked body once went
    unchecked). Past the size limit the app is told the client has gone, so it stops reading,
    its answer is dropped, and 413 is sent."""

    def __init__(self, app: Any, sc: ServeConfig) -> None:
        self.app, self.sc = app, sc

    def refusal(self, scope: dict) -> JSONResponse | None:
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        sc = self.sc
        if not host_allowed(headers.get("host", ""), sc.allowed_hosts):
            return _error(
                400,
                "the Host header names a host this server does not serve (DNS rebinding?); start "
                "it with "
                "--allowed-hosts NAME to accept that name",
                "invalid_host",
            )
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > sc.max_request_bytes):
            return _error(
                413,
                f"the request body is larger than {sc.max_request_bytes} bytes",
                "request_too_large",
            )
        if scope["path"].startswith("/v1") and sc.api_key is not None:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), sc.api_key.encode()):
                return _error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "invalid_api_key",
                )
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
            await _error(
                413, f"the request body is larger than {limit} bytes", "request_too_large"
            )(scope, receive, send)


ERRORS = {
    400: "invalid request (message, param and code say what)",
    401: "missing or wrong API key",
    404: "no such model or path",
    413: "request body too large",
    429: "the server's queue is full; retry shortly",
    500: "generation failed",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    k: {"model": ErrorResponse, "description": v} for k, v in ERRORS.items()
}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a JSON object; with stream: true, server-sent events ending in data: "
        "[DONE]",
        # Each event's data is a chunk object, or [DONE] at the end.
        "content": {"application/json": {}, "text/event-stream": {"schema": {}}},
    }
}


STATIC = Path(__file__).parent / "static"
CHAT_PAGE = STATIC / "chat.html"
# The files the chat page loads (the libraries vendored with their licences: static/vendor).
PAGE_FILES = ("chat.js", "vendor/marked.umd.js", "vendor/purify.min.js")
# The page runs only its own scripts: were a reply ever to slip past the Markdown sanitizer, an
# injected inline script or event handler would still not run; images only from this server.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class Served:
    """What every route shares: the model's tokenizer and chat template, the engine, the limits.
    The request checks that both endpoints make are its methods."""

    def __init__(self, model: GPT, tok: Tokenizer, sc: ServeConfig) -> None:
        self.tok, self.sc = tok, sc
        self.engine = Engine(
            model,
            tok,
            sc.max_batch,
            sc.queue_limit,
            continuous=sc.scheduler == "continuous",
            static=sc.cuda_graph,
            prefix_cache_tokens=sc.prefix_cache_tokens,
            prefill_chunk=sc.prefill_chunk,
        )
        self.template = ChatTemplate(tok)
        self.block = model.config.block_size
        self.created = int(time.time())
        self.special_ids = frozenset(tok.special_tokens.values()) - {tok.eot_id}
        self.chat_page = CHAT_PAGE.read_text(encoding="utf-8")
        self.page_files = {name: (STATIC / name).read_bytes() for name in PAGE_FILES}

    def token_text(self, token: int) -> str:
        """A token as the text it stands for (special tokens by name), for log-probabilities."""
        return self.tok.decode([token])

    def check_text(self, text: str, param: str) -> str:
        """JSON can carry lone surrogates (\\ud800), which no tokenizer can encode: say where."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(
                400,
                f"{param}: a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character "
                f"{e.start} "
                "is not text; send valid Unicode",
                "invalid_value",
                param,
            ) from None
        return text

    def sampling(self, r: _Base, default_max: int, n_prompts: int = 1) -> SamplingParams:
        """The request's sampling settings, checked against this server's model and limits."""
        sc = self.sc
        if r.model != sc.model_name:
            raise ApiError(
                404,
                f"model {r.model!r} does not exist; this server has {sc.model_name!r}",
                "model_not_found",
                "model",
            )
        for name, neutral in UNSUPPORTED.items():
            value = getattr(r, name, None)
            if value not in neutral:
                raise ApiError(
                    400,
                    f"{name} is not supported by this server (got {json.dumps(value)[:80]}); leave "
                    "it out",
                    "unsupported_parameter",
                    name,
                )
        max_tokens = r.max_tokens if r.max_tokens is not None else default_max
        if isinstance(r, ChatRequest) and r.max_completion_tokens is not None:
            max_tokens = r.max_completion_tokens
        if max_tokens > sc.max_tokens_cap:
            raise ApiError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {sc.max_tokens_cap}",
                "invalid_value",
                "max_tokens",
            )
        samples = r.n * n_prompts
        if samples > sc.queue_limit:  # never fits: 429 would be retried forever
            raise ApiError(
                400,
                f"the request asks for {samples} samples; this server's queue holds "
                f"{sc.queue_limit} "
                "(--queue-limit)",
                "invalid_value",
                "n",
            )
        if samples * max_tokens > sc.max_request_work:
            raise ApiError(
                400,
                f"the request asks for {samples} samples x {max_tokens} tokens = "
                f"{samples * max_tokens}; "
                f"one request may ask for at most {sc.max_request_work} (--max-request-work), so "
                "that it "
                "leaves room for others",
                "invalid_value",
                "n",
            )
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "invalid_value", "stop")
        stops = [
            self.check_text(s, "stop") for s in stops
        ]  # the Detokenizer ignores empty ones, as OpenAI does
        bias: dict[int, float] = {}
        for key, value in (r.logit_bias or {}).items():
            if not key.isdigit():
                raise ApiError(
                    400, f"logit_bias: {key!r} is not a token id", "invalid_value", "logit_bias"
                )
            if int(key) < self.tok.vocab_size:  # ids past this model's vocabulary bias nothing
                bias[int(key)] = value
        params = SamplingParams(
            max_tokens,
            r.temperature,
            r.top_k,
            r.top_p,
            r.repetition_penalty,
            stops,
            r.seed,
            frequency_penalty=r.frequency_penalty,
            presence_penalty=r.presence_penalty,
            logit_bias=bias,
        )
        try:
            return params.validate()
        except GptkitError as e:
            raise ApiError(400, str(e), "invalid_value", str(e).split(" ")[0]) from None

    def fit(self, ids: list[int], r: _Base) -> list[int]:
        """A prompt within the context: refused when longer, or its last tokens with truncate."""
        if not ids:
            ids = [self.tok.eot_id]
        chat = isinstance(r, ChatRequest)
        if len(ids) > self.block:
            if r.truncate is not True:
                msg = (
                    f"the prompt is {len(ids)} tokens, longer than the model's context of "
                    f"{self.block}; shorten it or "
                    'send "truncate": true to keep its last tokens'
                    + (' (chat: "oldest_turns" to drop the oldest exchanges)' if chat else "")
                )
                raise ApiError(400, msg, "context_length_exceeded", "prompt")
            ids = ids[-self.block :]
        return ids

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if any(not 0 <= x < self.tok.vocab_size for x in prompt):
                raise ApiError(
                    400,
                    f"prompt: token ids must be in [0, {self.tok.vocab_size})",
                    "invalid_value",
                    "prompt",
                )
            return prompt
        try:
            return self.tok.encode_prompt(self.check_text(prompt, "prompt"))
        except GptkitError as e:
            raise ApiError(400, f"prompt: {e}", "invalid_value", "prompt") from None

    async def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_ids: set[int],
        stops: list[str],
        n: int,
        skip_special: bool,
        logprobs: int | None = None,
        echo: bool = False,
    ) -> tuple[list[Job], AsyncIterator[tuple[int, str, bool]]]:
        """Submit n samples per prompt; returns (jobs, an async iterator of (index, delta,
        finished))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(job: Job, delta: str, done: bool) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (job.index, delta, done))

        skip = self.special_ids if skip_special else frozenset()
        jobs = [
            Job(
                i * n + k,
                p,
                replace(params, seed=None if params.seed is None else params.seed + k),
                stop_ids,
                stops,
                emit,
                skip,
                logprobs=logprobs,
                echo_logprobs=echo,
            )
            for i, p in enumerate(prompts)
            for k in range(n)
        ]
        try:
            self.engine.submit(jobs)
        except QueueFull:
            raise ApiError(
                429, "the server is busy (its queue is full); retry shortly", "rate_limit_exceeded"
            ) from None

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


def _served(request: Request) -> Served:
    return request.app.state.served


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Reply:
    """The one response builder of both endpoints: chunks and server-sent events, the final
    object with its choices, and usage. A completion's choice carries `text` (after the echoed
    prompt, with echo); a chat choice a `message`, streamed as `delta`s after a role chunk."""

    def __init__(
        self,
        s: Served,
        r: _Base,
        jobs: list[Job],
        prompts: list[list[int]],
        echo: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """extra: fields of this server's own added to every chunk and to the response."""
        self.s, self.r, self.jobs, self.prompts = s, r, jobs, prompts
        self.extra = extra or {}
        self.chat = isinstance(r, ChatRequest)
        self.echo = echo or [""] * len(prompts)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self.with_logprobs = bool(r.logprobs) if self.chat else r.logprobs is not None
        self.sent = [0] * len(jobs)  # per choice: log-probability entries already streamed
        self.offset = [0] * len(jobs)  # per choice: text_offset of its next token (completions)

    def _new_entries(self, i: int) -> list[TokenLogprob]:
        """Choice i's log-probability entries not yet sent (the echoed prompt's come first)."""
        job, sent = self.jobs[i], self.sent[i]
        prompt = job.prompt_logprobs[sent:]
        new = prompt + job.token_logprobs[max(0, sent - len(job.prompt_logprobs)) :]
        self.sent[i] = sent + len(new)
        return new

    def _logprobs(self, i: int) -> dict[str, Any] | None:
        """OpenAI's log-probability object for choice i's new tokens: the legacy completions
        shape (tokens, token_logprobs, top_logprobs, text_offset) or chat's content list."""
        if not self.with_logprobs:
            return None
        text = self.s.token_text
        entries = self._new_entries(i)
        if self.chat:

            def item(t: int, lp: float) -> dict[str, Any]:
                piece = text(t)
                return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

            content = [
                {**item(e.token, e.logprob or 0.0), "top_logprobs": [item(t, v) for t, v in e.top]}
                for e in entries
            ]
            return {"content": content}
        tokens = [text(e.token) for e in entries]
        offsets = []
        for piece in tokens:
            offsets.append(self.offset[i])
            self.offset[i] += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                None if e.logprob is None else {text(t): v for t, v in e.top} for e in entries
            ],
            "text_offset": offsets,
        }

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.s.sc.model_name,
            "choices": choices,
            **self.extra,
        }

    def _chunk(
        self, i: int, text: str | None, finish: str | None = None, opening: bool = False
    ) -> str:
        choice: dict[str, Any] = {"index": i}
        if not self.chat:
            choice["text"] = text or ""
        elif opening:
            choice["delta"] = {"role": "assistant", "content": ""}
        else:
            choice["delta"] = {"content": text} if text else {}
        choice.update(logprobs=None if opening else self._logprobs(i), finish_reason=finish)
        return sse(self._envelope(self.chunk_object, [choice]))

    def usage(self) -> dict[str, int]:
        p = sum(len(x) for x in self.prompts)
        c = sum(j.detok.completion_tokens for j in self.jobs if j.detok is not None)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream(self, events: AsyncIterator[tuple[int, str, bool]]) -> AsyncIterator[str]:
        """SSE: (chat: a role chunk per choice), text as it comes, a finish chunk per choice; a
        failed sample sends an error event (never text presented as the model's) and ends it."""
        if self.chat:
            for i in range(len(self.jobs)):
                yield self._chunk(i, None, opening=True)
        started: set[int] = set()
        n = self.r.n
        async for i, delta, done in events:
            job = self.jobs[i]
            if done and job.error:
                yield sse(
                    {
                        "error": {
                            "message": job.error,
                            "type": "server_error",
                            "param": None,
                            "code": "generation_failed",
                        }
                    }
                )
                return
            text = delta if i in started else self.echo[i // n] + delta
            started.add(i)
            if text:
                yield self._chunk(i, text)
            if done:
                yield self._chunk(i, None, job.detok.finish_reason)
        # OpenAI's usage chunk
        if self.r.stream_options is not None and self.r.stream_options.include_usage:
            yield sse({**self._envelope(self.chunk_object, []), "usage": self.usage()})
        yield "data: [DONE]\n\n"

    def final(self) -> dict[str, Any]:
        choices = []
        for i, job in enumerate(self.jobs):
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": job.detok.text.strip()}
            else:
                choice["text"] = self.echo[i // self.r.n] + job.detok.text
            choice.update(logprobs=self._logprobs(i), finish_reason=job.detok.finish_reason)
            choices.append(choice)
        return {**self._envelope(self.object, choices), "usage": self.usage()}

    async def send(self, request: Request, events: AsyncIterator[tuple[int, str, bool]]) -> Any:
        if self.r.stream:
            return StreamingResponse(self.stream(events), media_type="text/event-stream")
        await _drain(request, self.jobs, events)
        return self.final()


async def _drain(request: Request, jobs: list[Job], events: AsyncIterator) -> None:
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


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    s = _served(request)
    e = s.engine
    return {
        "status": "ok",
        "model": s.sc.model_name,
        "active_samples": e.active,
        "batches": e.batches,
        "rows": e.rows,
        "tokens": e.tokens,
        "failures": e.failures,
        "scheduler": "continuous" if e.continuous else "static",
        "steps": e.steps,
        "step_rows": e.step_rows,
        "mean_batch": round(e.step_rows / e.steps, 2) if e.steps else 0.0,
        # --cuda-graph: "captured", "eager" (capture failed: the reason), or "off"
        "cuda_graph": _graph_state(e),
        # prompt positions computed, and those copied from the prefix cache instead
        "prefill_tokens": e.prefill_tokens,
        "prefix_hits": e.prefixes.hits if e.prefixes else 0,
        "prefix_tokens_reused": e.prefixes.reused if e.prefixes else 0,
        "prefix_cache_tokens": e.prefixes.tokens if e.prefixes else 0,
    }


def _graph_state(e: Engine) -> str:
    d = e.decoder
    if d is None:
        return "off"
    if d.graph is not None:
        return "captured"
    return f"eager: {d.graph_error}" if d.graph_error else "eager"


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def models(request: Request) -> dict[str, Any]:
    s = _served(request)
    model = {"id": s.sc.model_name, "object": "model", "created": s.created, "owned_by": "gptkit"}
    # Extensions (the chat page reads them): the context, and what a request that leaves a
    # setting out gets.
    model.update(
        context_length=s.block,
        max_tokens_cap=s.sc.max_tokens_cap,
        defaults={
            "temperature": ChatRequest.model_fields["temperature"].default,
            "top_p": ChatRequest.model_fields["top_p"].default,
            "max_tokens": min(s.sc.default_max_tokens, s.sc.max_tokens_cap),
        },
    )
    return {"object": "list", "data": [model]}


@router.get("/", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(_served(request).chat_page, headers={"Content-Security-Policy": PAGE_CSP})


@router.get("/static/{name:path}", include_in_schema=False)
async def page_file(name: str, request: Request) -> Response:
    body = _served(request).page_files.get(name)
    if body is None:
        raise ApiError(404, f"no such file: /static/{name}", "not_found")
    return Response(body, media_type="text/javascript; charset=utf-8")


@router.post("/v1/completions", responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
async def completions(r: CompletionRequest, request: Request) -> Any:
    s, tok = _served(request), _served(request).tok
    prompt = r.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        texts: list[str | list[int]] = [list(prompt)]  # type: ignore[arg-type]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, list) for x in prompt):
        texts = [list(x) for x in prompt]  # type: ignore[union-attr]
    else:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)  # type: ignore[list-item]
    if not texts:
        raise ApiError(
            400,
            "prompt: give a string, a list of strings or a list of token ids",
            "invalid_value",
            "prompt",
        )
    params = s.sampling(r, 16, len(texts))
    if r.echo and params.max_new_tokens == 0 and r.n > 1:
        raise ApiError(
            400,
            "echo with max_tokens 0 scores the prompt, which is the same every time; send n: 1",
            "invalid_value",
            "n",
        )
    prompts = [s.fit(s.encode(t), r) for t in texts]
    # The end-of-turn token ends a completion as end-of-text does; special tokens are not text.
    stop_ids = {*tok.eos_ids, *s.template.stop_ids}
    jobs, events = await s.submit(
        prompts,
        params,
        stop_ids,
        params.stop,
        r.n,
        r.skip_special_tokens,
        r.logprobs,
        r.echo and r.logprobs is not None,
    )
    echo = [tok.decode(p) if r.echo else "" for p in prompts]
    return await Reply(s, r, jobs, prompts, echo).send(request, events)


@router.post("/v1/chat/completions", responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
async def chat(r: ChatRequest, request: Request) -> Any:
    s = _served(request)
    params = s.sampling(r, min(s.sc.default_max_tokens, s.sc.max_tokens_cap))
    if r.top_logprobs is not None and not r.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    msgs = [
        Message(
            "system" if m.role == "developer" else m.role,
            s.check_text(
                m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
                "messages",
            ),
        )
        for m in r.messages
    ]
    # roles are checked by the request model; a system message may come anywhere, as OpenAI allows
    dropped = None
    try:
        if r.truncate == "oldest_turns":
            ids, dropped = s.template.fit(msgs, s.block, params.max_new_tokens)
        else:
            ids = s.template.prompt_ids(msgs)
    except GptkitError as e:
        raise ApiError(400, f"messages: {e}", "invalid_value", "messages") from None
    prompts = [s.fit(ids, r)]
    stop_ids = set(s.template.stop_ids) | set(s.tok.eos_ids)
    jobs, events = await s.submit(
        prompts,
        params,
        stop_ids,
        params.stop + s.template.stop_strings,
        r.n,
        r.skip_special_tokens,
        (r.top_logprobs or 0) if r.logprobs else None,
    )
    # With "oldest_turns", every chunk (and the response) says how many messages were left out.
    extra = {} if dropped is None else {"truncated_messages": dropped}
    return await Reply(s, r, jobs, prompts, extra=extra).send(request, events)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Ours, FastAPI's and the router's errors (404, 405 ...), in OpenAI's shape."""
    if isinstance(e, ApiError):
        return _error(e.status, e.message, e.code, e.param)
    if e.status_code == 400:  # FastAPI could not read the body: bad UTF-8, nesting too deep ...
        return _error(
            400, f"the request body could not be read as JSON ({e.detail})", "invalid_json"
        )
    resp = _error(
        e.status_code,
        str(e.detail),
        {404: "not_found", 405: "method_not_allowed"}.get(e.status_code),
    )
    resp.headers.update(e.headers or {})  # 405's Allow header
    return resp


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    err = errors[0] if errors else {}
    if err.get("type") == "json_invalid":
        return _error(400, "the request body is not valid JSON", "invalid_json")
    path = tuple(x for x in err.get("loc", ()) if x != "body")
    msg = err.get("msg", "invalid value")

    # A field of several types (bool | "oldest_turns") fails once per type, each error's place
    # ending in the type's name: name the field, and say every type it could have been.
    def place(x: dict) -> tuple:
        return tuple(y for y in x.get("loc", ()) if y != "body")

    # (the same value, failing at the same place but for its last part: one per type)
    alike = [x for x in errors if place(x)[:-1] == path[:-1] and x.get("input") is err.get("input")]
    if len(path) > 1 and isinstance(path[-1], str) and len(alike) > 1:
        path = path[:-1]
        msg = "; or ".join(dict.fromkeys(x.get("msg", "") for x in alike))
    loc = ".".join(str(x) for x in path)
    return _error(400, f"{loc or 'body'}: {msg}", "invalid_value", loc or None)


async def _crash(request: Request, e: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(e).__name__}")


def create_app(model: GPT, tok: Tokenizer, sc: ServeConfig) -> FastAPI:
    """The FastAPI application serving `model` (call from Python to embed it elsewhere)."""
    # No /docs: Swagger UI loads its scripts from a CDN, blank offline. /openapi.json describes the
    # API.
    app = FastAPI(title="gptkit", version="1", docs_url=None, redoc_url=None)
    served = Served(model, tok, sc)
    app.state.served = served
    app.state.engine = served.engine
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(Guard, sc=sc)
    app.include_router(router)
    app.openapi = lambda: _openapi(app, sc, tok, served.template, served.block)  # type: ignore[method-assign]
    return app


def _openapi(
    app: FastAPI, sc: ServeConfig, tok: Tokenizer, template: ChatTemplate, block: int
) -> dict[str, Any]:
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

    # Text that surely fits: a byte-level BPE token covers at least one byte, a character at most
    # four.
    per_char = 1 if tok.kind == "char" else 4
    text: dict[str, Any] = {"type": "string", "maxLength": block // per_char}
    if tok.kind == "char":
        known = "".join(
            c if c.isalnum() else f"\\u{ord(c):04x}"
            for c in getattr(tok, "chars", [])
            if ord(c) < 0x10000
        )
        text["pattern"] = f"^[{known}]*$"
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": tok.vocab_size - 1},
        "minItems": 1,
        "maxItems": block,
    }
    # prompts per request, messages per conversation (as the schema promises; the API takes more)
    most = 4
    n_max = max(1, min(16, sc.queue_limit // most))
    marker = max(len(v) for k, v in template.marker.items() if k != "end") + len(
        template.marker["end"]
    )
    chat_text = {
        **text,
        "maxLength": max(
            0, (block - len(template.marker["assistant"]) - most * marker) // most // per_char
        ),
    }
    schemas = comps["schemas"]
    common = {
        "model": {"type": "string", "enum": [sc.model_name]},
        "max_tokens": {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": sc.max_tokens_cap},
                {"type": "null"},
            ]
        },
        "n": {
            "type": "integer",
            "minimum": 1,
            "maximum": n_max,
            "default": 1,
            "description": "samples per prompt; n x prompts x max_tokens may be at most "
            f"{sc.max_request_work}",
        },
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "logit_bias": {
            "anyOf": [
                {
                    "type": "object",
                    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                },
                {"type": "null"},
            ]
        },
    }
    neutral = {
        name: {"enum": [v for v in values if not isinstance(v, (dict, list))]}
        for name, values in UNSUPPORTED.items()
    }
    neutral["response_format"] = {
        "anyOf": [
            {"type": "null"},
            {
                "type": "object",
                "properties": {"type": {"enum": ["text"]}},
                "required": ["type"],
                "additionalProperties": False,
            },
        ]
    }
    for name in ("tools", "functions"):
        neutral[name] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
    neutral["suffix"] = {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}
    common["max_completion_tokens"] = common["max_tokens"]
    for model_name in ("CompletionRequest", "ChatRequest"):
        props = schemas[model_name]["properties"]
        props.update({k: v for k, v in {**common, **neutral}.items() if k in props})
    schemas["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            text,
            {"type": "array", "items": text, "minItems": 1, "maxItems": most},
            ids,
            {"type": "array", "items": ids, "minItems": 1, "maxItems": most},
        ]
    }
    schemas["ChatRequest"]["properties"]["messages"].update(maxItems=most)
    schemas["ChatMessage"]["properties"]["content"] = {
        "anyOf": [
            chat_text,
            {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}, "maxItems": 1},
        ]
    }
    schemas["TextPart"]["properties"]["text"] = chat_text
    # Combinations refused with 400: scoring a prompt (echo, max_tokens 0) once per request, and
    # top_logprobs only with logprobs: true.
    top = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 20}, {"type": "null"}]}
    schemas["CompletionRequest"]["properties"]["logprobs"] = top
    schemas["ChatRequest"]["properties"]["top_logprobs"] = top
    schemas["CompletionRequest"]["if"] = {
        "properties": {"echo": {"const": True}, "max_tokens": {"const": 0}},
        "required": ["echo", "max_tokens"],
    }
    schemas["CompletionRequest"]["then"] = {"properties": {"n": {"const": 1}}}
    schemas["ChatRequest"]["if"] = {
        "properties": {"logprobs": {"const": True}},
        "required": ["logprobs"],
    }
    schemas["ChatRequest"]["else"] = {"properties": {"top_logprobs": {"type": "null"}}}
    app.openapi_schema = schema
    return schema


def _header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that
    opens and then sends nothing, or its headers a byte at a time, is closed after `seconds`
    (uvicorn's own keep-alive timeout only starts after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._tail = b""
            self._deadline: asyncio.TimerHandle | None = self.loop.call_later(
                seconds, self._too_slow
            )

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


def serve(
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    sc: ServeConfig | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> None:
    """Load the run and serve it until interrupted; prints the address once it is listening."""
    import socket

    import uvicorn

    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    sc = sc or ServeConfig(model_name=Path(run).resolve().name)
    if sc.allowed_hosts is None and not is_loopback(host):
        # bound to a public address on purpose: any name reaches it
        sc = replace(sc, allowed_hosts=["*"])
    app = create_app(model, tok, sc)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        msg = (
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port, or --port 0 "
            "for a free one"
        )
        raise GptkitError(msg) from None
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            shown = f"[{host}]" if ":" in host else host
            print(
                f"gptkit: serving {sc.model_name} at http://{shown}:{bound} (OpenAI API under /v1, "
                "chat page at /)",
                flush=True,
            )

    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=2,
        http=_header_timeout_protocol(sc.timeout_headers),
        timeout_keep_alive=sc.timeout_keep_alive,
        limit_concurrency=sc.max_connections,
    )
    _Server(config).run(sockets=[sock])
