"""Hugging Face interop, with real `transformers` models (random weights, built locally) as oracles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.errors import GptkitError
from gptkit.formats.hf import export_hf, import_hf
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.loader import load_model
from gptkit.tokenizer import HFTokenizer

from .conftest import DATA, DEVICE, SHAKESPEARE

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
    from .hf_models import gpt2_model

    return gpt2_model(tmp_path / name, **shape)


SHAPES = {
    "tiny": dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "gpt2-124M": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.cuda
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


def test_exact_gelu_gpt2_imports_and_exports(tmp_path: Path) -> None:
    """A GPT-2 with transformers' exact GELU (activation_function "gelu") imports as
    model.mlp=gelu_exact with the same logits, exports back as "gelu" with the same logits, and
    GGUF export (llama.cpp's GPT-2 computes the tanh form) is refused in one line."""
    from .hf_models import gpt2_model

    theirs, folder = gpt2_model(tmp_path / "hf", **SHAPES["tiny"], activation_function="gelu")
    with torch.no_grad():  # pre-activations of order 1, where the two GELUs differ (by 5e-4 at most), and
        for block in theirs.transformer.h:  # an MLP that dominates the residual, so the logits show it
            block.mlp.c_fc.weight.mul_(40)
            block.mlp.c_proj.weight.mul_(40)
        theirs.transformer.wte.weight.mul_(30)  # (the tied head) logits of order 10: the forms differ by 1e-3 there
    theirs.save_pretrained(folder)
    run = import_hf(folder, tmp_path / "run", tokenizer=str(GPT2_FILES))
    ours, _, cfg = load_model(run)
    assert cfg.model.mlp == "gelu_exact"
    ids = torch.tensor([OURS_GPT2.encode("To be, or not to be, that is the question:")])
    with torch.no_grad():
        ref = theirs(ids).logits
        same_diff = (ours(ids)[0] - ref).abs().max().item()
    assert same_diff < 1e-4, same_diff
    out = export_hf(run, tmp_path / "back")
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() < 1e-4
    # the tanh form is a different function: the same weights give other logits
    cfg_tanh = json.loads((folder / "config.json").read_text()) | {"activation_function": "gelu_new"}
    (folder / "config.json").write_text(json.dumps(cfg_tanh))
    tanh_run = import_hf(folder, tmp_path / "tanh", tokenizer=str(GPT2_FILES))
    with torch.no_grad():
        tanh_diff = (load_model(tanh_run)[0](ids)[0] - ref).abs().max().item()
    assert tanh_diff > 5e-4, tanh_diff  # (measured 1.2e-3; the same form: 0.0)
    from gptkit.formats.gguf import export_gguf

    with pytest.raises(GptkitError, match="--to-hf"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


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
        cfg["model_type"] = "llama"  # a Llama config without the Llama fields
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
    from gptkit.training.train import train

    from .conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(**{"train.max_steps": 1, "model.pos_embedding": "rope"}))
    cfg.data.dir = str(small_data)
    train(cfg, tmp_path / "r", progress=False, quiet=True)
    with pytest.raises(GptkitError, match="model.norm=rmsnorm, model.mlp=swiglu, model.bias=false"):
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
    # a run trains on the folder and records its tokenizer's kind (once refused by validation)
    from gptkit.checkpoint import load_run_config
    from gptkit.config import load_config
    from gptkit.training.train import train

    from .conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(**{"train.max_steps": 1}))
    cfg.data.dir = str(tmp_path / "d")
    train(cfg, tmp_path / "r", progress=False, quiet=True)
    assert load_run_config(tmp_path / "r").data.tokenizer == "gpt2"


# --- the Llama family: Llama, Qwen2, Qwen3 ---

