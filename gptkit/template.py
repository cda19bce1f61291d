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

from dataclasses import dataclass

from gptkit.errors import GptkitError
from gptkit.generate import SamplingParams, TextStream
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


class ChatTemplate:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
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
        new characters) appended to the vocabulary; existing ids do not move."""
        out = tok.add_tokens(extra_chars, SPECIAL_TEMPLATE.values())
        out.chat_template = dict(SPECIAL_TEMPLATE)
        return out

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn."""
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

    def reply(self, model: GPT, ids: list[int], params: SamplingParams) -> TextStream:
        """The assistant's turn after `ids` (a conversation encoded with generation_prompt), through
        the one sampling core, ending at the template's end of turn."""
        return TextStream(model, self.tok, ids, params, self.stop_ids, self.stop_strings)

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        """The conversation as text, markers spelled out (for display and debugging)."""
        parts = [self.spec[m.role] + m.content + self.spec["end"] for m in messages]
        return "".join(parts) + (self.spec["assistant"] if generation_prompt else "")
