"""Instruction fine-tuning: read Alpaca or chat records, render them with the chat template,
and train with the one training loop, fully or with LoRA.

Examples are padded, never packed: each row of a batch holds one conversation followed by
padding, so attention (causal) never crosses from one example into another, and padding and
prompt tokens carry no loss (target -100). Rows are padded only to the longest example of
their batch. An example longer than the context keeps its first block_size + 1 tokens; one
whose cut leaves no assistant token is dropped and counted.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptkit.checkpoint import finetune_start, load_model, load_run_config, weights_sha256
from gptkit.config import Config
from gptkit.errors import GptkitError, check_number
from gptkit.model import GPT
from gptkit.runtime import resolve_device
from gptkit.template import ChatTemplate, Message, check_messages
from gptkit.tokenizer import Tokenizer, load_tokenizer

ASCII = "".join(map(chr, range(32, 127))) + "\n\t"

# --- reading instruction files ---


def _json_list_with_lines(text: str, path: Path) -> list[tuple[int, Any]]:
    """Parse a top-level JSON list, remembering the line each element starts on."""
    dec = json.JSONDecoder()
    out: list[tuple[int, Any]] = []
    i = text.index("[") + 1
    n = len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip(i)
    if i < n and text[i] == "]":
        return out
    while True:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise GptkitError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        out.append((text.count("\n", 0, i) + 1, obj))
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        raise GptkitError(f"{path}:{line}: invalid JSON: expected ',' or ']' after a record")


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line, record) pairs from a JSON list or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path}: no such instruction file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise GptkitError(f"{path}: the file is empty; expected a JSON list of records or one JSON record per line")
    if text.lstrip().startswith("["):
        return _json_list_with_lines(text, path)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            hint = " (a JSON file must hold a list of records, or use one record per line)" if lineno == 1 else ""
            raise GptkitError(f"{path}:{lineno}: invalid JSON: {e.msg}{hint}") from None
    return records


def to_messages(record: Any) -> list[Message]:
    """An Alpaca record ({instruction, input?, output}) or a chat record ({messages: [...]}) as
    messages; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"message {i} must be an object with 'role' and 'content'")
            for key in ("role", "content"):
                if key not in m:
                    raise ValueError(f"message {i} has no '{key}'")
            if not isinstance(m["content"], str):
                raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
            out.append(Message(m["role"], m["content"]))
        try:
            check_messages(out, need_assistant=True)
        except GptkitError as e:
            raise ValueError(str(e)) from None
        return out
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"Alpaca record has no '{key}'")
            if not isinstance(record[key], str):
                raise ValueError(f"'{key}' must be a string, got {type(record[key]).__name__}")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise ValueError(f"'input' must be a string, got {type(extra).__name__}")
        if not record["instruction"].strip():
            raise ValueError("'instruction' is empty")
        prompt = record["instruction"] + ("\n\n" + extra if extra.strip() else "")
        return [Message("user", prompt), Message("assistant", record["output"])]
    if "conversations" in record:
        raise ValueError(
            "this looks like ShareGPT ('conversations' with from/value), which is not read; convert each record to "
            '{"messages": [{"role": "user"|"assistant", "content": ...}]}'
        )
    raise ValueError(
        f"has neither 'messages' (chat format) nor 'instruction' and 'output' (Alpaca format); its keys: {sorted(record)[:6]}"
    )


@dataclass
class Conversations:
    items: list[list[Message]]
    skipped: int = 0


def load_conversations(files: list[str], skip_invalid: bool = False) -> Conversations:
    if not files:
        raise GptkitError("no instruction data: pass --data FILE (JSON or JSONL, Alpaca or chat format)")
    out = Conversations([])
    for f in files:
        records = read_records(f)
        if not records:
            raise GptkitError(f"{f}: holds no records")
        for k, (line, rec) in enumerate(records, 1):
            try:
                out.items.append(to_messages(rec))
            except ValueError as e:
                if not skip_invalid:
                    raise GptkitError(f"{f}:{line}: record {k}: {e} (pass --skip-invalid to skip such records)") from None
                out.skipped += 1
    if not out.items:
        raise GptkitError(f"no valid records in {', '.join(files)} ({out.skipped} skipped)")
    return out


# --- examples and batches ---


def encode_example(template: ChatTemplate, messages: list[Message], block_size: int) -> tuple[list[int], list[int]] | None:
    """(x, y) for one conversation: y[i] is the token after x[i] where it is assistant output,
    else -100. Cut to block_size positions; None when the cut leaves nothing to learn."""
    ids, mask = template.encode(messages)
    ids, mask = ids[: block_size + 1], mask[: block_size + 1]
    y = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    if all(t == -100 for t in y):
        return None
    return ids[:-1], y


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(examples):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x, y