FAMILY_NAMES = ["llama", "qwen2", "qwen3"]
MESSAGES = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Who is Romeo?"},
    {"role": "assistant", "content": "A Montague."},
    {"role": "user", "content": "And Juliet?"},
]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each family's tiny folder (Qwen3 with head_dim 32 at hidden 64: wider heads than hidden /
    heads) and its import as a gptkit run."""
    from .hf_models import hf_model

    out = {}
    for family in FAMILY_NAMES:
        extra = {"head_dim": 32, "tie_word_embeddings": True} if family == "qwen3" else {}
        folder = hf_model(tmp_path_factory.mktemp(family), family, **extra)
        run = import_hf(folder, tmp_path_factory.mktemp("runs") / family)
        out[family] = (folder, run)
    return out


def _logit_parity(folder: Path, run: Path, length: int = 40, device: str | torch.device = "cpu") -> float:
    model, _, _ = load_model(run, device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval().to(device)
    x = torch.randint(0, min(300, model.config.vocab_size), (2, length), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    with torch.no_grad():
        return (model(x)[0] - hf(x).logits).abs().max().item()


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.cuda
def test_family_logits_generation_and_cache_match_transformers(families: dict, family: str) -> None:
    folder, run = families[family]
    assert _logit_parity(folder, run, device=DEVICE) < 1e-4
    model, tok, cfg = load_model(run, DEVICE)
    assert (cfg.model.qkv_bias, cfg.model.qk_norm_weight) == (family == "qwen2", family == "qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval().to(DEVICE)
    prompt = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = [int(t[0]) for t in generate_ids(model, prompt, SamplingParams(max_new_tokens=30, temperature=0))]
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 12:]
    assert ours == theirs.tolist()
    # KV-cache decoding equals the full forward over the same tokens.
    from gptkit.model import KVCache

    seq = torch.cat([prompt, torch.tensor([ours], device=DEVICE)], dim=1)
    with torch.no_grad():
        full = model(seq)[0][0, -1]
        cache = KVCache.empty(model.config, 1, model.config.block_size, DEVICE, torch.float32)
        model(seq[:, :-5], cache=cache)
        for i in range(5, 0, -1):
            step = model(seq[:, -i : seq.size(1) - i + 1], cache=cache)[0][0, -1]
    assert torch.allclose(step, full, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_round_trip_is_bit_for_bit_with_tokenizer_and_template(families: dict, family: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder, run = families[family]
    back = export_hf(run, tmp_path / "back")
    arch = json.loads((folder / "config.json").read_text())["architectures"]
    assert json.loads((back / "config.json").read_text())["architectures"] == arch
    ours, theirs = load_file(back / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    original = transformers.AutoTokenizer.from_pretrained(folder)
    again = transformers.AutoTokenizer.from_pretrained(back)
    for prompt in (True, False):
        text = original.apply_chat_template(MESSAGES[: 4 if prompt else 3], tokenize=False, add_generation_prompt=prompt)
        assert again.apply_chat_template(MESSAGES[: 4 if prompt else 3], tokenize=False, add_generation_prompt=prompt) == text
    assert again("To be, or not")["input_ids"] == original("To be, or not")["input_ids"]


def test_bf16_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from .hf_models import hf_model

    folder = hf_model(tmp_path / "bf16", "qwen3", dtype=torch.bfloat16)
    run = import_hf(folder, tmp_path / "run")
    back = export_hf(run, tmp_path / "back")
    ours, theirs = load_file(back / "model.safetensors"), load_file(folder / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in theirs.values())
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _, _ = load_model(run)  # computes in fp32 from the exact bf16 values
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() < 1e-4


def test_published_shapes_match_transformers(tmp_path: Path) -> None:
    """SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocab 49,152,
    rope_theta 100,000, tied), sharded into two safetensors files as the Hub stores larger
    models, and a Qwen3-style shape with 128-wide heads and QK-norm."""
    from safetensors.torch import load_file, save_file

    from .hf_models import hf_model

    smol = hf_model(tmp_path / "smol", "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-5, rope_scaling=None)  # fmt: skip
    sd = load_file(smol / "model.safetensors")
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(smol / file), metadata={"format": "pt"})
    (smol / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (smol / "model.safetensors.index.json").write_text(json.dumps(index))
    del sd
    run = import_hf(smol, tmp_path / "smol-run")
    cfg = load_model(run)[2].model
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.mlp_hidden, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert _logit_parity(smol, run, 24) < 1e-4
    qwen = hf_model(tmp_path / "qwen", "qwen3", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                    intermediate_size=512, num_hidden_layers=3, rope_theta=1e6, rms_norm_eps=1e-6)  # fmt: skip
    assert _logit_parity(qwen, import_hf(qwen, tmp_path / "qwen-run"), 24) < 1e-4


@pytest.mark.parametrize(
    "problem", ["unknown_type", "moe", "sliding", "rope", "missing_shard", "index", "shape", "template", "no_tokenizer"]
)
def test_bad_llama_folders_are_one_line(tmp_path: Path, problem: str) -> None:
    from .hf_models import hf_model

    folder = hf_model(tmp_path / "m", "qwen2")
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    expect = {"unknown_type": "model_type 'mamba' is not supported", "moe": "mixture-of-experts", "sliding": "use_sliding_window",
              "rope": "rope_scaling type 'yarn'", "missing_shard": "names shard model-00002", "index": "not a safetensors index",
              "shape": "has shape", "template": "not valid Jinja", "no_tokenizer": "no tokenizer.json"}[problem]  # fmt: skip
    if problem == "unknown_type":
        cfg["model_type"] = "mamba"
    elif problem == "moe":
        cfg["num_experts"] = 8
    elif problem == "sliding":
        cfg["use_sliding_window"] = True
    elif problem == "rope":
        cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    elif problem in ("missing_shard", "index"):
        (folder / "model.safetensors").unlink()
        weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
        index = json.dumps({"weight_map": weight_map}) if problem == "missing_shard" else "[]"
        (folder / "model.safetensors.index.json").write_text(index)
    elif problem == "shape":
        cfg["intermediate_size"] = 96
    elif problem == "template":
        conf = json.loads((folder / "tokenizer_config.json").read_text())
        conf["chat_template"] = "{% for m in messages %}{{ m['content'] }"
        (folder / "tokenizer_config.json").write_text(json.dumps(conf))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    elif problem == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(GptkitError, match=expect) as e:
        import_hf(folder, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial"))


def test_export_chooses_the_family_from_the_options(tmp_path: Path, small_data: Path) -> None:
    """A run trained here with RoPE + RMSNorm + SwiGLU + GQA (untied) exports as Llama, with
    learned QK-norm as Qwen3, and transformers computes the same logits."""
    from gptkit.config import load_config
    from gptkit.training.train import train

    from .conftest import tiny_overrides

    modern = {"model.pos_embedding": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.bias": False,
              "model.n_kv_head": 1, "model.tie_embeddings": False, "train.max_steps": 3}  # fmt: skip
    for extra, arch in (({}, "LlamaForCausalLM"), ({"model.qk_norm": True, "model.qk_norm_weight": True}, "Qwen3ForCausalLM")):
        cfg = load_config(None, tiny_overrides(**modern, **extra))
        cfg.data.dir = str(small_data)
        run = tmp_path / arch
        train(cfg, run, progress=False, quiet=True)
        out = export_hf(run, tmp_path / f"{arch}-hf")
        assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
        assert _logit_parity(out, run, 30) < 1e-4
    cfg = load_config(None, tiny_overrides(**modern, **{"model.qk_norm": True}))
    cfg.data.dir = str(small_data)
    train(cfg, tmp_path / "unweighted", progress=False, quiet=True)
    with pytest.raises(GptkitError, match="model.qk_norm_weight=true"):
        export_hf(tmp_path / "unweighted", tmp_path / "no")


# --- everything downstream of an imported model ---


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, input=stdin, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.cuda
def test_imported_model_trains_fine_tunes_merges_samples_and_exports(families: dict, family: str, tmp_path: Path) -> None:
    """On a tiny imported Llama and Qwen3: continued pretraining (train --init-from), full and
    LoRA fine-tuning on q/k/v/o and gate/up/down (c_attn, c_proj, c_fc) through the model's own
    chat template, merge, generate, chat, eval and eval --instructions; the LoRA run, merged and
    exported, gives transformers the same logits as gptkit."""
    from gptkit.finetune.tasks import write_tasks

    folder, run = families[family]
    text = tmp_path / "corpus.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    quick = ["--set", "train.max_steps=6", "--set", "train.eval_interval=3", "--set", "train.batch_size=4",
             "--set", "train.dtype=float32", "--set", "train.tensorboard=false", "--no-progress"]  # fmt: skip
    r = cli("train", "--init-from", str(run), "--text", str(text), "--out", str(tmp_path / "cont"), *quick)
    assert r.returncode == 0, r.stderr
    tasks = write_tasks(tmp_path / "tasks.jsonl", 60)
    for mode in ([], ["--lora"]):
        out = tmp_path / ("lora" if mode else "full")
        r = cli("finetune", str(run), "--data", str(tasks), "--out", str(out), *mode, *quick)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "lora" / "checkpoint" / "adapter.safetensors").is_file()
    _, tok, cfg = load_model(tmp_path / "lora")
    assert tok.jinja_template and cfg.model.vocab_size == load_model(run)[2].model.vocab_size  # its own template, no new tokens
    assert cli("merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")).returncode == 0
    r = cli("export", str(tmp_path / "merged"), "--to-hf", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert _logit_parity(tmp_path / "hf", tmp_path / "merged") < 1e-4
    r = cli("generate", str(tmp_path / "merged"), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    r = cli("generate", str(tmp_path / "merged"), "--chat", "--prompt", "Hi", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = cli("chat", str(tmp_path / "full"), "--max-new-tokens", "6", "--seed", "2", stdin="Hello\nAgain\n")
    assert r.returncode == 0, r.stderr
    r = cli("eval", str(tmp_path / "merged"), "--instructions", str(tasks), "--limit", "4", "--max-new-tokens", "6")
    assert r.returncode == 0 and json.loads(r.stdout)["examples"] == 4, r.stderr
    r = cli("eval", str(run), "--text", str(text))
    assert r.returncode == 0 and json.loads(r.stdout)["bits_per_byte"] > 0, r.stderr


def test_imported_model_serves_chat_through_its_own_template(families: dict) -> None:
    """`gptkit serve` on an imported Qwen3: the official openai client's chat completion is what
    transformers' template and greedy generate() give for the same conversation."""
    from .test_serve import Server

    folder, run = families["qwen3"]
    s = Server(run)
    try:
        client = s.client("x")
        msgs = MESSAGES[:2]
        reply = client.chat.completions.create(model=s.name, messages=msgs, max_tokens=12, temperature=0)
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=False)
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=0)
        expected = hf_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert reply.choices[0].message.content == expected.strip()
        assert reply.usage.prompt_tokens == ids.shape[1]
    finally:
        s.stop()


@pytest.mark.slow
def test_imported_model_fine_tunes_under_torchrun(families: dict, tmp_path: Path) -> None:
    from gptkit.finetune.tasks import write_tasks

    from .test_distributed import torchrun

    _, run = families["llama"]
    tasks = write_tasks(tmp_path / "tasks.jsonl", 40)
    r = torchrun(2, "finetune", str(run), "--data", str(tasks), "--out", str(tmp_path / "ddp"), "--lora", "--no-progress",
                 "--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "train.dtype=float32")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_model(tmp_path / "ddp")[2].lora.enabled
