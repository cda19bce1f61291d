from __future__ import annotations

import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.model import GPT
from gptkit.training.optim import Muon, build_optimizers, newton_schulz


def test_newton_schulz_orthogonalises() -> None:
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 64), (3, 48, 48)):
        g = torch.randn(*shape)
        x = newton_schulz(g).float()
        s = torch.linalg.svdvals(x).flatten()
        # The quintic iteration pushes singular values into a band around 1, not exactly to 1
        # (the very smallest stay lower): most lie in [0.5, 1.3] and none above.
        assert s.max() < 1.3
        assert (s > 0.5).float().mean() > 0.9
        # Same singular vectors as g: x^T g is symmetric positive semi-definite (for the wide case).
        if shape == (32, 64):
            m = x @ g.mT
            assert torch.allclose(m, m.mT, atol=0.1 * m.abs().max().item())


def test_batched_equals_one_by_one() -> None:
    torch.manual_seed(0)
    gs = torch.randn(4, 16, 24)
    batched = newton_schulz(gs)
    single = torch.stack([newton_schulz(g) for g in gs])
    torch.testing.assert_close(batched, single, atol=2e-2, rtol=0)


def test_newton_schulz_is_the_textbook_quintic_iteration() -> None:
    """The fused multiply-add form computes x <- a x + (b S + c S^2) x, S = x x^T, step by step."""
    torch.manual_seed(0)
    a, b, c = 3.4445, -4.7750, 2.0315
    for shape in ((24, 40), (40, 24), (2, 16, 16)):
        g = torch.randn(*shape)
        x = g.bfloat16().float()
        x = x.mT if x.size(-2) > x.size(-1) else x
        x = x / x.norm(dim=(-2, -1), keepdim=True)
        for _ in range(5):
            s = x @ x.mT
            x = a * x + (b * s + c * s @ s) @ x
        x = x.mT if g.size(-2) > g.size(-1) else x
        # The kernel runs in bf16 (about 3 significant digits), the reference in fp32.
        torch.testing.assert_close(newton_schulz(g), x, atol=0.05, rtol=0)


def test_muon_and_adamw_groups_cover_every_parameter_once() -> None:
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False))
    cfg = TrainConfig(optimizer="muon")
    opts = build_optimizers(model, cfg, torch.device("cpu"))
    assert isinstance(opts[0], Muon) and isinstance(opts[1], torch.optim.AdamW)
    seen = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    muon_params = {id(p) for g in opts[0].param_groups for p in g["params"]}
    assert id(model.wte.weight) not in muon_params and id(model.lm_head.weight) not in muon_params
    assert all(p.dim() == 2 for g in opts[0].param_groups for p in g["params"])


def test_adamw_decays_matrices_only() -> None:
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    (opt,) = build_optimizers(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


def test_lora_new_rows_take_no_weight_decay() -> None:
    """apply_lora returns what it adapted; build_optimizers takes it and keeps the embedding, of
    which only the new rows train, out of weight decay (decay would move the frozen rows)."""
    from gptkit.config import LoraConfig
    from gptkit.peft.lora import apply_lora

    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    frozen = model.wte.weight[:36].detach().clone()
    adapters = apply_lora(model, LoraConfig(enabled=True), base_vocab_size=36)
    assert adapters.new_rows_from == 36 and adapters.row_params == [model.wte.weight]
    assert model.adapters is adapters
    (opt,) = build_optimizers(model, TrainConfig(weight_decay=0.5, lr=0.1), torch.device("cpu"), adapters)
    decay, no_decay = opt.param_groups
    assert any(p is model.wte.weight for p in no_decay["params"])
    assert all(p is not model.wte.weight for p in decay["params"])
    for _ in range(3):
        _, loss = model(torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.wte.weight[:36], frozen)  # old rows untouched
    # Without the adapters the same embedding would be decayed, frozen rows and all.
    (plain,) = build_optimizers(model, TrainConfig(weight_decay=0.5), torch.device("cpu"))
    assert any(p is model.wte.weight for p in plain.param_groups[0]["params"])


def test_muon_trains_a_model() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=32))
    opts = build_optimizers(model, TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02), torch.device("cpu"))
    x = torch.randint(0, 16, (32, 8))
    y = (x + 1) % 16  # next token = this token + 1
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.2 * first
