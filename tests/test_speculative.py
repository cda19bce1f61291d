"""Speculative decoding: the same greedy tokens as the target alone (every architecture and
quantization, past the context's end, with a penalty), samples distributed as the target's
(a chi-square test over thousands of seeds, with a check that the test can tell the draft's
distribution apart), and the engine, the command line and a real server with --draft."""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from gptkit.config import ModelConfig
from gptkit.inference.engine import generate_many
from gptkit.inference.generate import (
    SamplingParams,
    generate,
    generate_ids,
    process_history,
    seeded_generator,
)
from gptkit.inference.qlinear import swap_linears
from gptkit.inference.speculative import Speculator, check, load_speculator
from gptkit.loader import load_model
from gptkit.model import GPT, KVCache

from .conftest import cli

LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2}


def random_gpt(seed: int, vocab: int, std: float = 0.02, layers: int = 2, **options: object) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=layers, n_head=4, n_embd=32, block_size=40, **options)
    model = GPT(cfg).eval()
    if std != 0.02:  # spread the logits, so that the distributions differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=std)
    return model


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_tokens_are_the_targets_own(arch: str, scheme: str) -> None:
    target = random_gpt(0, 200, **(LLAMA if arch == "llama" else {}))
    if scheme != "none":
        swap_linears(target, True, scheme)
    draft = Speculator(random_gpt(1, 200), k=3)
    for seed, penalty in itertools.product(range(3), (1.0, 1.3)):
        # prompts up to past the context (40), and 70 tokens: the cache is rebuilt on the way
        prompt = torch.randint(0, 200, (1, 5 + 17 * seed), generator=torch.Generator().manual_seed(seed))
        params = SamplingParams(max_new_tokens=70, temperature=0, repetition_penalty=penalty)
        alone = [int(t) for t in generate_ids(target, prompt, params)]
        fast = [int(t) for t in generate_ids(target, prompt, params, speculator=draft)]
        assert fast == alone
    # a draft whose vocabulary is padded to another size: the same tokens
    for vocab in (190, 232):
        other = Speculator(random_gpt(2, vocab), k=3, vocab=200)
        assert [int(t) for t in generate_ids(target, prompt, params, speculator=other)] == alone
    # a random draft rarely guesses right, but it was asked every round
    assert draft.rounds > 0 and draft.proposed >= draft.rounds and 0 <= draft.accepted <= draft.proposed
    # switched off after 8 rounds for keeping too few: the rest decoded plainly, the same tokens
    strict = Speculator(random_gpt(1, 200), k=3, min_acceptance=0.9)
    assert [int(t) for t in generate_ids(target, prompt, params, speculator=strict)] == alone
    assert strict.switched_off == 1 and strict.rounds == 8


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
def test_a_check_computes_what_decoding_steps_do(scheme: str) -> None:
    """The verification's logits over k + 1 positions are the ones k + 1 decoding steps give:
    to float rounding (int8 with int8 activations: its rows quantized one at a time; in one
    batch they would differ by about 5e-3)."""
    model = random_gpt(0, 200, **LLAMA)
    if scheme != "none":
        swap_linears(model, True, scheme)
    ids = torch.randint(0, 200, (1, 15), generator=torch.Generator().manual_seed(0)).tolist()[0]
    cfg, cpu = model.config, torch.device("cpu")
    with torch.inference_mode():
        one = KVCache.empty(cfg, 1, cfg.block_size, cpu, torch.float32)
        model(torch.tensor([ids[:10]]), cache=one)
        steps = torch.cat([model(torch.tensor([[t]]), cache=one)[0] for t in ids[10:]], dim=1)
        all_at_once = KVCache.empty(cfg, 1, cfg.block_size, cpu, torch.float32)
        model(torch.tensor([ids[:10]]), cache=all_at_once)
        checked = check(model, ids[10:], all_at_once)
    assert (checked - steps).abs().max() < 1e-5


