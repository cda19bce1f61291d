from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.errors import GptkitError
from gptkit.inference.generate import (
    SamplingParams,
    TextStream,
    generate,
    generate_ids,
    process_logits,
    sample_next,
    seeded_generator,
)
from gptkit.loader import load_model

from .conftest import DEVICE


@pytest.fixture(scope="module")
def model_tok(trained_run: Path):  # noqa: ANN201
    model, tok, _ = load_model(trained_run, DEVICE)
    return model, tok


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    out = list(ids)
    for _ in range(n):
        window = torch.tensor([out[-model.config.block_size :]], device=DEVICE)
        logits, _ = model(window)
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


@pytest.mark.cuda
def test_greedy_through_cache_equals_full_recompute(model_tok) -> None:  # noqa: ANN001
    model, tok = model_tok
    ids = tok.encode("First Citizen:\n")
    got = [int(t[0]) for t in generate_ids(model, torch.tensor([ids]), SamplingParams(max_new_tokens=12, temperature=0))]
    assert got == greedy_without_cache(model, ids, 12)


@pytest.mark.cuda
def test_long_generation_and_prompt_beyond_context(model_tok) -> None:  # noqa: ANN001
    model, tok = model_tok
    block = model.config.block_size
    long_prompt = ("All the world's a stage " * 10)[: 3 * block]
    params = SamplingParams(max_new_tokens=3 * block, temperature=1.0, seed=1, stop_at_eot=False)
    s = TextStream(model, tok, long_prompt, params)
    text = "".join(s)
    assert s.completion_tokens == 3 * block and len(text) == 3 * block  # char model: a token per character
    assert s.finish_reason == "length" and s.prompt_tokens == 3 * block


@pytest.mark.cuda
def test_seed_reproducible_and_temperature_matters(model_tok) -> None:  # noqa: ANN001
    model, tok = model_tok
    a = generate(model, tok, "ROMEO:", SamplingParams(max_new_tokens=40, temperature=1.0, seed=3))
    b = generate(model, tok, "ROMEO:", SamplingParams(max_new_tokens=40, temperature=1.0, seed=3))
    c = generate(model, tok, "ROMEO:", SamplingParams(max_new_tokens=40, temperature=1.0, seed=4))
    assert a == b and a != c


@pytest.mark.cuda
def test_stop_strings_cut_the_text(model_tok) -> None:  # noqa: ANN001
    model, tok = model_tok
    full = generate(model, tok, "ROMEO:", SamplingParams(max_new_tokens=60, temperature=1.0, seed=7, stop_at_eot=False))
    stop = full[10:12]
    s = TextStream(
        model, tok, "ROMEO:", SamplingParams(max_new_tokens=60, temperature=1.0, seed=7, stop=[stop], stop_at_eot=False)
    )
    pieces = list(s)
    text = "".join(pieces)
    assert text == full[: full.index(stop)]
    assert s.finish_reason == "stop"


def test_top_k_and_top_p_restrict_the_support() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    ctx = torch.zeros(4, 1, dtype=torch.long)
    k = process_logits(logits, ctx, SamplingParams(temperature=1.0, top_k=5))
    assert ((k > float("-inf")).sum(-1) == 5).all()
    p = process_logits(logits, ctx, SamplingParams(temperature=1.0, top_p=0.5))
    probs = logits.softmax(-1)
    for row in range(4):
        kept = (p[row] > float("-inf")).nonzero().flatten()
        mass = probs[row, kept].sum()
        assert mass >= 0.5
        # Minimal: without its least likely token the kept set would fall short of top_p.
        assert mass - probs[row, kept].min() < 0.5
    assert (process_logits(logits, ctx, SamplingParams(temperature=0)).argmax(-1) == logits.argmax(-1)).all()


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = process_logits(logits, torch.tensor([[0, 1]]), SamplingParams(temperature=1.0, repetition_penalty=2.0))
    assert (out - out.max()).tolist() == [[0.0, -3.0, -0.5]]  # [1, -2, 0.5], less its maximum (softmax is the same)


def test_bad_sampling_params(model_tok) -> None:  # noqa: ANN001
    model, tok = model_tok
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=-5), dict(repetition_penalty=0)):
        with pytest.raises(GptkitError):
            generate(model, tok, "a", SamplingParams(**bad))  # type: ignore[arg-type]


@pytest.mark.cuda
def test_bf16_weights_decode(model_tok) -> None:  # noqa: ANN001
    model, tok = model_tok
    import copy

    bf = copy.deepcopy(model).to(torch.bfloat16)
    text = generate(bf, tok, "ROMEO:", SamplingParams(max_new_tokens=20, temperature=0))
    assert len(text) == 20


