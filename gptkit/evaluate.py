"""Loss, perplexity and bits-per-byte of a model on a token stream.

The whole split is covered by consecutive non-overlapping windows of block_size tokens, every
token after the first predicted exactly once. Bits-per-byte divides the total loss (in bits) by
the UTF-8 bytes of the predicted tokens, so char and BPE models compare."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptkit.errors import GptkitError, check_number
from gptkit.model import GPT
from gptkit.runtime import autocast_context, resolve_device, resolve_dtype


@torch.no_grad()
def token_losses(
    model: GPT,
    tokens: np.ndarray,
    batch_size: int,
    device: torch.device | str,
    autocast: Any = None,
    max_batches: int | None = None,
    generator: torch.Generator | None = None,
    split: tuple[int, int] | None = None,
) -> tuple[float, int, np.ndarray]:
    """Sum of next-token losses (nats), the number of predictions, and the predicted token ids.

    With a generator, `max_batches` batches of random windows (a quick estimate during training);
    without, every window of the stream in order. split=(rank, world): only every world-th
    window from rank on, so that processes share the work and their sums add up."""
    T = model.config.block_size
    n = len(tokens)
    if n < 2:
        raise GptkitError(f"need at least 2 tokens to evaluate, got {n}")
    if generator is not None:
        n_windows = (max_batches or 1) * batch_size
        starts = torch.randint(max(1, n - T), (n_windows,), generator=generator).numpy()
    else:
        starts = np.arange(0, n - 1, T)
        if max_batches is not None:
            starts = starts[: max_batches * batch_size]
    if split is not None:
        starts = starts[split[0] :: split[1]]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predicted: list[np.ndarray] = []
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    try:
        # Full windows in batches; the final, shorter window (if any) on its own.
        full = [s for s in starts if s + T + 1 <= n]
        rest = [s for s in starts if s + T + 1 > n]
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in rest]
        for group in groups:
            length = min(T, n - 1 - group[0]) if len(group) == 1 else T
            win = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in group])
            x = torch.from_numpy(win[:, :-1]).to(device)
            y = torch.from_numpy(win[:, 1:]).to(device)
            with ctx:
                logits, _ = model(x)
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
            predicted.append(win[:, 1:].reshape(-1))
    finally:
        model.train(was_training)
    return total, count, np.concatenate(predicted)


def summarize(total_nats: float, count: int, n_bytes: int | None) -> dict[str, Any]:
    """Loss, perplexity, tokens and (given the predicted text's UTF-8 bytes) bits per byte."""
    loss = total_nats / count
    out: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if n_bytes is not None:
        out["bits_per_byte"] = total_nats / math.log(2) / n_bytes if n_bytes else float("nan")
    return out


def predicted_bytes(predicted: np.ndarray, byte_lengths: np.ndarray) -> int:
    return int(byte_lengths[np.clip(predicted, 0, len(byte_lengths) - 1)].sum())


def evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    text: str | Path | None = None,
    split: str = "val",
    device: str = "auto",
    batch_size: int | None = None,
    max_batches: int | None = None,
    errors: str = "strict",
) -> dict[str, Any]:
    """Loss, perplexity, bits_per_byte and token count of a run's model on a data folder's split
    (the run's own data by default) or on a text file (invalid UTF-8 refused, or replaced with
    errors="replace"), over the whole of it."""
    from gptkit.checkpoint import load_model
    from gptkit.data import DataSet, _read_text_chunks

    if batch_size is not None:
        check_number("batch_size", batch_size, 1, integer=True)
    if max_batches is not None:
        check_number("max_batches", max_batches, 1, integer=True)
    dev = resolve_device(device)
    model, tok, cfg = load_model(run_dir, dev)
    if text is not None:
        p = Path(text)
        if not p.is_file():
            raise GptkitError(f"{p}: no such file")
        content = "".join(_read_text_chunks(p, errors))
        if not content:
            raise GptkitError(f"{p}: file is empty")
        tokens = np.asarray(tok.encode(content), dtype=np.int64)
    else:
        if data is None and cfg.finetune.base:
            raise GptkitError(f"{run_dir} is a fine-tuned run: evaluate it with --instructions FILE (or --text FILE)")
        folder = Path(data) if data is not None else _run_data_dir(Path(run_dir), cfg.data.dir)
        ds = DataSet(folder)
        if ds.tokenizer.vocab_size != tok.vocab_size or ds.tokenizer.kind != tok.kind:
            raise GptkitError(f"{folder}: its tokenizer differs from the run's; prepare it with the run's tokenizer")
        tokens = ds.split(split)
    amp = autocast_context(dev, resolve_dtype(cfg.train.dtype, dev))
    total, count, predicted = token_losses(model, tokens, batch_size or cfg.train.batch_size, dev, amp, max_batches)
    return summarize(total, count, predicted_bytes(predicted, tok.token_byte_lengths()))


def _run_data_dir(run_dir: Path, configured: str) -> Path:
    if not configured:
        raise GptkitError(f"{run_dir}: the run names no data folder; pass --data DIR or --text FILE")
    p = Path(configured)
    return p if p.is_absolute() else run_dir / p
