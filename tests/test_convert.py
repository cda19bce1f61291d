"""Hugging Face interop, with real `transformers` models (random weights, built locally) as oracles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.checkpoint import load_model
from gptkit.convert import export_hf, import_hf
from gptkit.errors import GptkitError
from gptkit.generate import SamplingParams, generate_ids
from gptkit.tokenizer import HFTokenizer

from .conftest import DATA, SHAKESPEARE

transformers = pytest.importorskip("transformers")
GPT2_FILES = DATA / "gpt2"
GPT2_HF = DATA / "gpt2-hf"
OURS_GPT2 = HFTokenizer.gpt2(GPT2_FILES)
THEIRS_GPT2 = transformers.GPT2TokenizerFast(vocab=str(GPT2_FILES / "encoder.json"), merges=str(GPT2_FILES / "vocab.bpe"))


def test_gpt2_tokenizer_known_ids() -> None:
    assert OURS_GPT2.vocab_size == 50257 and OURS_GPT2.eot_id == 50256
    assert OURS_GPT2.encode("Hello world") == [15496, 995]
    assert OURS_GPT2.encode(" the") == [262]
    hf_names = HFTokenizer.gpt2(GPT2_HF)
    assert hf_names.encode("Hello world") == [15496, 995]


def test_gpt2_tokenizer_on_all_of_shakespeare() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = OURS_GPT2.encode(text)
    assert len(ids) == 338_025
    assert ids == THEIRS_GPT2(text)["input_ids"]
    assert OURS_GPT2.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(),
            st.sampled_from(
                ["don't", "I'm", "we've", "it's", "they'll", "   ", "\n\n", "\t", "12345", "3.14", "😀🎉", "naïve café"]
            ),
        ),
        max_size=6,
    ).map("".join)
)
def test_gpt2_tokenizer_matches_transformers(s: str) -> None:
    assert OURS_GPT2.encode(s) == THEIRS_GPT2(s)["input_ids"]
    assert OURS_GPT2.decode(OURS_GPT2.encode(s)) == s


def hf_model(tmp_path: Path, name: str, **shape: int) -> tuple[object, Path]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and gains too, so that every tensor's mapping is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


SHAPES = {
    "tiny": dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "gpt2-124M": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_import_export_parity_and_round_trip(tmp_path: Path, shape: str) -> None:
    theirs, folder = hf_model(tmp_path, "hf", **SHAPES[shape])
    run = import_hf(folder, tmp_path / "run", tokenizer=str(GPT2_FILES))
    ours, tok, cfg = load_model(run)
    assert cfg.model.n_layer == SHAPES[shape]["n_layer"] and tok.vocab_size == 50257
    ids = torch.tensor([OURS_GPT2.encode("To be, or not to be, that is the question:")])
    with torch.no_grad():
        ref = theirs(ids).logits
        mine, _ = ours(ids)
    diff = (ref - mine).abs().max().item()
    assert diff < 1e-4, diff

    out = export_hf(run, tmp_path / "back")
    assert (out / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() < 1e-4
    original = theirs.state_dict()
    for k, v in back.state_dict().items():  # every tensor bit for bit
        assert torch.equal(v, original[k]), k
    tok_back = transformers.AutoTokenizer.from_pretrained(out)
    assert tok_back("Hello world")["input_ids"] == [15496, 995]


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    _, folder = hf_model(tmp_path, "hf", **SHAPES["tiny"])
    run = import_hf(folder, tmp_path / "run", tokenizer=str(GPT2_FILES))
    exported = export_hf(run, tmp_path / "back")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ours, _, _ = load_model(run)
    prompt = torch.tensor([OURS_GPT2.encode("ROMEO: But soft, what light")])
    got = [int(t[0]) for t in generate_ids(ours, prompt, SamplingParams(max_new_tokens=30, temperature=0))]
    ref = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=30,
        min_new_tokens=30,
        do_sample=False,
        pad_token_id=50256,
        eos_token_id=None,
    )
    assert got == ref[0, prompt.size(1) :].tolist()


def test_char_run_exports_with_tokenizer(tmp_path: Path, trained_run: Path) -> None:
    out = export_hf(trained_run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours, our_tok, _ = load_model(trained_run)
    text = "First Citizen:\nSpeak."
    assert tok(text)["input_ids"] == our_tok.encode(text)
    assert tok.decode(our_tok.encode(text)) == text
    ids = torch.tensor([our_tok.encode(text)])
    with torch.no_grad():
        assert (model(ids).logits - ours(ids)[0]).abs().max().item() < 1e-4


def test_pytorch_bin_is_loaded_without_pickle_code(tmp_path: Path) -> None:
    theirs, folder = hf_model(tmp_path, "hf", **SHAPES["tiny"])
    binary = tmp_path / "bin"  # the older format: a pickled state dict, loaded with weights_only=True
    binary.mkdir()
    (binary / "config.json").write_text((folder / "config.json").read_text())
    torch.save(theirs.state_dict(), binary / "pytorch_model.bin")
    run = import_hf(binary, tmp_path / "run", tokenizer=str(GPT2_FILES))
    ours, _, _ = load_model(run)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("problem", ["model_type", "missing_weights", "shape", "truncated", "no_config", "vocab"])
def test_bad_hf_folders(tmp_path: Path, problem: str) -> None:
    _, folder = hf_model(tmp_path, "hf", **{**SHAPES["tiny"], "vocab_size": 1000})
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    tokenizer = None
    if problem == "model_type":
        cfg["model_type"] = "llama"
        cfg_file.write_text(json.dumps(cfg))
    elif problem == "missing_weights":
        (folder / "model.safetensors").unlink()
    elif problem == "shape":
        cfg["n_embd"] = 64
        cfg_file.write_text(json.dumps(cfg))
    elif problem == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif problem == "no_config":
        cfg_file.unlink()
    elif problem == "vocab":
        tokenizer = str(GPT2_FILES)  # 50,257 tokens for a model with 1,000 embeddings
    with pytest.raises(GptkitError):
        import_hf(folder, tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_export_refuses_modern_architecture(tmp_path: Path, small_data: Path) -> None:
    from gptkit.config import load_config
    from gptkit.train import train

    from .conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(**{"train.max_steps": 1, "model.pos_embedding": "rope"}))
    cfg.data.dir = str(small_data)
    train(cfg, tmp_path / "r", progress=False, quiet=True)
    with pytest.raises(GptkitError, match="model.pos_embedding=learned"):
        export_hf(tmp_path / "r", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_prepare_with_gpt2_tokenizer(tmp_path: Path, small_text: Path) -> None:
    from gptkit.data import DataSet, prepare

    meta = prepare([str(small_text)], tmp_path / "d", f"gpt2:{GPT2_HF}", progress=False)
    assert meta.tokenizer == "gpt2" and meta.vocab_size == 50257 and meta.dtype == "uint16"
    ds = DataSet(tmp_path / "d")
    text = small_text.read_text()
    ids = ds.split("train").tolist() + ds.split("val").tolist()
    assert ds.tokenizer.decode(ids) == text
    assert abs(len(ids) - len(THEIRS_GPT2(text)["input_ids"])) <= 2  # only the split point may differ
