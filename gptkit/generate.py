"""The sampling core: one function that `generate`, `chat` and `serve` all call.

Decoding runs through the KV cache, so each new token costs one position's forward pass. A
prompt longer than the context keeps its last block_size tokens; when the cache fills
during generation it is rebuilt from the last 3/4 of the context and decoding goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache
from gptkit.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the context
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eot: bool = True

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 0:
            raise GptkitError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GptkitError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GptkitError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GptkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GptkitError(f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}")
        return self


def process_logits(logits: torch.Tensor, context: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to (B, V) logits."""
    logits = logits.float()
    if p.repetition_penalty != 1.0:
        seen = logits.gather(1, context)
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, context, seen)
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, context: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    logits = process_logits(logits, context, p)
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) for a batch of equal-length prompts (B, T), one step at a time."""
    block = model.config.block_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = prompt.to(device)
    if ids.size(1) == 0:
        raise GptkitError("the prompt is empty; give at least one token")
    context = ids  # everything so far, for the repetition penalty
    cache = KVCache.empty(model.config, ids.size(0), block, device, dtype)
    logits, _ = model(ids[:, -block:], cache=cache, last_only=True)
    for _ in range(params.max_new_tokens):
        nxt = sample_next(logits[:, -1], context, params, gen)
        yield nxt
        context = torch.cat([context, nxt[:, None]], dim=1)
        if cache.pos >= block:
            keep = max(1, block * 3 // 4)
            cache.pos = 0
            logits, _ = model(context[:, -keep:], cache=cache, last_only=True)
        else:
            logits, _ = model(nxt[:, None], cache=cache, last_only=True)


class TextStream:
    """Text deltas of one sample, stopping at a stop string (not included), at the end-of-text
    token, or after max_new_tokens. After iteration, `finish_reason` is "stop" or "length" and
    `completion_tokens` counts the tokens generated."""

    def __init__(self, model: GPT, tok: Tokenizer, prompt: str | list[int], params: SamplingParams) -> None:
        self.model, self.tok, self.params = model, tok, params.validate()
        self.prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not self.prompt_ids:
            self.prompt_ids = [tok.eot_id]  # an empty prompt starts a fresh document
        self.finish_reason = "length"
        self.completion_tokens = 0
        self.text = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def __iter__(self) -> Iterator[str]:
        device = next(self.model.parameters()).device
        gen = None
        if self.params.seed is not None:
            gen = torch.Generator(device=device).manual_seed(self.params.seed)
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long)
        out: list[int] = []
        emitted = 0  # characters of self.text already yielded
        stops = [s for s in self.params.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        for nxt in generate_ids(self.model, prompt, self.params, gen):
            t = int(nxt[0])
            self.completion_tokens += 1
            if self.params.stop_at_eot and t == self.tok.eot_id:
                self.finish_reason = "stop"
                break
            out.append(t)
            self.text = self.tok.decode(out)
            hit = min((i for i in (self.text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
                break
            safe = len(self.text) - hold
            if self.text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                safe = min(safe, len(self.text) - 1)
            if safe > emitted:
                yield self.text[emitted:safe]
                emitted = safe
        if len(self.text) > emitted:
            yield self.text[emitted:]


def generate(model: GPT, tok: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The completion of `prompt` as one string."""
    return "".join(TextStream(model, tok, prompt, params))
