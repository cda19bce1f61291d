"""Instruction evaluation: the response loss of an instruction-tuned model on held-out
conversations, and whether its greedy answers match theirs exactly or contain them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.errors import check_number
from gptkit.evaluate.loss import sum_losses
from gptkit.finetune.instructions import encode_example, example_batches, load_conversations
from gptkit.inference.engine import generate_many
from gptkit.inference.generate import SamplingParams
from gptkit.loader import load_model
from gptkit.model import GPT
from gptkit.runtime import resolve_device
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer


def response_losses(
    model: GPT,
    examples: list[tuple[list[int], list[int]]],
    batch_size: int,
    device: torch.device | str,
    amp: Any = None,
) -> tuple[float, int, np.ndarray]:
    """sum_losses over the assistant tokens of instruction examples (encode_example)."""
    return sum_losses(model, example_batches(examples, batch_size), device, amp)


def evaluate_instructions(
    run: str | Path,
    files: list[str],
    device: str = "auto",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    limit: int | None = None,
) -> dict[str, Any]:
    """Response loss, and exact / contains match of greedy answers to the last assistant turn of
    each conversation in files, given what came before it."""

    check_number("max_new_tokens", max_new_tokens, 1, integer=True)
    check_number("batch_size", batch_size, 1, integer=True)
    if limit is not None:
        check_number("limit", limit, 1, integer=True)
    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    return evaluate_answers(
        model, tok, load_conversations(files).items[:limit], max_new_tokens, batch_size
    )


def evaluate_answers(
    model: GPT,
    tok: Tokenizer,
    convs: list[list[Message]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> dict[str, Any]:
    """evaluate_instructions on a model in memory. `samples` shows the first five answers, then
    wrong ones, up to twelve in all."""
    template = ChatTemplate(tok)
    block = model.config.block_size
    examples = [e for e in (encode_example(template, c, block) for c in convs) if e is not None]
    total, count, _ = response_losses(model, examples, batch_size, next(model.parameters()).device)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    lasts = [max(i for i, m in enumerate(c) if m.role == "assistant") for c in convs]
    prompts = [template.prompt_ids(c[:last]) for c, last in zip(convs, lasts)]
    answers = generate_many(model, tok, prompts, [params] * len(prompts), batch_size,
                         template.stop_ids, template.stop_strings)  # fmt: skip
    exact = contains = 0
    samples = []
    for c, last, answer in zip(convs, lasts, answers):
        want = c[last].content.strip()
        exact += answer.strip() == want
        contains += bool(want) and want.lower() in answer.lower()
        if len(samples) < 5 or (answer.strip() != want and len(samples) < 12):
            samples.append(
                {"prompt": c[last - 1].content if last else "", "expected": want, "got": answer}
            )
    n = len(convs)
    return {
        "response_loss": total / count if count else float("nan"),
        "exact_match": exact / n,
        "contains_match": contains / n,
        "examples": n,
        "samples": samples,
    }
