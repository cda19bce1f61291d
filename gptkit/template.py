"""The chat template: how a conversation becomes token ids, the same for training, chat,
generate and serve.

A fine-tuned tokenizer carries four special tokens, one id each, stored with it in
chat_template.json:

    <|system|>You are terse.<|end|><|user|>Hi there<|end|><|assistant|>Hello.<|end|>

Markers are inserted by id and message text is encoded with special-token strings left as
plain text, so a message cannot forge a role. Only the assistant's text and its closing
<|end|> carry loss: the model learns to answer and to stop, never to write the prompt.

A tokenizer without a template (a run that was only pretrained) gets a plain-text fallback,
"User: ...\\nAssistant: ...\\n", so that chat and serve still work with a base model.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptkit.errors import GptkitError
from gptkit.inference.generate import SamplingParams, Speculation, TextStream
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
SPECIAL_TEMPLATE = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}
PLAIN_TEMPLATE = {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "end": "\n"}


# gptkit's two templates written as Jinja, for the runtimes that render a model's template
# themselves (transformers, vLLM, llama.cpp, Ollama): the same text as ChatTemplate.render.
SPECIAL_JINJA = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
PLAIN_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ 'System: ' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' }}{% else %}{{ 'Assistant: ' }}{% endif %}"
    "{{ m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}"
    "{% endif %}"
)


def jinja_source(tok: Tokenizer) -> str:
    """The chat template of tok as Jinja source: an imported model's own, or gptkit's."""
    if tok.jinja_template:
        return tok.jinja_template
    return SPECIAL_JINJA if tok.chat_template else PLAIN_JINJA


@dataclass
class Message:
    role: str
    content: str


def check_messages(messages: list[Message], need_assistant: bool) -> None:
    """The conversation rules every caller shares: known roles, system only first, and for
    training at least one assistant turn."""
    if not messages:
        raise GptkitError("the conversation is empty; give at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise GptkitError(
                f"message {i}: role must be one of {', '.join(ROLES)}, got {m.role!r}"
            )
        if not isinstance(m.content, str):
            raise GptkitError(
                f"message {i}: content must be a string, got {type(m.content).__name__}"
            )
        if m.role == "system" and i != 0:
            raise GptkitError(f"message {i}: a system message may only come first")
    if need_assistant and not any(m.role == "assistant" for m in messages):
        raise GptkitError(
            "the conversation has no assistant turn, so there is nothing to learn from it"
        )


def _raise(message: str) -> None:
    raise GptkitError(f"the chat template refused the conversation: {message}")


@functools.cache
def _compile_jinja(source: str) -> jinja2.Template:
    """A model's Jinja chat template, in a sandbox: it cannot read files, import, or reach Python
    objects beyond the messages and token strings it is given."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise GptkitError(f"the model's chat template is not valid Jinja: {e}") from None


