"""lm-evaluation-harness's standard benchmarks in process: a gptkit model as an lm-eval `TemplateLM`
(`harness_model`) and `evaluate_tasks` over a run."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from gptkit.errors import GptkitError, check_number
from gptkit.inference.engine import generate_many
from gptkit.inference.generate import SamplingParams
from gptkit.loader import load_model
from gptkit.model import GPT, KVCache
from gptkit.runtime import resolve_device
from gptkit.template import ChatTemplate, Message, jinja_source
from gptkit.tokenizer import Tokenizer


class ContinuationScorer:
    """Log-likelihoods of continuations given contexts, in length-sorted, left-padded batches
    (each row computes what it would alone). Continuations of one context (a multiple-choice
    question's choices) share its forward pass: the context runs once into a KV cache that each
    continuation then extends. A lone continuation (a rolling window) takes one forward pass with
    its context."""

    def __init__(self, model: GPT, prefix: int, batch_size: int) -> None:
        self.model, self.prefix, self.batch_size = model, prefix, batch_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block = model.config.block_size

    def judge(self, lp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """A continuation's log-likelihood from the (len, V) log-probabilities predicting it, and
        whether greedy decoding would write it."""
        target = torch.tensor(cont, device=self.device)
        return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood of each continuation given its context, whether greedy picks it)."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, cont) in enumerate(pairs):
            fits = 0 < len(context) and len(context) + len(cont) - 1 <= self.block
            groups.setdefault(tuple(context) if fits else (-1 - i,), []).append(i)
        shared = sorted((g for g in groups.items() if len(g[1]) > 1), key=lambda g: -len(g[0]))
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        for group in shared:
            width = max([len(group[0]), *(len(c) for c, _ in batch)])
            longest = max(len(pairs[i][1]) for _, rows in [*batch, group] for i in rows)
            if batch and (len(batch) >= self.batch_size or width + longest - 1 > self.block):
                self.score_shared(pairs, batch, out)
                batch = []
            batch.append(group)
        if batch:
            self.score_shared(pairs, batch, out)
        alone = [i for _, rows in groups.items() if len(rows) == 1 for i in rows]
        order = sorted(alone, key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for k in range(0, len(order), self.batch_size):
            self.score_alone(pairs, order[k : k + self.batch_size], out)
        return out

    @torch.no_grad()
    def score_alone(
        self, pairs: list[tuple[list[int], list[int]]], rows: list[int], out: list
    ) -> None:
        seqs = [(pairs[i][0] + pairs[i][1])[-(self.block + 1) :][:-1] for i in rows]
        width = max(len(s) for s in seqs)
        pad = torch.tensor([width - len(s) for s in seqs], device=self.device)
        x = torch.tensor([[self.prefix] * (width - len(s)) + s for s in seqs], device=self.device)
        logits, _ = self.model(x, pad=pad if bool(pad.any()) else None)
        for row, i in enumerate(rows):  # softmax over the continuation's positions only
            cont = pairs[i][1]
            out[i] = self.judge(logits[row, width - len(cont) :].float().log_softmax(-1), cont)

    @torch.no_grad()
    def score_shared(
        self,
        pairs: list[tuple[list[int], list[int]]],
        batch: list[tuple[tuple[int, ...], list[int]]],
        out: list[tuple[float, bool]],
    ) -> None:
        model, device, prefix = self.model, self.device, self.prefix
        contexts = [list(c) for c, _ in batch]
        width = max(len(c) for c in contexts)
        rows = [i for _, members in batch for i in members]
        conts = [pairs[i][1] for i in rows]
        longest = max(len(c) for c in conts)
        pad = torch.tensor([width - len(c) for c in contexts], device=device)
        x = torch.tensor([[prefix] * (width - len(c)) + c for c in contexts], device=device)
        cache = KVCache.empty(model.config, len(contexts), width + longest - 1, device, self.dtype)
        logits, _ = model(x, cache=cache, pad=pad if bool(pad.any()) else None)
        last = logits[:, -1]  # each context's prediction of its continuations' first token
        owner = torch.tensor([g for g, (_, members) in enumerate(batch) for _ in members])
        rest = None
        if longest > 1:  # the continuations (but their last token) extend copies of the cache
            grown = KVCache(cache.k[:, owner], cache.v[:, owner], cache.pos)
            # Right-padded: a position never sees the ones after it, so the padding is inert.
            y = torch.tensor([c[:-1] + [prefix] * (longest - len(c)) for c in conts], device=device)
            rest, _ = model(y, cache=grown, pad=pad[owner] if bool(pad.any()) else None)
        for r, (i, cont) in enumerate(zip(rows, conts)):
            steps = [last[owner[r]][None]]
            if rest is not None:
                steps.append(rest[r, : len(cont) - 1])
            out[i] = self.judge(torch.cat(steps).float().log_softmax(-1), cont)


def harness_model(
    model: GPT, tok: Tokenizer, batch_size: int = 16, max_length: int | None = None
) -> Any:
    """The model as an lm-eval `TemplateLM`: lm-eval encodes context and continuation with the
    run's tokenizer; gptkit scores continuations (`ContinuationScorer`), rolls windows over whole
    documents as lm-eval's hf backend does (max_length long: the context by default), and
    generates greedily through the one sampling core."""
    return _lm_class()(model, tok, batch_size, max_length)


@functools.cache
def _lm_class() -> type:
    """lm-eval's base class is imported here, when a harness model is first made: lm-eval is an
    optional extra, and importing it takes seconds."""
    from lm_eval.api.model import TemplateLM

    return type("GptkitLM", (_GptkitLM, TemplateLM), {})


class _GptkitLM:
    """The methods of lm-eval's `TemplateLM` over a gptkit model (mixed in by `_lm_class`)."""

    def __init__(self, model: GPT, tok: Tokenizer, batch_size: int, max_length: int | None):
        super().__init__()
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.block = model.config.block_size
        self.prefix = tok.bos_id if tok.bos_id is not None else tok.eot_id
        self.scorer = ContinuationScorer(model, self.prefix, batch_size)
        self._max_length = max_length or self.block

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    # --apply-chat-template: lm-eval renders each request as a conversation through the run's
    # own template (gptkit's, or an imported model's Jinja one), as transformers would.
    @property
    def tokenizer_name(self) -> str:
        return f"gptkit-{self.tok.kind}-{self.tok.vocab_size}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return jinja_source(self.tok)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        messages = [Message(m["role"], m["content"]) for m in chat_history]
        return ChatTemplate(self.tok).render(messages, generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests: list, **kwargs: Any) -> list[tuple[float, bool]]:
        return self.scorer.score([(context, cont) for _, context, cont in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            ids = self.tok.encode(request.args[0])
            # lm-eval's windows are (inputs, targets); disjoint: (context, continuation).
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(ids, self.prefix, self.max_length, 1)
            ]
            totals.append(sum(value for value, _ in self.scorer.score(windows)))
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            params.append(
                SamplingParams(
                    max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                    temperature=0.0,
                    stop=[until] if isinstance(until, str) else list(until),
                )
            )
            prompts.append(self.tok.encode_prompt(context)[-(self.block - 1) :])
        return generate_many(self.model, self.tok, prompts, params, self.batch_size)


def evaluate_tasks(
    run: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    output: str | Path | None = None,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """Standard benchmarks (HellaSwag, ARC, ... or the user's own task YAMLs) through
    lm-evaluation-harness's Python API, in this process; returns lm-eval's results (and
    writes them as JSON to output)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise GptkitError(
            "--tasks needs lm-evaluation-harness: pip install 'gptkit[eval]'"
        ) from None
    if num_fewshot is not None:
        check_number("num_fewshot", num_fewshot, 0, integer=True)
    check_number("batch_size", batch_size, 1, integer=True)
    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise GptkitError(
            f"unknown task {unknown[0]!r}; see `lm_eval --tasks list`, or pass --include-path DIR"
        )
    results = lm_eval.simple_evaluate(
        model=harness_model(model, tok, batch_size),
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        apply_chat_template=apply_chat_template,
    )
    summary = {
        "results": results["results"],
        "n-shot": results.get("n-shot", {}),
        "versions": results.get("versions", {}),
    }
    if output is not None:
        Path(output).write_text(json.dumps(summary, indent=1, default=str))
    return summary
