"""Text -> token shards, and the random windows training reads from them.

`prepare` streams a corpus of any size: a first pass counts (and, for char/bpe, trains the
tokenizer), a second tokenizes batches of chunks and appends them to `train.bin` / `val.bin`
(uint16 when the vocabulary fits, else uint32). Training memory-maps the shards.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y): inputs and targets, -100 where no loss
BLOCK_BYTES = 1 << 20  # read the corpus 1 MiB at a time
ENCODE_BATCH = 16  # chunks per batch-encoding call


def bundled_corpus() -> Path:
    """Tiny Shakespeare, shipped inside the package as the default corpus."""
    return Path(__file__).parent / "data" / "tinyshakespeare.txt"


def preset(name: str) -> Path:
    """A configuration shipped inside the package (gptkit/presets/NAME.yaml)."""
    return Path(__file__).parent / "presets" / f"{name}.yaml"


def default_preset() -> Path:
    """The main job's configuration, used by `gptkit train` without --config."""
    return preset("shakespeare-char")


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their .txt and .jsonl files, recursively) and glob patterns -> files."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".jsonl")
            )
            if not found:
                raise GptkitError(f"{p}: folder holds no .txt or .jsonl files")
            files.extend(found)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
            if not found:
                raise GptkitError(f"{item}: pattern matches no files")
            files.extend(found)
        else:
            raise GptkitError(f"{item}: no such file or folder")
    return files


