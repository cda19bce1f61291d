from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gptkit.runtime as runtime
from gptkit.config import ModelConfig
from gptkit.model import GPT, KVCache, causal_attention, linear_cross_entropy

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("on_device")]

VARIANTS = {
    "gpt2": {},
    "rope": {"pos_embedding": "rope"},
    "rmsnorm": {"norm": "rmsnorm", "bias": False},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "untied": {"tie_embeddings": False, "zero_init_head": False},
    "softcap": {"logit_softcap": 15.0},
    "gqa": {"n_kv_head": 2},
    "modern": {
        "pos_embedding": "rope",
        "norm": "rmsnorm",
        "qk_norm": True,
        "mlp": "relu2",
        "tie_embeddings": False,
        "logit_softcap": 30.0,
        "n_kv_head": 1,
        "bias": False,
    },
}


def make(**kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32, **kw)  # type: ignore[arg-type]
    return GPT(cfg).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss(variant: str) -> None:
    m = make(**VARIANTS[variant])
    x = torch.randint(0, 50, (3, 24))
    logits, loss = m(x, torch.randint(0, 50, (3, 24)))
    assert logits.shape == (3, 24, 50)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    # At initialisation the prediction is near uniform: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant: str) -> None:
    """Changing a future token never changes the logits of earlier positions."""
    m = make(**VARIANTS[variant])
    x = torch.randint(0, 50, (2, 20))
    base, _ = m(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 50
        changed, _ = m(y)
        torch.testing.assert_close(changed[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.allclose(changed[:, t:], base[:, t:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_full_forward(variant: str) -> None:
    m = make(**VARIANTS[variant])
    x = torch.randint(0, 50, (2, 24))
    full, _ = m(x)
    cache = KVCache.empty(m.config, 2, 24, x.device, torch.float32)
    steps = [m(x[:, :5], cache=cache)[0]]  # a prefill of 5, then a chunk of 3, then one by one
    steps.append(m(x[:, 5:8], cache=cache)[0])
    for t in range(8, 24):
        steps.append(m(x[:, t : t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 24


@pytest.mark.parametrize("variant", ["gpt2", "modern", "gqa", "softcap"])
def test_static_decoding_step_equals_the_cached_step(variant: str) -> None:
    """KVCache.at: a decode step at fixed shapes (every slot attended, those past `at` and
    before pad masked) gives the logits of the ordinary cached step, for left-padded rows."""
    m = make(**VARIANTS[variant])
    pad = torch.tensor([0, 3])
    x = torch.randint(0, 50, (2, 10))
    ref = KVCache.empty(m.config, 2, 24, x.device, torch.float32)
    static = KVCache.empty(m.config, 2, 24, x.device, torch.float32, zeroed=True)
    m(x[:, :6], cache=ref, pad=pad)
    m(x[:, :6], cache=static, pad=pad)
    at = torch.full((2,), 6)
    step = KVCache(static.k, static.v, at=at)
    for t in range(6, 10):
        want, _ = m(x[:, t : t + 1], cache=ref, last_only=True, pad=pad)
        got, _ = m(x[:, t : t + 1], cache=step, pad=pad)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        at += 1
    torch.testing.assert_close(static.k[:, :, :, :10], ref.k[:, :, :, :10], atol=1e-6, rtol=0)


def test_context_overflow_is_an_error() -> None:
    m = make()
    with pytest.raises(ValueError, match="longer than the context"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_gpt2_init_and_tying() -> None:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=100, block_size=64, n_layer=8, n_head=4, n_embd=128))
    assert m.lm_head.weight is m.wte.weight
    std_proj = m.blocks[0].attn.c_proj.weight.std().item()
    std_fc = m.blocks[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert m.blocks[0].attn.c_attn.bias.abs().sum() == 0


def test_param_count_and_flops_match_gpt2_small() -> None:
    m = GPT(ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    # GPT-2 small: 124,439,808 parameters with position embeddings, tied head.
    assert m.num_params(non_embedding=False) == 124_439_808
    assert m.num_params() == 124_439_808 - 1024 * 768
    linear = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257
    assert m.flops_per_token(1024, training=False) == 2 * linear + 4 * 12 * 1024 * 768
    assert m.flops_per_token(1024) == 3 * m.flops_per_token(1024, training=False)


def test_save_state_without_shared_head() -> None:
    m = make()
    sd = m.state_dict_for_save()
    assert "lm_head.weight" not in sd
    m2 = make(**{})
    torch.nn.init.zeros_(m2.wte.weight)
    m2.load_saved_state(sd)
    x = torch.randint(0, 50, (1, 10))
    torch.testing.assert_close(m2(x)[0], m(x)[0])
    with pytest.raises(KeyError):
        m2.load_saved_state({k: v for k, v in sd.items() if k != "ln_f.weight"})


def test_ignore_index_masks_loss() -> None:
    m = make()
    x = torch.randint(0, 50, (2, 10))
    y = x.clone()
    y[:, :5] = -100
    logits, loss = m(x, y)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 50), x[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_left_padded_rows_compute_what_they_would_alone(variant: str) -> None:
    """A batch of unequal prompts, left-padded (pad[b] tokens), gives each row the logits it
    gets alone: for the prefill and for cached decoding steps after it."""
    m = make(**VARIANTS[variant])
    lengths = [9, 4, 6]
    rows = [torch.randint(0, 50, (n,)) for n in lengths]
    extra = torch.randint(0, 50, (3, 3))
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    x = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    cache = KVCache.empty(m.config, 3, 24, x.device, torch.float32)
    prefill, _ = m(x, cache=cache, pad=pad)
    steps = [m(extra[:, t : t + 1], cache=cache, pad=pad)[0] for t in range(3)]
    for b, r in enumerate(rows):
        alone, _ = m(torch.cat([r, extra[b]])[None])
        torch.testing.assert_close(prefill[b, pad[b] :], alone[0, : len(r)], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat([s[b] for s in steps]), alone[0, len(r) :], atol=1e-5, rtol=0)


# --- the training loss without whole logits (linear_cross_entropy) ---


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    vocab=st.integers(2, 300),
    masked=st.floats(0.0, 0.9),
    softcap=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 1000),
)
def test_linear_cross_entropy_is_cross_entropy_of_the_logits(
    n: int, vocab: int, masked: float, softcap: float, seed: int
) -> None:
    """Loss and both gradients equal F.cross_entropy(F.linear(x, w)) with -100 targets ignored
    (and logit soft-capping), whatever the rows, vocabulary and share of ignored targets."""
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(vocab, 16, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, vocab, (n,), generator=g)
        t[torch.rand(n, generator=g) < masked] = -100
        t[0] = 0  # at least one target
        z = torch.nn.functional.linear(x, w)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        ref = torch.nn.functional.cross_entropy(z, t, ignore_index=-100)
        gx, gw = torch.autograd.grad(3 * ref, (x, w))
        out = linear_cross_entropy(x, w, t, softcap)
        fx, fw = torch.autograd.grad(3 * out, (x, w))
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(fx, gx)
        torch.testing.assert_close(fw, gw)


@pytest.mark.parametrize("variant", ["gpt2", "modern", "softcap", "untied"])
def test_training_loss_skips_the_logits_and_keeps_the_gradients(variant: str) -> None:
    """In training with a large vocabulary the model returns no logits, and its loss and every
    parameter's gradient are those of cross-entropy over the full logits, tied head included."""
    # The fused loss is a CPU path (GPT._fused_loss): these run on the CPU under any DEVICE.
    with torch.device("cpu"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=4, n_embd=32, **VARIANTS[variant])  # type: ignore[arg-type]
        m = GPT(cfg).train()
        x = torch.randint(0, 4096, (16, 64))
        y = x.roll(-1, dims=1)
        y[:, :20] = -100  # a prompt without loss
        logits, loss = m(x, y)
        assert logits is None and loss is not None
        fused = torch.autograd.grad(loss, list(m.parameters()))
        full, _ = m(x)
        ref = torch.nn.functional.cross_entropy(full.reshape(-1, 4096), y.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(loss, ref)
        for a, b in zip(fused, torch.autograd.grad(ref, list(m.parameters())), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # evaluation still gets its logits
            assert m(x, y)[0] is not None
        # A frozen head (LoRA): the other gradients are the same, and the head gets none.
        head = m.lm_head.weight
        head.requires_grad_(False)
        rest = [p for p in m.parameters() if p.requires_grad]
        _, loss = m(x, y)
        ref = torch.nn.functional.cross_entropy(m(x)[0].reshape(-1, 4096), y.reshape(-1), ignore_index=-100)
        for a, b in zip(torch.autograd.grad(loss, rest), torch.autograd.grad(ref, rest), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_matches_the_autocast_logits() -> None:
    """Under autocast the products run in bf16 and the softmax in fp32, as F.linear +
    F.cross_entropy do: the same loss to bf16 precision, gradients in the weights' dtype."""
    with torch.device("cpu"):
        torch.manual_seed(0)
        x = torch.randn(200, 64, requires_grad=True)
        w = (torch.randn(3000, 64) * 0.1).requires_grad_()
        t = torch.randint(0, 3000, (200,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w).float(), t)
            out = linear_cross_entropy(x, w, t)
        gx, gw = torch.autograd.grad(ref, (x, w))
        fx, fw = torch.autograd.grad(out, (x, w))
        assert fw.dtype == torch.float32 and fx.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        for a, b in ((fx, gx), (fw, gw)):
            assert ((a - b).norm() / b.norm()).item() < 0.02


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    kv=st.integers(1, 3),
    group=st.integers(1, 3),
    t=st.integers(1, 40),
    d=st.sampled_from([4, 8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_causal_attention_is_sdpa_causal(b: int, kv: int, group: int, t: int, d: int, seed: int) -> None:
    """The written-out softmax(QK^T/sqrt(d) + causal bias) V equals SDPA's causal attention, with
    grouped keys too, in its values and in all three gradients."""
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(b, kv * group, t, d, generator=g, requires_grad=True)
        k, v = (torch.randn(b, kv, t, d, generator=g, requires_grad=True) for _ in range(2))
        up = torch.randn(b, kv * group, t, d, generator=g)
        ours = causal_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(torch.autograd.grad(ours, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def _bf16_step(model: GPT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], set[str]]:
    """Loss, gradients and the ops run of one bf16-autocast training step on the CPU."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x)[1]
            loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("variant", ["gpt2", "gqa", "modern"])
def test_bf16_cpu_training_writes_attention_out_with_sdpas_numbers(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 training on a CPU with a short context takes the written-out formula (no SDPA call),
    and its loss and gradients are SDPA math kernel's to bf16 precision; in fp32 SDPA runs."""
    with torch.device("cpu"):
        model = make(**VARIANTS[variant]).train()
        x = torch.randint(0, 50, (3, 24))
        loss, grads, ops = _bf16_step(model, x)  # the default
        assert "aten::baddbmm" in ops and not any("scaled_dot_product" in op for op in ops)
        monkeypatch.setattr(runtime, "CPU_TRAIN_ATTENTION", "math")
        ref_loss, ref_grads, ref_ops = _bf16_step(model, x)
        assert "aten::scaled_dot_product_attention" in ref_ops and "aten::baddbmm" not in ref_ops
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
        for a, r in zip(grads, ref_grads):
            assert ((a - r).norm() / r.norm().clamp_min(1e-12)).item() < 0.05
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x, x)[1].backward()  # fp32: SDPA
        assert any("scaled_dot_product" in e.key for e in prof.key_averages())
