"""CPU decoding, tokens/s: gptkit fp32, gptkit int8 and int4 (`gptkit quantize [--scheme int4]`),
transformers fp32, and llama.cpp (llama-cpp-python) on the f32, q8_0 and q4_0 GGUF files
`gptkit export --to-gguf` writes from the same weights. GPT-2 124M shape and SmolLM2-135M's,
random weights, a 16-token prompt then 128 greedy tokens (prefill included), batch 1 and 8
(llama.cpp's Python API decodes one sequence: batch 1 only), 2 threads everywhere. Rounds are interleaved; medians.
gptkit int8 at batch 1 quantizes each token's activations to int8 too (the default); int8_bf16act
is the same weights with weight-only products (`gptkit quantize --activations bf16`).

Then the quality of int8 and int4: a byte-level BPE model trained here for a minute, its
perplexity quantized against fp32 on tiny Shakespeare's validation split and on a held-out text (the responses of
tests/data/llms_from_scratch_instruction_data.json) -- once over whole windows (batched products) and once token by
token through the KV cache at batch 1, the path decoding takes (int8: activations quantized too) -- and the share of 20
prompts whose first 32 greedy tokens equal fp32's.

    python benchmarks/cpu_decode.py [--rounds 3] [--new-tokens 128] [--shape gpt2-124M smollm2-135M]

Ends with one JSON line including ratio_int8_vs_llamacpp_q8_b1 (GPT-2 124M shape),
ratio_int8_vs_fp32_b8, int8_ppl_change (relative), and the same for int4 against llama.cpp's
q4_0 and q8_0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, llama, run_folder

from gptkit.config import load_config
from gptkit.data import prepare
from gptkit.formats.gguf import export_gguf
from gptkit.inference.generate import SamplingParams, generate_ids
from gptkit.inference.quantize import quantize_run
from gptkit.loader import load_model
from gptkit.model import KVCache
from gptkit.training.train import train

PROMPT = 16
THREADS = 2


def speed(shape: str, rounds: int, n: int) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        run = run_folder(shape, tmp)
        fp32, _, cfg = load_model(run)
        int8, _, _ = load_model(quantize_run(run, tmp / "int8"))
        int8w, _, _ = load_model(quantize_run(run, tmp / "int8w", activations="bf16"))
        int4, _, _ = load_model(quantize_run(run, tmp / "int4", "int4"))
        theirs = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
        llms = {t: llama(export_gguf(run, tmp / f"{t}.gguf", t), PROMPT + n + 16, THREADS) for t in ("f32", "q8_0", "q4_0")}
        vocab = min(cfg.model.vocab_size, 1000)
        prompts = {b: torch.randint(0, vocab, (b, PROMPT), generator=torch.Generator().manual_seed(b)) for b in (1, 8)}

        def ours(model: torch.nn.Module, b: int) -> float:
            t0 = time.perf_counter()
            count = sum(1 for _ in generate_ids(model, prompts[b], SamplingParams(max_new_tokens=n, temperature=0)))
            assert count == n
            return b * n / (time.perf_counter() - t0)

        def hf(b: int) -> float:
            p = prompts[b]
            t0 = time.perf_counter()
            with torch.no_grad():
                out = theirs.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)  # fmt: skip
            assert out.shape[1] == PROMPT + n
            return b * n / (time.perf_counter() - t0)

        def cpp(llm: object) -> float:
            llm.reset()
            t0 = time.perf_counter()
            got = list(itertools.islice(llm.generate(prompts[1][0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0), n))
            assert len(got) == n
            return n / (time.perf_counter() - t0)

        runs = {
            ("gptkit_fp32", 1): lambda: ours(fp32, 1),
            ("gptkit_int8", 1): lambda: ours(int8, 1),
            ("gptkit_int8_bf16act", 1): lambda: ours(int8w, 1),
            ("gptkit_int4", 1): lambda: ours(int4, 1),
            ("transformers_fp32", 1): lambda: hf(1),
            ("llama.cpp_f32", 1): lambda: cpp(llms["f32"]),
            ("llama.cpp_q8_0", 1): lambda: cpp(llms["q8_0"]),
            ("llama.cpp_q4_0", 1): lambda: cpp(llms["q4_0"]),
            ("gptkit_fp32", 8): lambda: ours(fp32, 8),
            ("gptkit_int8", 8): lambda: ours(int8, 8),
            ("gptkit_int4", 8): lambda: ours(int4, 8),
            ("transformers_fp32", 8): lambda: hf(8),
        }
        torch.set_num_threads(THREADS)
        for fn in runs.values():  # warm-up
            fn()
        results: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                results[key].append(fn())
        for llm in llms.values():
            llm.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{shape}: decode tokens/s, {n} new tokens, {THREADS} threads, median of {rounds}")
    for (name, b), v in med.items():
        print(f"  {name:18s} batch {b}: {v:8.1f} tok/s   {v / med[('gptkit_fp32', b)]:.2f}x gptkit fp32")
    return {f"{name}_b{b}": round(v, 1) for (name, b), v in med.items()}


def held_out_text() -> str:
    records = json.loads((ROOT / "tests" / "data" / "llms_from_scratch_instruction_data.json").read_text())
    return "\n\n".join(r["output"] for r in records)


def quality(minutes: float) -> dict:
    """Perplexity of int8 and int4 against fp32, and greedy agreement, on a model trained here."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        text = (ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        (tmp / "corpus.txt").write_text(text)
        prepare([str(tmp / "corpus.txt")], tmp / "data", "bpe", vocab_size=2048, progress=False)
        sets = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128", "train.batch_size=16",
                f"train.max_time_s={minutes * 60}", "train.max_steps=100000", "train.eval_interval=100000",
                "train.dtype=float32", "train.tensorboard=false", "train.sample_tokens=0"]  # fmt: skip
        cfg = load_config(None, sets)
        cfg.data.dir = str(tmp / "data")
        train(cfg, tmp / "run", progress=False, quiet=True)
        fp32, tok, cfg = load_model(tmp / "run")
        kinds = {"int8": ("int8", "int8"), "int8_bf16act": ("int8", "bf16"), "int4": ("int4", "int8")}
        quantized = {k: load_model(quantize_run(tmp / "run", tmp / k, s, activations=a))[0] for k, (s, a) in kinds.items()}
        block = cfg.model.block_size

        def ppl(model: torch.nn.Module, ids: list[int]) -> float:
            x = torch.tensor([ids[i : i + block] for i in range(0, len(ids) - block, block)][:64])
            with torch.no_grad():
                logits = model(x[:, :-1])[0]
            return math.exp(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:]).item())

        def decode_ppl(model: torch.nn.Module, ids: list[int], windows: int = 16) -> float:
            nll, count = 0.0, 0
            with torch.no_grad():
                for i in range(0, block * windows, block):
                    row = torch.tensor(ids[i : i + block])
                    cache = KVCache.empty(model.config, 1, block, torch.device("cpu"), torch.float32)
                    for t in range(block - 1):
                        logits = model(row[None, t : t + 1], cache=cache)[0][0, -1]
                        nll -= logits.log_softmax(-1)[row[t + 1]].item()
                        count += 1
            return math.exp(nll / count)

        texts = {"shakespeare_val": tok.encode(text[int(len(text) * 0.9) :]), "held_out": tok.encode(held_out_text())}
        out = {}
        for name, ids in texts.items():
            a = ppl(fp32, ids)
            out[name] = {"fp32": round(a, 3)}
            for s, model in quantized.items():
                b = ppl(model, ids)
                out[name] |= {s: round(b, 3), f"{s}_change": round(b / a - 1, 5)}
            a = decode_ppl(fp32, ids)
            out[name] |= {"decode_fp32": round(a, 3)}
            for s, model in quantized.items():
                b = decode_ppl(model, ids)
                out[name] |= {f"decode_{s}": round(b, 3), f"decode_{s}_change": round(b / a - 1, 5)}
        ids = texts["shakespeare_val"]
        params = SamplingParams(max_new_tokens=32, temperature=0)
        prompts = [torch.tensor([ids[i * 97 : i * 97 + 16]]) for i in range(20)]

        def greedy(model: torch.nn.Module, p: torch.Tensor) -> list[int]:
            return [int(t) for t in generate_ids(model, p, params)]

        reference = [greedy(fp32, p) for p in prompts]  # fp32's once, for every scheme
        for s, model in quantized.items():
            same = sum(greedy(model, p) == want for p, want in zip(prompts, reference))
            out[f"{s}_greedy_32_same_share"] = same / 20
    print(f"\nint8/int4 quality (BPE model trained {minutes} min): {json.dumps(out)}")
    return out


