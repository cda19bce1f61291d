from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptkit import data as data_mod
from gptkit.data import Batches, DataSet, prepare, resolve_inputs
from gptkit.errors import GptkitError
from gptkit.tokenizer import CharTokenizer

from .conftest import SHAKESPEARE


def test_shakespeare_split_matches_known_counts(tmp_path: Path) -> None:
    """The whole corpus (over one 1 MiB read block): 90/10 in file order, as the data README says."""
    assert SHAKESPEARE.stat().st_size > data_mod.BLOCK_BYTES
    meta = prepare([str(SHAKESPEARE)], tmp_path / "d", "char", progress=False)
    assert (meta.train_tokens, meta.val_tokens) == (1_003_854, 111_540)
    assert meta.dtype == "uint16" and meta.vocab_size == 66
    ds = DataSet(tmp_path / "d")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert ds.tokenizer.decode(ds.split("train").tolist()) == text[:1_003_854]
    assert ds.tokenizer.decode(ds.split("val").tolist()) == text[1_003_854:]


def test_streaming_in_small_blocks_equals_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_text: Path) -> None:
    """Reading in many small blocks (many chunks and encode batches) gives the same tokens."""
    whole = prepare([str(small_text)], tmp_path / "a", "bpe", vocab_size=300, progress=False)
    monkeypatch.setattr(data_mod, "BLOCK_BYTES", 1000)
    chunked = prepare([str(small_text)], tmp_path / "b", "bpe", vocab_size=300, progress=False)
    a, b = DataSet(tmp_path / "a"), DataSet(tmp_path / "b")
    text = small_text.read_text()
    assert a.tokenizer.decode(a.split("train").tolist()) + a.tokenizer.decode(a.split("val").tolist()) == text
    assert b.tokenizer.decode(b.split("train").tolist()) + b.tokenizer.decode(b.split("val").tolist()) == text
    # Chunk boundaries sit at line ends, so BPE tokens hardly differ.
    assert abs((whole.train_tokens + whole.val_tokens) - (chunked.train_tokens + chunked.val_tokens)) < 50


def test_folder_glob_and_jsonl_documents(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha beta gamma\n" * 50)
    (src / "sub" / "b.txt").write_text("delta epsilon\n" * 50)
    (src / "c.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} zeta"}) for i in range(30)))
    (src / "ignored.bin").write_bytes(b"\xff\xfe")
    assert len(resolve_inputs([str(src)])) == 3
    assert len(resolve_inputs([str(src / "**" / "*.txt")])) == 2
    meta = prepare([str(src)], tmp_path / "d", "char", val_fraction=0.2, progress=False)
    ds = DataSet(tmp_path / "d")
    ids = np.concatenate([ds.split("train"), ds.split("val")])
    eot = ds.tokenizer.eot_id
    assert (ids == eot).sum() == 32  # one after each of the 32 documents
    assert meta.train_tokens + meta.val_tokens == ids.size


def test_uint32_for_large_vocabularies(tmp_path: Path) -> None:
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 68_000) if not 0xD800 <= c <= 0xDFFF][:66_000]
    text = "".join(chars[i % len(chars)] for i in range(140_000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    meta = prepare([str(tmp_path / "big.txt")], tmp_path / "d", "char", progress=False)
    assert meta.dtype == "uint32" and meta.vocab_size > 65536
    ds = DataSet(tmp_path / "d")
    assert ds.tokenizer.decode(ds.split("train")[:100].tolist()) == text[:100]


def test_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello world\n" * 10 + b"ab\xffcd\n")
    with pytest.raises(GptkitError, match=r"bad.txt: invalid UTF-8 at byte offset 122"):
        prepare([str(f)], tmp_path / "d", "char", progress=False)
    assert not (tmp_path / "d" / "meta.json").exists()
    meta = prepare([str(f)], tmp_path / "d", "char", errors="replace", progress=False)
    assert meta.train_tokens + meta.val_tokens == 126


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.write_text(""), "corpus is empty"),
        (lambda p: None, "no such file"),
        (lambda p: p.write_text('{"text": 3}\n'), "expected a JSON string"),
        (lambda p: p.write_text("{nope\n"), "not valid JSON"),
    ],
)
def test_bad_corpora(tmp_path: Path, setup: object, message: str) -> None:
    f = tmp_path / ("c.jsonl" if "JSON" in message else "c.txt")
    setup(f)  # type: ignore[operator]
    with pytest.raises(GptkitError, match=message):
        prepare([str(f)], tmp_path / "d", "char", progress=False)


def test_prepare_refuses_to_overwrite(tmp_path: Path, small_text: Path) -> None:
    prepare([str(small_text)], tmp_path / "d", "char", progress=False)
    before = (tmp_path / "d" / "train.bin").read_bytes()
    with pytest.raises(GptkitError, match="--overwrite"):
        prepare([str(small_text)], tmp_path / "d", "bpe", progress=False)
    assert (tmp_path / "d" / "train.bin").read_bytes() == before


def test_batches_are_windows_and_resumable() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, block_size=16, batch_size=4, seed=0)
    x, y = b.next()
    assert x.shape == (4, 16) and (y[:, :-1] == x[:, 1:]).all() and (y - x == 1).all()
    state = b.state()
    after = [b.next() for _ in range(3)]
    b2 = Batches(tokens, block_size=16, batch_size=4, seed=123)
    b2.load_state(state)
    for (xa, _), (xb, _) in zip(after, [b2.next() for _ in range(3)]):
        assert (xa == xb).all()
    with pytest.raises(GptkitError, match="fewer than one context window"):
        Batches(tokens[:10], block_size=16, batch_size=4, seed=0)


def test_char_tokenizer_missing_in_data_folder(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="not a prepared data folder"):
        DataSet(tmp_path)
    CharTokenizer(["a"]).save(tmp_path / "tokenizer")
    with pytest.raises(GptkitError, match="no such data folder"):
        DataSet(tmp_path / "nope")
