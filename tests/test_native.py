"""The native batch-1 decode step (gptkit/inference/native.py) against eager decoding: the same
logits, keys and values at every architecture switch, the same greedy tokens from a trained model
in fp32, int8 and int4, and eager decoding wherever it does not apply."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptkit.config import ModelConfig
from gptkit.inference import native
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.inference.qlinear import Int8Linear, swap_linears
from gptkit.loader import load_model
from gptkit.model import GPT, KVCache

pytestmark = pytest.mark.skipif(native.extension() is None, reason=f"native step not built: {native.build_info}")


def steps(model: GPT, tokens: list[int], fast: bool) -> tuple[torch.Tensor, KVCache]:
    """The (T, V) logits after each token decoded one at a time, and the cache they filled."""
    cfg = model.config
    cache = KVCache.empty(cfg, 1, cfg.block_size, torch.device("cpu"), torch.float32)
    dec = native.decoder(model) if fast else None
    out = []
    with torch.inference_mode():
        for t in tokens:
            x = torch.tensor([[t]])
            out.append(dec.step(x, cache) if dec else model(x, cache=cache, last_only=True)[0])
    return torch.cat(out, dim=1)[0], cache


def random_model(seed: int, **kw: object) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, block_size=64, **kw)  # type: ignore[arg-type]
    model = GPT(cfg).eval()
    with torch.no_grad():  # weights far from GPT-2's tiny init, so every part of a step counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


ARCHS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64),
    "llama_gqa": dict(n_layer=2, n_head=6, n_kv_head=2, n_embd=96, pos_embedding="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "qwen3": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_size=32, pos_embedding="rope",
                  norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, qk_norm=True,
                  qk_norm_weight=True),
    "plain_qk_norm_relu2": dict(n_layer=3, n_head=2, n_embd=32, mlp="relu2", qk_norm=True,
                                logit_softcap=15.0, pos_embedding="rope"),
    "gelu_exact": dict(n_layer=1, n_head=1, n_embd=16, mlp="gelu_exact", norm_eps=1e-3),
    # rows of 40 and 100 floats: no row but the first starts on a 64-byte line
    "odd_widths": dict(n_layer=2, n_head=2, n_embd=40, mlp_size=100, mlp="swiglu", norm="rmsnorm"),
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_logits_and_cache_equal_eager(arch: str) -> None:
    model = random_model(0, **ARCHS[arch])
    tokens = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want, want_cache = steps(model, tokens, fast=False)
    got, got_cache = steps(model, tokens, fast=True)
    scale = want.abs().max()
    assert scale > 1.0  # logits of a size where a wrong step would show
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(scale))
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    filled = (slice(None), slice(None), slice(None), slice(0, len(tokens)))
    torch.testing.assert_close(got_cache.k[filled], want_cache.k[filled], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_cache.v[filled], want_cache.v[filled], rtol=0, atol=1e-5)
    assert got_cache.pos == want_cache.pos == len(tokens)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 16, 24]),
    layers=st.integers(1, 3),
    norm=st.sampled_from(["layernorm", "rmsnorm"]),
    mlp=st.sampled_from(["gelu", "gelu_exact", "relu2", "swiglu"]),
    rope=st.booleans(),
    qk=st.sampled_from(["none", "plain", "weight"]),
    bias=st.booleans(),
    n=st.integers(1, 30),
)
def test_any_architecture_decodes_as_eager(
    kv: int, group: int, head_dim: int, layers: int, norm: str, mlp: str, rope: bool, qk: str,
    bias: bool, n: int,
) -> None:  # fmt: skip
    heads = kv * group
    model = random_model(
        n, n_layer=layers, n_head=heads, n_kv_head=kv, n_embd=heads * head_dim, norm=norm, mlp=mlp,
        pos_embedding="rope" if rope else "learned", qk_norm=qk != "none",
        qk_norm_weight=qk == "weight", bias=bias,
    )  # fmt: skip
    tokens = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    want, _ = steps(model, tokens, fast=False)
    got, _ = steps(model, tokens, fast=True)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))


@pytest.fixture(scope="module")
def prompts(trained_run: Path) -> list[torch.Tensor]:
    _, tok, _ = load_model(trained_run)
    texts = ["First Citizen:\n", "ROMEO:\nO", "KING RICHARD", "Be", "What say you"]
    return [torch.tensor([tok.encode(t)]) for t in texts]


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int8-weight-only", "int4"])
def test_greedy_tokens_equal_eager(
    trained_run: Path, prompts: list[torch.Tensor], scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, _ = load_model(trained_run)
    if scheme != "fp32":
        activations = "bf16" if scheme == "int8-weight-only" else "int8"
        swap_linears(model, True, scheme[:4], activations)
    assert native.decoder(model) is not None
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    for prompt in prompts:
        monkeypatch.setenv("GPTKIT_NATIVE", "1")
        got = [int(t) for t in generate_ids(model, prompt, params)]
        monkeypatch.setenv("GPTKIT_NATIVE", "0")
        want = [int(t) for t in generate_ids(model, prompt, params)]
        assert got == want


def test_eager_where_the_step_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(0, **ARCHS["gpt2"])
    assert native.decoder(model) is not None
    model.config.dropout = 0.1
    assert native.decoder(model.train()) is None  # dropout would be on
    model.config.dropout = 0.0
    model.eval()
    handle = model.blocks[0].mlp.register_forward_hook(lambda *a: None)
    assert native.decoder(model) is None  # a hook changes what a module computes
    handle.remove()
    assert native.decoder(model.to(torch.bfloat16)) is None
    monkeypatch.setenv("GPTKIT_NATIVE", "0")
    assert native.decoder(random_model(0, **ARCHS["gpt2"])) is None


def test_a_left_padded_pool_row_decodes_as_eager() -> None:
    """step_at, as the serving engine calls it for a row decoding alone: its sequence starts
    `first` slots into the cache (left padding), so slot and position differ."""
    model = random_model(3, **ARCHS["llama_gqa"])
    dec = native.decoder(model)
    assert dec is not None
    gen = torch.Generator().manual_seed(4)
    first, prompt, tokens = 5, torch.randint(0, 97, (1, 12), generator=gen), torch.randint(0, 97, (20,), generator=gen)
    ids = torch.cat([torch.zeros(1, first, dtype=torch.long), prompt], dim=1)
    pad = torch.tensor([first])
    caches = [KVCache.empty(model.config, 1, 64, torch.device("cpu"), torch.float32) for _ in range(2)]
    got, want = [], []
    with torch.inference_mode():
        for cache in caches:
            model(ids, cache=cache, pad=pad)
        eager, fast = caches
        for t in tokens.tolist():
            want.append(model(torch.tensor([[t]]), cache=eager, last_only=True, pad=pad)[0])
            got.append(dec.step_at([t], fast.pos - first, fast.pos, first, fast.k, fast.v))
            fast.pos += 1
    want_t, got_t = torch.cat(want, dim=1), torch.cat(got, dim=1)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=2e-5 * float(want_t.abs().max()))


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int8-weight-only", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "odd_widths"])
def test_a_verification_gets_each_rows_own_logits_bit_for_bit(arch: str, scheme: str) -> None:
    """Several rows in one call (a speculative verification) give exactly the logits, keys and
    values those rows get decoded one at a time: speculation's greedy tokens are then the
    target's own, bit for bit."""
    model = random_model(5, **ARCHS[arch])
    if scheme != "fp32":
        swap_linears(model, True, scheme[:4], "bf16" if scheme == "int8-weight-only" else "int8")
    dec = native.decoder(model)
    assert dec is not None
    tokens = torch.randint(0, 97, (14,), generator=torch.Generator().manual_seed(6)).tolist()
    one, many = (KVCache.empty(model.config, 1, 64, torch.device("cpu"), torch.float32) for _ in range(2))
    with torch.inference_mode():
        for t in tokens[:9]:  # the same prompt in both caches, a step at a time
            dec.step(torch.tensor([t]), one)
        many.k.copy_(one.k)
        many.v.copy_(one.v)
        alone = torch.cat([dec.step(torch.tensor([t]), one) for t in tokens[9:]], dim=1)
        together = dec.step_at(tokens[9:], 9, 9, 0, many.k, many.v)
    assert torch.equal(together, alone)
    assert torch.equal(many.k[:, :, :, :14], one.k[:, :, :, :14])
    assert torch.equal(many.v[:, :, :, :14], one.v[:, :, :, :14])