@torch.no_grad()
def response_losses(
    model: GPT, examples: list[tuple[list[int], list[int]]], batch_size: int, device: torch.device | str, amp: Any = None
) -> tuple[float, int, np.ndarray]:
    """Summed loss (nats) over the assistant tokens of examples, their count and their ids."""
    import contextlib

    was_training = model.training
    model.eval()
    total, count, predicted = 0.0, 0, []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # similar lengths pad less
    try:
        for k in range(0, len(order), batch_size):
            x, y = pad_batch([examples[i] for i in order[k : k + batch_size]], 0)
            x, y = x.to(device), y.to(device)
            with amp if amp is not None else contextlib.nullcontext():
                logits, _ = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
            keep = y != -100
            count += int(keep.sum())
            predicted.append(y[keep].cpu().numpy())
    finally:
        model.train(was_training)
    return total, count, np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)


class InstructionData:
    """Training batches of whole examples (random, padded to the batch's longest) and the
    held-out examples' response loss; the sampler's state goes into checkpoints."""

    def __init__(
        self, conversations: list[list[Message]], tok: Tokenizer, block_size: int, batch_size: int, seed: int,
        val_fraction: float,
    ) -> None:  # fmt: skip
        template = ChatTemplate(tok)
        encoded = [encode_example(template, m, block_size) for m in conversations]
        truncated = sum(e is not None and len(e[0]) == block_size for e in encoded)
        self.dropped = sum(e is None for e in encoded)
        examples = [e for e in encoded if e is not None]
        if not examples:
            raise GptkitError("every example is longer than the context before its answer starts; raise model.block_size")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = math.ceil(len(examples) * val_fraction) if val_fraction > 0 and len(examples) > 1 else 0
        self.val = [examples[i] for i in order[:n_val]]
        self.train = [examples[i] for i in order[n_val:]]
        self.tokenizer, self.batch_size = tok, batch_size
        self.pad_id = tok.eot_id
        self.gen = torch.Generator().manual_seed(seed)
        self.ctx: Any = None  # a DistContext under torchrun (bind)
        self.description = (
            f"{len(self.train):,} train / {len(self.val):,} held-out examples, "
            f"{sum(sum(t != -100 for t in y) for _, y in self.train):,} response tokens"
            + (f", {truncated} at or cut to the context" if truncated else "")
            + (f", {self.dropped} dropped (no answer within the context)" if self.dropped else "")
        )

    def bind(self, ctx: Any) -> None:
        """Under torchrun: take this rank's rows of each global batch and share evaluation."""
        self.ctx = ctx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.train), (self.batch_size,), generator=self.gen).tolist()
        if self.ctx is not None and self.ctx.enabled:
            idx = idx[self.ctx.shard(self.batch_size)]
        return pad_batch([self.train[i] for i in idx], self.pad_id)

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)

    def evaluate(
        self, model: GPT, batch_size: int, device: torch.device, amp: Any, max_batches: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[float, int, np.ndarray]:  # fmt: skip
        examples = self.val or self.train  # no held-out share: report the training examples' loss
        if generator is not None and max_batches:
            pick = torch.randint(len(examples), (max_batches * batch_size,), generator=generator).tolist()
            examples = [examples[i] for i in pick]
        if self.ctx is not None and self.ctx.enabled and not self.ctx.fsdp:
            examples = examples[self.ctx.rank :: self.ctx.world]  # the caller sums over ranks
        return response_losses(model, examples, batch_size, device, amp)


# --- the fine-tuning run ---


def finetune_config(config: str | None = None, overrides: list[str] | None = None) -> Config:
    """The fine-tuning defaults (gptkit/presets/finetune.yaml), then a file, then --set."""
    from gptkit.config import apply_overrides, load_config
    from gptkit.data import preset

    cfg = load_config(config or preset("finetune"))
    return apply_overrides(cfg, overrides or []).validate()


def finetune(
    base: str | Path | None,
    data: list[str] | None,
    out: str | Path,
    cfg: Config | None = None,
    lora: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_at: int | None = None,
) -> Any:
    """Fine-tune the run `base` on instruction files `data` into the run folder `out`, fully or
    with LoRA; with resume, continue `out` from its own config. Returns the TrainResult."""
    from gptkit.lora import parameter_counts
    from gptkit.train import train

    out = Path(out)
    if resume:
        cfg = cfg or load_run_config(out)
        if not cfg.finetune.base:
            raise GptkitError(f"{out} is not a fine-tuning run; continue it with gptkit train --resume {out}")
        tok = load_tokenizer(out / "tokenizer")
        convs = load_conversations(cfg.finetune.data, cfg.finetune.skip_invalid)
    else:
        cfg = copy.deepcopy(cfg) if cfg is not None else finetune_config()
        if base is None:
            raise GptkitError("name the base run to fine-tune: gptkit finetune BASE_RUN --data FILE --out RUN")
        if lora is not None:
            cfg.lora.enabled = lora
        if data:
            cfg.finetune.data = [str(Path(d).resolve()) for d in data]
        base_cfg = load_run_config(Path(base))
        convs = load_conversations(cfg.finetune.data, cfg.finetune.skip_invalid)
        base_tok = load_tokenizer(Path(base) / "tokenizer")
        # A character vocabulary grows by the data's characters and all of printable ASCII, so
        # that a user's question (or a held-out file) in plain English always encodes.
        text = "".join(m.content for c in convs.items for m in c) + ASCII if base_tok.kind == "char" else ""
        tok = ChatTemplate.add_to(base_tok, text)
        f = cfg.finetune
        f.base = str(Path(base).resolve())
        f.base_sha256 = "" if base_cfg.lora.enabled else weights_sha256(base)
        f.base_vocab_size = base_cfg.model.vocab_size
        model_cfg = copy.deepcopy(base_cfg.model)
        model_cfg.block_size = min(f.block_size or model_cfg.block_size, model_cfg.block_size)
        model_cfg.dropout = cfg.model.dropout
        model_cfg.vocab_size = max(model_cfg.vocab_size, tok.vocab_size)
        cfg.model = model_cfg
        cfg.data.dir, cfg.data.tokenizer = "", f"run:{f.base}"
        cfg.validate()
    torch.manual_seed(cfg.train.seed)  # adapters' initialisation: the same run twice is the same run
    model = finetune_start(cfg, cfg.train.seed)
    counts = parameter_counts(model)
    data_src = InstructionData(
        convs.items, tok, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed, cfg.finetune.val_fraction
    )
    quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks
    if cfg.finetune.epochs > 0:  # passes over the training examples, in optimizer steps
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        cfg.train.max_steps = max(1, math.ceil(cfg.finetune.epochs * len(data_src.train) / per_step))
    if not quiet:
        mode = f"LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora.enabled else "full fine-tuning"
        skipped = f", {convs.skipped} invalid records skipped" if convs.skipped else ""
        epochs = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum / max(1, len(data_src.train))
        early = f", early stopping after {cfg.train.patience} evaluations without a better validation loss" * bool(
            cfg.train.patience
        )
        print(
            f"gptkit: {mode}: {counts['trainable']:,} of {counts['total']:,} parameters train "
            f"({100 * counts['trainable'] / counts['total']:.2f}%){skipped}; at most {cfg.train.max_steps} steps "
            f"({epochs:.1f} epochs){early}",
            flush=True,
        )
    return train(
        cfg, out, resume=resume, overwrite=overwrite, progress=progress, init_from=model, quiet=quiet, stop_at=stop_at,
        data=data_src,
    )  # fmt: skip


def merge(run: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fold a LoRA run's adapter into its base weights: a plain run folder that needs no base."""
    from gptkit.checkpoint import TrainingState, checkpoint_info, refuse_nonempty, save_checkpoint, staged_folder

    run = Path(run)
    out = Path(out) if out else run.with_name(run.name + "-merged")
    cfg = load_run_config(run)
    if not cfg.lora.enabled:
        raise GptkitError(f"{run} has no LoRA adapter to merge (lora.enabled is false); its weights are already whole")
    refuse_nonempty(out, overwrite)
    model, tok, cfg = load_model(run, "cpu", merge_adapters=True)
    cfg.lora.enabled = False
    cfg.finetune.base_sha256 = ""
    info = checkpoint_info(run)
    with staged_folder(out) as tmp:
        tok.save(tmp / "tokenizer")
        cfg.save(tmp / "config.yaml")
        save_checkpoint(tmp, model, [], TrainingState(step=info["step"], tokens_seen=info["tokens_seen"]))
    return out


# --- instruction evaluation ---


def evaluate_instructions(
    run: str | Path, files: list[str], device: str = "auto", max_new_tokens: int = 128, batch_size: int = 16,
    limit: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Response loss, and exact / contains match of greedy answers to the last assistant turn of
    each conversation in files, given what came before it."""

    check_number("max_new_tokens", max_new_tokens, 1, integer=True)
    check_number("batch_size", batch_size, 1, integer=True)
    if limit is not None:
        check_number("limit", limit, 1, integer=True)
    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    return evaluate_answers(model, tok, load_conversations(files).items[:limit], max_new_tokens, batch_size)


def evaluate_answers(
    model: GPT, tok: Tokenizer, convs: list[list[Message]], max_new_tokens: int = 128, batch_size: int = 16
) -> dict[str, Any]:
    """evaluate_instructions on a model in memory. `samples` shows the first five answers, then
    wrong ones, up to twelve in all."""
    from gptkit.generate import SamplingParams

    template = ChatTemplate(tok)
    block = model.config.block_size
    examples = [e for e in (encode_example(template, c, block) for c in convs) if e is not None]
    total, count, _ = response_losses(model, examples, batch_size, next(model.parameters()).device)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    exact = contains = 0
    samples = []
    for c in convs:
        last = max(i for i, m in enumerate(c) if m.role == "assistant")
        answer = "".join(template.reply(model, template.encode(c[:last], generation_prompt=True)[0], params))
        want = c[last].content.strip()
        exact += answer.strip() == want
        contains += bool(want) and want.lower() in answer.lower()
        if len(samples) < 5 or (answer.strip() != want and len(samples) < 12):
            samples.append({"prompt": c[last - 1].content if last else "", "expected": want, "got": answer})
    n = len(convs)
    return {
        "response_loss": total / count if count else float("nan"),
        "exact_match": exact / n,
        "contains_match": contains / n,
        "examples": n,
        "samples": samples,
    }
