"""Decoding tokens/s: gptkit's KV-cache sampler vs Hugging Face `generate()` (use_cache=True, greedy).

GPT-2 124M shape with random weights, a 16-token prompt, 128 new tokens, batch 1 and 8, both in
fp32, and gptkit also with bf16 weights. Rounds are interleaved; medians are reported.

    python benchmarks/generate_speed.py [--rounds 3] [--new-tokens 128]

Ends with one JSON line including ratio_b1 and ratio_b8 (gptkit fp32 / transformers fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from gptkit.config import ModelConfig
from gptkit.generate import SamplingParams, generate_ids
from gptkit.model import GPT

PROMPT = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    theirs = GPT2LMHeadModel(GPT2Config()).eval()
    n = a.new_tokens

    def run_ours(model: GPT, batch: int) -> float:
        prompt = torch.randint(0, 50257, (batch, PROMPT))
        t = time.perf_counter()
        count = sum(1 for _ in generate_ids(model, prompt, SamplingParams(max_new_tokens=n, temperature=0)))
        assert count == n
        return batch * n / (time.perf_counter() - t)

    def run_theirs(batch: int) -> float:
        prompt = torch.randint(0, 50257, (batch, PROMPT))
        t = time.perf_counter()
        with torch.no_grad():
            out = theirs.generate(
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
        "shape": "gpt2-124M",
        "new_tokens": n,
        "tokens_per_s": {k: {f"b{b}": round(v, 1) for b, v in per.items()} for k, per in med.items()},
        "ratio_b1": round(med["gptkit_fp32"][1] / med["transformers_fp32"][1], 2),
        "ratio_b8": round(med["gptkit_fp32"][8] / med["transformers_fp32"][8], 2),
        "ratio_b1_bf16": round(med["gptkit_bf16"][1] / med["transformers_fp32"][1], 2),
        "fp32_weight_streaming_ceiling_b1": round(ceiling, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