def left_padded(model: GPT, prompts: list[list[int]]) -> tuple[list[KVCache], list[int]]:
    """Each prompt prefilled alone into a one-row cache, left-padded to the longest (the serving
    engine's pool layout), and each row's padding."""
    width = max(map(len, prompts))
    caches, firsts = [], []
    for p in prompts:
        first = width - len(p)
        cache = KVCache.empty(model.config, 1, 64, torch.device("cpu"), torch.float32)
        model(torch.tensor([[0] * first + p]), cache=cache, pad=torch.tensor([first]) if first else None)
        caches.append(cache)
        firsts.append(first)
    return caches, firsts


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "odd_widths"])
def test_a_batch_of_sequences_gets_each_ones_own_logits_bit_for_bit(arch: str, scheme: str) -> None:
    """step_rows: one token for each of several left-padded sequences in one call gives each
    exactly the logits and cache it gets decoded alone, so a request's tokens do not depend on
    what else is in the batch (int8 too: each row is quantized as it would be alone)."""
    model = random_model(7, **ARCHS[arch])
    if scheme != "fp32":
        swap_linears(model, True, scheme, "int8")
    dec = native.decoder(model)
    assert dec is not None
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 9, 1, 6)]
    nexts = torch.randint(0, 97, (len(prompts), 7), generator=gen).tolist()
    with torch.inference_mode():
        alone, firsts = left_padded(model, prompts)
        pool = KVCache(torch.cat([c.k for c in alone], 1), torch.cat([c.v for c in alone], 1), alone[0].pos)
        for step in range(7):
            at = pool.pos
            together = dec.step_rows([n[step] for n in nexts], [at - f for f in firsts], firsts, at, pool.k, pool.v)
            pool.pos += 1
            for b, cache in enumerate(alone):
                one = dec.step_at([nexts[b][step]], at - firsts[b], at, firsts[b], cache.k, cache.v)[0, 0]
                cache.pos += 1
                assert torch.equal(together[b], one), (step, b)
    n = pool.pos  # slots past it were never written
    assert torch.equal(pool.k[..., :n, :], torch.cat([c.k[..., :n, :] for c in alone], 1))
    assert torch.equal(pool.v[..., :n, :], torch.cat([c.v[..., :n, :] for c in alone], 1))


