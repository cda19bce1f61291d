"""Int8 and int4 weight-only runs: close to fp32 (logits, perplexity, greedy text), loadable
without the fp32 weights, used by generate, chat, serve and eval, and refused for training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from gptkit.config import load_config
from gptkit.errors import GptkitError
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.inference.qlinear import GROUP, Int4Linear, Int8Linear
from gptkit.inference.quantize import quantize_run
from gptkit.loader import load_model
from gptkit.training.train import train

from .conftest import DATA, SHAKESPEARE, tiny_overrides
from .conftest import cli as in_process
from .test_serve import Server


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, bpe_runs: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """(fp32 run, its int8 quantization) for the BPE runs, GPT-2's architecture and the Llama one."""
    tmp = tmp_path_factory.mktemp("quantize")
    return {name: (bpe_runs[name], quantize_run(bpe_runs[name], tmp / f"{name}-int8")) for name in ("gpt2", "llama")}


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_int8_is_close_to_fp32(runs: dict, name: str) -> None:
    """Logits within 5 % of their range, perplexity on text the model never saw within 1 %, and
    greedy continuations mostly the same."""
    fp32_run, int8_run = runs[name]
    full, tok, cfg = load_model(fp32_run)
    q, _, qcfg = load_model(int8_run)
    assert qcfg.model.quantization == "int8" and any(isinstance(m, Int8Linear) for m in q.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[-20_000:])
    block = cfg.model.block_size
    x = torch.tensor([ids[i : i + block] for i in range(0, block * 32, block)])
    with torch.no_grad():
        a, b = full(x)[0], q(x)[0]
        assert (a - b).abs().max() < 0.05 * (a.max() - a.min())
        ppl = [math.exp(torch.nn.functional.cross_entropy(z[:, :-1].transpose(1, 2), x[:, 1:]).item()) for z in (a, b)]
    assert abs(ppl[1] / ppl[0] - 1) < 0.01, ppl
    same = 0
    params = SamplingParams(max_new_tokens=32, temperature=0)
    for i in range(8):
        prompt = x[i : i + 1, :16]
        same += [int(t) for t in generate_ids(full, prompt, params)] == [int(t) for t in generate_ids(q, prompt, params)]
    assert same >= 5, same
    # Decoding (one row a product, its activations quantized to int8 too): perplexity computed
    # token by token through the cache, as generate and serve compute, also within 1 %.
    dec = [decode_perplexity(m, x[:2]) for m in (full, q)]
    assert abs(dec[1] / dec[0] - 1) < 0.01, dec
    with torch.no_grad():  # fp32 token by token is fp32 on the whole windows at once
        whole = math.exp(torch.nn.functional.cross_entropy(full(x[:2])[0][:, :-1].transpose(1, 2), x[:2, 1:]).item())
    assert abs(dec[0] / whole - 1) < 1e-4, (dec, whole)


def decode_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of each window's tokens, each predicted by a batch-1 decoding step."""
    from gptkit.model import KVCache

    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            cache = KVCache.empty(model.config, 1, row.numel(), torch.device("cpu"), torch.float32)
            for t in range(row.numel() - 1):
                logits = model(row[None, t : t + 1], cache=cache)[0][0, -1]
                nll -= logits.log_softmax(-1)[row[t + 1]].item()
                count += 1
    return math.exp(nll / count)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 100), bias=st.booleans(), outlier=st.floats(0, 50), seed=st.integers(0, 99))
