"""Evaluation: loss, perplexity and bits-per-byte of a model on a token stream, and the
response loss and answer match of an instruction-tuned model on held-out conversations.

The whole split is covered by consecutive non-overlapping windows of block_size tokens, every
token after the first predicted exactly once. Bits-per-byte divides the total loss (in bits) by
the UTF-8 bytes of the predicted tokens, so char and BPE models compare."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptkit.checkpoint import load_model
from gptkit.data import DataSet, read_text_chunks, windows
from gptkit.engine import generate_many
from gptkit.errors import GptkitError, check_number
from gptkit.generate import SamplingParams
from gptkit.instructions import encode_example, example_batches, load_conversations
from gptkit.model import GPT, KVCache
from gptkit.runtime import autocast_context, resolve_device, resolve_dtype
from gptkit.template import ChatTemplate, Message, jinja_source
from gptkit.tokenizer import Tokenizer


@torch.no_grad()
def sum_losses(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    autocast: Any = None,
) -> tuple[float, int, np.ndarray]:
    """The one loss routine of every evaluation: over batches of (x, y), the sum of next-token
    losses (nats) at the positions whose target is not -100, their count, and those targets."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predicted: list[np.ndarray] = []
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits, _ = model(x)
            flat = logits.float().flatten(0, 1)
            total += F.cross_entropy(flat, y.flatten(), ignore_index=-100, reduction="sum").item()
            keep = y != -100
            count += int(keep.sum())
            predicted.append(y[keep].cpu().numpy())
    finally:
        model.train(was_training)
    return total, count, np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)


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
    """sum_losses over windows of a token stream (data.windows: every window in order, or with a
    generator max_batches batches of random ones; split=(rank, world) shares them out)."""
    batches = windows(tokens, model.config.block_size, batch_size, max_batches, generator, split)
    return sum_losses(model, batches, device, autocast)


def response_losses(
    model: GPT,
    examples: list[tuple[list[int], list[int]]],
    batch_size: int,
    device: torch.device | str,
    amp: Any = None,
) -> tuple[float, int, np.ndarray]:
    """sum_losses over the assistant tokens of instruction examples (encode_example)."""
    return sum_losses(model, example_batches(examples, batch_size), device, amp)


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
        content = "".join(read_text_chunks(p, errors))
        if not content:
            raise GptkitError(f"{p}: file is empty")
        tokens = np.asarray(tok.encode(content), dtype=np.int64)
    else:
        if data is None and cfg.finetune.base:
            raise GptkitError(
                f"{run_dir} is a fine-tuned run: evaluate it with --instructions FILE (or --text "
                "FILE)"
            )
        folder = Path(data) if data is not None else _run_data_dir(Path(run_dir), cfg.data.dir)
        ds = DataSet(folder)
        if ds.tokenizer.vocab_size != tok.vocab_size or ds.tokenizer.kind != tok.kind:
            raise GptkitError(
                f"{folder}: its tokenizer differs from the run's; prepare it with the run's "
                "tokenizer"
            )
        tokens = ds.split(split)
    amp = autocast_context(dev, resolve_dtype(cfg.train.dtype, dev))
    total, count, predicted = token_losses(
        model, tokens, batch_size or cfg.train.batch_size, dev, amp, max_batches
    )
    return summarize(total, count, predicted_bytes(predicted, tok.token_byte_lengths()))


def _run_data_dir(run_dir: Path, configured: str) -> Path:
    if not configured:
        raise GptkitError(
            f"{run_dir}: the run names no data folder; pass --data DIR or --text FILE"
        )
    p = Path(configured)
    return p if p.is_absolute() else run_dir / p


# --- instruction evaluation ---


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


# --- standard benchmarks: lm-evaluation-harness in process ---


