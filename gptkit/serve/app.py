"""`gptkit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web chat page.

    GET  /health                 liveness and the model's name
    GET  /v1/models              the one model served
    POST /v1/completions         text completion (stream, n, stop, seed, usage ...)
    POST /v1/chat/completions    chat through the run's chat template (with --index: each
                                 question answered from its best passages, cited in "sources")
    POST /v1/classify            a classification run's labels and probabilities for texts
    GET  /                       a small chat page that streams from /v1/chat/completions

This module is the HTTP layer only: request models and their checks, auth and limits (Guard),
server-sent events and OpenAI's error shapes. Generation runs on the engine's thread
(inference/engine.py), never on the event loop; a request that would overflow its queue gets 429.
A streaming client that disconnects stops its rows at the next token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.classify import Classifier
from gptkit.errors import GptkitError
from gptkit.inference.engine import Engine, Job, QueueFull, TokenLogprob
from gptkit.inference.generate import SamplingParams
from gptkit.inference.speculative import Speculator
from gptkit.model import GPT
from gptkit.retrieval import Index, fit_passages
from gptkit.serve.guard import Guard, ServeConfig
from gptkit.serve.openapi import openapi_schema
from gptkit.serve.protocol import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    UNSUPPORTED,
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    SamplingRequest,
    error_response,
)
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

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

    def __init__(
        self,
        model: GPT,
        tok: Tokenizer,
        sc: ServeConfig,
        labels: list[str] | None = None,
        speculator: Speculator | None = None,
    ) -> None:
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
            speculator=speculator,
        )
        self.template = ChatTemplate(tok)
        self.block = model.config.block_size
        self.created = int(time.time())
        self.special_ids = frozenset(tok.special_tokens.values()) - {tok.eot_id}
        self.index = Index.load(sc.index) if sc.index else None
        if self.index is not None:
            self.index.check_tokenizer(tok, sc.model_name)
        # a classification run scores its labels on a thread of its own, one request at a time
        self.classifier = Classifier(model, tok, labels) if labels else None
        self.classify_lock = asyncio.Lock()
        self.classify_waiting = 0
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

    def ground(self, msgs: list[Message], max_new_tokens: int) -> tuple[Message, list]:
        """The last user message with its best passages (as many as leave room for the reply),
        and their sources."""
        assert self.index is not None
        budget = self.template.prompt_budget(self.block, max_new_tokens)
        found = self.index.search(msgs[-1].content, self.sc.passages)
        prompt, kept = fit_passages(self.template, msgs[:-1], msgs[-1].content, found, budget)
        return Message("user", prompt), [{"source": p.source, "score": p.score} for p in kept]

    def sampling(self, r: SamplingRequest, default_max: int, n_prompts: int = 1) -> SamplingParams:
        """The request's sampling settings, checked against this server's model and limits."""
        self.check_supported(r)
        params = SamplingParams(
            max_new_tokens=self.check_budget(r, default_max, n_prompts),
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            repetition_penalty=r.repetition_penalty,
            stop=self.stops(r),
            seed=r.seed,
            frequency_penalty=r.frequency_penalty,
            presence_penalty=r.presence_penalty,
            logit_bias=self.logit_bias(r),
        )
        try:
            return params.validate()
        except GptkitError as e:
            raise ApiError(400, str(e), "invalid_value", str(e).split(" ")[0]) from None

    def check_supported(self, r: SamplingRequest) -> None:
        """This server's model, and no parameter it would have to ignore."""
        if r.model != self.sc.model_name:
            raise ApiError(
                404,
                f"model {r.model!r} does not exist; this server has {self.sc.model_name!r}",
                "model_not_found",
                "model",
            )
        for name, neutral in UNSUPPORTED.items():
            value = getattr(r, name, None)
            if value not in neutral:
                raise ApiError(
                    400,
                    f"{name} is not supported by this server (got {json.dumps(value)[:80]}); "
                    "leave it out",
                    "unsupported_parameter",
                    name,
                )

    def check_budget(self, r: SamplingRequest, default_max: int, n_prompts: int) -> int:
        """max_tokens within the cap, and samples x max_tokens within one request's share."""
        sc = self.sc
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
                f"{sc.queue_limit} (--queue-limit)",
                "invalid_value",
                "n",
            )
        if samples * max_tokens > sc.max_request_work:
            raise ApiError(
                400,
                f"the request asks for {samples} samples x {max_tokens} tokens = "
                f"{samples * max_tokens}; one request may ask for at most "
                f"{sc.max_request_work} (--max-request-work), so that it leaves room for others",
                "invalid_value",
                "n",
            )
        return max_tokens

    def stops(self, r: SamplingRequest) -> list[str]:
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "invalid_value", "stop")
        # the Detokenizer ignores empty ones, as OpenAI does
        return [self.check_text(s, "stop") for s in stops]

    def logit_bias(self, r: SamplingRequest) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (r.logit_bias or {}).items():
            if not key.isdigit():
                raise ApiError(
                    400, f"logit_bias: {key!r} is not a token id", "invalid_value", "logit_bias"
                )
            if int(key) < self.tok.vocab_size:  # ids past this model's vocabulary bias nothing
                bias[int(key)] = value
        return bias

    def fit(self, ids: list[int], r: SamplingRequest) -> list[int]:
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
        r: SamplingRequest,
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
        # --draft: the draft, its guesses made and kept (acceptance_rate); null without one
        "speculative": e.speculator.stats() if e.speculator else None,
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
    sources = None
    dropped = None
    try:
        if s.index is not None and msgs[-1].role == "user":
            msgs[-1], sources = s.ground(msgs, params.max_new_tokens)
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
    extra: dict[str, Any] = {} if dropped is None else {"truncated_messages": dropped}
    if sources is not None:  # with --index: the passages the answer was given, best first
        extra["sources"] = sources
    return await Reply(s, r, jobs, prompts, extra=extra).send(request, events)