@pytest.mark.cuda
def test_batched_left_padded_sampling_equals_solo(model_tok) -> None:  # noqa: ANN001
    """The server's batched decoding: rows of unequal prompts, each with its own seed, sample
    exactly what each prompt samples alone."""
    model, tok = model_tok
    prompts = [tok.encode(p) for p in ("First Citizen:\n", "ROMEO:", "A")]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    ids = torch.tensor([[tok.eot_id] * (width - len(p)) + p for p in prompts])
    gens = [torch.Generator(DEVICE).manual_seed(s) for s in (1, 2, 3)]
    batched = torch.stack(list(generate_ids(model, ids, params, gens, pad)), dim=1)
    for b, p in enumerate(prompts):
        solo = [int(t[0]) for t in generate_ids(model, torch.tensor([p]), params, torch.Generator(DEVICE).manual_seed(b + 1))]
        assert batched[b].tolist() == solo


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_static_decoding_samples_the_same_tokens(model_tok, batch: int) -> None:  # noqa: ANN001
    """generate_ids(static=True) -- the decode step at fixed shapes that CUDA captures in a graph
    -- samples the tokens of ordinary decoding, with per-row seeds, left padding and three slides
    of the context, and draws them from the same distributions."""
    model, tok = model_tok
    prompts = [tok.encode(p) for p in ("First Citizen:\n", "ROMEO:", "A")][:batch]
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts]) if batch > 1 else None
    ids = torch.tensor([[tok.eot_id] * (width - len(p)) + p for p in prompts])
    params = SamplingParams(max_new_tokens=3 * model.config.block_size, temperature=0.8, stop_at_eot=False)
    runs = []
    for static in (False, True):
        gens = [torch.Generator(DEVICE).manual_seed(s) for s in range(batch)]
        dists: list[torch.Tensor] = []
        steps = generate_ids(model, ids, params, gens, pad, on_distribution=dists.append, static=static)
        runs.append((torch.stack(list(steps), dim=1), torch.stack(dists)))
    (tokens, dist), (static_tokens, static_dist) = runs
    assert static_tokens.tolist() == tokens.tolist()
    torch.testing.assert_close(static_dist, dist, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device (GPTKIT_TEST_DEVICE=cuda)")
def test_cuda_graph_is_captured_and_the_cli_samples_the_same_text(model_tok, trained_run: Path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    from gptkit.inference.generate import StaticDecoder

    model, tok = model_tok
    decoder = StaticDecoder(model, 1, DEVICE, torch.float32)
    ids = torch.tensor([tok.encode("ROMEO:")], device=DEVICE)
    with torch.no_grad():
        decoder.prefill(ids, None)
        decoder.step(ids[:, -1], None)
    assert decoder.graph is not None, decoder.graph_error
    texts = []
    for extra in ([], ["--cuda-graph"]):
        args = ["generate", str(trained_run), "--prompt", "ROMEO:", "--seed", "5", "--max-new-tokens", "80", "--device", "cuda"]
        p = subprocess.run([sys.executable, "-m", "gptkit", *args, *extra], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        texts.append(p.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > 80


# --- sampling settings at the edges of their ranges ---

finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-45, 1e-300, 1e-100, 1.0, 2.0, 100.0, 101.0])
)


@settings(max_examples=300, deadline=None)
@given(
    temperature=finite_or_not,
    top_p=finite_or_not,
    penalty=finite_or_not,
    top_k=st.integers(-2, 60),
    seed=st.one_of(st.none(), st.integers(-(2**80), 2**80)),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
)
def test_any_accepted_setting_samples_a_token(
    temperature: float, top_p: float, penalty: float, top_k: int, seed: int | None, scale: float
) -> None:
    """Whatever the settings, validate() refuses them with a GptkitError or sampling gives a real
    token: never nan probabilities, never an exception from torch."""
    params = SamplingParams(temperature=temperature, top_p=top_p, repetition_penalty=penalty, top_k=top_k, seed=seed)
    try:
        params.validate()
    except GptkitError:
        assert not (
            math.isfinite(temperature) and 0 <= temperature <= 100 and math.isfinite(top_p) and 0 < top_p <= 1
            and math.isfinite(penalty) and 0.01 <= penalty <= 100 and top_k >= 0
        )  # fmt: skip
        return
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * scale
    context = torch.randint(50, (4, 6), generator=torch.Generator().manual_seed(1))
    tokens = sample_next(logits, context, params, seeded_generator(seed))
    assert tokens.shape == (4,) and bool(((tokens >= 0) & (tokens < 50)).all())
    if temperature < 1e-30 or top_p < 1e-30:  # effectively greedy: the best (penalised) logit
        best = process_logits(logits, context, SamplingParams(temperature=0, repetition_penalty=penalty)).argmax(-1)
        assert torch.equal(tokens, best)
