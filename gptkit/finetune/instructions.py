"""Instruction data: Alpaca or chat records -> messages -> examples -> training batches.

Examples are padded, never packed: each row of a batch holds one conversation followed by
padding, so attention (causal) never crosses from one example into another, and padding and
prompt tokens carry no loss (target -100). Rows are padded only to the longest example of
their batch. An example longer than the context keeps its first block_size + 1 tokens; one
whose cut leaves no assistant token is dropped and counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptkit.data import Batch
from gptkit.errors import GptkitError
from gptkit.template import ChatTemplate, Message, check_messages
from gptkit.tokenizer import Tokenizer
from gptkit.training.distributed import DistContext

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
        raise GptkitError(
            f"{path}: the file is empty; expected a JSON list of records or one JSON record per "
            "line"
        )
    if text.lstrip().startswith("["):
        return _json_list_with_lines(text, path)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            hint = (
                " (a JSON file must hold a list of records, or use one record per line)"
                if lineno == 1
                else ""
            )
            raise GptkitError(f"{path}:{lineno}: invalid JSON: {e.msg}{hint}") from None
    return records


def to_messages(record: Any) -> list[Message]:
    """An Alpaca record ({instruction, input?, output}), a chat record ({messages: [...]}) or a
    grounded-answer record ({question, passages: [{source, text}], answer}, rendered by
    retrieval.grounded_prompt) as messages; ValueError says what is wrong."""
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
                raise ValueError(
                    f"message {i}: content must be a string, got {type(m['content']).__name__}"
                )
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
    if "question" in record and "passages" in record:
        from gptkit.retrieval import grounded_messages

        user, answer = grounded_messages(record)
        return [Message("user", user), Message("assistant", answer)]
    if "conversations" in record:
        raise ValueError(
            "this looks like ShareGPT ('conversations' with from/value), which is not read; "
            "convert each record to "
            '{"messages": [{"role": "user"|"assistant", "content": ...}]}'
        )
    raise ValueError(
        "has neither 'messages' (chat format), 'instruction' and 'output' (Alpaca format) nor "
        f"'question', 'passages' and 'answer' (grounded answers); its keys: {sorted(record)[:6]}"
    )


@dataclass
class Conversations:
    items: list[list[Message]]
    skipped: int = 0


def load_conversations(files: list[str], skip_invalid: bool = False) -> Conversations:
    if not files:
        raise GptkitError(
            "no instruction data: pass --data FILE (JSON or JSONL, Alpaca or chat format)"
        )
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
                    raise GptkitError(
                        f"{f}:{line}: record {k}: {e} (pass --skip-invalid to skip such records)"
                    ) from None
                out.skipped += 1
    if not out.items:
        raise GptkitError(f"no valid records in {', '.join(files)} ({out.skipped} skipped)")
    return out


# --- examples and batches ---


def encode_example(
    template: ChatTemplate, messages: list[Message], block_size: int
) -> tuple[list[int], list[int]] | None:
    """(x, y) for one conversation: y[i] is the token after x[i] where it is assistant output,
    else -100. Cut to block_size positions; None when the cut leaves nothing to learn."""
    ids, mask = template.encode(messages)
    ids, mask = ids[: block_size + 1], mask[: block_size + 1]
    y = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    if all(t == -100 for t in y):
        return None
    return ids[:-1], y


def pad_batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(examples):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x, y


def example_batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded batches of examples in order of length (similar lengths pad less)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for k in range(0, len(order), batch_size):
        yield pad_batch([examples[i] for i in order[k : k + batch_size]], pad_id)


class InstructionData:
    """Training batches of whole examples (random, padded to the batch's longest) and the
    held-out examples' response loss; the sampler's state goes into checkpoints."""

    def __init__(
        self,
        conversations: list[list[Message]],
        tok: Tokenizer,
        block_size: int,
        batch_size: int,
        seed: int,
        val_fraction: float,
    ) -> None:
        template = ChatTemplate(tok)
        encoded = [encode_example(template, m, block_size) for m in conversations]
        truncated = sum(e is not None and len(e[0]) == block_size for e in encoded)
        self.dropped = sum(e is None for e in encoded)
        examples = [e for e in encoded if e is not None]
        if not examples:
            raise GptkitError(
                "every example is longer than the context before its answer starts; raise "
                "model.block_size"
            )
        order = torch.randperm(
            len(examples), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        n_val = (
            math.ceil(len(examples) * val_fraction) if val_fraction > 0 and len(examples) > 1 else 0
        )
        self.val = [examples[i] for i in order[:n_val]]
        self.train = [examples[i] for i in order[n_val:]]
        self.tokenizer, self.batch_size = tok, batch_size
        self.pad_id = tok.eot_id
        self.gen = torch.Generator().manual_seed(seed)
        self.ctx = DistContext()  # one process, until bind
        self.description = (
            f"{len(self.train):,} train / {len(self.val):,} held-out examples, "
            f"{sum(sum(t != -100 for t in y) for _, y in self.train):,} response tokens"
            + (f", {truncated} at or cut to the context" if truncated else "")
            + (f", {self.dropped} dropped (no answer within the context)" if self.dropped else "")
        )

    def bind(self, ctx: DistContext) -> None:
        """Under torchrun: take this rank's rows of each global batch and share evaluation."""
        self.ctx = ctx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.train), (self.batch_size,), generator=self.gen).tolist()
        if self.ctx.enabled:
            idx = idx[self.ctx.shard(self.batch_size)]
        return pad_batch([self.train[i] for i in idx], self.pad_id)

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)

    def val_batches(
        self, batch_size: int, max_batches: int | None = None, gen: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """The held-out examples in padded batches: all, or max_batches batches drawn by gen."""
        examples = self.val or self.train  # no held-out share: report the training examples' loss
        if gen is not None and max_batches:
            pick = torch.randint(len(examples), (max_batches * batch_size,), generator=gen).tolist()
            examples = [examples[i] for i in pick]
        if self.ctx.enabled and not self.ctx.fsdp:
            examples = examples[self.ctx.rank :: self.ctx.world]  # the caller sums over ranks
        return example_batches(examples, batch_size)
