"""`gptkit serve`: the app on uvicorn, on a socket bound before the model loads."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import torch

from gptkit.errors import GptkitError
from gptkit.inference.speculative import load_speculator
from gptkit.loader import load_model
from gptkit.runtime import resolve_device
from gptkit.serve.app import create_app
from gptkit.serve.guard import ServeConfig, is_loopback


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

    model, tok, cfg = load_model(run, resolve_device(device), merge_adapters=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    sc = sc or ServeConfig(model_name=Path(run).resolve().name)
    if sc.allowed_hosts is None and not is_loopback(host):
        # bound to a public address on purpose: any name reaches it
        sc = replace(sc, allowed_hosts=["*"])
    labels = cfg.finetune.labels if cfg.finetune.task == "classify" else None
    spec = None
    if sc.draft:
        spec = load_speculator(sc.draft, model, tok, sc.draft_tokens, resolve_device(device),
                               sc.draft_p_min, sc.draft_min_acceptance)  # fmt: skip
    app = create_app(model, tok, sc, labels, spec)
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
