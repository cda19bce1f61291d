"""Decode tokens/s: llama.cpp (llama-cpp-python) on gptkit's exported GGUF files against gptkit's
own `generate` on the same model, side by side in one run.

GPT-2 124M shape (llama.cpp's gpt2) and SmolLM2-135M's (llama.cpp's llama), random weights,
batch 1, a 16-token prompt then 128 greedy tokens, prefill included on both sides; gptkit in fp32
and bf16, llama.cpp on the f32, f16 and q8_0 files. Both on the same 2 threads. Rounds are
interleaved; medians. Also prints the largest logit difference of each file against gptkit.

    python benchmarks/gguf_speed.py [--rounds 3] [--new-tokens 128] [--shape gpt2-124M smollm2-135M]

llama.cpp runs without its extra (repacked) weight buffers (use_extra_bufts=False): with them it
segfaults in decode on q8_0 files on this machine's CPU. Ends with one JSON line per shape.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import llama, run_folder

from gptkit.formats.gguf import export_gguf
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.loader import load_model

PROMPT = 16
THREADS = 2


def measure(shape: str, rounds: int, n: int) -> dict:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = run_folder(shape, tmp)
        model, _, cfg = load_model(run)
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        files = {t: export_gguf(run, tmp / f"model-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}
        sizes = {t: round(f.stat().st_size / 2**20, 1) for t, f in files.items()}
        llms = {t: llama(f, PROMPT + n + 16, THREADS) for t, f in files.items()}
        vocab = cfg.model.vocab_size
        prompt = torch.randint(0, min(vocab, 1000), (1, PROMPT), generator=torch.Generator().manual_seed(1))

        # Fidelity: each file's logits for the prompt against gptkit's.
        with torch.no_grad():
            ours_logits = model(prompt)[0][0].numpy()
        diffs = {}
        for t, llm in llms.items():
            llm.reset()
            llm.eval(prompt[0].tolist())
            diffs[t] = float(np.abs(np.array(llm.scores[:PROMPT]) - ours_logits).max())

        def gptkit(m: torch.nn.Module) -> float:
            t0 = time.perf_counter()
            count = sum(1 for _ in generate_ids(m, prompt, SamplingParams(max_new_tokens=n, temperature=0)))
            assert count == n
            return n / (time.perf_counter() - t0)

        def llama_cpp_decode(llm: object) -> float:
            llm.reset()
            t0 = time.perf_counter()
            got = list(itertools.islice(llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0), n))
            assert len(got) == n
            return n / (time.perf_counter() - t0)

        runs = {"gptkit_fp32": lambda: gptkit(model), "gptkit_bf16": lambda: gptkit(model_bf16)}
        runs.update({f"llama.cpp_{t}": (lambda llm=llm: llama_cpp_decode(llm)) for t, llm in llms.items()})
        for fn in runs.values():  # warm-up
            fn()
        results: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                results[name].append(fn())
        for llm in llms.values():
            llm.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{shape}: decode tokens/s at batch 1, {n} new tokens, {THREADS} threads (median of {rounds})")
    for name, v in med.items():
        t = name.removeprefix("llama.cpp_")
        extra = f"  file {sizes[t]:7.1f} MiB  max |logit diff| vs gptkit {diffs[t]:.2e}" if t in sizes else ""
        print(f"  {name:18s} {v:8.1f} tok/s{extra}")
    base = med["gptkit_fp32"]
    return {
        "shape": shape,
        "new_tokens": n,
        "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_vs_gptkit_fp32": {k: round(v / base, 2) for k, v in med.items()},
        "file_mib": sizes,
        "max_logit_diff": {k: float(f"{v:.2e}") for k, v in diffs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shape", nargs="+", default=["gpt2-124M", "smollm2-135M"], choices=["gpt2-124M", "smollm2-135M"])
    a = ap.parse_args()
    for shape in a.shape:
        print(json.dumps(measure(shape, a.rounds, a.new_tokens)))


if __name__ == "__main__":
    main()
