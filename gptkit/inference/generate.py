"""The sampling core: one function that `generate`, `chat` and `serve` all call.

Decoding runs through the KV cache, so each new token costs one position's forward pass. A
prompt longer than the context keeps its last block_size tokens; when the cache fills
during generation it is rebuilt from the last 3/4 of the context and decoding goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gptkit.errors import GptkitError, check_number
from gptkit.inference import native
from gptkit.model import GPT, KVCache
from gptkit.tokenizer import Tokenizer


class Speculation(Protocol):
    """What generate_ids needs of a draft (speculative.Speculator, which imports this module)."""

    def decode(self, model: GPT, prompt: torch.Tensor, params: SamplingParams, gen: Any,
               on_distribution: Any, on_prompt: Any) -> Iterator[torch.Tensor]: ...  # fmt: skip


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
    # OpenAI's: subtract presence_penalty once from every token generated so far, and
    # frequency_penalty once per time it was generated; add logit_bias[token] to its logit.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self) -> SamplingParams:
        """Refuse values that would break sampling; the CLI, the Python API and the server all call
        this."""
        check_number("max_new_tokens", self.max_new_tokens, 0, integer=True)
        check_number("temperature", self.temperature, 0, TEMPERATURE_MAX, hint="0 = greedy")
        check_number("top_k", self.top_k, 0, integer=True, hint="0 = off")
        check_number("top_p", self.top_p, 0, 1, low_open=True, hint="1 = off")
        check_number("repetition_penalty", self.repetition_penalty, *PENALTY_RANGE, hint="1 = off")
        if self.seed is not None:
            check_number("seed", self.seed, integer=True)
        check_number("frequency_penalty", self.frequency_penalty, -2, 2, hint="0 = off")
        check_number("presence_penalty", self.presence_penalty, -2, 2, hint="0 = off")
        for token, bias in self.logit_bias.items():
            check_number("logit_bias keys", token, 0, integer=True)
            check_number(f"logit_bias[{token}]", bias, -100, 100)
        return self

    def batch_key(self) -> tuple:
        """Settings that must be equal for rows to be sampled in one batched step."""
        return (
            self.temperature,
            self.top_k,
            self.top_p,
            self.repetition_penalty,
            self.frequency_penalty,
            self.presence_penalty,
            tuple(sorted(self.logit_bias.items())),
        )


TEMPERATURE_MAX = 100.0
PENALTY_RANGE = (0.01, 100.0)  # beyond it a float32 logit overflows or the penalty means nothing


def seeded_generator(
    seed: int | None, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """A generator for a request's seed. Any integer is accepted: it is reduced to the 64 bits
    the generator holds (torch refuses values outside them)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % (1 << 64))


