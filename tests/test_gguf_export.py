"""GGUF export, proven by llama.cpp itself (through llama-cpp-python): its tokenizer, logits,
greedy generation, q8_0 perplexity and chat-template rendering against gptkit's."""

from __future__ import annotations

import itertools
import math
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptkit.config import load_config
from gptkit.finetune.instruct import finetune, finetune_config
from gptkit.formats.gguf import export_gguf
from gptkit.formats.hf import import_hf
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.loader import load_model
from gptkit.template import ChatTemplate, Message
from gptkit.training.train import train

from .conftest import DATA, SHAKESPEARE, tiny_overrides
from .hf_models import gpt2_model, hf_model

pytestmark = pytest.mark.slow  # llama.cpp itself reads every file: end-to-end, run by .ci/run

try:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
except ImportError:  # an optional test dependency: it compiles llama.cpp on install
    llama_cpp = None
    print("llama-cpp-python is not installed: the tests that run llama.cpp are skipped (pip install llama-cpp-python)")
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")

RUNS = ("gpt2", "llama", "qwen2", "qwen3", "bpe-gpt2", "bpe-llama")
PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, bpe_runs: dict[str, Path]) -> dict[str, Path]:
    """GPT-2 and each Llama family imported from random-weight transformers models, and two runs
    trained on a byte-level BPE (conftest's bpe_runs: GPT-2's architecture and the Llama one)."""
    tmp = tmp_path_factory.mktemp("gguf")
    out = {}
    _, folder = gpt2_model(tmp / "gpt2-hf", vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    out["gpt2"] = import_hf(folder, tmp / "gpt2", tokenizer=str(DATA / "gpt2"))
    for family in ("llama", "qwen2", "qwen3"):
        extra = {"head_dim": 32, "tie_word_embeddings": True} if family == "qwen3" else {}
        pre = {"llama": "llama3", "qwen2": "qwen2", "qwen3": "smollm"}[family]
        folder = hf_model(tmp / f"{family}-hf", family, pre=pre, **extra)
        out[family] = import_hf(folder, tmp / family)
    out["bpe-gpt2"], out["bpe-llama"] = bpe_runs["gpt2"], bpe_runs["llama"]
    return out


@pytest.fixture(scope="module")
def chat_run(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BPE run fine-tuned for a few steps: its tokenizer has gptkit's chat template tokens."""
    out = tmp_path_factory.mktemp("gguf-chat") / "chat"
    sets = ["train.max_steps=4", "train.batch_size=4", "train.dtype=float32", "train.tensorboard=false",
            "train.eval_interval=4", "train.warmup_steps=1"]  # fmt: skip
    data = [str(DATA / "self_instruct_seed_tasks.chat.jsonl")]
    finetune(runs["bpe-gpt2"], data, out, finetune_config(None, sets), progress=False, quiet=True)
    return out


def _llama(path: Path, n_ctx: int = 128, vocab_only: bool = False) -> object:
    """llama.cpp on the file, with an f32 KV cache (its default f16 cache would round what is
    compared at 1e-3) and without its extra (repacked) weight buffers (with them llama.cpp segfaults in decode on
    q8_0 files on this machine's CPU; the file and the arithmetic are the same either way)."""
    defaults = llama_cpp.llama_model_default_params

    def no_repacking() -> object:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                               vocab_only=vocab_only, type_k=0, type_v=0, seed=0)  # fmt: skip
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


@pytest.fixture(scope="module")
def f32_files(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gguf-files")
    return {name: export_gguf(run, tmp / f"{name}.gguf", "f32") for name, run in runs.items()}


# --- tokenization ---

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")), max_size=80)
# Text with the tokenizers' own special-token strings mixed in.
WITH_SPECIALS = st.lists(st.one_of(TEXT, st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<|end|>"])),
                         max_size=5).map("".join)  # fmt: skip


@pytest.fixture(scope="module")
def vocabularies(runs: dict[str, Path], f32_files: dict[str, Path], chat_run: Path, tmp_path_factory) -> dict:
    """(gptkit tokenizer, llama.cpp vocabulary) for each kind of pre-tokenizer and the chat run."""
    chat_file = export_gguf(chat_run, tmp_path_factory.mktemp("gguf-chat-file") / "chat.gguf", "f32")
    named = {**{k: f32_files[k] for k in ("gpt2", "llama", "qwen2", "qwen3", "bpe-gpt2")}, "chat": chat_file}
    runs_of = {**runs, "chat": chat_run}
    return {k: (load_model(runs_of[k])[1], _llama(f, vocab_only=True)) for k, f in named.items()}


@needs_llama_cpp
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "qwen3", "bpe-gpt2", "chat"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, mixed=WITH_SPECIALS)
def test_llama_cpp_tokenizes_as_gptkit(vocabularies: dict, name: str, text: str, mixed: str) -> None:
    """GPT-2's, Llama 3's, Qwen2's and SmolLM2's pre-tokenizers and gptkit's own BPE: the same ids
    from llama.cpp, special-token strings as text (plain) and as their tokens (special)."""
    tok, llm = vocabularies[name]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_plain(text)
    assert llm.tokenize(mixed.encode(), add_bos=False, special=False) == tok.encode_plain(mixed)
    assert llm.tokenize(mixed.encode(), add_bos=False, special=True) == tok.encode(mixed)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["gpt2", "bpe-gpt2", "llama"])
def test_tiny_shakespeare_tokenizes_the_same(vocabularies: dict, name: str) -> None:
    tok, llm = vocabularies[name]
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ours = tok.encode_plain(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours and len(ours) > 50_000


# --- the model ---


@needs_llama_cpp
@pytest.mark.parametrize("name", RUNS)
def test_f32_logits_and_greedy_generation_match(runs: dict[str, Path], f32_files: dict[str, Path], name: str) -> None:
    model, tok, cfg = load_model(runs[name])
    ids = tok.encode(PROMPT)[: cfg.model.block_size // 2]
    llm = _llama(f32_files[name], n_ctx=cfg.model.block_size)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0].numpy()
        diff = np.abs(theirs - ours).max()
        assert diff < 1e-3, diff
        assert np.abs(ours).max() > 0.5  # logits that would show a mapping error

        n = min(32, cfg.model.block_size - len(ids))
        llm.reset()
        greedy = list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), n))
        mine = [int(t[0]) for t in generate_ids(model, torch.tensor([ids]), SamplingParams(max_new_tokens=n, temperature=0))]
        assert greedy == mine and n >= 24
    finally:
        llm.close()


