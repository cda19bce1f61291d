"""A multi-turn chat over the one sampling core: history through the chat template, streamed
replies, and the oldest turns dropped when the conversation outgrows the context."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from gptkit.errors import GptkitError
from gptkit.inference.generate import SamplingParams
from gptkit.inference.speculative import Speculator
from gptkit.model import GPT
from gptkit.retrieval import Index, fit_passages
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit; "
    "type \\n for a line break"
)


class ChatSession:
    def __init__(
        self,
        model: GPT,
        tok: Tokenizer,
        params: SamplingParams,
        system: str = "",
        index: Index | None = None,
        k: int = 3,
    ) -> None:
        self.model, self.params = model, params
        self.template = ChatTemplate(tok)
        self.system = system
        self.history: list[Message] = []
        self.trimmed = 0  # turns dropped so far to fit the context
        self.static = False  # decode through a CUDA graph (generate.StaticDecoder)
        self.speculator: Speculator | None = None  # decode speculatively with a draft
        # grounded answers: each question goes to the model with its best k passages
        self.index, self.k = index, k
        self.sources: list[str] = []  # the last reply's passages' sources, best first

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, user: str) -> list[int]:
        """The template's ids for system + history + this user turn + the assistant marker, the
        oldest exchanges dropped (for good) while they leave too little room for the reply
        (ChatTemplate.fit)."""
        system = [Message("system", self.system)] if self.system else []
        if self.index is not None:
            user = self.ground(user, system)
        messages = system + self.history + [Message("user", user)]
        ids, dropped = self.template.fit(
            messages, self.model.config.block_size, self.params.max_new_tokens
        )
        del self.history[:dropped]
        self.trimmed += dropped
        return ids

    def ground(self, question: str, system: list[Message]) -> str:
        """The question with as many of its best passages as leave room for the reply (the
        history keeps the question alone: old passages would crowd out new ones)."""
        budget = self.template.prompt_budget(
            self.model.config.block_size, self.params.max_new_tokens
        )
        found = self.index.search(question, self.k)
        prompt, kept = fit_passages(self.template, system, question, found, budget)
        self.sources = [p.source for p in kept]
        return prompt

    def reply(self, user: str) -> Iterator[str]:
        """Stream the assistant's reply; the exchange joins the history when it is complete."""
        ids = self.prompt_ids(user)
        stream = self.template.reply(self.model, ids, self.params, self.static, self.speculator)
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
        if interactive and session.index is not None:
            found = ", ".join(f"[{i}] {s}" for i, s in enumerate(session.sources, 1))
            stdout.write(f"\n(passages: {found or 'none matched'})")
        stdout.write("\n")
        stdout.flush()