def read_text_chunks(path: Path, errors: str) -> Iterator[str]:
    """Decoded pieces of about BLOCK_BYTES, cut at line ends; bad UTF-8 names its byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    consumed = 0
    carry = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            final = not block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                pending = len(decoder.getstate()[0])
                offset = consumed - pending + e.start
                raise GptkitError(
                    f"{path}: invalid UTF-8 at byte offset {offset}; "
                    "fix the file or pass --errors replace (gptkit prepare, gptkit eval)"
                ) from None
            consumed += len(block)
            text = carry + text
            if final:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < 4 * BLOCK_BYTES:
                carry = text  # no line end yet: wait for more (bounded)
                continue
            cut = cut or len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def _read_jsonl_docs(path: Path, errors: str) -> Iterator[str]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise GptkitError(
                    f"{path}: invalid UTF-8 at byte offset {offset + e.start} (line {lineno}); "
                    "fix the file or pass --errors replace (gptkit prepare, gptkit eval)"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptkitError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            text = rec.get("text") if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise GptkitError(
                    f'{path}:{lineno}: expected a JSON string or an object with a "text" string'
                )
            yield text


def iter_documents(files: list[Path], errors: str = "strict") -> Iterator[Iterator[str]]:
    """Each document as an iterator of its text chunks: a .txt file is one document, each line of
    a .jsonl file is one."""
    for path in files:
        if path.suffix == ".jsonl":
            for doc in _read_jsonl_docs(path, errors):
                yield iter([doc])
        else:
            yield read_text_chunks(path, errors)


@dataclass
class Meta:
    tokenizer: str
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    val_fraction: float
    sources: list[str]

    def save(self, folder: Path) -> None:
        (folder / "meta.json").write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Meta:
        f = folder / "meta.json"
        if not f.is_file():
            raise GptkitError(
                f"{folder}: not a prepared data folder (no meta.json); make one with `gptkit "
                "prepare`"
            )
        try:
            return cls(**json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise GptkitError(f"{f}: corrupt ({e}); prepare the data again") from e


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    errors: str = "strict",
    overwrite: bool = False,
    progress: bool = True,
    split_at: int | None = None,
) -> Meta:
    """Tokenize a corpus into OUT/{train,val}.bin, OUT/meta.json and OUT/tokenizer/.

    The split is by characters in file order: the first (1 - val_fraction) of the text trains,
    the rest validates (split_at: at that character instead, e.g. a document boundary).
    Documents are separated by the end-of-text token."""
    if not 0 < val_fraction < 1:
        raise GptkitError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    if (out / "meta.json").exists() and not overwrite:
        raise GptkitError(
            f"{out} already holds prepared data; pass --overwrite to replace it, or choose another "
            "--out"
        )
    files = resolve_inputs(inputs)
    if all(f.stat().st_size == 0 for f in files):
        raise GptkitError(f"corpus is empty: {', '.join(map(str, files))}")
    tok, total, docs = _first_pass(files, errors, tokenizer, vocab_size)
    if total == 0:
        raise GptkitError(f"corpus is empty: {', '.join(map(str, inputs))}")
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    with _progress(progress, total) as bar:
        shards = _ShardWriter(out, tok, dtype, docs > 1, bar)
        cut = split_at if split_at is not None else int(total * (1 - val_fraction))
        n_tokens = shards.write(files, errors, split_at=cut)
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok.save(tok_dir)
    meta = Meta(
        tokenizer=tok.kind,
        vocab_size=tok.vocab_size,
        dtype=np.dtype(dtype).name,
        train_tokens=n_tokens["train"],
        val_tokens=n_tokens["val"],
        val_fraction=val_fraction,
        sources=[str(f) for f in files],
    )
    meta.save(out)
    return meta


def _first_pass(
    files: list[Path], errors: str, tokenizer: str | Tokenizer, vocab_size: int
) -> tuple[Tokenizer, int, int]:
    """Pass 1 over the corpus: the tokenizer (trained on the way when it learns from the text),
    the number of characters and of documents."""
    counts = {"chars": 0, "docs": 0}

    def counted_chunks() -> Iterator[str]:
        for doc in iter_documents(files, errors):
            counts["docs"] += 1
            for chunk in doc:
                counts["chars"] += len(chunk)
                yield chunk

    if isinstance(tokenizer, Tokenizer) or tokenizer.startswith(("gpt2:", "run:")):
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer)
        for _ in counted_chunks():
            pass
    else:
        tok = build_tokenizer(tokenizer, counted_chunks(), vocab_size)
    return tok, counts["chars"], counts["docs"]


class _ShardWriter:
    """Pass 2: the corpus tokenized in batches and appended to train.bin / val.bin, written under
    temporary names so that a failure leaves no half-made data set behind. The split is at
    character split_at; documents end with the end-of-text token when there are several."""

    def __init__(self, out: Path, tok: Tokenizer, dtype: Any, multi_doc: bool, bar: Any) -> None:
        self.out, self.tok, self.dtype, self.multi_doc, self.bar = out, tok, dtype, multi_doc, bar
        self.eot = np.asarray([tok.eot_id], dtype=np.int64)
        self.n_tokens = {"train": 0, "val": 0}
        self.pending: list[tuple[str, str, bool]] = []  # (split, text, ends_document)

    def write(self, files: list[Path], errors: str, split_at: int) -> dict[str, int]:
        tmp = {s: self.out / f".{s}.bin.tmp" for s in ("train", "val")}
        try:
            with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
                sinks = {"train": ftrain, "val": fval}
                pos = 0
                for doc in iter_documents(files, errors):
                    for chunk, last in _with_last_flag(doc):
                        if pos < split_at < pos + len(chunk):
                            cut = split_at - pos
                            self.pending.append(("train", chunk[:cut], False))
                            self.pending.append(("val", chunk[cut:], last))
                        else:
                            self.pending.append(("train" if pos < split_at else "val", chunk, last))
                        pos += len(chunk)
                        if len(self.pending) >= ENCODE_BATCH:
                            self.flush(sinks)
                if self.pending:
                    self.flush(sinks)
            for s in ("train", "val"):
                os.replace(tmp[s], self.out / f"{s}.bin")
        finally:
            for f in tmp.values():
                f.unlink(missing_ok=True)
        return self.n_tokens

    def flush(self, sinks: dict[str, Any]) -> None:
        ids = self.tok.encode_batch([t for _, t, _ in self.pending])
        for (split, text, ends_doc), arr in zip(self.pending, ids):
            if ends_doc and self.multi_doc:
                arr = np.concatenate([arr, self.eot])
            arr.astype(self.dtype).tofile(sinks[split])
            self.n_tokens[split] += arr.size
            self.bar(len(text))
        self.pending.clear()


def _with_last_flag(chunks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    prev = None
    for c in chunks:
        if prev is not None:
            yield prev, False
        prev = c
    if prev is not None:
        yield prev, True


class _progress:
    """A rich progress bar over characters, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):  # noqa: ANN204
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("tokenizing"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeRemainingColumn(),
        )
        self.p.start()
        task = self.p.add_task("tok", total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.p.stop()


class DataSet:
    """A prepared data folder: its tokenizer, metadata and memory-mapped shards."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise GptkitError(f"{self.folder}: no such data folder; make one with `gptkit prepare`")
        self.meta = Meta.load(self.folder)
        self.tokenizer = load_tokenizer(self.folder / "tokenizer")

    def split(self, name: str) -> np.ndarray:
        path = self.folder / f"{name}.bin"
        if not path.is_file():
            raise GptkitError(f"{path} is missing; prepare the data again")
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=self.meta.dtype)
        return np.memmap(path, dtype=self.meta.dtype, mode="r")


class Batches:
    """Random (x, y) windows of block_size tokens from a shard; y is x shifted by one. The index
    generator's state is part of a checkpoint, so a resumed run sees the same batches."""

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, name: str = "train"
    ) -> None:
        if len(tokens) < block_size + 1:
            raise GptkitError(
                f"the {name} split has {len(tokens)} tokens, fewer than one context window plus "
                "one "
                f"({block_size + 1}); use a smaller model.block_size or a larger corpus"
            )
        self.tokens = tokens
        self.block_size, self.batch_size = block_size, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.tokens) - self.block_size, (self.batch_size,), generator=self.gen
        ).numpy()
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)


def windows(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_batches: int | None = None,
    generator: torch.Generator | None = None,
    split: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """(x, y) batches of windows of a token stream, for evaluation. Without a generator: every
    window in order, consecutive and non-overlapping, so each token after the first is predicted
    exactly once (the last, shorter window on its own); the first max_batches batches only when
    given. With one: max_batches batches of random windows, a quick estimate during training.
    split=(rank, world): every world-th window from rank on, so processes share the work."""
    T, n = block_size, len(tokens)
    if n < 2:
        raise GptkitError(f"need at least 2 tokens to evaluate, got {n}")
    if generator is not None:
        starts = torch.randint(
            max(1, n - T), ((max_batches or 1) * batch_size,), generator=generator
        ).numpy()
    else:
        starts = np.arange(0, n - 1, T)
        if max_batches is not None:
            starts = starts[: max_batches * batch_size]
    if split is not None:
        starts = starts[split[0] :: split[1]]
    full = [s for s in starts if s + T + 1 <= n]
    rest = [s for s in starts if s + T + 1 > n]
    for group in [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [
        [s] for s in rest
    ]:
        length = min(T, n - 1 - group[0]) if len(group) == 1 else T
        win = torch.from_numpy(
            np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in group])
        )
        yield win[:, :-1], win[:, 1:]
