from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.errors import GptkitError
from gptkit.tokenizer import EOT, CharTokenizer, HFTokenizer, build_tokenizer, load_tokenizer

from .conftest import SHAKESPEARE

CORPUS = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
CHAR = CharTokenizer.train([CORPUS])
BPE = HFTokenizer.train([CORPUS], vocab_size=512)


def test_char_vocab_from_corpus() -> None:
    full = CharTokenizer.train([SHAKESPEARE.read_text(encoding="utf-8")])
    assert len(full.chars) == 65 and full.vocab_size == 66
    assert full.eot_id == 65 and full.decode([65]) == EOT


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=sorted(set(CORPUS))))
def test_char_round_trip(s: str) -> None:
    ids = CHAR.encode(s)
    assert len(ids) == len(s)
    assert CHAR.decode(ids) == s


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(s: str) -> None:
    assert BPE.decode(BPE.encode(s)) == s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=8))
def test_batch_encoding_equals_single(texts: list[str]) -> None:
    for tok in (CHAR, BPE):
        if tok is CHAR:
            texts = ["".join(c for c in t if c in CHAR.stoi) for t in texts]
        assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_unknown_character_is_a_clear_error() -> None:
    with pytest.raises(GptkitError, match=r"'é' \(U\+00E9 LATIN SMALL LETTER E WITH ACUTE\) at position 8"):
        CHAR.encode("cafe café")


def test_bpe_vocab_size_and_compression() -> None:
    assert BPE.vocab_size == 512
    assert len(BPE.encode(CORPUS[:10_000])) < 0.6 * 10_000
    assert BPE.encode(EOT) == [BPE.eot_id]


def test_byte_lengths() -> None:
    text = CORPUS[:5000]
    for tok in (CHAR, BPE):
        lengths = tok.token_byte_lengths()
        assert len(lengths) == tok.vocab_size
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode())
        assert lengths[tok.eot_id] == 0


@pytest.mark.parametrize("tok", [CHAR, BPE], ids=["char", "bpe"])
def test_save_load(tok: object, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")  # type: ignore[attr-defined]
    back = load_tokenizer(tmp_path / "t")
    s = "First Citizen:\nBefore we proceed"
    assert back.encode(s) == tok.encode(s)  # type: ignore[attr-defined]
    assert back.vocab_size == tok.vocab_size and back.kind == tok.kind  # type: ignore[attr-defined]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptkit_tokenizer.json").write_text("{broken")
    with pytest.raises(GptkitError, match="corrupt"):
        load_tokenizer(tmp_path)
    with pytest.raises(GptkitError, match="no GPT-2 tokenizer files"):
        build_tokenizer(f"gpt2:{tmp_path}")
