"""The inference engine: samples decoded in batches on one thread, apart from any HTTP.

Continuous batching (the default): a request joins the running batch at the next decode step
and leaves it the step it finishes. Its prompt is prefilled alone into one slot of a fixed pool
of KV-cache slots (max_batch of them, each the model's context long, allocated once), then it
decodes alongside the others, each row with its own sampling settings and seed, so any requests
share a step. Rows sit right-aligned on the pool's time axis: a row's tokens occupy positions
[start, pos), and its `start` is the left padding of the batched forward (see GPT.forward), so
each row computes what it would alone. When the pool's time axis is full, rows at the full
context drop their oldest quarter (recomputed, as generate_ids does) and everyone moves left.
A prompt that begins like a recent one (the same system prompt, the next turn of a chat) copies
that beginning's keys and values from a bounded prefix cache instead of computing it. With a
draft model (speculative.py), a row decoding alone is decoded speculatively: up to k + 1 tokens
a step. Batched rows already share each pass over the weights, so they decode one token each.

The static scheduler (`continuous=False`, `gptkit serve --scheduler static`), kept for
comparison: requests waiting together are decoded together when their sampling settings match,
and a batch runs until its longest sample ends.

Either way, submissions beyond the bounded queue raise QueueFull, a cancelled sample stops at
the next token, and a failure stays with the sample that caused it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from gptkit.errors import GptkitError
from gptkit.inference import native
from gptkit.inference.generate import (
    Detokenizer,
    SamplingParams,
    StaticDecoder,
    choose_next,
    generate_ids,
    process_history,
    seeded_generator,
    stop_token_ids,
)
from gptkit.inference.speculative import Drafter, Speculator
from gptkit.model import GPT, KVCache
from gptkit.tokenizer import Tokenizer


@dataclass(eq=False)  # identity, not field-by-field comparison: two choices may be alike
class Job:
    """One sample (one choice) of one request."""

    index: int  # the choice's index in its request
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    stops: list[str]
    # (job, text delta, finished); called on the engine thread
    emit: Callable[[Job, str, bool], None]
    skip_ids: frozenset[int] = frozenset()  # tokens not written as text (special tokens)
    logprobs: int | None = None  # record each generated token's log-probability and the top N
    echo_logprobs: bool = False  # score the prompt's tokens too (the first has none)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # as generated
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    cancelled: bool = False
    detok: Detokenizer | None = None
    # set when generation failed for this sample; it finishes with no text of the failure
    error: str = ""
    # retried alone after its batch failed, so that a failure stays with its own row
    solo: bool = False
    emitted: bool = False

    def key(self) -> tuple:
        return ("solo", id(self)) if self.solo else self.params.batch_key()

    def send(self, delta: str, done: bool) -> None:
        self.emitted = self.emitted or bool(delta)
        self.emit(self, delta, done)


@dataclass
class TokenLogprob:
    """One token's log-probability (None for a prompt's first token, which nothing predicts) and
    the most likely alternatives at its position, as (token id, log-probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, n: int) -> list[TokenLogprob]:
    """Each row's token from (R, V) log-probabilities, with its log-probability and the row's n
    most likely tokens, in one top-k for all rows; tokens a distribution excludes (-inf: top-k,
    top-p) are left out, so every value is a finite number."""
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    if n <= 0:
        return [TokenLogprob(t, c, []) for t, c in zip(tokens.tolist(), chosen)]
    values, ids = logprobs.topk(min(n, logprobs.size(-1)), dim=-1)
    return [
        TokenLogprob(t, c, [(i, v) for i, v in zip(row_ids, row_values) if v != float("-inf")])
        for t, c, row_ids, row_values in zip(tokens.tolist(), chosen, ids.tolist(), values.tolist())
    ]


def prompt_logprobs(prompt: list[int], logits: torch.Tensor, n: int) -> list[TokenLogprob]:
    """A prompt's tokens scored by the model's (T, V) logits over it: each token given the ones
    before (the model's own distribution, no sampling settings); the first has none."""
    lp = logits[: len(prompt) - 1].float().log_softmax(-1)
    target = torch.tensor(prompt[1:], device=logits.device)
    return [TokenLogprob(prompt[0], None, []), *token_logprobs(lp, target, n)]