def largest_change(q: dict, scheme: str) -> float:
    """The perplexity change of largest size, over both texts, whole windows and decoding."""
    keys = (f"{scheme}_change", f"decode_{scheme}_change")
    return max((v[k] for v in q.values() if isinstance(v, dict) for k in keys), key=abs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shape", nargs="+", default=["gpt2-124M", "smollm2-135M"], choices=["gpt2-124M", "smollm2-135M"])
    ap.add_argument("--train-minutes", type=float, default=1.0)
    a = ap.parse_args()
    result: dict = {"new_tokens": a.new_tokens}
    for shape in a.shape:
        result[shape] = speed(shape, a.rounds, a.new_tokens)
    q = quality(a.train_minutes)
    result["quality"] = q
    first = result[a.shape[0]]
    result["ratio_int8_vs_llamacpp_q8_b1"] = round(first["gptkit_int8_b1"] / first["llama.cpp_q8_0_b1"], 2)
    result["ratio_int8_vs_fp32_b8"] = round(first["gptkit_int8_b8"] / first["gptkit_fp32_b8"], 2)
    result["int8_ppl_change"] = largest_change(q, "int8")
    result["ratio_int4_vs_llamacpp_q4_b1"] = round(first["gptkit_int4_b1"] / first["llama.cpp_q4_0_b1"], 2)
    result["ratio_int4_vs_llamacpp_q8_b1"] = round(first["gptkit_int4_b1"] / first["llama.cpp_q8_0_b1"], 2)
    result["int4_ppl_change"] = largest_change(q, "int4")
    result["ratio_int8_bf16act_vs_llamacpp_q8_b1"] = round(first["gptkit_int8_bf16act_b1"] / first["llama.cpp_q8_0_b1"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