def test_int8_single_row_quantizes_its_activations(rows: int, cols: int, bias: bool, outlier: float, seed: int) -> None:
    """One row at a time (batch-1 decoding) the row is quantized to 8 bits over its own range,
    zero exactly representable (x ~ (q - z) * s, q in 0..255), and multiplied with the stored
    int8 weights: the layer's output is that product, to float rounding -- where a value sits
    within 1e-3 of a step's midpoint either neighbouring level is a correct rounding, and the
    kernel's own float arithmetic may take the other one (2 of 3000 random rows with one thread
    here), so those values may each add one step times their weights. With activations="bf16" the row gets what
    it gets inside a batch (the weight-only kernel)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(cols, rows, bias=bias)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(1, cols)
    x[0, seed % cols] += outlier
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s = max((hi - lo) / 255, 1e-12)
    z = round(-lo / s)
    level = x / s + z
    xq = level.round().clamp(0, 255).sub(z).mul(s)
    w = q.weight.float() * q.scale.float()[:, None]
    b = lin.bias.detach() if bias else 0
    want = xq @ w.t() + b
    got = q(x)
    tie = ((level - level.floor() - 0.5).abs() < 1e-3)[0]
    slack = s * w.abs()[:, tie].sum(1) + 1e-4 * (want.abs().max().item() + 1) + 1e-4 * want.abs()[0]
    assert ((got - want).abs()[0] <= slack).all(), ((got - want).abs().max().item(), tie.sum().item())
    # the error is the activations' quantization: at most half a step per value
    assert ((got - (x @ w.t() + b)).abs() <= s / 2 * w.abs().sum(1) + 1e-4).all()
    q.int8_activations = False
    torch.testing.assert_close(q(x), q(torch.cat([x, x]))[:1], rtol=1e-6, atol=1e-6)


def test_int8_checkpoint_holds_int8_weights_only(runs: dict) -> None:
    fp32_run, int8_run = runs["gpt2"]
    with safe_open(str(int8_run / "checkpoint" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    matrices = [k for k in dtypes if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))] + ["lm_head.weight"]
    assert matrices and all(dtypes[k] == "I8" for k in matrices)
    assert all(dtypes[k.replace(".weight", ".scale")] == "BF16" for k in matrices)
    assert dtypes["wte.weight"] == "F32"  # the embedding lookup stays in full precision
    # Loading needs no fp32 weights: the fp32 run's checkpoint can go.
    (fp32_run / "checkpoint" / "model.safetensors").rename(fp32_run / "checkpoint" / "away")
    try:
        model, _, _ = load_model(int8_run)
    finally:
        (fp32_run / "checkpoint" / "away").rename(fp32_run / "checkpoint" / "model.safetensors")
    assert model.lm_head.weight.dtype == torch.int8


def test_int8_run_generates_chats_evaluates_and_serves(runs: dict) -> None:
    _, q = runs["llama"]
    r = cli("generate", str(q), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:") and len(r.stdout) > 10, r.stderr
    r = cli("chat", str(q), "--max-new-tokens", "10", stdin="Who art thou?\n")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = cli("eval", str(q))
    assert r.returncode == 0 and '"perplexity"' in r.stdout, r.stderr
    server = Server(q, "--api-key", "k")
    try:
        out = server.client("k").completions.create(model=q.name, prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=2)
        model, tok, _ = load_model(q)
        ids = tok.encode("ROMEO:")
        want = [int(t) for t in generate_ids(model, torch.tensor([ids]), SamplingParams(max_new_tokens=12, temperature=0))]
        assert out.choices[0].text == tok.decode(want) and len(out.choices[0].logprobs.tokens) == 12
    finally:
        server.stop()


def test_quantized_runs_are_for_inference(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fp32_run, q = runs["gpt2"]
    for args, says in [
        (("quantize", str(q), "--out", str(tmp_path / "again")), "already quantized"),
        (("train", "--resume", str(q)), "for inference"),
        (
            ("finetune", str(q), "--data", str(DATA / "self_instruct_seed_tasks.chat.jsonl"), "--out", str(tmp_path / "ft")),
            "its weights cannot train; adapt it",
        ),
        (("train", "--init-from", str(q), "--out", str(tmp_path / "t")), "its weights cannot train"),
        (("export", str(q), "--to-hf", str(tmp_path / "hf")), "quantized"),
        (("export", str(q), "--to-gguf", str(tmp_path / "m.gguf")), "quantized"),
        (("quantize", str(fp32_run), "--out", str(tmp_path / "s"), "--scheme", "int3"), "invalid choice"),
        (("quantize", str(fp32_run), "--out", str(tmp_path / "s"), "--activations", "fp8"), "invalid choice"),
        (("quantize", str(fp32_run), "--out", str(q)), "--overwrite"),
    ]:
        code, _, err = in_process(capsys, *args)  # the command line's main(): no start-up per case
        assert code == 2 and says in err and "Traceback" not in err, (args, err)
    assert not any(tmp_path.iterdir())
    with pytest.raises(GptkitError, match="--device cpu"):
        load_model(q, "meta")  # a device without PyTorch's int8 CPU kernel
    cfg = load_config(None, tiny_overrides(**{"model.quantization": "int8"}))
    with pytest.raises(GptkitError, match="gptkit quantize"):
        train(cfg, tmp_path / "new", progress=False, quiet=True)
    from gptkit.finetune.instruct import finetune, finetune_config

    sets = ["train.max_steps=2", "train.batch_size=4", "train.dtype=float32", "train.tensorboard=false", "train.eval_interval=2"]
    finetune(fp32_run, [str(DATA / "self_instruct_seed_tasks.chat.jsonl")], tmp_path / "lora", finetune_config(None, sets),
             lora=True, progress=False, quiet=True)  # fmt: skip
    r = cli("quantize", str(tmp_path / "lora"), "--out", str(tmp_path / "lora-int8"))
    assert r.returncode == 2 and "merge it first" in r.stderr and not (tmp_path / "lora-int8").exists(), r.stderr


# --- int4 (groups of 32, scale and zero) ---


@pytest.fixture(scope="module")
def int4_runs(tmp_path_factory: pytest.TempPathFactory, bpe_runs: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("quantize4")
    return {name: (bpe_runs[name], quantize_run(bpe_runs[name], tmp / f"{name}-int4", "int4")) for name in ("gpt2", "llama")}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 100), batch=st.integers(1, 5), bias=st.booleans(), seed=st.integers(0, 99))
def test_int4_layer_computes_with_its_stored_values(rows: int, cols: int, batch: int, bias: bool, seed: int) -> None:
    """Whatever the shape (rows not a multiple of the kernel's 16, widths not a multiple of the
    group), the layer's output is x @ W^T for W rebuilt by hand from the stored nibbles, scales
    and zeros, w = (q - 8) * scale + zero; each weight is within half a step of the original,
    and a layer loaded from the state dict computes the same."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(cols, rows, bias=bias)
    q = Int4Linear.from_linear(lin)
    nib = torch.stack([q.weight & 15, q.weight >> 4], dim=2).flatten(1).float()[:, :cols]
    group = torch.arange(cols) // GROUP
    w = (nib - 8) * q.scale.float()[:, group] + q.zero.float()[:, group]
    assert ((w - lin.weight.detach()).abs() <= q.scale.float()[:, group] * 0.5 + 1e-3).all()
    x = torch.randn(batch, 3, cols)
    want = x.bfloat16().float() @ w.t() + (lin.bias.detach() if bias else 0)
    got = q(x)
    assert got.shape == (batch, 3, rows) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item() + 1e-3)
    again = Int4Linear(cols, rows, bias)
    again.load_state_dict(q.state_dict())
    assert torch.equal(again(x), got)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_int4_is_close_to_fp32(int4_runs: dict, name: str) -> None:
    """Perplexity on text the model never saw within 5 % of fp32's, the same most likely next
    token at most positions, and a checkpoint of 4-bit values (two a byte) with bf16 scales and
    zeros, which `gptkit generate` decodes from."""
    fp32_run, int4_run = int4_runs[name]
    full, tok, cfg = load_model(fp32_run)
    q, _, qcfg = load_model(int4_run)
    assert qcfg.model.quantization == "int4" and not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[-20_000:])
    block = cfg.model.block_size
    x = torch.tensor([ids[i : i + block] for i in range(0, block * 32, block)])
    with torch.no_grad():
        a, b = full(x)[0], q(x)[0]
    ppl = [math.exp(torch.nn.functional.cross_entropy(z[:, :-1].transpose(1, 2), x[:, 1:]).item()) for z in (a, b)]
    assert abs(ppl[1] / ppl[0] - 1) < 0.05, ppl
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.8, agree
    with safe_open(str(int4_run / "checkpoint" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["lm_head.weight"] == "U8" and dtypes["lm_head.scale"] == dtypes["lm_head.zero"] == "BF16"
    r = cli("generate", str(int4_run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0")
    want = [
        int(t) for t in generate_ids(q, torch.tensor([tok.encode("ROMEO:")]), SamplingParams(max_new_tokens=12, temperature=0))
    ]
    assert r.returncode == 0 and r.stdout.strip() == ("ROMEO:" + tok.decode(want)).strip(), r.stderr


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("batch", [1, 3])
def test_quantized_layer_computes_with_weights_loaded_after_it_ran(kind: type, batch: int) -> None:
    """The kernel-side copies of the weights (padded, packed; int8's single-row one too) are
    made at the first call and made again when other weights are loaded into the same layer."""
    torch.manual_seed(0)
    a, b = (kind.from_linear(torch.nn.Linear(40, 24)) for _ in range(2))  # 40: padded by both
    x = torch.randn(batch, 40)
    first = a(x)
    a.load_state_dict(b.state_dict())
    assert not torch.equal(a(x), first)
    assert torch.equal(a(x), b(x))


# --- LoRA over a quantized base (QLoRA's idea, on the CPU) ---


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 48), cols=st.integers(1, 80), batch=st.integers(1, 6), scheme=st.sampled_from(["int8", "int4"]),
       seed=st.integers(0, 99))  # fmt: skip
def test_quantized_layer_passes_gradients_through_its_stored_weights(rows: int, cols: int, batch: int, scheme: str,
                                                                     seed: int) -> None:  # fmt: skip
    """dL/dx of a frozen int8/int4 layer is dL/dy times the weights it stores (dequantized), and
    the weights themselves get none."""
    torch.manual_seed(seed)
    layer = (Int4Linear if scheme == "int4" else Int8Linear).from_linear(torch.nn.Linear(cols, rows))
    w = layer.dequantized()
    assert w.shape == (rows, cols)
    x = torch.randn(batch, 3, cols, requires_grad=True)
    g = torch.randn(batch, 3, rows)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)
    assert all(not t.requires_grad for t in layer.buffers())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lora_over_a_quantized_base(runs: dict, int4_runs: dict, tmp_path: Path, scheme: str) -> None:
    from safetensors.torch import load_file

    from gptkit.finetune.instruct import finetune, finetune_config

    _, q = (runs if scheme == "int8" else int4_runs)["llama"]
    sets = ["train.max_steps=12", "train.batch_size=4", "train.dtype=float32", "train.tensorboard=false",
            "train.eval_interval=6", "train.lr=1e-2", "train.warmup_steps=0", "train.patience=0"]  # fmt: skip
    out = tmp_path / "qlora"
    finetune(q, [str(DATA / "self_instruct_seed_tasks.chat.jsonl")], out, finetune_config(None, sets), method="lora",
             progress=False, quiet=True)  # fmt: skip
    adapter = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    assert adapter and all(".lora_" in k or k.endswith(".new_rows") for k in adapter)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    model, tok, cfg = load_model(out, merge_adapters=True)  # the adapter stays apart, over the int8/int4 layers
    assert cfg.model.quantization == scheme and model.adapters is not None
    base, _, _ = load_model(q)
    qbase = dict(base.named_buffers())
    for n, b in model.named_buffers():  # the quantized weights did not move
        if n.endswith(("weight", "scale", "zero")) and "lm_head" not in n:
            assert torch.equal(b, qbase[n.replace(".base.", ".")]), n
    r = cli("merge", str(out))
    assert r.returncode == 2 and "quantizing again" in r.stderr
    for method in ("lora", "full"):  # such a run is no base: its adapter cannot be folded in
        with pytest.raises(GptkitError, match="fine-tune its base"):
            finetune(out, [str(DATA / "self_instruct_seed_tasks.chat.jsonl")], tmp_path / "again",
                     finetune_config(None, sets), method=method, progress=False, quiet=True)  # fmt: skip
    assert not (tmp_path / "again").exists()
    r = cli("generate", str(out), "--prompt", "To be", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