class QueueFull(Exception):
    pass


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Keys and values of recent token sequences, each computed from position 0: every prompt
    as it is prefilled, and every finished sample's prompt and reply. A new prompt that begins
    like one of them (the same system prompt, the next turn of a conversation) copies that part
    instead of recomputing it. Bounded by max_tokens positions in all, least recently used
    first out; a sequence that another extends is kept once, as the longer one."""

    MIN_TOKENS = 4  # shorter shared beginnings are not worth a copy

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )
        self.tokens = 0  # positions held
        self.hits = 0  # prompts that reused a beginning
        self.reused = 0  # prompt positions copied instead of computed

    def longest(self, ids: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, int]:
        """The entry sharing the longest beginning with ids, and that length."""
        best, n = None, 0
        for key in self.entries:
            m = common_prefix(key, ids)
            if m > n:
                best, n = key, m
        if best is None or n < self.MIN_TOKENS:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], n

    def add(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys and values (n_layer, 1, kv_heads, len(ids), head_dim) of ids."""
        key = tuple(ids)
        if not self.MIN_TOKENS <= len(key) <= self.max_tokens:
            return
        for old in list(self.entries):
            if len(old) >= len(key) and old[: len(key)] == key:
                self.entries.move_to_end(old)  # already held, inside a longer one
                return
            if key[: len(old)] == old:
                self._drop(old)  # this one extends it
        self.entries[key] = (k, v)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        del self.entries[key]
        self.tokens -= len(key)


@dataclass(eq=False)
class _Row:
    """A sample decoding in the pool: its slot, where its cached tokens start on the pool's time
    axis, and every token so far (the last one not yet in the cache: the next step's input)."""

    job: Job
    slot: int
    start: int
    context: list[int]
    prompt_len: int
    gen: torch.Generator | None
    drafter: Drafter | None = None  # speculative decoding: the draft's cache for this row


