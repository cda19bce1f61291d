"""Decoding tokens/s: gptkit's KV-cache sampler vs Hugging Face `generate()` (use_cache=True, greedy).

GPT-2 124M shape (or SmolLM2-135M's, --shape smollm2-135M: imported through `gptkit convert`)
with random weights, a 16-token prompt, 128 new tokens, batch 1 and 8, both in fp32, and gptkit
with bf16 weights (at SmolLM2's shape transformers in bf16 too). Rounds are interleaved; medians.

    python benchmarks/generate_speed.py [--rounds 3] [--new-tokens 128] [--shape smollm2-135M]

Ends with one JSON line including ratio_b1 and ratio_b8 (gptkit fp32 / transformers fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptkit.config import ModelConfig
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.model import GPT

PROMPT = 16


def build(shape: str) -> tuple[GPT, torch.nn.Module, int]:
    """gptkit's model and transformers' at one shape, with the same random weights. SmolLM2's
    shape goes through the real path: a LlamaForCausalLM folder converted by `gptkit convert`."""
    if shape == "gpt2-124M":
        from transformers import GPT2Config, GPT2LMHeadModel

        ours = GPT(ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval()
        return ours, GPT2LMHeadModel(GPT2Config()).eval(), 50257
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptkit.formats.hf import import_hf
    from gptkit.loader import load_model

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)  # fmt: skip
    theirs = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(Path(tmp) / "hf")
        _tiny_tokenizer(Path(tmp) / "hf")
        import_hf(Path(tmp) / "hf", Path(tmp) / "run")
        ours = load_model(Path(tmp) / "run")[0]
    return ours, theirs, 49152


def _tiny_tokenizer(folder: Path) -> None:
    """A stand-in tokenizer.json (the benchmark feeds token ids; conversion wants a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shape", default="gpt2-124M", choices=["gpt2-124M", "smollm2-135M"])
    a = ap.parse_args()
    torch.manual_seed(0)
    ours, theirs, vocab = build(a.shape)
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    theirs_bf16 = copy.deepcopy(theirs).to(torch.bfloat16) if a.shape != "gpt2-124M" else None
    n = a.new_tokens

    def run_ours(model: GPT, batch: int) -> float:
        prompt = torch.randint(0, vocab, (batch, PROMPT))
        t = time.perf_counter()
        count = sum(1 for _ in generate_ids(model, prompt, SamplingParams(max_new_tokens=n, temperature=0)))
        assert count == n
        return batch * n / (time.perf_counter() - t)

    def run_theirs(batch: int, model: torch.nn.Module = theirs) -> float:
        prompt = torch.randint(0, vocab, (batch, PROMPT))
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert out.shape[1] == PROMPT + n
        return batch * n / (time.perf_counter() - t)

    # The batch-1 ceiling: the time to stream every weight matrix once through F.linear (what one
    # decoding step must do at least), on this machine, now.
    mats = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    vecs = {w.size(1): torch.randn(1, w.size(1)) for w in mats}

    def stream_weights() -> None:
        for w in mats:
            torch.nn.functional.linear(vecs[w.size(1)], w)

    stream_weights()
    t = time.perf_counter()
    for _ in range(5):
        stream_weights()
    ceiling = 5 / (time.perf_counter() - t)
    print(f"fp32 weight-streaming ceiling at batch 1: {ceiling:.1f} tok/s")

    runs = {
        "gptkit_fp32": lambda b: run_ours(ours, b),
        "gptkit_bf16": lambda b: run_ours(ours_bf16, b),
        "transformers_fp32": run_theirs,
    }
    if theirs_bf16 is not None:
        runs["transformers_bf16"] = lambda b: run_theirs(b, theirs_bf16)
    results: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in runs}
    for fn in runs.values():  # warm-up
        fn(1)
    for _ in range(a.rounds):
        for batch in (1, 8):
            for name, fn in runs.items():
                results[name][batch].append(fn(batch))
    med = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in results.items()}
    for name, per in med.items():
        print(f"{name:20s} batch 1: {per[1]:8.1f} tok/s   batch 8: {per[8]:8.1f} tok/s")
    out = {
        "shape": a.shape,
        "new_tokens": n,
        "tokens_per_s": {k: {f"b{b}": round(v, 1) for b, v in per.items()} for k, per in med.items()},
        "ratio_b1": round(med["gptkit_fp32"][1] / med["transformers_fp32"][1], 2),
        "ratio_b8": round(med["gptkit_fp32"][8] / med["transformers_fp32"][8], 2),
        "ratio_b1_bf16": round(med["gptkit_bf16"][1] / med["transformers_fp32"][1], 2),
        "fp32_weight_streaming_ceiling_b1": round(ceiling, 1),
    }
    if theirs_bf16 is not None:
        out["ratio_b1_bf16_vs_bf16"] = round(med["gptkit_bf16"][1] / med["transformers_bf16"][1], 2)
        out["ratio_b8_bf16_vs_bf16"] = round(med["gptkit_bf16"][8] / med["transformers_bf16"][8], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
