"""Tokenizers behind one interface: character-level, byte-level BPE (Hugging Face `tokenizers`)
and GPT-2's published BPE. Each saves to and loads from a folder as JSON."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gptkit.errors import GptkitError

EOT = "<|endoftext|>"
META_FILE = "gptkit_tokenizer.json"
TEMPLATE_FILE = "chat_template.json"
JINJA_FILE = "chat_template.jinja"  # an imported model's own chat template


def _save_template(tok: Tokenizer, folder: Path) -> None:
    if tok.chat_template:
        (folder / TEMPLATE_FILE).write_text(json.dumps(tok.chat_template, indent=1))
    if tok.jinja_template:
        (folder / JINJA_FILE).write_text(tok.jinja_template, encoding="utf-8")


class Tokenizer:
    """encode / decode / vocab_size / special tokens; subclasses implement the first two."""

    kind: str = ""
    special_tokens: dict[str, int]
    # role -> marker token, "end" -> end of turn; see template.py
    chat_template: dict[str, str] | None = None
    jinja_template: str | None = None  # an imported model's Jinja chat template (template.py)
    eot_token: str = EOT  # ends a document, pads batches; an imported model's end-of-sequence
    bos_token: str | None = None  # an imported model's beginning-of-sequence token
    add_bos: bool = False  # prompts start with bos_token (Llama-family tokenizers)
    extra_eos_ids: tuple[int, ...] = ()  # more ids that end generation (generation_config.json)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        return self.special_tokens[self.eot_token]

    @property
    def bos_id(self) -> int | None:
        return self.special_tokens.get(self.bos_token) if self.bos_token else None

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends generation: the end-of-text token and any others the model names."""
        return [self.eot_id, *(i for i in self.extra_eos_ids if i != self.eot_id)]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt to continue: the text's ids, after the BOS token where the model wants one."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_plain(self, text: str) -> list[int]:
        """Encode text in which special-token strings are plain text."""
        return self.encode(text)

    def add_tokens(self, chars: Iterable[str] = (), specials: Iterable[str] = ()) -> Tokenizer:
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus, then the special tokens."""

    kind = "char"

    def __init__(
        self,
        chars: list[str],
        specials: list[str] | None = None,
        added: list[tuple[str, bool]] | None = None,
    ) -> None:
        # ids: the corpus's characters, then the special tokens, then tokens added later (new
        # characters or specials, in order), so that growing the vocabulary never moves an id.
        self.chars = list(chars)
        specials = specials if specials is not None else [EOT]
        self.base_specials = list(specials)
        self.added = list(added or [])
        self.itos = self.chars + list(specials) + [t for t, _ in self.added]
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(specials)}
        base = len(self.chars) + len(specials)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        for k, (t, special) in enumerate(self.added):
            (self.special_tokens if special else self.stoi)[t] = base + k
        # Fast path for encoding: a code point -> id table.
        size = max((ord(c) for c in self.stoi), default=0) + 1
        self._table = np.full(size, -1, dtype=np.int64)
        for c, i in self.stoi.items():
            self._table[ord(c)] = i

    def add_tokens(self, chars: Iterable[str] = (), specials: Iterable[str] = ()) -> CharTokenizer:
        """A copy with new characters and special tokens appended (existing ones are skipped)."""
        added = list(self.added)
        for c in sorted(set(chars) - set(self.stoi)):
            added.append((c, False))
        for t in specials:
            if t not in self.special_tokens:
                added.append((t, True))
        return CharTokenizer(self.chars, self.base_specials, added)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise GptkitError("cannot build a character tokenizer from an empty corpus")
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def _lookup(self, text: str) -> np.ndarray:
        """Ids of text's characters, -1 where the vocabulary lacks one."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        return np.where(
            codes < self._table.size, self._table[np.minimum(codes, self._table.size - 1)], -1
        )

    def encode_array(self, text: str) -> np.ndarray:
        ids = self._lookup(text)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            pos = int(bad[0])
            ch = text[pos]
            name = unicodedata.name(ch, "unnamed")
            raise GptkitError(
                f"character {ch!r} (U+{ord(ch):04X} {name}) at position {pos} is not in this "
                "character "
                f"tokenizer's vocabulary of {len(self.chars)} characters; use only characters from "
                "the training "
                "corpus, or train with data.tokenizer=bpe, which represents any text"
            )
        return ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def encode_plain(self, text: str) -> list[int]:
        # Conversation text (chat, serve, instruction eval) may hold characters the vocabulary
        # lacks; they become "?" (or are dropped) rather than stopping a conversation.
        ids = self._lookup(text)
        if "?" in self.stoi:
            return np.where(ids < 0, self.stoi["?"], ids).tolist()
        return ids[ids >= 0].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.itos)
        return "".join(self.itos[i] if 0 <= i < n else "\ufffd" for i in ids)

    def token_byte_lengths(self) -> np.ndarray:
        special = set(self.special_tokens.values())
        lengths = [0 if i in special else len(t.encode("utf-8")) for i, t in enumerate(self.itos)]
        return np.asarray(lengths, dtype=np.int64)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "chars": self.chars, "special_tokens": self.base_specials}
        if self.added:
            meta["added"] = [[t, special] for t, special in self.added]
        (folder / META_FILE).write_text(json.dumps(meta, ensure_ascii=False))
        _save_template(self, folder)