@dataclass(eq=False)
class _Prefill:
    """A prompt being prefilled, a chunk per engine step, into a one-row cache of its own."""

    job: Job
    ids: list[int]
    cache: KVCache
    # echo: every chunk's logits (the prompt's log-probabilities); else the last position's
    logits: list[torch.Tensor] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: GPT,
        tok: Tokenizer,
        max_batch: int = 16,
        queue_limit: int = 64,
        continuous: bool = True,
        static: bool = False,
        prefix_cache_tokens: int | None = None,
        prefill_chunk: int = 256,
        speculator: Speculator | None = None,
    ) -> None:
        """static (continuous only): every decode step runs at the pool's full width through a
        StaticDecoder, captured in a CUDA graph on CUDA (`gptkit serve --cuda-graph`).
        prefix_cache_tokens (continuous only): positions of keys and values kept for prompts that
        begin alike (PrefixCache); default as many as the pool holds, 0 for none.
        prefill_chunk (continuous only): prompt positions prefilled between two decode steps, so
        that a long prompt delays the rows decoding by one chunk at a time, not its whole length.
        speculator: a draft model; a row decoding alone is decoded speculatively with it."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.speculator = speculator
        self.filling: deque[_Prefill] = deque()  # continuous: prompts being prefilled, in order
        self.model, self.tok = model, tok
        if prefix_cache_tokens is None:
            prefix_cache_tokens = max_batch * model.config.block_size
        on = prefix_cache_tokens > 0 and continuous
        self.prefixes = PrefixCache(prefix_cache_tokens) if on else None
        self.prefill_tokens = 0  # prompt positions computed (not copied from the prefix cache)
        self.static = static and continuous
        self.decoder: StaticDecoder | None = None
        # decode steps in one native call (native.py), where it covers the model
        self.fast = native.decoder(model)
        self.max_batch, self.queue_limit = max_batch, queue_limit
        self.continuous = continuous
        self.device = next(model.parameters()).device
        self.rows_live: list[_Row] = []  # continuous: rows decoding, row i in slot i
        self.pool: KVCache | None = None
        self.queue: deque[Job] = deque()
        self.active = 0  # jobs queued or running
        self.cv = threading.Condition()
        # decoded batches, their total rows and tokens (for /health and the load test)
        self.batches = 0
        self.rows = 0
        self.tokens = 0
        self.failures = 0  # samples that ended with an error
        # decode steps and the rows they decoded together (the mean batch, for /health)
        self.steps = 0
        self.step_rows = 0
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)
        self.thread.start()

    def generate_many(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        stop_ids: Iterable[int] = (),
        stops: Iterable[str] = (),
    ) -> list[str]:
        """The completions of many prompts, decoded together as the engine schedules them, in
        order: each the text TextStream gives for it alone (the one sampling core), ending at a
        stop string (params' and `stops`), at a stop id, at end-of-text when params.stop_at_eot,
        or after max_new_tokens. For callers with many prompts (evaluation)."""
        finished = threading.Semaphore(0)
        jobs = []
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            p = p.validate()
            ends = stop_token_ids(self.tok, p, stop_ids)
            jobs.append(
                Job(
                    i,
                    list(ids) or [self.tok.eot_id],
                    p,
                    ends,
                    [*p.stop, *stops],
                    lambda job, delta, done: done and finished.release(),
                )  # fmt: skip
            )
        for lo in range(0, len(jobs), self.queue_limit):  # never more than the queue holds
            part = jobs[lo : lo + self.queue_limit]
            self.submit(part)
            for _ in part:
                finished.acquire()
        failed = next((j.error for j in jobs if j.error), None)
        if failed:
            raise GptkitError(failed)
        return [j.detok.text if j.detok is not None else "" for j in jobs]

    def close(self) -> None:
        """Stop the engine's thread once what is queued and decoding has finished."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join()

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
                if self.closed:
                    return []
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
        if self.continuous:
            self._loop_continuous()
            return
        while True:
            batch = self._take_batch()
            if not batch:  # closed
                return
            retry: list[Job] = []
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 -- no bad row may end the server, or its batch
                unfinished = [j for j in batch if j.detok is None or not j.detok.done]
                for job in unfinished:
                    if len(batch) > 1 and not job.emitted:
                        # Run it again alone: only the culprit fails.
                        job.solo, job.detok = True, None
                        retry.append(job)
                    else:
                        job.error = f"generation failed: {type(e).__name__}: {e}"
                        self.failures += 1
                        job.send("", True)
            finally:
                with self.cv:
                    self.active -= len(batch) - len(retry)
                    self.queue.extendleft(reversed(retry))

    @torch.inference_mode()
    def _start(self, jobs: list[Job]) -> list[Job]:
        """Each job's detokenizer; the jobs with nothing to generate are answered here (a prompt
        to score, or none), and the ones left to decode are returned."""
        self.batches += 1
        self.rows += len(jobs)
        for job in jobs:
            job.detok = Detokenizer(self.tok, job.params, job.stop_ids, job.stops, job.skip_ids)
            job.token_logprobs = []
        live = [j for j in jobs if not j.cancelled and j.params.max_new_tokens > 0]
        for job in jobs:
            if job.echo_logprobs and not job.cancelled and job not in live:
                self._score_prompt(job)
        for job in jobs:
            if job not in live:
                job.detok.finish_reason = "length"
                job.send("", True)
        return live

    def _run(self, jobs: list[Job]) -> None:
        live = self._start(jobs)
        if not live:
            return
        width = max(len(j.prompt) for j in live)
        pad = torch.tensor([width - len(j.prompt) for j in live])
        ids = torch.tensor([[self.tok.eot_id] * (width - len(j.prompt)) + j.prompt for j in live])
        gens = [seeded_generator(j.params.seed) for j in live]
        params = replace(live[0].params, max_new_tokens=max(j.params.max_new_tokens for j in live))
        pending = set(range(len(live)))
        dist: list[torch.Tensor] = []  # the distribution the latest tokens were drawn from

        def keep(logprobs: torch.Tensor) -> None:
            dist[:] = [logprobs]

        def score_prompts(logits: torch.Tensor) -> None:  # the prefill's logits, rows left-padded
            for row, job in enumerate(live):
                if job.echo_logprobs:
                    start = width - len(job.prompt)
                    job.prompt_logprobs = prompt_logprobs(
                        job.prompt, logits[row, start:], job.logprobs or 0
                    )

        top_n = max((j.logprobs for j in live if j.logprobs is not None), default=None)
        echo = any(j.echo_logprobs for j in live)
        steps = generate_ids(
            self.model,
            ids,
            params,
            gens if any(gens) else None,
            pad if pad.any() else None,
            keep if top_n is not None else None,
            score_prompts if echo else None,
            speculator=self.speculator if len(live) == 1 else None,
        )
        for nxt in steps:
            self.steps += 1
            self.step_rows += len(pending)
            # One top-k for the batch, at the widest N any row asked for.
            entries = token_logprobs(dist[0], nxt, top_n) if top_n is not None else []
            self._deliver(live, pending, nxt, entries)
            if not pending:
                break

    def _deliver(
        self, live: list[Job], pending: set[int], nxt: torch.Tensor, entries: list
    ) -> None:
        """A decoding step's tokens to the rows still pending; finished rows leave `pending`."""
        for i in list(pending):
            job = live[i]
            if job.cancelled:
                pending.discard(i)
                continue
            if job.logprobs is not None:
                entry = entries[i]
                job.token_logprobs.append(
                    TokenLogprob(entry.token, entry.logprob, entry.top[: job.logprobs])
                )
            delta = job.detok.feed(int(nxt[i]))
            self.tokens += 1
            if delta or job.detok.done:
                job.send(delta, job.detok.done)
            if job.detok.done:
                pending.discard(i)

    def _score_prompt(self, job: Job) -> None:
        """A prompt scored without generating: its forward pass is all it needs."""
        logits, _ = self.model(torch.tensor([job.prompt], device=self.device))
        job.prompt_logprobs = prompt_logprobs(job.prompt, logits[0], job.logprobs or 0)

    # --- continuous batching ---

    @torch.inference_mode()
    def _loop_continuous(self) -> None:
        cfg = self.model.config
        dtype = next(self.model.parameters()).dtype
        # Zeroed, not just allocated: a row's masked positions still enter the attention product
        # (with weight 0), and 0 x NaN from uninitialised memory would be NaN.
        self.pool = KVCache.empty(
            cfg, self.max_batch, cfg.block_size, self.device, dtype, zeroed=True
        )
        if self.static:
            self.decoder = StaticDecoder(self.model, self.max_batch, self.device, dtype, self.pool)
        while True:
            with self.cv:
                while not self.queue and not self.rows_live and not self.filling:
                    if self.closed:
                        return
                    self.cv.wait()
                room = self.max_batch - len(self.rows_live) - len(self.filling)
                admit = [self.queue.popleft() for _ in range(min(room, len(self.queue)))]
            for job in admit:
                try:
                    self._admit(job)
                except Exception as e:  # noqa: BLE001 -- a bad prompt fails its own request only
                    self._fail(job, e)
            self._fill()
            if self.rows_live:
                try:
                    alone = len(self.rows_live) == 1 and not self.filling and not self.queue
                    if alone and self.speculator is not None:
                        self._speculate(self.rows_live[0])
                    else:
                        self._step()
                except Exception as e:  # noqa: BLE001 -- the engine thread must outlive any bug
                    for row in list(self.rows_live):
                        self._fail(row.job, e)

    def _end(self, job: Job, delta: str = "") -> None:
        """The sample is over: its slot and queue place are free before its last text goes out."""
        row = next((r for r in self.rows_live if r.job is job), None)
        if row is not None:
            self._release(row)
        with self.cv:
            self.active -= 1
        if not job.cancelled:
            job.send(delta, True)

    def _fail(self, job: Job, e: Exception) -> None:
        job.error = f"generation failed: {type(e).__name__}: {e}"
        self.failures += 1
        self._end(job)

    def _release(self, row: _Row) -> None:
        """Free a row's slot; the last row moves into it, so rows in use stay slots 0..n-1. A row
        whose cache still starts at its first token leaves its prompt and reply to the prefix
        cache (the next turn of a conversation begins with them)."""
        assert self.pool is not None
        span = slice(row.start, self.pool.pos)
        if self.prefixes is not None and self.pool.pos - row.start == len(row.context) - 1:
            k = self.pool.k[:, row.slot : row.slot + 1, :, span].clone()
            v = self.pool.v[:, row.slot : row.slot + 1, :, span].clone()
            self.prefixes.add(row.context[:-1], k, v)
        last = self.rows_live.pop()
        if last is not row:
            span = slice(last.start, self.pool.pos)
            self.pool.k[:, row.slot, :, span] = self.pool.k[:, last.slot, :, span]
            self.pool.v[:, row.slot, :, span] = self.pool.v[:, last.slot, :, span]
            last.slot = row.slot
            self.rows_live[row.slot] = last
        if not self.rows_live:
            self.pool.pos = 0

    def _cache_for(self, ids: list[int], share: bool) -> KVCache:
        """A one-row cache for ids; share: its beginning copied from the prefix cache when one
        held begins alike (the last token is always computed: its logits say what comes next)."""
        cache = KVCache.empty(
            self.model.config,
            1,
            len(ids),
            self.device,
            self.pool.k.dtype,  # type: ignore[union-attr]
        )
        reuse = self.prefixes if share else None
        if reuse is not None:
            held, n = reuse.longest(ids)
            n = min(n, len(ids) - 1)
            if held is not None and n > 0:
                cache.k[:, :, :, :n] = held[0][:, :, :, :n]
                cache.v[:, :, :, :n] = held[1][:, :, :, :n]
                cache.pos = n
                reuse.hits += 1
                reuse.reused += n
        return cache

    def _prefill(self, ids: list[int]) -> KVCache:
        """ids prefilled at once into a cache of their own (a row's kept context, recomputed)."""
        cache = self._cache_for(ids, share=False)
        self.model(torch.tensor([ids], device=self.device), cache=cache, last_only=True)
        self.prefill_tokens += len(ids)
        return cache

    def _place(self, slot: int, cache: KVCache) -> int:
        """Copy a prefilled cache into a slot, ending at the pool's current position; returns
        where it starts. Rows already there move right when the pool holds fewer positions."""
        pool = self.pool
        assert pool is not None
        n = cache.pos
        if pool.pos < n:
            self._shift(n - pool.pos)
        pool.k[:, slot, :, pool.pos - n : pool.pos] = cache.k[:, 0, :, :n]
        pool.v[:, slot, :, pool.pos - n : pool.pos] = cache.v[:, 0, :, :n]
        return pool.pos - n

    def _admit(self, job: Job) -> None:
        job.detok = Detokenizer(self.tok, job.params, job.stop_ids, job.stops, job.skip_ids)
        job.token_logprobs = []
        if job.cancelled or job.params.max_new_tokens <= 0:
            if job.echo_logprobs and not job.cancelled:
                self._score_prompt(job)
            job.detok.finish_reason = "length"
            self._end(job)
            return
        ids = job.prompt[-self.model.config.block_size :]
        cache = self._cache_for(ids, share=not job.echo_logprobs)
        self.filling.append(_Prefill(job, ids, cache))

    def _fill(self) -> None:
        """Prefill up to prefill_chunk prompt positions, oldest prompt first; each prompt that
        is complete takes a slot and samples its first token."""
        budget = self.prefill_chunk
        while self.filling and budget > 0:
            f = self.filling[0]
            job, cache = f.job, f.cache
            if job.cancelled:
                self.filling.popleft()
                self._end(job)
                continue
            n = min(budget, len(f.ids) - cache.pos)
            try:
                chunk = torch.tensor([f.ids[cache.pos : cache.pos + n]], device=self.device)
                logits, _ = self.model(chunk, cache=cache, last_only=not job.echo_logprobs)
            except Exception as e:  # noqa: BLE001 -- a bad prompt fails its own request only
                self.filling.popleft()
                self._fail(job, e)
                continue
            self.prefill_tokens += n
            budget -= n
            if job.echo_logprobs:
                f.logits.append(logits)
            else:
                f.logits = [logits[:, -1:]]
            if cache.pos == len(f.ids):
                self.filling.popleft()
                try:
                    self._start(f)
                except Exception as e:  # noqa: BLE001
                    self._fail(job, e)

    def _start(self, f: _Prefill) -> None:
        """A prefilled prompt joins the decoding rows."""
        job, ids = f.job, f.ids
        if self.prefixes is not None and not job.echo_logprobs:
            self.prefixes.add(ids, f.cache.k.clone(), f.cache.v.clone())
        if job.echo_logprobs:
            logits = torch.cat(f.logits, dim=1)
            job.prompt_logprobs = prompt_logprobs(ids, logits[0], job.logprobs or 0)
        slot = len(self.rows_live)
        start = self._place(slot, f.cache)
        gen = seeded_generator(job.params.seed, self.device)
        row = _Row(job, slot, start, list(ids), len(ids), gen)
        self.rows_live.append(row)
        self.rows += 1
        self._sample(row, f.logits[-1][:, -1])

    def _sample(self, row: _Row, logits: torch.Tensor) -> None:
        """The row's next token from its (1, V) logits with its own settings, through the one
        sampling core (process_logits, choose_next); then its text, or its end."""
        p = row.job.params
        processed = process_history(logits, p, row.context, row.prompt_len)
        self._take(row, int(choose_next(processed, p, row.gen)[0]), processed)

    def _take(self, row: _Row, token: int, processed: torch.Tensor) -> None:
        """The row's next token, drawn from processed (1, V) logits: its text, or its end."""
        job = row.job
        if job.logprobs is not None:
            nxt = torch.tensor([token], device=processed.device)
            job.token_logprobs += token_logprobs(processed.log_softmax(-1), nxt, job.logprobs)
        row.context.append(token)
        self.tokens += 1
        delta = job.detok.feed(token)  # type: ignore[union-attr]
        if job.detok.done:  # type: ignore[union-attr]
            self._end(job, delta)
        elif delta:
            job.send(delta, False)

    def _make_room(self) -> None:
        """The pool's time axis is full: rows at the full context keep their last 3/4 (recomputed,
        as generate_ids does), then every row moves left by the smallest start."""
        pool = self.pool
        assert pool is not None
        block = self.model.config.block_size
        keep = max(1, block * 3 // 4)
        for row in self.rows_live:
            if row.start == 0:
                kept = row.context[-keep:-1]
                if kept:
                    row.start = self._place(row.slot, self._prefill(kept))
                else:
                    row.start = pool.pos
        m = min(r.start for r in self.rows_live)
        if m:
            self._shift(-m)

    def _shift(self, by: int) -> None:
        """Move every row's cached positions `by` places along the pool's time axis (right:
        room on the left for a longer prompt; left: room at the end)."""
        pool = self.pool
        assert pool is not None
        n, lo = len(self.rows_live), min(r.start for r in self.rows_live) if self.rows_live else 0
        if n and pool.pos > lo:
            src = slice(lo, pool.pos)
            dst = slice(lo + by, pool.pos + by)
            pool.k[:, :n, :, dst] = pool.k[:, :n, :, src].clone()
            pool.v[:, :n, :, dst] = pool.v[:, :n, :, src].clone()
        for r in self.rows_live:
            r.start += by
        pool.pos += by

    def _forward(self, rows: list[_Row], lo: int, hi: int) -> torch.Tensor:
        """One decode step for rows lo..hi-1 (their slots), writing at the pool's position."""
        pool = self.pool
        assert pool is not None
        if self.decoder is not None and (lo, hi) == (0, len(rows)):
            # The whole pool: free slots decode token 0 seeing only their own slot (pad = pos).
            n, width = hi, self.max_batch
            tokens = [r.context[-1] for r in rows] + [0] * (width - n)
            pad = [r.start for r in rows] + [pool.pos] * (width - n)
            x, p = (torch.tensor(v, device=self.device) for v in (tokens, pad))
            return self.decoder.step(x, p)[:n, -1]
        if self.fast is not None:
            at, first = pool.pos, [r.start for r in rows[lo:hi]]
            tokens = [r.context[-1] for r in rows[lo:hi]]
            k, v = pool.k[:, lo:hi], pool.v[:, lo:hi]
            return self.fast.step_rows(tokens, [at - f for f in first], first, at, k, v)
        view = KVCache(pool.k[:, lo:hi], pool.v[:, lo:hi], pool.pos)
        x = torch.tensor([[r.context[-1]] for r in rows[lo:hi]], device=self.device)
        pad = torch.tensor([r.start for r in rows[lo:hi]], device=self.device)
        logits, _ = self.model(x, cache=view, last_only=True, pad=pad if bool(pad.any()) else None)
        return logits[:, -1]

    def _speculate(self, row: _Row) -> None:
        """A decode step for a row alone: its draft guesses up to k tokens, and one forward pass
        of the pool's slot 0 checks them (speculative.verify); a step yields 1 to k + 1 tokens."""
        job, pool, spec = row.job, self.pool, self.speculator
        assert pool is not None and spec is not None and job.detok is not None
        if job.cancelled:
            self._end(job)
            return
        block = self.model.config.block_size
        left = job.params.max_new_tokens - job.detok.completion_tokens
        k = min(spec.k, left - 1, block - pool.pos - 1)
        if row.drafter is None:
            row.drafter = spec.sequence()
        if k < 1 or row.drafter.off:  # one token left, or a draft this row switched off
            self._step()
            return
        view = KVCache(pool.k[:, :1], pool.v[:, :1], pool.pos)
        pad = torch.tensor([row.start], device=self.device) if row.start else None
        tokens, dists = row.drafter.speculate(self.model, row.context, k, job.params, row.gen,
                                          row.prompt_len, view, pad, self.fast)  # fmt: skip
        self.steps += 1
        self.step_rows += 1
        self.batches += 1
        before = pool.pos
        for i, (token, dist) in enumerate(zip(tokens, dists)):
            pool.pos = before + i + 1  # the cache holds every token of the row but its newest
            self._take(row, token, dist)
            if job.detok.done:
                return

    def _step(self) -> None:
        for row in [r for r in self.rows_live if r.job.cancelled]:
            self._end(row.job)
        if not self.rows_live:
            return
        pool = self.pool
        assert pool is not None
        if pool.pos >= self.model.config.block_size:
            self._make_room()
        rows = list(self.rows_live)
        self.batches += 1  # continuous: every step is a batch of whoever is decoding
        self.steps += 1
        self.step_rows += len(rows)
        try:
            logits: list[torch.Tensor | None] = list(self._forward(rows, 0, len(rows)))
        except Exception:  # noqa: BLE001 -- find the row that broke the step: each alone
            logits = []
            for i in range(len(rows)):
                try:
                    logits.append(self._forward(rows, i, i + 1)[0])
                except Exception as e:  # noqa: BLE001
                    logits.append(None)
                    rows[i].job.error = f"generation failed: {type(e).__name__}: {e}"
        pool.pos += 1
        for row, row_logits in zip(rows, logits):
            job = row.job
            if row_logits is None:
                self.failures += 1
                self._end(job)
                continue
            try:
                self._sample(row, row_logits[None])
            except Exception as e:  # noqa: BLE001
                self._fail(job, e)


def generate_many(
    model: GPT,
    tok: Tokenizer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    max_batch: int,
    stop_ids: Iterable[int] = (),
    stops: Iterable[str] = (),
    speculator: Speculator | None = None,
) -> list[str]:
    """Engine.generate_many on an engine of its own (max_batch rows at a time), closed after:
    for callers that decode many prompts once (evaluation, `generate --num-samples`)."""
    engine = Engine(
        model, tok, max_batch=max_batch, queue_limit=max(max_batch, 64), speculator=speculator
    )
    try:
        return engine.generate_many(prompts, params, stop_ids, stops)
    finally:
        engine.close()
