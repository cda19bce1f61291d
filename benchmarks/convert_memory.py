"""Peak memory of `gptkit convert`, in copies of the weights: GPT-2 124M, or (--shape) a
SmolLM2-135M- or Qwen2.5-0.5B-shaped checkpoint in bf16 as they are published.

Builds a GPT2LMHeadModel with random weights (no download), saves it as a Hugging Face folder,
then runs the conversion in a fresh process and reads that process's peak RSS. A process that
only imports gptkit and torch gives the baseline; (peak - baseline) / weight bytes is the number
of weight copies held at once.

    python benchmarks/convert_memory.py [--shape gpt2-124M|smollm2-135M|qwen2.5-0.5B]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# VmHWM (the peak resident set of this process image): unlike ru_maxrss it is not inherited
# from the parent across fork + exec.
CODE = """
import sys
import torch, gptkit.formats.hf, gptkit.checkpoint
if sys.argv[1] == "convert":
    gptkit.formats.hf.import_hf(sys.argv[2], sys.argv[3])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(int(hwm.split()[1]) * 1024)
"""


def peak(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def make_model(shape: str) -> torch.nn.Module:
    import transformers as tf

    if shape == "gpt2-124M":
        return tf.GPT2LMHeadModel(tf.GPT2Config())
    if shape == "smollm2-135M":
        config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
        return tf.LlamaForCausalLM(config).to(torch.bfloat16)  # as published: bf16
    config = tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return tf.Qwen2ForCausalLM(config).to(torch.bfloat16)  # Qwen2.5-0.5B's shape


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2-124M", choices=["gpt2-124M", "smollm2-135M", "qwen2.5-0.5B"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = make_model(a.shape)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "hf")
        if a.shape != "gpt2-124M":  # the Llama family brings its own tokenizer
            from tokenizers import Tokenizer, models

            tok = Tokenizer(models.BPE())
            tok.add_special_tokens(["<|endoftext|>"])
            tok.save(str(Path(tmp) / "hf" / "tokenizer.json"))
            (Path(tmp) / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        del model
        base = peak("baseline")
        top = peak("convert", str(Path(tmp) / "hf"), str(Path(tmp) / "run"))
    copies = (top - base) / weight_bytes
    print(f"weights {weight_bytes / 2**20:.0f} MiB; peak RSS {top / 2**20:.0f} MiB over a {base / 2**20:.0f} MiB baseline")
    print(json.dumps({"shape": a.shape, "weights_mib": round(weight_bytes / 2**20), "peak_rss_mib": round(top / 2**20),
                      "baseline_rss_mib": round(base / 2**20), "weight_copies": round(copies, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
