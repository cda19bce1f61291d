"""Decode tokens/s: llama.cpp (llama-cpp-python) on gptkit's exported GGUF files against gptkit's
own `generate` on the same model, side by side in one run.

GPT-2 124M shape (llama.cpp's gpt2) and SmolLM2-135M's (llama.cpp's llama), random weights,
batch 1, a 16-token prompt then 128 greedy tokens, prefill included on both sides; gptkit in fp32
and bf16, llama.cpp on the f32, f16 and q8_0 files. Both on the same 2 threads. Rounds are
interleaved; medians. Also prints the largest logit difference of each file against gptkit.

    python benchmarks/gguf_speed.py [--rounds 3] [--new-tokens 128] [--shape gpt2-124M smollm2-135M]

llama.cpp runs without its repacked weight buffers (use_extra_bufts=False): their AMX kernels
crash on q8_0 files on this machine's CPU. Ends with one JSON line per shape.
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

from gptkit.checkpoint import load_model
from gptkit.convert import import_hf
from gptkit.generate import SamplingParams, generate_ids
from gptkit.gguf_export import export_gguf

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16
THREADS = 2


def run_folder(shape: str, tmp: Path) -> Path:
    """A gptkit run at `shape` with random weights, made through `gptkit convert` from a
    transformers model (GPT-2's tokenizer for GPT-2; a small byte-level BPE for SmolLM2's shape,
    its other rows unused)."""
    torch.manual_seed(0)
    if shape == "gpt2-124M":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp / "hf")
        return import_hf(tmp / "hf", tmp / "run", tokenizer=str(ROOT / "tests" / "data" / "gpt2"))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp / "hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([(ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text()[:200_000]], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp / "hf")
    return import_hf(tmp / "hf", tmp / "run")


def llama(path: Path, n_ctx: int) -> object:
    import llama_cpp

    defaults = llama_cpp.llama_model_default_params

    def no_repacking() -> object:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS,
                               verbose=False, type_k=0, type_v=0, logits_all=True)  # fmt: skip
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def measure(shape: str, rounds: int, n: int) -> dict:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = run_folder(shape, tmp)
        model, _, cfg = load_model(run)
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        files = {t: export_gguf(run, tmp / f"model-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}
        sizes = {t: round(f.stat().st_size / 2**20, 1) for t, f in files.items()}
        llms = {t: llama(f, PROMPT + n + 16) for t, f in files.items()}
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
