"""Answers grounded in a document store: a folder of documents, cut into overlapping passages,
indexed with BM25 (the `bm25s` library), and the top passages put into the prompt with their
source names so that the reply can cite them.

    gptkit index DOCS_DIR --out INDEX [--run RUN]    # build; saved as a folder, reloaded by name
    gptkit chat RUN --index INDEX                     # each question answered from its passages
    gptkit serve RUN --index INDEX                    # the same for /v1/chat/completions

An index is JSON and numpy arrays (bm25s saves them without pickle), so loading one runs no
code. Built with --run, passages are measured in that run's tokens (so that k of them fit its
context) and the index records the tokenizer; a run with another tokenizer is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer, fingerprint

FORMAT = 1
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
INSTRUCTION = "Answer the question from the passages and cite the source of the answer."


@dataclass
class Passage:
    source: str  # the document's path inside the folder
    text: str
    score: float = 0.0


# --- documents and passages ---


def read_documents(folder: str | Path) -> tuple[dict[str, str], list[str]]:
    """{relative path: text} of the folder's text documents (any depth, hidden files skipped),
    and the files left out as not text (binary, not UTF-8, or empty)."""
    root = Path(folder)
    if not root.is_dir():
        raise GptkitError(f"{root}: no such folder (give a folder of .txt / .md documents)")
    docs: dict[str, str] = {}
    skipped: list[str] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or any(p.startswith(".") for p in rel.split("/")):
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text or not text.strip():
            skipped.append(rel)
            continue
        docs[rel] = text
    if not docs:
        what = (
            f"its {len(skipped)} files are binary or empty ({', '.join(skipped[:3])}"
            f"{' ...' if len(skipped) > 3 else ''})"
            if skipped
            else "it holds no files"
        )
        raise GptkitError(
            f"{root}: no text documents to index: {what}; give a folder of UTF-8 text files "
            "(.txt, .md)"
        )
    return docs, skipped


def split_passages(text: str, size: int, overlap: int, tok: Tokenizer | None = None) -> list[str]:
    """Overlapping windows of `size` words (or, with tok, tokens), each starting `size - overlap`
    after the last; paragraph breaks are kept inside a window."""
    if tok is None:
        words = re.findall(r"\S+\s*", text)
        pieces = [
            "".join(words[i : i + size]).strip()
            for i in range(0, max(1, len(words) - overlap), size - overlap)
        ]
    else:
        ids = tok.encode_plain(text)
        pieces = [
            tok.decode(ids[i : i + size]).strip()
            for i in range(0, max(1, len(ids) - overlap), size - overlap)
        ]
    return [p for p in pieces if p]


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise GptkitError(
            "grounded answers need the bm25s library: pip install 'gptkit[rag]'"
        ) from None
    return bm25s


def _terms(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


# --- the index ---


class Index:
    """Passages and their BM25 index, saved as a folder."""

    def __init__(self, passages: list[Passage], meta: dict[str, Any], bm25: Any) -> None:
        self.passages, self.meta, self.bm25 = passages, meta, bm25

    @classmethod
    def build(
        cls,
        folder: str | Path,
        size: int = 120,
        overlap: int = 30,
        tok: Tokenizer | None = None,
        run: str = "",
    ) -> Index:
        """The index of a folder's text documents (read_documents)."""
        docs, skipped = read_documents(folder)
        index = cls.from_documents(docs, size, overlap, tok, run)
        index.meta.update(skipped=skipped, folder=str(Path(folder).resolve()))
        return index

    @classmethod
    def from_documents(
        cls,
        docs: dict[str, str],
        size: int = 120,
        overlap: int = 30,
        tok: Tokenizer | None = None,
        run: str = "",
    ) -> Index:
        """The index of {source name: text} documents."""
        bm25s = _bm25s()
        if size < 8:
            raise GptkitError(f"--chunk must be at least 8, got {size}")
        if not 0 <= overlap < size:
            raise GptkitError(f"--overlap must be in [0, --chunk), got {overlap}")
        passages = [
            Passage(src, piece)
            for src, text in docs.items()
            for piece in split_passages(text, size, overlap, tok)
        ]
        bm25 = bm25s.BM25()
        bm25.index(_terms([f"{p.source}\n{p.text}" for p in passages]), show_progress=False)
        meta = {
            "format": FORMAT,
            "documents": len(docs),
            "skipped": [],
            "passages": len(passages),
            "chunk": size,
            "overlap": overlap,
            "unit": "tokens" if tok is not None else "words",
            "tokenizer": fingerprint(tok) if tok is not None else "",
            "run": run,
            "folder": "",
        }
        return cls(passages, meta, bm25)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        out = Path(out)
        if (out / "index.json").exists() and not overwrite:
            raise GptkitError(f"{out} already holds an index; pass --overwrite to replace it")
        if out.exists() and not out.is_dir():
            raise GptkitError(f"{out} is a file; name a folder for the index")
        out.mkdir(parents=True, exist_ok=True)
        self.bm25.save(out / "bm25", show_progress=False)
        with open(out / "passages.jsonl", "w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps({"source": p.source, "text": p.text}, ensure_ascii=False) + "\n")
        (out / "index.json").write_text(json.dumps(self.meta, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        bm25s = _bm25s()
        folder = Path(folder)
        if not (folder / "index.json").is_file():
            raise GptkitError(
                f"{folder} is not an index (no index.json); build one with gptkit index DOCS_DIR "
                f"--out {folder}"
            )
        try:
            meta = json.loads((folder / "index.json").read_text())
            passages = [
                Passage(r["source"], r["text"])
                for r in map(json.loads, (folder / "passages.jsonl").open(encoding="utf-8"))
            ]
            bm25 = bm25s.BM25.load(folder / "bm25", allow_pickle=False, show_progress=False)
        except (OSError, ValueError, KeyError) as e:
            raise GptkitError(f"{folder}: the index is damaged ({e}); build it again") from None
        if meta.get("format") != FORMAT or len(passages) != meta.get("passages"):
            raise GptkitError(
                f"{folder}: the index is damaged or from another version; build it again"
            )
        return cls(passages, meta, bm25)

    def check_tokenizer(self, tok: Tokenizer, where: str) -> None:
        """An index measured in one tokenizer's tokens is refused for a model with another."""
        made = self.meta.get("tokenizer", "")
        if made and made != fingerprint(tok):
            made_by = self.meta.get("run") or "another run"
            raise GptkitError(
                f"the index was built with another tokenizer (that of {made_by}), not {where}'s: "
                "its passages were cut to that tokenizer's lengths; rebuild it: gptkit index "
                f"{self.meta.get('folder', 'DOCS_DIR')} --out INDEX --run {where}"
            )

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The k best passages for the query, best first (fewer when fewer match at all)."""
        if not query.strip():
            return []
        k = min(k, len(self.passages))
        docs, scores = self.bm25.retrieve(_terms([query]), k=k, show_progress=False)
        return [
            Passage(self.passages[i].source, self.passages[i].text, float(s))
            for i, s in zip(docs[0].tolist(), scores[0].tolist())
            if s > 0
        ]


# --- prompts ---


def grounded_prompt(question: str, passages: list[Passage]) -> str:
    """The user's turn with its passages: numbered, each with its source name, then the question.
    Training data (question, passages, answer) and chat/serve render through this one function."""
    if not passages:
        return question
    body = "\n\n".join(f"[{i}] ({p.source}) {p.text}" for i, p in enumerate(passages, 1))
    return f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question}"


def grounded_messages(record: dict[str, Any]) -> tuple[str, str]:
    """A {question, passages: [{source, text}], answer} record as (user turn, answer); ValueError
    says what is wrong."""
    q, ps, answer = record.get("question"), record.get("passages"), record.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answer, str):
        raise ValueError("'answer' must be a string")
    if not isinstance(ps, list):
        raise ValueError("'passages' must be a list of {source, text} objects")
    passages = []
    for i, p in enumerate(ps):
        if not (isinstance(p, dict) and isinstance(p.get("text"), str)
                and isinstance(p.get("source", ""), str)):  # fmt: skip
            raise ValueError(f"passage {i} must be an object with a string 'text' (and 'source')")
        passages.append(Passage(p.get("source", ""), p["text"]))
    return grounded_prompt(q, passages), answer


def fit_passages(
    template: Any, before: list[Any], question: str, passages: list[Passage], budget: int
) -> tuple[str, list[Passage]]:
    """The grounded user turn with as many of the best passages as keep the prompt (the
    messages `before` it, this turn, the assistant marker) within `budget` tokens."""
    from gptkit.template import Message

    kept = list(passages)
    while kept:
        prompt = grounded_prompt(question, kept)
        if len(template.prompt_ids([*before, Message("user", prompt)])) <= budget:
            return prompt, kept
        kept.pop()
    return question, kept