def test_a_batch_matches_eager_batched_decoding() -> None:
    """fp32 step_rows against GPT.forward on the same left-padded batch: the same logits up to the
    order of a sum."""
    model = random_model(9, **ARCHS["qwen3"])
    dec = native.decoder(model)
    assert dec is not None
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 2, 8)]
    width = max(map(len, prompts))
    firsts = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * f + p for f, p in zip(firsts, prompts)])
    pad = torch.tensor(firsts)
    eager, fast = (KVCache.empty(model.config, 3, 64, torch.device("cpu"), torch.float32) for _ in range(2))
    with torch.inference_mode():
        model(ids, cache=eager, pad=pad)
        fast.k.copy_(eager.k)
        fast.v.copy_(eager.v)
        fast.pos = eager.pos
        for t in torch.randint(0, 97, (10, 3), generator=gen):
            want = model(t[:, None], cache=eager, last_only=True, pad=pad)[0][:, -1]
            got = dec.step_batch(t, fast, pad)[:, -1]
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))


def test_batched_generation_decodes_natively_as_eager(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate_ids over a left-padded batch takes the native step (step_batch): the same greedy
    tokens as eager batched decoding from the same prefill."""
    model, tok, _ = load_model(trained_run)
    encoded = [tok.encode(t) for t in ["ROMEO:", "First Citizen:\nWe are", "O"]]
    width = max(map(len, encoded))
    batch = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    pad = torch.tensor([width - len(e) for e in encoded])
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("GPTKIT_NATIVE", flag)
        runs.append(torch.stack(list(generate_ids(model, batch, params, pad=pad)), 1))
    assert torch.equal(runs[0], runs[1])


def test_without_a_build_toolchain_decoding_stays_eager(tmp_path: Path) -> None:
    """No ninja or compiler on PATH and no cached build: one line on stderr says so, and the
    same tokens come from eager decoding."""
    code = (
        "import torch\n"
        "from gptkit.config import ModelConfig\n"
        "from gptkit.model import GPT\n"
        "from gptkit.inference import native\n"
        "from gptkit.inference.generate import SamplingParams, generate_ids\n"
        "torch.manual_seed(0)\n"
        "model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()\n"
        "assert native.decoder(model) is None and native.decoder(model) is None\n"
        "p = SamplingParams(max_new_tokens=5, temperature=0)\n"
        "print([int(t) for t in generate_ids(model, torch.tensor([[1, 2]]), p)])\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "gptkit:" in line]
    assert len(lines) == 1 and "could not be built" in lines[0] and "decoding eagerly" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("[")


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_rows_in_one_product_are_each_rows_own(seed: int) -> None:
    """Wider int8 layers, where rows quantized the way fbgemm quantizes a row alone go through
    one product with a second packing of the weights (Linear::int8_rows): each row's logits
    are still bit for bit its own, and the second packing was made."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=2999, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=384,
                      mlp_size=1000, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    swap_linears(model, True, "int8")
    dec = native.decoder(model)
    assert dec is not None
    tokens = torch.randint(0, 2999, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    one = KVCache.empty(cfg, 1, 64, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        for t in tokens[:30]:
            dec.step(torch.tensor([t]), one)
        many = KVCache(one.k.clone(), one.v.clone(), one.pos)
        alone = torch.cat([dec.step(torch.tensor([t]), one) for t in tokens[30:]], dim=1)
        together = dec.step_at(tokens[30:], 30, 30, 0, many.k, many.v)
    assert torch.equal(together, alone)
    assert all(m._kernel[2][0] is not False for m in model.modules() if isinstance(m, Int8Linear))
