"""Speculative decoding: a small draft model guesses the next k tokens one at a time, and the
target checks all k in one forward pass, which at batch 1 costs little more than one token's
(the pass streams the weights once either way). The target keeps a prefix of the guesses and
adds one token of its own, so every round yields between 1 and k + 1 tokens.

Which guesses are kept is the standard rule (Leviathan et al. 2023; Chen et al. 2023), with p
and q the target's and the draft's distributions after the request's sampling settings:

- greedy: a guess is kept while it is the target's argmax; the first that is not is replaced
  by the argmax. The tokens are the target's own greedy tokens, given that the target's logits
  over k + 1 positions at once equal its logits one position at a time (int4: exactly; fp32: to
  float rounding; int8 with int8 activations: exactly, its products run row by row then).
- sampled: guess x is kept with probability min(1, p(x) / q(x)); the first one refused is
  replaced by a draw from max(0, p - q), normalised. Each token is then distributed exactly as
  p, whatever the draft (tests/test_speculative.py checks it over many seeds). When every guess
  is kept, the extra token is drawn from the target's next distribution.

The draft only proposes, so any model sharing the target's tokenizer works, of any size,
quantized or not; a better draft means more tokens kept a round, never different output.

A guess the draft itself is unsure of is usually refused, and costs a draft step and a row of
the checking pass for nothing. So the draft stops guessing for the round once its most likely
next token has probability below `p_min` (`--draft-p-min`, as llama.cpp's draft p-min and
transformers' assistant confidence threshold do); at the first position that makes the round a
plain decoding step. The decision reads only the draft's distribution, never the token it would
draw, so the sampled output stays distributed as the target's.

A draft that is mostly wrong for a sequence makes it slower than plain decoding, since a round
costs more than a step. So once a sequence has had `warmup` rounds and the share of its guesses
kept is below `min_acceptance` (`--draft-min-acceptance`), it decodes plainly from then on. By
default that share is about where a round stops paying for itself, as measured on this project's
benchmark: 0.35 for a float target, 0.6 for a quantized one (its checking rows cost more). The
switch depends on counts only, so a seeded sample repeats; and whichever way each token is
made, it is drawn from the target's distribution given the tokens before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gptkit.errors import GptkitError
from gptkit.inference import native
from gptkit.inference.generate import SamplingParams, choose_next, process_history
from gptkit.inference.qlinear import QuantizedLinear, rows_alone
from gptkit.model import GPT, KVCache
from gptkit.tokenizer import Tokenizer, fingerprint

MAX_DRAFT_TOKENS = 16
DEFAULT_P_MIN = 0.0
WARMUP_ROUNDS = 8


@dataclass
class Speculator:
    """A draft model and how many tokens it guesses a round, with the counts of guesses made and
    kept (the acceptance rate) over every sequence it has served. Built directly, it never
    switches a sequence off (min_acceptance 0); load_speculator sets the target's default."""

    draft: GPT
    k: int = 4
    name: str = ""  # where the draft came from, for /health
    vocab: int = 0  # the target's vocabulary, when the draft's differs (padded rows); 0: the same
    p_min: float = DEFAULT_P_MIN  # stop guessing when the draft's best token is less likely
    min_acceptance: float = 0.0  # a sequence keeping fewer of its guesses decodes plainly
    warmup: int = WARMUP_ROUNDS  # rounds a sequence has before min_acceptance is applied
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    switched_off: int = 0  # sequences that went back to plain decoding

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @torch.inference_mode()
    def decode(
        self,
        model: GPT,
        prompt: torch.Tensor,
        params: SamplingParams,
        gen: torch.Generator | None = None,
        on_distribution: Callable[[torch.Tensor], None] | None = None,
        on_prompt: Callable[[torch.Tensor], None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """generate_ids for one prompt (1, T), decoded speculatively: the same tokens greedy, the
        same distribution sampled. The first token comes from the prompt's forward pass as usual,
        then each round yields up to k + 1. The target's cache holds the tokens from `start` on but
        the last, and is rebuilt from the last 3/4 of the context at the token generate_ids
        rebuilds it."""
        block = model.config.block_size
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        context = prompt[0].tolist()  # everything so far, for the penalties
        prompt_len = len(context)
        start = max(0, len(context) - block)
        cache = KVCache.empty(model.config, 1, block, device, dtype)
        logits, _ = model(torch.tensor([context[start:]], device=device), cache=cache,
                          last_only=on_prompt is None)  # fmt: skip
        if on_prompt is not None:
            on_prompt(logits)
        drafter = self.sequence()
        fast = native.decoder(model)  # plain steps in native calls, where it covers the target
        dists = [process_history(logits[:, -1], params, context, prompt_len)]
        tokens = [int(choose_next(dists[0], params, gen)[0])]
        made = 0
        while True:
            for token, dist in zip(tokens, dists):
                if on_distribution is not None:
                    on_distribution(dist.log_softmax(-1))
                context.append(token)
                made += 1
                yield torch.tensor([token], device=device)
                if made >= params.max_new_tokens:
                    return
            if cache.pos >= block:
                start = len(context) - max(1, block * 3 // 4)
                cache.pos = 0
                model(torch.tensor([context[start:-1]], device=device), cache=cache, last_only=True)
            # guesses only up to the full context, so the rebuilds fall where generate_ids' do
            k = min(self.k, params.max_new_tokens - made - 1, block - cache.pos - 1)
            before = cache.pos
            if k > 0 and not drafter.off:
                tokens, dists = drafter.speculate(
                    model, context, k, params, gen, prompt_len, cache, fast=fast
                )
            else:  # one token left to make, or one position left in the context: a plain step
                x = torch.tensor([context[-1:]], device=device)
                logits = fast.step(x, cache) if fast else model(x, cache=cache)[0]
                dists = [process_history(logits[:, -1], params, context, prompt_len)]
                tokens = [int(choose_next(dists[0], params, gen)[0])]
            cache.pos = before + len(tokens)  # the last token and the guesses kept

    def sequence(self) -> Drafter:
        """A draft cache for one sequence."""
        return Drafter(self)

    def stats(self) -> dict[str, object]:
        return {
            "draft": self.name,
            "draft_tokens": self.k,
            "draft_p_min": self.p_min,
            "draft_min_acceptance": self.min_acceptance,
            "sequences_switched_off": self.switched_off,
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            # tokens a target forward pass yields on average: kept guesses plus its own
            "tokens_per_round": round((self.accepted + self.rounds) / self.rounds, 3)
            if self.rounds
            else 0.0,
        }


# The draft catches up on the tokens the target settled on (one or two a round) in one native
# call; a prompt goes through the eager forward, whose batched products are faster at length.
CATCH_UP_NATIVE = 8


@dataclass
class Drafter:
    """The draft's side of one sequence: its KV cache and the tokens in it, which start at
    `start` in the sequence. Each round it catches up on the tokens the target settled on since
    the last (usually one or two) and guesses from there."""

    spec: Speculator
    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)
    start: int = 0
    proposed: int = 0  # this sequence's own counts, for min_acceptance
    accepted: int = 0
    rounds: int = 0
    off: bool = False  # switched to plain decoding
    fast: native.NativeDecoder | None = None  # the draft's steps in native calls, where it can

    def propose(
        self,
        context: list[int],
        k: int,
        p: SamplingParams,
        gen: torch.Generator | None,
        prompt_len: int,
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Up to k guesses after context (every token so far), and the (1, V) processed logits
        each was drawn from: fewer where the draft's best next token has probability below
        p_min (none at all, possibly)."""
        draft = self.spec.draft
        block = draft.config.block_size
        param = next(draft.parameters())
        if self.cache is None:
            self.cache = KVCache.empty(draft.config, 1, block, param.device, param.dtype)
            self.fast = native.decoder(draft)
        if len(context) - self.start + k > block:  # the draft's context is full: keep 3/4
            self.start = len(context) - max(1, (block - k) * 3 // 4)
            self.tokens = []
        want = context[self.start :]
        same = 0
        while same < min(len(self.tokens), len(want) - 1) and self.tokens[same] == want[same]:
            same += 1
        self.cache.pos = same
        x = torch.tensor([want[same:]], device=param.device)
        logits = self._next(x)
        guesses: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(k):
            q = process_history(logits, p, context + guesses, prompt_len)
            if self.spec.p_min > 0 and float(q.softmax(-1).amax()) < self.spec.p_min:
                self.tokens = want + guesses  # each guess made went through the draft
                return guesses, dists
            token = int(choose_next(q, p, gen)[0])
            guesses.append(token)
            dists.append(q)
            if i < k - 1:
                logits = self._next(torch.tensor([[token]], device=param.device))
        self.tokens = want + guesses[:-1]
        return guesses, dists

    def speculate(
        self,
        model: GPT,
        context: list[int],
        k: int,
        p: SamplingParams,
        gen: torch.Generator | None,
        prompt_len: int,
        cache: KVCache,
        pad: torch.Tensor | None = None,
        fast: native.NativeDecoder | None = None,
    ) -> tuple[list[int], list[torch.Tensor]]:
        """One round: k guesses after context, checked in one pass of the target over its cache
        (which holds context but its last token; pad: a pool row's left padding; fast: the
        target's native decoder). Returns the tokens it yields and, for each, the target's
        processed (1, V) logits; the cache's position is the caller's to set."""
        guesses, draft_dists = self.propose(context, k, p, gen, prompt_len)
        logits = check(model, context[-1:] + guesses, cache, pad, fast)
        tokens, dists = verify(logits[0], guesses, draft_dists, p, gen, context, prompt_len)
        self._count(len(guesses), len(tokens) - 1)
        return tokens, dists

    def _count(self, guessed: int, kept: int) -> None:
        """A round's guesses made and kept, in this sequence's counts and the draft's; the
        sequence goes plain once past warmup with too few kept (min_acceptance)."""
        spec = self.spec
        for counts in (self, spec):
            counts.rounds += 1
            counts.proposed += guessed
            counts.accepted += kept
        if self.rounds >= spec.warmup and self.accepted < spec.min_acceptance * self.proposed:
            self.off = True
            spec.switched_off += 1

    def _next(self, x: torch.Tensor) -> torch.Tensor:
        """The draft's (1, V) logits after x, cut or padded (never chosen) to the target's V."""
        if self.fast is not None and self.cache is not None and x.size(1) <= CATCH_UP_NATIVE:
            logits = self.fast.step(x, self.cache)[:, -1]
        else:
            logits = self.spec.draft(x, cache=self.cache, last_only=True)[0][:, -1].float()
        extra = (self.spec.vocab or logits.size(-1)) - logits.size(-1)
        return F.pad(logits, (0, extra), value=float("-inf")) if extra else logits


def check(
    model: GPT,
    tokens: list[int],
    cache: KVCache,
    pad: torch.Tensor | None = None,
    fast: native.NativeDecoder | None = None,
) -> torch.Tensor:
    """The target's (1, T, V) logits after each of tokens (its last token and the guesses), in
    one forward pass that computes what T decoding steps would: through the native step where
    the target decodes natively (each row what it gets alone, the weights read once), else
    eagerly (qlinear.rows_alone)."""
    if fast is not None:
        first = 0 if pad is None else int(pad[0])
        return fast.step_at(tokens, cache.pos - first, cache.pos, first, cache.k, cache.v)
    x = torch.tensor([tokens], device=cache.k.device)
    with rows_alone():
        return model(x, cache=cache, pad=pad)[0]


def verify(
    logits: torch.Tensor,
    guesses: list[int],
    draft_dists: list[torch.Tensor],
    p: SamplingParams,
    gen: torch.Generator | None,
    context: list[int],
    prompt_len: int,
) -> tuple[list[int], list[torch.Tensor]]:
    """The tokens a round yields: the guesses kept, then the target's own token. logits (k + 1,
    V) are the target's after context[-1] and each guess. Returns the tokens and, for each, the
    target's processed (1, V) logits it stands for (for log-probabilities)."""
    out: list[int] = []
    dists: list[torch.Tensor] = []
    for i, guess in enumerate(guesses):
        target = process_history(logits[i : i + 1], p, context + out, prompt_len)
        dists.append(target)
        if p.temperature == 0:
            best = int(target[0].argmax())
            out.append(best)
            if best != guess:
                return out, dists
            continue
        pt, pq = target[0].softmax(-1), draft_dists[i][0].softmax(-1)
        u = torch.rand((), generator=gen, device=pt.device)
        if u * pq[guess] <= pt[guess]:  # kept with probability min(1, p / q)
            out.append(guess)
            continue
        rest = (pt - pq).clamp(min=0)
        if not bool(rest.sum() > 0):  # p == q to rounding: a refusal then is rounding itself
            rest = pt
        out.append(int(torch.multinomial(rest, 1, generator=gen)))
        return out, dists
    target = process_history(logits[len(guesses) :], p, context + out, prompt_len)
    dists.append(target)
    out.append(int(choose_next(target, p, gen)[0]))
    return out, dists


def load_speculator(
    run: str | Path,
    model: GPT,
    tok: Tokenizer,
    k: int = 4,
    device: torch.device | str = "cpu",
    p_min: float | None = None,
    min_acceptance: float | None = None,
) -> Speculator:
    """A Speculator over the draft run at `run` for `model` (whose tokenizer is tok): refused,
    in one line, when the draft reads text with another tokenizer or k, p_min or
    min_acceptance is out of range. min_acceptance None: default_min_acceptance(model)."""
    from gptkit.loader import load_model

    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise GptkitError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS}, got {k}")
    p_min = DEFAULT_P_MIN if p_min is None else p_min
    if not 0.0 <= p_min < 1.0:
        raise GptkitError(f"--draft-p-min must be in [0, 1), got {p_min}")
    if min_acceptance is None:
        min_acceptance = default_min_acceptance(model)
    if not 0.0 <= min_acceptance <= 1.0:
        raise GptkitError(f"--draft-min-acceptance must be in [0, 1], got {min_acceptance}")
    draft, draft_tok, _ = load_model(run, device, merge_adapters=True)
    if fingerprint(draft_tok) != fingerprint(tok) or draft_tok.eot_id != tok.eot_id:
        raise GptkitError(
            f"the draft {run} uses another tokenizer than the model it drafts for; a draft must "
            "share its target's tokenizer (train it with the same --set data.dir, or import "
            "one of the same family)"
        )
    if draft.config.block_size < 2 * k + 2:
        raise GptkitError(
            f"the draft's context ({draft.config.block_size}) is too short for --draft-tokens "
            f"{k}; use at most {(draft.config.block_size - 2) // 2}"
        )
    return Speculator(draft, k, name=str(run), vocab=model.config.vocab_size, p_min=p_min,
                      min_acceptance=min_acceptance)  # fmt: skip


def default_min_acceptance(model: GPT) -> float:
    """About the share of guesses kept below which a round costs more than the tokens it yields
    (benchmarks/cpu_decode.py --parts speculative, k = 4: 0.35-0.44 for fp32 targets, 0.58-0.82
    for int8 and int4 ones, whose checking rows cost more; docs/performance.md)."""
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    return 0.6 if quantized else 0.35