def _perplexity(llm: object, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return math.exp(nll / count)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["bpe-gpt2", "bpe-llama"])
def test_quantized_perplexity_is_close_to_f32(runs: dict[str, Path], f32_files: dict[str, Path], name: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """On text the model never saw (the end of tiny Shakespeare), llama.cpp's perplexity of the
    q8_0 and f16 files against the f32 file's, and the f32 file's against gptkit's own."""
    model, tok, cfg = load_model(runs[name])
    text = SHAKESPEARE.read_text(encoding="utf-8")[-20_000:]
    ids, block = tok.encode(text), cfg.model.block_size
    windows = [ids[i : i + block] for i in range(0, block * 16, block)]
    with torch.no_grad():
        x = torch.tensor(windows)
        ours = math.exp(torch.nn.functional.cross_entropy(model(x[:, :-1])[0].transpose(1, 2), x[:, 1:]).item())
    ppl = {}
    for outtype in ("f32", "f16", "q8_0", "q4_0"):
        path = f32_files[name] if outtype == "f32" else export_gguf(runs[name], tmp_path / f"{outtype}.gguf", outtype)
        llm = _llama(path, n_ctx=block)
        ppl[outtype] = _perplexity(llm, windows)
        llm.close()
    assert ppl["f32"] < 0.5 * tok.vocab_size  # a model that learned something
    assert abs(ppl["f32"] / ours - 1) < 1e-4, (ppl, ours)
    assert abs(ppl["f16"] / ppl["f32"] - 1) < 0.01, ppl
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02, ppl
    assert (tmp_path / "q8_0.gguf").stat().st_size < 0.45 * f32_files[name].stat().st_size
    assert abs(ppl["q4_0"] / ppl["f32"] - 1) < 0.05, ppl  # 4 bits: within 5 %, as gptkit's own int4
    # 18 bytes a block of 32 against q8_0's 34; the tokenizer and the f32 norms weigh the same in both
    assert (tmp_path / "q4_0.gguf").stat().st_size < 0.8 * (tmp_path / "q8_0.gguf").stat().st_size


# --- the chat template ---

CONVERSATION = [Message("system", "You are terse."), Message("user", "Who is Romeo?"),
                Message("assistant", "A Montague."), Message("user", "And Juliet?")]  # fmt: skip


@needs_llama_cpp
@pytest.mark.parametrize("name", ["chat", "bpe-gpt2", "llama", "qwen2"])
def test_llama_cpp_renders_the_same_chat_prompt(runs: dict[str, Path], chat_run: Path, vocabularies: dict,
                                                f32_files: dict, name: str) -> None:  # fmt: skip
    """llama-cpp-python's chat completion renders the file's template with the file's BOS and EOS
    (as Llama does for chat_template.default): the prompt's ids equal gptkit's template's."""
    run = chat_run if name == "chat" else runs[name]
    _, tok, _ = load_model(run)
    llm = vocabularies[name][1] if name in vocabularies else _llama(f32_files[name], vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    model = llm._model
    formatter = Jinja2ChatFormatter(template, eos_token=model.token_get_text(llm.token_eos()),
                                    bos_token=model.token_get_text(llm.token_bos()))  # fmt: skip
    messages = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    prompt = formatter(messages=messages).prompt
    theirs = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert theirs == ChatTemplate(tok).prompt_ids(CONVERSATION)
    if name == "chat":  # gptkit's own markers, one token each, and the turn's end is llama.cpp's EOT
        assert prompt.endswith("<|user|>And Juliet?<|end|><|assistant|>")
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == tok.special_tokens["<|end|>"]
    if name == "llama":
        assert theirs[0] == tok.bos_id and llm.metadata["tokenizer.ggml.add_bos_token"] == "true"


# --- bad input ---


def test_tokenizers_llama_cpp_cannot_read_are_named() -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from gptkit.errors import GptkitError
    from gptkit.formats.gguf import llama_cpp_pre
    from gptkit.tokenizer import HFTokenizer

    sentencepiece = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece.decoder = decoders.Metaspace()
    unknown_split = Tokenizer(models.BPE())
    unknown_split.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\w+|\W"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    unknown_split.decoder = decoders.ByteLevel()
    for tok, says in ((sentencepiece, "SentencePiece-style"), (unknown_split, "Split + ByteLevel")):
        tok.add_special_tokens(["<|endoftext|>"])
        with pytest.raises(GptkitError, match=re.escape(says)):
            llama_cpp_pre(HFTokenizer(tok, "hf"))


def cli(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # a file-size limit stands in for a full disk: writes fail part way
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if limit_bytes else None)  # fmt: skip


def test_bad_exports_are_one_line_and_leave_no_file(
    runs: dict[str, Path], bpe_runs: dict[str, Path], trained_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    cases = [
        ((str(trained_run), "--to-gguf", str(out)), "character-level tokenizer"),  # the char run
        ((str(runs["bpe-gpt2"]), "--to-gguf", str(out), "--outtype", "q4_k"), "invalid choice"),
        ((str(runs["bpe-gpt2"]), "--to-gguf", str(tmp_path)), "is a folder"),
    ]
    for args, says in cases:
        r = cli("export", *args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()
    softcap = tmp_path / "softcap"
    cfg = load_config(None, tiny_overrides(**{"train.max_steps": 1, "model.logit_softcap": 30.0}))
    cfg.data.dir = str(bpe_runs["data"])
    train(cfg, softcap, progress=False, quiet=True)
    r = cli("export", str(softcap), "--to-gguf", str(out))
    assert r.returncode == 2 and "model.logit_softcap=0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # A write that fails part way (the disk fills): one line, nothing left at FILE or beside it.
    r = cli("export", str(runs["bpe-gpt2"]), "--to-gguf", str(out), limit_bytes=100_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.glob("m.gguf*")) == []
    # An existing file is kept without --overwrite, replaced with it.
    r = cli("export", str(runs["bpe-gpt2"]), "--to-gguf", str(out))
    assert r.returncode == 0 and "llama-cli -m" in r.stdout, r.stderr
    before = out.read_bytes()
    r = cli("export", str(runs["bpe-gpt2"]), "--to-gguf", str(out), "--outtype", "q8_0")
    assert r.returncode == 2 and "--overwrite" in r.stderr and out.read_bytes() == before
    r = cli("export", str(runs["bpe-gpt2"]), "--to-gguf", str(out), "--outtype", "q8_0", "--overwrite")
    assert r.returncode == 0 and out.stat().st_size < len(before)