def test_a_draft_identical_to_the_target_is_always_right() -> None:
    target = random_gpt(0, 200)
    spec = Speculator(copy.deepcopy(target), k=4)
    prompt = torch.tensor([[1, 2, 3]])
    params = SamplingParams(max_new_tokens=31, temperature=0)
    assert [int(t) for t in generate_ids(target, prompt, params, speculator=spec)] == [
        int(t) for t in generate_ids(target, prompt, params)
    ]
    assert spec.acceptance_rate == 1.0 and spec.stats()["tokens_per_round"] == 5.0


def joint(model: GPT, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple, float]:
    """The exact probability of every n-token continuation the settings allow."""
    out: dict[tuple, float] = {(): 1.0}
    with torch.inference_mode():
        for _ in range(n):
            nxt = {}
            for seq, prob in out.items():
                context = prompt + list(seq)
                logits = model(torch.tensor([context]))[0][:, -1]
                probs = process_history(logits, params, context, len(prompt)).softmax(-1)[0]
                for t in probs.nonzero()[:, 0].tolist():
                    nxt[(*seq, t)] = prob * float(probs[t])
            out = nxt
    return out


@pytest.mark.parametrize(
    "options", [{}, {"p_min": 0.5}, {"min_acceptance": 0.75, "warmup": 1}], ids=["plain", "p_min", "switch_off"]
)
def test_sampled_tokens_are_distributed_as_the_targets(options: dict) -> None:
    """4 tokens a sample, k = 2: rounds end in kept guesses, in refusals at either position and
    in the bonus token. The penalty makes each position's distribution depend on the guesses
    before it. 2,000 seeds; chi-square against the target's exact joint distribution. With
    p_min the draft also stops early in some rounds (at the first guess or the second); with
    min_acceptance the sequences that kept fewer than 3/4 of their first round's guesses
    decode their remaining tokens plainly."""
    target = random_gpt(0, 24, std=0.5, layers=1)
    draft = copy.deepcopy(target)  # alike but not the same: guesses both kept and refused
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    prompt = [3, 1, 4]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=3, repetition_penalty=1.5)
    spec = Speculator(draft, k=2, **options)
    counts: dict[tuple, int] = {}
    n = 2000
    for seed in range(n):
        seq = tuple(
            int(t) for t in generate_ids(target, torch.tensor([prompt]), params, seeded_generator(10_000 + seed), speculator=spec)
        )
        counts[seq] = counts.get(seq, 0) + 1

    probs = joint(target, prompt, params, 4)
    assert set(counts) <= set(probs)  # never a sequence the target's settings exclude
    cells = sorted(probs, key=probs.get, reverse=True)
    big = [c for c in cells if probs[c] * n >= 5]  # the rare ones pooled into one cell
    seen = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    want = [probs[c] * n for c in big] + [n * (1 - sum(probs[c] for c in big))]
    # (at 20,000 seeds the same test gives p = 0.60)
    assert chisquare(seen, want).pvalue > 1e-3
    assert 0.2 < spec.acceptance_rate < 0.8  # guesses both kept and refused
    if "p_min" in options:  # some rounds stopped short, and not every one
        assert spec.rounds < spec.proposed < 2 * spec.rounds
    if "min_acceptance" in options:  # some sequences switched off after their first round
        assert 0.1 * n < spec.switched_off < 0.9 * n
    # The test can tell a wrong distribution: the draft's own is 4x as far from the samples.
    draft_probs = joint(draft, prompt, params, 4)

    def distance(probs: dict[tuple, float]) -> float:  # total variation
        return sum(abs(counts.get(c, 0) / n - probs.get(c, 0.0)) for c in set(probs) | set(counts)) / 2

    assert distance(draft_probs) > 4 * distance(probs)


