"""The inference engine: samples decoded in batches on one thread, apart from any HTTP.

Requests waiting together are decoded together in one batch when their sampling settings
match (prompts of different lengths are left-padded, see GPT.forward); others wait their turn
in a bounded queue, and a submission that would overflow it raises QueueFull. Each sample
keeps its own seed. A cancelled sample stops at the next token. A failure in a batch is retried
row by row, so that only the sample that caused it fails.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from gptkit.generate import Detokenizer, SamplingParams, generate_ids, seeded_generator
from gptkit.model import GPT
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


class Engine:
    def __init__(
        self, model: GPT, tok: Tokenizer, max_batch: int = 16, queue_limit: int = 64
    ) -> None:
        self.model, self.tok = model, tok
        self.max_batch, self.queue_limit = max_batch, queue_limit
        self.queue: deque[Job] = deque()
        self.active = 0  # jobs queued or running
        self.cv = threading.Condition()
        # decoded batches, their total rows and tokens (for /health and the load test)
        self.batches = 0
        self.rows = 0
        self.tokens = 0
        self.failures = 0  # samples that ended with an error
        self.thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)
        self.thread.start()

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
        while True:
            batch = self._take_batch()
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

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.rows += len(jobs)
        for job in jobs:
            job.detok = Detokenizer(self.tok, job.params, job.stop_ids, job.stops, job.skip_ids)
            job.token_logprobs = []
        live = [j for j in jobs if not j.cancelled and j.params.max_new_tokens > 0]
        for job in jobs:  # a prompt scored without generating: its forward pass is all it needs
            if job.echo_logprobs and not job.cancelled and job not in live:
                device = next(self.model.parameters()).device
                logits, _ = self.model(torch.tensor([job.prompt], device=device))
                job.prompt_logprobs = prompt_logprobs(job.prompt, logits[0], job.logprobs or 0)
        for job in jobs:
            if job not in live:
                job.detok.finish_reason = "length"
                job.send("", True)
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
        )
        for nxt in steps:
            # One top-k for the batch, at the widest N any row asked for.
            entries = token_logprobs(dist[0], nxt, top_n) if top_n is not None else []
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
            if not pending:
                break
