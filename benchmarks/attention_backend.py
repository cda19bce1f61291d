"""Training step time on CPU with the plain attention formula (SDPA's math kernel) vs the fused
flash kernel, for the shapes gptkit trains on CPUs. Interleaved rounds; medians and ratios. gptkit uses the
plain formula where it wins: bf16 autocast with contexts up to 128 tokens.

    python benchmarks/attention_backend.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend

import gptkit.model as gm
import gptkit.runtime as rt
from gptkit.config import load_config
from gptkit.data import default_preset

GPT2_6x384 = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "train.batch_size=8"]
BASELINE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "train.batch_size=12"]
SHAPES = {
    "main-job preset (bf16, ctx 128)": (str(default_preset()), []),
    "nanoGPT CPU baseline (fp32, ctx 64)": (None, [*BASELINE, "train.dtype=float32"]),
    "gpt2 6x384 ctx256 b8 bf16": (None, [*GPT2_6x384, "train.dtype=bfloat16"]),
    "gpt2 6x384 ctx256 b8 fp32": (None, [*GPT2_6x384, "train.dtype=float32"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    out = {}
    for name, (preset, sets) in SHAPES.items():
        cfg = load_config(preset, [*sets, "model.vocab_size=66"])
        model = gm.GPT(cfg.model)
        rt.CPU_MATH_ATTENTION_MAX_T = 1 << 30  # let CPU_TRAIN_ATTENTION decide at every length
        x = torch.randint(0, 66, (cfg.train.batch_size, cfg.model.block_size))
        bf16 = cfg.train.dtype in ("auto", "bfloat16")

        def step(model: gm.GPT = model, x: torch.Tensor = x, bf16: bool = bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(x, x)
            loss.backward()

        times: dict[str, list[float]] = {"math": [], "flash": []}
        for _ in range(a.rounds):
            for kind, backends in (("math", [SDPBackend.MATH]), ("flash", [SDPBackend.FLASH_ATTENTION])):
                rt.CPU_TRAIN_ATTENTION = backends
                step()
                t = time.perf_counter()
                step()
                times[kind].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out[name] = {
            "math_ms": round(med["math"], 1),
            "flash_ms": round(med["flash"], 1),
            "flash_over_math": round(med["flash"] / med["math"], 2),
        }
        print(f"{name:36s} math {med['math']:7.1f} ms   flash {med['flash']:7.1f} ms   flash/math {out[name]['flash_over_math']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