def test_engine_speculates_a_lone_row_and_batches_several(bpe_runs: dict[str, Path]) -> None:
    target, tok, _ = load_model(bpe_runs["llama"])
    spec = load_speculator(bpe_runs["gpt2"], target, tok, k=4)
    prompts = [tok.encode(t) for t in ("ROMEO:", "First Citizen:\nWe", "KING")]
    params = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eot=False)
    alone = [generate(target, tok, p, params) for p in prompts]
    assert generate_many(target, tok, prompts[:1], [params], 4, speculator=spec) == alone[:1]
    lone_rounds = spec.rounds
    assert lone_rounds > 0 and spec.accepted > 0  # trained on the same text: some guesses kept
    # three at once: batched steps, then speculation for whichever row is left alone
    assert generate_many(target, tok, prompts, [params] * 3, 4, speculator=spec) == alone
    # sampled with a seed: the same text each time
    sampled = SamplingParams(max_new_tokens=30, temperature=0.9, seed=5)
    once = generate_many(target, tok, prompts[:1], [sampled], 4, speculator=spec)
    assert generate_many(target, tok, prompts[:1], [sampled], 4, speculator=spec) == once
    # a draft that stops guessing when unsure: fewer guesses a round, the same text
    unsure = load_speculator(bpe_runs["gpt2"], target, tok, k=4, p_min=0.1)
    assert generate_many(target, tok, prompts[:1], [params], 4, speculator=unsure) == alone[:1]
    assert 0 < unsure.proposed < 4 * unsure.rounds, unsure.stats()
    assert unsure.acceptance_rate > spec.acceptance_rate, (unsure.stats(), spec.stats())  # better guesses
    # a draft switched off for a row that keeps less than all of its guesses: the same text
    strict = load_speculator(bpe_runs["gpt2"], target, tok, k=4, min_acceptance=1.0)
    assert generate_many(target, tok, prompts[:1], [params], 4, speculator=strict) == alone[:1]
    assert strict.switched_off == 1 and strict.rounds == 8 and strict.stats()["sequences_switched_off"] == 1


def test_cli_generate_and_chat_with_a_draft(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, bpe_runs: dict[str, Path], trained_run: Path
) -> None:
    run, draft = str(bpe_runs["llama"]), str(bpe_runs["gpt2"])
    args = ["generate", run, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0"]
    code, plain, _ = cli(capsys, *args)
    assert code == 0
    code, fast, err = cli(capsys, *args, "--draft", draft, "--draft-tokens", "3")
    assert code == 0 and fast == plain
    assert "draft guesses kept" in err
    # chat: the same reply with and without the draft
    replies = []
    for extra in ([], ["--draft", draft]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Who are you?\n"))
        code, out, _ = cli(capsys, "chat", run, "--temperature", "0", "--max-new-tokens", "24", *extra)
        assert code == 0
        replies.append(out)
    assert replies[0] == replies[1] and replies[0].strip()
    # a draft with another tokenizer, and a k out of range: one line each, exit 2
    code, _, err = cli(capsys, *args, "--draft", str(trained_run))
    assert code == 2 and "another tokenizer" in err and "Traceback" not in err
    code, _, err = cli(capsys, *args, "--draft", draft, "--draft-tokens", "0")
    assert code == 2 and "--draft-tokens must be in 1..16" in err
    code, _, err = cli(capsys, *args, "--draft", draft, "--draft-p-min", "1.5")
    assert code == 2 and "--draft-p-min must be in [0, 1)" in err
    code, _, err = cli(capsys, *args, "--draft", draft, "--draft-min-acceptance", "2")
    assert code == 2 and "--draft-min-acceptance must be in [0, 1]" in err


def test_server_reports_acceptance(bpe_runs: dict[str, Path]) -> None:
    pytest.importorskip("openai")
    from .test_serve import Server

    target, tok, _ = load_model(bpe_runs["llama"])
    want = generate(target, tok, "ROMEO:", SamplingParams(max_new_tokens=30, temperature=0))
    server = Server(bpe_runs["llama"], "--draft", str(bpe_runs["gpt2"]), "--draft-tokens", "3")
    try:
        status, before = server.request("GET", "/health")
        assert status == 200 and before["speculative"]["proposed"] == 0
        status, body = server.request(
            "POST", "/v1/completions", {"model": server.name, "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}
        )
        assert status == 200 and body["choices"][0]["text"] == want
        stats = server.request("GET", "/health")[1]["speculative"]
        assert stats["draft_tokens"] == 3 and stats["proposed"] > 0
        assert stats["acceptance_rate"] == round(stats["accepted"] / stats["proposed"], 4)
    finally:
        server.stop()
