"""Training tokens/s and model-FLOPs utilisation: gptkit vs Hugging Face GPT2LMHeadModel.

Same shape (6 layers, 6 heads, 384 wide, context 256, batch 8, vocab 65), same AdamW step,
each in fp32 and in its fastest mode (bf16 autocast; torch.compile too with --compile),
measured side by side in one run. Repeats are interleaved so machine noise hits both alike.

    python benchmarks/train_throughput.py [--steps 4] [--rounds 7] [--compile] [--shape speedrun-baseline-4x128]

Ends with one JSON line: tokens/s per setting, MFU against the measured matmul peaks, and
ratio_fp32 / ratio_fastest (gptkit / transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
from common import matmul_peak, median_time

from gptkit.config import ModelConfig
from gptkit.model import GPT

SHAPES = {"gpt2-6x384": (6, 6, 384, 256, 8, 65), "speedrun-baseline-4x128": (4, 4, 128, 64, 12, 65)}
L, H, C, T, B, V = SHAPES["gpt2-6x384"]


def ours(compile_: bool = False) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, dropout=0.0))
    fwd = torch.compile(m) if compile_ else m
    return m, lambda x, y: fwd(x, y)[1]


def theirs(compile_: bool = False) -> tuple[torch.nn.Module, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = GPT2LMHeadModel(cfg)
    fwd = torch.compile(m) if compile_ else m
    # labels shifted inside, as HF does; give it inputs as labels (same work).
    return m, lambda x, y: fwd(input_ids=x, labels=x).loss


def step_fn(build, dtype: torch.dtype, compile_: bool):  # noqa: ANN001, ANN201
    model, loss_of = build(compile_)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to build on 2 cores)")
    ap.add_argument("--shape", choices=list(SHAPES), default="gpt2-6x384")
    a = ap.parse_args()
    global L, H, C, T, B, V
    L, H, C, T, B, V = SHAPES[a.shape]
    torch.manual_seed(0)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    flops_per_token = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C)).flops_per_token(T)

    settings = [
        ("gptkit", "float32", False),
        ("transformers", "float32", False),
        ("gptkit", "bfloat16", False),
        ("transformers", "bfloat16", False),
    ]
    if a.compile:
        settings += [("gptkit", "bfloat16", True), ("transformers", "bfloat16", True)]
    steps = {s: step_fn(ours if s[0] == "gptkit" else theirs, getattr(torch, s[1]), s[2]) for s in settings}
    for fn in steps.values():  # warm up (and compile) everything first
        fn()
        fn()
    tps: dict[tuple, list[float]] = {s: [] for s in settings}
    for _ in range(a.rounds):  # interleaved rounds
        for s, fn in steps.items():
            tps[s].append(B * T / median_time(fn, a.steps, warmup=1))
    med = {s: statistics.median(v) for s, v in tps.items()}
    rows = {}
    for (who, dt, comp), v in med.items():
        name = f"{who}_{dt}{'_compile' if comp else ''}"
        rows[name] = {"tokens_per_s": round(v), "mfu": round(v * flops_per_token / peaks[dt], 3)}
        print(f"{name:32s} {v:10,.0f} tok/s   MFU {rows[name]['mfu']:.1%} of the {dt} matmul peak")

    def fastest(who: str) -> tuple[str, float]:
        return max(((n, r["tokens_per_s"]) for n, r in rows.items() if n.startswith(who)), key=lambda t: t[1])

    ours_best, theirs_best = fastest("gptkit"), fastest("transformers")
    result = {
        "shape": {"n_layer": L, "n_head": H, "n_embd": C, "block_size": T, "batch": B, "vocab": V},
        "matmul_peak_gflops": {k: round(v / 1e9) for k, v in peaks.items()},
        "settings": rows,
        "ratio_fp32": round(med[("gptkit", "float32", False)] / med[("transformers", "float32", False)], 3),
        "fastest_gptkit": ours_best[0],
        "fastest_transformers": theirs_best[0],
        "ratio_fastest": round(ours_best[1] / theirs_best[1], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
