"""Training step time on CPU with each way of computing attention, for the shapes gptkit trains
on CPUs: the formula written out (model.causal_attention: softmax(QK^T/sqrt(d) + causal bias) V
as baddbmm, softmax, bmm), SDPA's math kernel and its fused flash kernel. Interleaved rounds;
medians and ratios. gptkit writes the formula out where it wins (bf16 autocast with contexts up
to runtime.CPU_SHORT_CONTEXT tokens) and lets SDPA choose elsewhere.

    python benchmarks/attention_backend.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import gptkit.model as gm
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


KINDS = ("formula", "math", "flash")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    out = {}
    for name, (preset, sets) in SHAPES.items():
        cfg = load_config(preset, [*sets, "model.vocab_size=66"])
        model = gm.GPT(cfg.model)
        x = torch.randint(0, 66, (cfg.train.batch_size, cfg.model.block_size))
        bf16 = cfg.train.dtype in ("auto", "bfloat16")

        def step(model: gm.GPT = model, x: torch.Tensor = x, bf16: bool = bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(x, x)
            loss.backward()

        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(a.rounds):
            for kind in KINDS:
                # Every shape, precision and length takes this kind (gptkit's own rule is bypassed).
                gm.cpu_train_attention = lambda device, seq_len, kind=kind: kind
                step()
                t = time.perf_counter()
                step()
                times[kind].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out[name] = {f"{k}_ms": round(v, 1) for k, v in med.items()}
        out[name].update({f"math_over_{k}": round(med["math"] / med[k], 2) for k in ("formula", "flash")})
        print(f"{name:36s} " + "   ".join(f"{k} {med[k]:7.1f} ms" for k in KINDS)
              + f"   math/formula {out[name]['math_over_formula']}   math/flash {out[name]['math_over_flash']}")  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