def process_logits(
    logits: torch.Tensor,
    context: torch.Tensor | None,
    p: SamplingParams,
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply logit bias, presence / frequency penalties (on the generated tokens), repetition
    penalty (on the whole context), temperature, top-k and top-p to (B, V) logits."""
    logits = logits.float()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        ids_ok = ids < logits.size(-1)
        bias = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        logits = logits.index_add(1, ids[ids_ok], bias[ids_ok].expand(logits.size(0), -1))
    if (p.frequency_penalty or p.presence_penalty) and generated is not None and generated.size(1):
        counts = torch.zeros_like(logits).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=logits.dtype)
        )
        logits = (
            logits
            - p.frequency_penalty * counts
            - p.presence_penalty * (counts > 0).to(logits.dtype)
        )
    if p.repetition_penalty != 1.0 and context is not None:
        seen = logits.gather(1, context)
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, context, seen)
    if p.temperature == 0:
        return logits
    # Shift the best logit to 0 first, and keep the divisor a normal float32: then even a
    # temperature of 1e-45 gives 0 for the best token and -inf or large negatives, never nan.
    logits = (logits - logits.amax(-1, keepdim=True)) / max(p.temperature, 1e-30)
    if p.top_k > 0 and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop[:, 0] = False  # a top_p below float32's range (1e-100) would otherwise drop it too
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def process_history(
    logits: torch.Tensor, p: SamplingParams, history: list[int], prompt_len: int
) -> torch.Tensor:
    """process_logits for one sequence's (1, V) logits given its tokens so far as a list (the
    prompt's first prompt_len of them): the list becomes a tensor only when a penalty reads it."""
    context = generated = None
    if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        context = torch.tensor([history], device=logits.device)
        generated = context[:, prompt_len:]
    return process_logits(logits, context, p, generated)


def sample_next(
    logits: torch.Tensor,
    context: torch.Tensor,
    p: SamplingParams,
    gen: torch.Generator | list[torch.Generator | None] | None,
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row; gen may be one generator for the batch or one per row (each
    request of a batched server keeps its own seed)."""
    return choose_next(process_logits(logits, context, p, generated), p, gen)


def choose_next(
    logits: torch.Tensor,
    p: SamplingParams,
    gen: torch.Generator | list[torch.Generator | None] | None,
) -> torch.Tensor:
    """A token from each row of processed logits (process_logits): the best, or a sample."""
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if isinstance(gen, list):
        return torch.cat(
            [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(gen)]
        ).squeeze(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class StaticDecoder:
    """Decoding at fixed shapes, for a batch of `batch` rows over a cache as long as the context:
    the prompt is prefilled as usual, then every decode step reads and writes the same buffers
    (KVCache.at), so on CUDA the step is captured once in a CUDA graph and replayed -- one launch
    per token instead of a few hundred small kernels, which is what bounds small-batch decoding
    on a GPU. Elsewhere the same step runs eagerly (the same numbers; no faster on a CPU)."""

    def __init__(
        self,
        model: GPT,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        cache: KVCache | None = None,
    ) -> None:
        """cache: an existing zeroed cache of `batch` rows to decode in (the engine's pool)."""
        self.model = model
        cfg = model.config
        self.cache = cache or KVCache.empty(cfg, batch, cfg.block_size, device, dtype, zeroed=True)
        self.idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.at = torch.zeros(batch, dtype=torch.long, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.step_cache = KVCache(self.cache.k, self.cache.v, at=self.at)
        self.use_graph = device.type == "cuda"
        self.graph: Any = None  # torch.cuda.CUDAGraph, captured at the first step
        self.graph_error = ""  # why the capture failed, if it did (the steps then run eagerly)
        self.out: torch.Tensor | None = None

    def prefill(
        self, ids: torch.Tensor, pad: torch.Tensor | None, last_only: bool = True
    ) -> torch.Tensor:
        """Fill the cache from slot 0 with ids (B, T) (left-padded by pad); returns the logits."""
        self.cache.pos = 0
        logits, _ = self.model(ids, cache=self.cache, last_only=last_only, pad=pad)
        return logits

    def step(self, tokens: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, 1, V) after writing tokens (B,) at slot cache.pos, which the caller then
        advances. The result is overwritten by the next step."""
        self.idx.copy_(tokens[:, None])
        self.at.fill_(self.cache.pos)
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)
        if self.use_graph and self.graph is None:
            self._capture()
        if not self.use_graph:
            out = self._run()
        else:
            self.graph.replay()
            assert self.out is not None
            out = self.out
        return out

    def _run(self) -> torch.Tensor:
        return self.model(self.idx, cache=self.step_cache, pad=self.pad)[0]

    def _capture(self) -> None:
        # Warm-up runs on a side stream first (CUDA's rule for capture); they write the same
        # keys and values into the same slot as the real step, so they change nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.out = self._run()
        except RuntimeError as e:  # an operation CUDA cannot capture: decode eagerly instead
            self.use_graph, self.graph_error = False, f"{type(e).__name__}: {e}"
            return
        self.graph = graph


Step = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _stepper(
    model: GPT, batch: int, static: bool, device: torch.device, dtype: torch.dtype
) -> tuple[KVCache, Step]:
    """The cache decoding writes in, and the step that decodes one token a row into it at its
    position (advancing it), returning the (B, 1, V) logits: a StaticDecoder's, the native
    step's (where native.py covers the model), or the model's forward."""
    if static:
        decoder = StaticDecoder(model, batch, device, dtype)

        def static_step(nxt: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
            logits = decoder.step(nxt, pad)
            decoder.cache.pos += 1
            return logits

        return decoder.cache, static_step
    cache = KVCache.empty(model.config, batch, model.config.block_size, device, dtype)
    fast = native.decoder(model)
    if fast is not None:
        return cache, lambda nxt, pad: fast.step_batch(nxt, cache, pad)
    return cache, lambda nxt, pad: model(nxt[:, None], cache=cache, last_only=True, pad=pad)[0]


# inference_mode rather than no_grad: no version counters or view tracking on the hundreds of
# small tensors a token makes (measured: 5-7 % of a batch-1 CPU decoding step).
@torch.inference_mode()
def generate_ids(
    model: GPT,
    prompt: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | list[torch.Generator | None] | None = None,
    pad: torch.Tensor | None = None,
    on_distribution: Callable[[torch.Tensor], None] | None = None,
    on_prompt: Callable[[torch.Tensor], None] | None = None,
    static: bool = False,
    speculator: Speculation | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) for a batch of prompts (B, T), one step at a time. Prompts
    of unequal length come left-padded, pad[b] tokens in row b (see GPT.forward).
    on_distribution receives, before each token is drawn, the (B, V) log-probabilities it is
    drawn from: after penalties, temperature, top-k and top-p (greedy: the model's, penalised).
    on_prompt receives the prefill's (B, T, V) logits at every prompt position, so that scoring
    a prompt (echo) costs no forward pass of its own.
    static: decode through a StaticDecoder (a CUDA graph on CUDA); the same tokens.
    speculator: one prompt decoded speculatively (speculative.py); the same tokens greedy."""
    if speculator is not None and prompt.size(0) == 1 and pad is None:
        g = gen[0] if isinstance(gen, list) else gen
        return (yield from speculator.decode(model, prompt, params, g, on_distribution, on_prompt))
    block = model.config.block_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = prompt.to(device)
    pad = pad.to(device) if pad is not None else None
    if ids.size(1) == 0:
        raise GptkitError("the prompt is empty; give at least one token")
    context = ids  # everything so far, for the repetition penalty
    cache, step = _stepper(model, ids.size(0), static, device, dtype)
    if ids.size(1) > block and pad is not None:
        pad = (pad - (ids.size(1) - block)).clamp(min=0)
    logits, _ = model(ids[:, -block:], cache=cache, last_only=on_prompt is None, pad=pad)
    if on_prompt is not None:
        on_prompt(logits)
        logits = logits[:, -1:]
    start = context.size(1)
    for _ in range(params.max_new_tokens):
        processed = process_logits(logits[:, -1], context, params, context[:, start:])
        if on_distribution is not None:
            on_distribution(processed.log_softmax(-1))
        nxt = choose_next(processed, params, gen)
        yield nxt
        context = torch.cat([context, nxt[:, None]], dim=1)
        if cache.pos >= block:
            keep = max(1, block * 3 // 4)
            if pad is not None:
                pad = (pad - (cache.pos + 1 - keep)).clamp(min=0)
            cache.pos = 0
            logits, _ = model(context[:, -keep:], cache=cache, last_only=True, pad=pad)
        else:
            logits = step(nxt, pad)


class Detokenizer:
    """Turns one sample's token ids into text deltas, holding back what may still become a stop
    string and half-decoded characters. `feed` returns the new text; `done` says the sample has
    ended ("stop": a stop id or string, "length": max_new_tokens)."""

    def __init__(
        self,
        tok: Tokenizer,
        params: SamplingParams,
        stop_ids: set[int],
        stops: list[str],
        skip_ids: frozenset[int] = frozenset(),
    ) -> None:
        """skip_ids: tokens that count but are not written as text (special tokens, for serve)."""
        self.tok, self.params, self.stop_ids, self.stops, self.skip_ids = (
            tok,
            params,
            stop_ids,
            [s for s in stops if s],
            skip_ids,
        )
        # a stop string may still be forming
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.out: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already returned
        self.completion_tokens = 0
        self.finish_reason = ""

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    def feed(self, t: int) -> str:
        self.completion_tokens += 1
        if t in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        if t not in self.skip_ids:
            self.out.append(t)
        self.text = self.tok.decode(self.out)
        starts = (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops)
        hit = min((i for i in starts if i >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            self.finish_reason = "stop"
            return self.flush()
        if self.completion_tokens >= self.params.max_new_tokens:
            self.finish_reason = "length"
            return self.flush()
        safe = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            safe = min(safe, len(self.text) - 1)
        if safe > self.emitted:
            delta, self.emitted = self.text[self.emitted : safe], safe
            return delta
        return ""

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


def stop_token_ids(tok: Tokenizer, params: SamplingParams, extra: Iterable[int] = ()) -> set[int]:
    """The token ids that end a sample: `extra` and, when params.stop_at_eot, end-of-text."""
    return set(extra) | (set(tok.eos_ids) if params.stop_at_eot else set())


class TextStream:
    """Text deltas of one sample, stopping at a stop string (not included), at a stop token
    (end-of-text by default), or after max_new_tokens. After iteration, `finish_reason` is
    "stop" or "length" and `completion_tokens` counts the tokens generated."""

    def __init__(
        self,
        model: GPT,
        tok: Tokenizer,
        prompt: str | list[int],
        params: SamplingParams,
        stop_ids: list[int] | None = None,
        extra_stop: list[str] | None = None,
        static: bool = False,
        speculator: Speculation | None = None,
    ) -> None:
        """stop_ids: token ids that end the sample (besides end-of-text, when params.stop_at_eot);
        extra_stop: stop strings added to params.stop (a chat template's end of turn);
        static: decode through a StaticDecoder (a CUDA graph on CUDA);
        speculator: decode speculatively with its draft (speculative.py)."""
        self.model, self.tok, self.params = model, tok, params.validate()
        self.static, self.speculator = static, speculator
        ids = stop_token_ids(tok, params, stop_ids or [])
        self.prompt_ids = tok.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not self.prompt_ids:  # an empty prompt starts a fresh document
            self.prompt_ids = [tok.bos_id if tok.bos_id is not None else tok.eot_id]
        self.detok = Detokenizer(tok, self.params, ids, list(params.stop) + list(extra_stop or []))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.detok.completion_tokens

    @property
    def finish_reason(self) -> str:
        return self.detok.finish_reason or "length"

    @property
    def text(self) -> str:
        return self.detok.text

    def __iter__(self) -> Iterator[str]:
        if self.params.max_new_tokens == 0:
            return
        device = next(self.model.parameters()).device
        gen = seeded_generator(self.params.seed, device)
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long)
        steps = generate_ids(
            self.model, prompt, self.params, gen, static=self.static, speculator=self.speculator
        )
        for nxt in steps:
            delta = self.detok.feed(int(nxt[0]))
            if delta:
                yield delta
            if self.detok.done:
                break


def generate(
    model: GPT, tok: Tokenizer, prompt: str | list[int], params: SamplingParams, **stops: Any
) -> str:
    """The completion of `prompt` as one string (stops: TextStream's stop_ids and extra_stop)."""
    return "".join(TextStream(model, tok, prompt, params, **stops))