@router.post("/v1/classify", responses=ERROR_RESPONSES)
async def classify(r: ClassifyRequest, request: Request) -> dict[str, Any]:
    """Labels and probabilities from a classification run (gptkit finetune --task classify)."""
    s = _served(request)
    if r.model is not None and r.model != s.sc.model_name:
        raise ApiError(404, f"model {r.model!r} does not exist; this server has "
                       f"{s.sc.model_name!r}", "model_not_found", "model")  # fmt: skip
    if s.classifier is None:
        raise ApiError(
            400,
            "this server's model was not fine-tuned to classify; serve a run made with gptkit "
            "finetune BASE --task classify",
            "invalid_request_error",
        )
    texts = [r.input] if isinstance(r.input, str) else list(r.input)
    if not texts or len(texts) > s.sc.max_classify_inputs:
        raise ApiError(400, f"input: send 1 to {s.sc.max_classify_inputs} texts, got "
                       f"{len(texts)}", "invalid_value", "input")  # fmt: skip
    for i, t in enumerate(texts):
        s.check_text(t, f"input[{i}]")
        if not t:
            raise ApiError(400, f"input[{i}] is empty", "invalid_value", "input")
    if s.classify_waiting >= s.sc.queue_limit:
        raise ApiError(429, "the server is busy (its queue is full); retry shortly",
                       "rate_limit_exceeded")  # fmt: skip
    s.classify_waiting += 1
    try:
        async with s.classify_lock:
            probs = await asyncio.to_thread(s.classifier.probabilities, texts)
    except GptkitError as e:
        raise ApiError(400, f"input: {e}", "invalid_value", "input") from None
    finally:
        s.classify_waiting -= 1
    labels = s.classifier.labels
    data = []
    for i, p in enumerate(probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        data.append({"index": i, "label": labels[best],
                     "probabilities": dict(zip(labels, p))})  # fmt: skip
    return {"object": "list", "model": s.sc.model_name, "labels": labels, "data": data}


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Ours, FastAPI's and the router's errors (404, 405 ...), in OpenAI's shape."""
    if isinstance(e, ApiError):
        return error_response(e.status, e.message, e.code, e.param)
    if e.status_code == 400:  # FastAPI could not read the body: bad UTF-8, nesting too deep ...
        return error_response(
            400, f"the request body could not be read as JSON ({e.detail})", "invalid_json"
        )
    resp = error_response(
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
        return error_response(400, "the request body is not valid JSON", "invalid_json")
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
    return error_response(400, f"{loc or 'body'}: {msg}", "invalid_value", loc or None)


async def _crash(request: Request, e: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(e).__name__}")


def create_app(
    model: GPT,
    tok: Tokenizer,
    sc: ServeConfig,
    labels: list[str] | None = None,
    speculator: Speculator | None = None,
) -> FastAPI:
    """The FastAPI application serving `model` (call from Python to embed it elsewhere); labels:
    a classification run's, for /v1/classify; speculator: a draft model to decode lone rows
    speculatively with."""
    # No /docs: Swagger UI loads its scripts from a CDN, blank offline. /openapi.json describes the
    # API.
    app = FastAPI(title="gptkit", version="1", docs_url=None, redoc_url=None)
    served = Served(model, tok, sc, labels, speculator)
    app.state.served = served
    app.state.engine = served.engine
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(Guard, sc=sc)
    app.include_router(router)
    app.openapi = lambda: openapi_schema(
        app, sc, tok, served.template, served.block, served.classifier is not None
    )  # type: ignore[method-assign]
    return app