def harness_model(
    model: GPT, tok: Tokenizer, batch_size: int = 16, max_length: int | None = None
) -> Any:
    """The model as an lm-eval `TemplateLM`: lm-eval encodes context and continuation with the
    run's tokenizer; gptkit scores continuations in length-sorted, left-padded batches (each row
    computes what it would alone), rolls windows over whole documents as lm-eval's hf backend
    does (max_length long: the context by default), and generates greedily through the one
    sampling core."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    block = model.config.block_size
    prefix = tok.bos_id if tok.bos_id is not None else tok.eot_id

    def judge(lp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """A continuation's log-likelihood from the (len, V) log-probabilities predicting it, and
        whether greedy decoding would write it."""
        target = torch.tensor(cont, device=device)
        return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    def score(pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood of each continuation given its context, whether greedy picks it).
        Continuations of one context (a multiple-choice question's choices) share its forward
        pass: the context runs once into a KV cache that each continuation then extends. A lone
        continuation (a rolling window) takes one forward pass with its context."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, cont) in enumerate(pairs):
            fits = 0 < len(context) and len(context) + len(cont) - 1 <= block
            groups.setdefault(tuple(context) if fits else (-1 - i,), []).append(i)
        shared = sorted((g for g in groups.items() if len(g[1]) > 1), key=lambda g: -len(g[0]))
        alone = [i for _, rows in groups.items() if len(rows) == 1 for i in rows]
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        for group in shared:
            width = max([len(group[0]), *(len(c) for c, _ in batch)])
            longest = max(len(pairs[i][1]) for _, rows in [*batch, group] for i in rows)
            if batch and (len(batch) >= batch_size or width + longest - 1 > block):
                score_shared(pairs, batch, out)
                batch = []
            batch.append(group)
        if batch:
            score_shared(pairs, batch, out)
        order = sorted(alone, key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for k in range(0, len(order), batch_size):
            rows = order[k : k + batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(block + 1) :][:-1] for i in rows]
            width = max(len(s) for s in seqs)
            pad = torch.tensor([width - len(s) for s in seqs], device=device)
            x = torch.tensor([[prefix] * (width - len(s)) + s for s in seqs], device=device)
            with torch.no_grad():
                logits, _ = model(x, pad=pad if bool(pad.any()) else None)
            for row, i in enumerate(rows):  # softmax over the continuation's positions only
                cont = pairs[i][1]
                out[i] = judge(logits[row, width - len(cont) :].float().log_softmax(-1), cont)
        return out

    @torch.no_grad()
    def score_shared(
        pairs: list[tuple[list[int], list[int]]],
        batch: list[tuple[tuple[int, ...], list[int]]],
        out: list[tuple[float, bool]],
    ) -> None:
        contexts = [list(c) for c, _ in batch]
        width = max(len(c) for c in contexts)
        rows = [i for _, members in batch for i in members]
        conts = [pairs[i][1] for i in rows]
        longest = max(len(c) for c in conts)
        pad = torch.tensor([width - len(c) for c in contexts], device=device)
        x = torch.tensor([[prefix] * (width - len(c)) + c for c in contexts], device=device)
        cache = KVCache.empty(model.config, len(contexts), width + longest - 1, device, dtype)
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
            out[i] = judge(torch.cat(steps).float().log_softmax(-1), cont)

    class GptkitLM(TemplateLM):
        @property
        def eot_token_id(self) -> int:
            return tok.eot_id

        @property
        def prefix_token_id(self) -> int:
            return prefix

        @property
        def max_length(self) -> int:
            return max_length or block

        def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
            return tok.encode(string)

        # --apply-chat-template: lm-eval renders each request as a conversation through the run's
        # own template (gptkit's, or an imported model's Jinja one), as transformers would.
        @property
        def tokenizer_name(self) -> str:
            return f"gptkit-{tok.kind}-{tok.vocab_size}"

        def chat_template(self, chat_template: bool | str = False) -> str:
            return jinja_source(tok)

        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            messages = [Message(m["role"], m["content"]) for m in chat_history]
            return ChatTemplate(tok).render(messages, generation_prompt=add_generation_prompt)

        def _loglikelihood_tokens(self, requests: list, **kwargs: Any) -> list[tuple[float, bool]]:
            return score([(context, continuation) for _, context, continuation in requests])

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for request in requests:
                ids = tok.encode(request.args[0])
                # lm-eval's windows are (inputs, targets); disjoint: (context, continuation).
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(ids, prefix, self.max_length, 1)
                ]
                totals.append(sum(value for value, _ in score(windows)))
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            prompts, params = [], []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                params.append(
                    SamplingParams(
                        max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                        temperature=0.0,
                        stop=until,
                    )
                )
                prompts.append(tok.encode_prompt(context)[-(block - 1) :])
            return generate_many(model, tok, prompts, params, batch_size)

    return GptkitLM()


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