class HFTokenizer(Tokenizer):
    """A byte-level BPE from Hugging Face `tokenizers`: trained here ("bpe") or GPT-2's ("gpt2")."""

    def __init__(self, tok: object, kind: str, eot_token: str = EOT) -> None:
        self.tok = tok
        self.kind = kind
        self.eot_token = eot_token
        self.special_tokens = {eot_token: tok.token_to_id(eot_token)}  # type: ignore[attr-defined]
        if self.special_tokens[eot_token] is None:
            raise GptkitError(f"tokenizer has no {eot_token} token")

    @classmethod
    def from_model_folder(cls, folder: Path) -> HFTokenizer:
        """An imported model's own tokenizer: tokenizer.json with its special tokens, BOS and EOS
        from tokenizer_config.json and generation_config.json, and its Jinja chat template
        (tokenizer_config.json's chat_template, or chat_template.jinja)."""
        from tokenizers import Tokenizer as HFTok

        try:
            hf = HFTok.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise GptkitError(
                f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e})"
            ) from None
        conf = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        eos_ids = gen.get("eos_token_id", [])
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        eos = _token_text(conf.get("eos_token"))
        if eos is None and eos_ids:
            eos = hf.id_to_token(eos_ids[0])
        if eos is None or hf.token_to_id(eos) is None:
            raise GptkitError(
                f"{folder}: the tokenizer names no end-of-sequence token (eos_token in "
                "tokenizer_config.json or eos_token_id in generation_config.json)"
            )
        out = cls(hf, "hf", eos)
        out.special_tokens.update(specials)
        out.extra_eos_ids = tuple(eos_ids)
        bos = _token_text(conf.get("bos_token"))
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = hf.id_to_token(gen["bos_token_id"])
        if bos is not None and hf.token_to_id(bos) is not None:
            out.bos_token = bos
            out.special_tokens.setdefault(bos, hf.token_to_id(bos))
            # The tokenizer's own post-processor says whether a prompt starts with BOS.
            probe = hf.encode("a", add_special_tokens=True).ids
            out.add_bos = bool(conf.get("add_bos_token", probe[:1] == [hf.token_to_id(bos)]))
        template = conf.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (folder / JINJA_FILE).is_file():
            template = (folder / JINJA_FILE).read_text(encoding="utf-8")
        out.jinja_template = template if isinstance(template, str) and template.strip() else None
        return out

    @staticmethod
    def _byte_level(model: object) -> object:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, pre_tokenizers

        tok = HFTok(model)  # type: ignore[arg-type]
        # No prefix space and no normalizer: decode(encode(s)) == s for every string.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        from tokenizers import models, pre_tokenizers, trainers

        tok = cls._byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)  # type: ignore[attr-defined]
        return cls(tok, "bpe")

    @classmethod
    def gpt2(cls, path: str | Path) -> HFTokenizer:
        """GPT-2's BPE from a folder holding vocab.json + merges.txt or encoder.json + vocab.bpe."""
        from tokenizers import AddedToken, models

        p = Path(path)
        pairs = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]
        for vocab, merges in pairs:
            if (p / vocab).is_file() and (p / merges).is_file():
                try:
                    tok = cls._byte_level(models.BPE.from_file(str(p / vocab), str(p / merges)))
                except Exception as e:
                    raise GptkitError(f"{p}: cannot read GPT-2 BPE files: {e}") from e
                tok.add_special_tokens([AddedToken(EOT, special=True)])  # type: ignore[attr-defined]
                return cls(tok, "gpt2")
        if (p / "tokenizer.json").is_file():
            return cls._load_hf_json(p / "tokenizer.json", "gpt2")
        raise GptkitError(
            f"{p}: no GPT-2 tokenizer files found; expected vocab.json + merges.txt (Hugging Face "
            "names) "
            "or encoder.json + vocab.bpe (OpenAI names)"
        )

    @classmethod
    def _load_hf_json(cls, file: Path, kind: str, eot_token: str = EOT) -> HFTokenizer:
        from tokenizers import Tokenizer as HFTok

        try:
            return cls(HFTok.from_file(str(file)), kind, eot_token)
        except GptkitError:
            raise
        except Exception as e:
            raise GptkitError(f"{file}: not a readable tokenizer file: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Rust-side batch encoding, parallel over all cores.
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)  # type: ignore[attr-defined]
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)  # type: ignore[attr-defined]

    def encode_plain(self, text: str) -> list[int]:
        # Special-token strings inside user text stay text: a message cannot forge a role marker.
        self.tok.encode_special_tokens = True  # type: ignore[attr-defined]
        try:
            return self.encode(text)
        finally:
            self.tok.encode_special_tokens = False  # type: ignore[attr-defined]

    def add_tokens(self, chars: Iterable[str] = (), specials: Iterable[str] = ()) -> HFTokenizer:
        """A copy with new special tokens appended (byte-level BPE already spells any character)."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTok

        tok = HFTok.from_str(self.tok.to_str())  # type: ignore[attr-defined]
        new = [t for t in specials if t not in self.special_tokens]
        tok.add_special_tokens([AddedToken(t, special=True) for t in new])
        out = HFTokenizer(tok, self.kind, self.eot_token)
        out.special_tokens.update({t: tok.token_to_id(t) for t in list(self.special_tokens) + new})
        out.bos_token, out.add_bos, out.extra_eos_ids = (
            self.bos_token,
            self.add_bos,
            self.extra_eos_ids,
        )
        out.jinja_template = self.jinja_template
        return out

    def token_byte_lengths(self) -> np.ndarray:
        # Byte-level BPE spells each byte as one printable character, so a token's string
        # length is its byte count.
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = set(self.special_tokens.values())
        from tokenizers import decoders

        byte_level = isinstance(self.tok.decoder, decoders.ByteLevel)  # type: ignore[attr-defined]
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():  # type: ignore[attr-defined]
            if i in special:
                continue
            # Other schemes (SentencePiece's "▁" and <0x0A> byte tokens): what the token decodes to.
            lengths[i] = len(token) if byte_level else len(self.decode([i]).encode("utf-8"))
        return lengths

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))  # type: ignore[attr-defined]
        meta = {"kind": self.kind, "special_tokens": list(self.special_tokens)}
        if self.kind == "hf":
            meta.update(
                eot_token=self.eot_token,
                bos_token=self.bos_token,
                add_bos=self.add_bos,
                extra_eos_ids=list(self.extra_eos_ids),
            )
        (folder / META_FILE).write_text(json.dumps(meta))
        _save_template(self, folder)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptkitError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(folder: str | Path) -> Tokenizer:
    folder = Path(folder)
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise GptkitError(f"{folder}: no tokenizer here (missing {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptkitError(f"{meta_file}: corrupt tokenizer file ({e})") from e
    kind = meta.get("kind")
    if kind == "char":
        added = [(str(t), bool(special)) for t, special in meta.get("added", [])]
        tok: Tokenizer = CharTokenizer(meta["chars"], meta.get("special_tokens", [EOT]), added)
    elif kind in ("bpe", "gpt2", "hf"):
        tok = HFTokenizer._load_hf_json(folder / "tokenizer.json", kind, meta.get("eot_token", EOT))
        tok.bos_token, tok.add_bos = meta.get("bos_token"), bool(meta.get("add_bos", False))
        tok.extra_eos_ids = tuple(meta.get("extra_eos_ids", []))
        for t in meta.get("special_tokens", []):
            tid = tok.tok.token_to_id(t)  # type: ignore[attr-defined]
            if tid is not None:
                tok.special_tokens[t] = tid
    else:
        raise GptkitError(f"{meta_file}: unknown tokenizer kind {kind!r}")
    template_file = folder / TEMPLATE_FILE
    if template_file.is_file():
        tok.chat_template = json.loads(template_file.read_text(encoding="utf-8"))
    if (folder / JINJA_FILE).is_file():
        tok.jinja_template = (folder / JINJA_FILE).read_text(encoding="utf-8")
    return tok


def build_tokenizer(
    spec: str, texts: Iterable[str] | None = None, vocab_size: int = 4096
) -> Tokenizer:
    """spec: "char" or "bpe" (trained on texts), "gpt2:PATH" (GPT-2's files) or "run:RUN_DIR" (a
    run's)."""
    if spec.startswith("gpt2:"):
        return HFTokenizer.gpt2(spec.split(":", 1)[1])
    if spec.startswith("run:"):
        return load_tokenizer(Path(spec.split(":", 1)[1]) / "tokenizer")
    if texts is None:
        raise ValueError(f"tokenizer {spec!r} needs texts to train on")
    if spec == "char":
        return CharTokenizer.train(texts)
    if spec == "bpe":
        return HFTokenizer.train(texts, vocab_size)
    raise GptkitError(f"unknown tokenizer {spec!r}; use char, bpe, gpt2:PATH or run:RUN_DIR")


# Encoded to recognise a tokenizer: the same ids, the same tokenizer (ASCII letters only, so that
# a character vocabulary can encode it too).
PROBE = (
    "Passages are measured in the tokens of the model that reads them, so the index knows "
    "which tokenizer counted them and refuses another one"
)


def fingerprint(tok: Tokenizer) -> str:
    """A short hash of the ids tok gives a fixed text: two tokenizers that differ (a search
    index's and a model's, a draft's and its target's) almost surely give different ones."""
    return hashlib.sha256(json.dumps(tok.encode_plain(PROBE)).encode()).hexdigest()[:16]
