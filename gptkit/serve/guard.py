"""What every request passes before a route: the Host header (DNS rebinding), the API key, the
body's size (`Guard`), with the server's limits (`ServeConfig`)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from gptkit.serve.protocol import error_response


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
    index: str = ""  # a `gptkit index` folder: chat questions are answered from its passages
    passages: int = 3  # with index: the best passages put into each question's prompt
    draft: str = ""  # a draft run: a row decoding alone is decoded speculatively with it
    draft_tokens: int = 4  # with draft: tokens it guesses a round, at most
    draft_p_min: float | None = None  # with draft: stop guessing below it (None: the default)
    draft_min_acceptance: float | None = None  # with draft: a row keeping less decodes plainly
    max_classify_inputs: int = 64  # texts one /v1/classify request may send


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
            return error_response(
                400,
                "the Host header names a host this server does not serve (DNS rebinding?); start "
                "it with "
                "--allowed-hosts NAME to accept that name",
                "invalid_host",
            )
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > sc.max_request_bytes):
            return error_response(
                413,
                f"the request body is larger than {sc.max_request_bytes} bytes",
                "request_too_large",
            )
        if scope["path"].startswith("/v1") and sc.api_key is not None:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), sc.api_key.encode()):
                return error_response(
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
            await error_response(
                413, f"the request body is larger than {limit} bytes", "request_too_large"
            )(scope, receive, send)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
