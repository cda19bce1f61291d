"""Shared helpers for the benchmarks: medians over repeats and the machine's matmul peaks."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a square n x n matmul on this machine, median of repeats."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, repeats)


def training_step(cfg, vocab: int = 65) -> Callable[[], None]:  # noqa: ANN001
    """One training step of a gptkit config as `gptkit.train` runs it (its optimizers, autocast,
    clipping, torch.compile when train.compile), on a fixed random batch: for timing
    configurations against each other. The config is not modified."""
    from gptkit.model import GPT
    from gptkit.optim import build_optimizers
    from gptkit.runtime import autocast_context, resolve_dtype

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=vocab))
    forward = torch.compile(model) if cfg.train.compile else model
    optimizers = build_optimizers(model, cfg.train, cpu)
    amp = autocast_context(cpu, resolve_dtype(cfg.train.dtype, cpu))
    x = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.block_size))
    y = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.block_size))

    def step() -> None:
        with amp:
            loss = forward(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    return step


def answer_timings(conn, step: Callable[[], None], cold_step: bool = True) -> None:  # noqa: ANN001
    """A benchmark worker's loop: warm `step` up, say "ready", then each time the parent sends n,
    time n steps and send back their median (0 ends it). cold_step: one untimed step first each
    round, since the other settings ran in between and the caches are cold."""
    step()
    step()
    conn.send("ready")
    while (n := conn.recv()) > 0:
        if cold_step:
            step()
        conn.send(median_time(step, n, warmup=0))
