"""A multi-turn chat over the one sampling core: history through the chat template, streamed
replies, and the oldest turns dropped when the conversation outgrows the context."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from gptkit.errors import GptkitError
from gptkit.inference.generate import SamplingParams
from gptkit.model import GPT
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit; "
    "type \\n for a line break"
)


class ChatSession:
    def __init__(
        self, model: GPT, tok: Tokenizer, params: SamplingParams, system: str = ""
    ) -> None:
        self.model, self.params = model, params
        self.template = ChatTemplate(tok)
        self.system = system
        self.history: list[Message] = []
        self.trimmed = 0  # turns dropped so far to fit the context
        self.static = False  # decode through a CUDA graph (generate.StaticDecoder)

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, user: str) -> list[int]:
        """The template's ids for system + history + this user turn + the assistant marker, the
        oldest exchanges dropped (for good) while they leave too little room for the reply
        (ChatTemplate.fit)."""
        system = [Message("system", self.system)] if self.system else []
        messages = system + self.history + [Message("user", user)]
        ids, dropped = self.template.fit(
            messages, self.model.config.block_size, self.params.max_new_tokens
        )
        del self.history[:dropped]
        self.trimmed += dropped
        return ids

    def reply(self, user: str) -> Iterator[str]:
        """Stream the assistant's reply; the exchange joins the history when it is complete."""
        ids = self.prompt_ids(user)
        stream = self.template.reply(self.model, ids, self.params, self.static)
        yield from stream
        self.history += [Message("user", user), Message("assistant", stream.text.strip())]


def run_chat(
    session: ChatSession,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    interactive: bool = False,
) -> None:
    """Read user turns line by line. Interactive: prompts and streamed replies; otherwise (a
    pipe) each reply is written on its own line, so a conversation can be scripted."""
    if interactive:
        stdout.write(f"gptkit chat: {HELP}\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        # a typed \n is a line break within the turn
        text = line.rstrip("\r\n").replace("\\n", "\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            if interactive:
                stdout.write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system") :].strip()
            if interactive:
                stdout.write(f"(system message {'set' if session.system else 'cleared'})\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        if interactive:
            stdout.write("bot> ")
        try:
            for piece in session.reply(text):
                stdout.write(piece.replace("\n", " ") if not interactive else piece)
                stdout.flush()
        # e.g. a character the model's vocabulary lacks: say so, keep chatting
        except GptkitError as e:
            stdout.write(f"(error: {e})")
        stdout.write("\n")
        stdout.flush()