class ChatTemplate:
    """gptkit's own template (special marker tokens, or the plain-text fallback), or an imported
    model's Jinja template (tok.jinja_template), behind one interface."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.jinja = _compile_jinja(tok.jinja_template) if tok.jinja_template else None
        if self.jinja is not None:
            self.special, self.spec = True, {}
            # The prompt overhead of one message, for the server's schema (an estimate).
            self.marker = {"end": [], "assistant": [0] * 8, "user": [0] * 8, "system": [0] * 8}
            return
        self.special = bool(tok.chat_template)
        spec = tok.chat_template or PLAIN_TEMPLATE
        if self.special:
            missing = [t for t in spec.values() if t not in tok.special_tokens]
            if missing:
                raise GptkitError(
                    f"the tokenizer's chat template names tokens it does not have: {missing}"
                )
            self.marker = {k: [tok.special_tokens[v]] for k, v in spec.items()}
        else:
            self.marker = {k: tok.encode(v) for k, v in spec.items()}
        self.spec = spec

    @staticmethod
    def add_to(tok: Tokenizer, extra_chars: str = "") -> Tokenizer:
        """A copy of tok with the template's special tokens (and, for a character tokenizer, any
        new characters) appended to the vocabulary; existing ids do not move. An imported model
        keeps its own (Jinja) template and vocabulary."""
        if tok.jinja_template:
            return tok
        out = tok.add_tokens(extra_chars, SPECIAL_TEMPLATE.values())
        out.chat_template = dict(SPECIAL_TEMPLATE)
        return out

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn."""
        if self.jinja is not None:
            return self.tok.eos_ids
        return self.marker["end"] if self.special else [self.tok.eot_id]

    @property
    def stop_strings(self) -> list[str]:
        """With the plain template, the text that ends a turn (the special one stops by id)."""
        return [] if self.special else [PLAIN_TEMPLATE["end"]]

    def encode(
        self, messages: list[Message], generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether it is assistant output (carries
        loss). With generation_prompt, the ids end with the assistant marker, ready to sample."""
        if self.jinja is not None:
            return self._encode_jinja(messages, generation_prompt)
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            head = self.marker[m.role]
            body = self.tok.encode_plain(m.content) + self.marker["end"]
            ids += head + body
            mask += [False] * len(head) + [m.role == "assistant"] * len(body)
        if generation_prompt:
            ids += self.marker["assistant"]
            mask += [False] * len(self.marker["assistant"])
        return ids, mask

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The conversation ready for the assistant's turn (generation prompt), without the loss
        mask that only training needs (for a Jinja template the mask costs a render per turn)."""
        if self.jinja is not None:
            return self._tokenize(self._render_jinja(messages, True)).ids
        return self.encode(messages, generation_prompt=True)[0]

    @staticmethod
    def prompt_budget(block: int, max_new_tokens: int) -> int:
        """Prompt tokens that leave room for a reply of max_new_tokens (at most half the
        context)."""
        return block - max(1, min(max_new_tokens, block // 2))

    def fit(
        self, messages: list[Message], block: int, max_new_tokens: int
    ) -> tuple[list[int], int]:
        """prompt_ids for a conversation that may have outgrown the context, and how many
        messages were left out: whole exchanges (a user turn and the reply after it) are dropped
        from the oldest, system messages always kept, while the prompt leaves too little room
        for the reply (max_new_tokens, at most half the context). If the last turn alone is still
        too long, the prompt keeps its last tokens. The one rule of `gptkit chat` and of the
        server's "truncate": "oldest_turns"."""
        budget = self.prompt_budget(block, max_new_tokens)
        kept = list(messages)
        dropped = 0
        while True:
            ids = self.prompt_ids(kept)
            turns = [i for i, m in enumerate(kept) if m.role != "system"]
            if len(ids) <= budget or len(turns) <= 1:
                return ids[-budget:], dropped
            first = turns[0]
            pair = kept[first].role == "user" and kept[turns[1]].role == "assistant"
            for i in sorted(turns[:2] if pair and len(turns) > 2 else turns[:1], reverse=True):
                del kept[i]
                dropped += 1

    def reply(
        self,
        model: GPT,
        ids: list[int],
        params: SamplingParams,
        static: bool = False,
        speculator: Speculation | None = None,
    ) -> TextStream:
        """The assistant's turn after `ids` (a conversation encoded with generation_prompt), through
        the one sampling core, ending at the template's end of turn (static, speculator:
        TextStream's)."""
        return TextStream(
            model, self.tok, ids, params, self.stop_ids, self.stop_strings, static, speculator
        )

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        """The conversation as text, markers spelled out (for display and debugging)."""
        if self.jinja is not None:
            return self._render_jinja(messages, generation_prompt)
        parts = [self.spec[m.role] + m.content + self.spec["end"] for m in messages]
        return "".join(parts) + (self.spec["assistant"] if generation_prompt else "")

    # --- an imported model's Jinja template ---

    def _render_jinja(self, messages: list[Message], generation_prompt: bool) -> str:
        tok = self.tok
        names = {"bos_token": tok.bos_token or "", "eos_token": tok.eot_token}
        try:
            return self.jinja.render(  # type: ignore[union-attr]
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=generation_prompt,
                **names,
            )
        except GptkitError:
            raise
        except Exception as e:  # noqa: BLE001 -- a template's own error, said in one line
            raise GptkitError(
                f"the chat template failed to render: {type(e).__name__}: {e}"
            ) from None

    def _encode_jinja(
        self, messages: list[Message], generation_prompt: bool
    ) -> tuple[list[int], list[bool]]:
        """Render, then tokenize (special-token strings in the text become their tokens, as in
        transformers). The loss mask covers each assistant turn's text up to and including its
        first end-of-sequence token: the span between the conversation rendered up to the turn
        (with the generation prompt) and rendered through it."""
        text = self._render_jinja(messages, generation_prompt)
        enc = self._tokenize(text)
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self._render_jinja(messages[:i], True)
            through = self._render_jinja(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise GptkitError(
                    "the chat template does not render a conversation as its turns one after "
                    "another, so the assistant's tokens cannot be told apart for training"
                )
            spans.append((len(before), len(through)))
        # One pass over the tokens (their offsets rise): inside a span until its first EOS.
        eos = set(self.tok.eos_ids)
        mask, k, closed = [], 0, False
        for tid, (at, _) in zip(enc.ids, enc.offsets):
            while k < len(spans) and at >= spans[k][1]:
                k, closed = k + 1, False
            inside = k < len(spans) and at >= spans[k][0] and not closed
            mask.append(inside)
            closed = closed or (inside and tid in eos)
        return list(enc.ids), mask

    def _tokenize(self, text: str) -> Any:
        """Rendered text to tokens; special-token strings in it become their tokens."""
        return self.tok.tok.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
