"""Training tokens/s and model-FLOPs utilisation: gptkit vs Hugging Face GPT2LMHeadModel.

Same shape (6 layers, 6 heads, 384 wide, context 256, batch 8, vocab 65 by default), same
loss, gradient clipping and AdamW hyperparameters, each in fp32 and in bf16 autocast (and
torch.compile with --compile).

Each library trains the way its own training code does, in a process of its own (allocator and
thread settings are per process):
- gptkit: the step of `gptkit.training.train` -- the optimizers from `build_optimizers` (fused AdamW)
  and glibc told to keep freed memory (`keep_freed_memory`), as `gptkit train` does on a CPU;
- transformers: `torch.optim.AdamW(fused=True)`, the optimizer the `Trainer` picks by default
  with this PyTorch, and the default allocator;
- transformers_same_allocator (fp32): the same, plus `keep_freed_memory`, to show how much of
  the gap the allocator setting is.
The processes take turns (one runs while the others wait), in interleaved rounds, so machine
noise hits all alike; each figure is the median over rounds, and the ratios are medians of the
per-round ratios.

    python benchmarks/train_throughput.py [--steps 10] [--rounds 9] [--compile] [--shape speedrun-baseline-4x128]

With --loop, also runs `gptkit.training.train.train()` itself for --loop-steps steps at the same shape
on the bundled Shakespeare data, and reports its tokens/s from its own log (data sampling,
learning-rate schedule and logging included).

Ends with one JSON line: tokens/s per setting, MFU against the measured matmul peaks, and
ratio_fp32 / ratio_fastest (gptkit / transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import answer_timings, matmul_peak, training_step

from gptkit.config import Config, ModelConfig, load_config
from gptkit.model import GPT

SHAPES = {"gpt2-6x384": (6, 6, 384, 256, 8, 65), "speedrun-baseline-4x128": (4, 4, 128, 64, 12, 65)}
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.1, 1.0


def gptkit_config(shape: tuple[int, ...], dtype: str, compile_: bool = False, extra: tuple[str, ...] = ()) -> Config:
    L, H, C, T, B, _ = shape
    return load_config(None, [
        f"model.n_layer={L}", f"model.n_head={H}", f"model.n_embd={C}", f"model.block_size={T}", "model.dropout=0.0",
        f"train.batch_size={B}", f"train.dtype={dtype}", f"train.compile={str(compile_).lower()}",
        f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}", f"train.grad_clip={CLIP}", *extra,
    ])  # fmt: skip


def build(who: str, shape: tuple[int, ...], dtype_name: str, compile_: bool):  # noqa: ANN201
    """One training step of `who`'s model, as a function of no arguments."""
    from gptkit.runtime import keep_freed_memory

    if who == "gptkit":  # as `gptkit train` runs it on a CPU
        keep_freed_memory()
        return training_step(gptkit_config(shape, dtype_name, compile_), vocab=shape[-1])

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    if who == "transformers_same_allocator":
        keep_freed_memory()
    L, H, C, T, B, V = shape
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(cfg).train()
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    x = torch.randint(0, V, (B, T))
    dtype = getattr(torch, dtype_name)
    amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = fwd(input_ids=x, labels=x).loss  # labels shifted inside, as HF does: the same work
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(conn, who: str, shape: tuple[int, ...], dtype_name: str, compile_: bool) -> None:  # noqa: ANN001
    """Builds one setting, warms it up, then times `n` steps each time it is asked."""
    answer_timings(conn, build(who, shape, dtype_name, compile_))


def loop_tokens_per_s(shape: tuple[int, ...], steps: int) -> float:
    """tokens/s that `gptkit.training.train.train()` itself logs, median over its log intervals (the first dropped)."""
    from gptkit.data import bundled_corpus, prepare
    from gptkit.training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        prepare([str(bundled_corpus())], Path(tmp) / "data", "char", progress=False)
        cfg = gptkit_config(shape, "float32", extra=(
            f"train.max_steps={steps}", "train.log_interval=20", "train.eval_interval=1000000", "train.sample_tokens=0",
            "train.tensorboard=false",
        ))  # fmt: skip
        cfg.data.dir = str(Path(tmp) / "data")
        train(cfg, Path(tmp) / "run", progress=False, quiet=True)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        return statistics.median([r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to build on 2 cores)")
    ap.add_argument("--shape", choices=list(SHAPES), default="gpt2-6x384")
    ap.add_argument("--loop", action="store_true", help="also measure gptkit's whole train() loop")
    ap.add_argument("--loop-steps", type=int, default=400)
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    L, H, C, T, B, V = shape
    torch.manual_seed(0)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    flops_per_token = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C)).flops_per_token(T)

    settings = [
        ("gptkit", "float32", False),
        ("transformers", "float32", False),
        ("transformers_same_allocator", "float32", False),
        ("gptkit", "bfloat16", False),
        ("transformers", "bfloat16", False),
    ]
    if a.compile:
        settings += [("gptkit", "bfloat16", True), ("transformers", "bfloat16", True)]
    ctx = mp.get_context("spawn")
    conns = {}
    for s in settings:  # start (and warm up, and compile) one at a time: they must not overlap
        parent, child = ctx.Pipe()
        ctx.Process(target=worker, args=(child, *[s[0], shape, s[1], s[2]]), daemon=True).start()
        assert parent.recv() == "ready"
        conns[s] = parent
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    for _ in range(a.rounds):  # interleaved rounds
        for s, conn in conns.items():
            time.sleep(0.5)  # let the last worker's OpenMP threads stop spinning before the next one runs
            conn.send(a.steps)
            times[s].append(conn.recv())
    for conn in conns.values():
        conn.send(0)

    rows = {}
    for (who, dt, comp), ts in times.items():
        name = f"{who}_{dt}{'_compile' if comp else ''}"
        v = B * T / statistics.median(ts)
        rows[name] = {"tokens_per_s": round(v), "mfu": round(v * flops_per_token / peaks[dt], 3)}
        print(f"{name:44s} {v:10,.0f} tok/s   MFU {rows[name]['mfu']:.1%} of the {dt} matmul peak")

    def ratio(ours: tuple, theirs: tuple) -> float:
        """Median over rounds of (their step time / our step time)."""
        return round(statistics.median(t / o for o, t in zip(times[ours], times[theirs])), 3)

    def fastest(who: str) -> tuple:
        return min((s for s in settings if s[0] == who), key=lambda s: statistics.median(times[s]))

    result = {
        "shape": {"n_layer": L, "n_head": H, "n_embd": C, "block_size": T, "batch": B, "vocab": V},
        "matmul_peak_gflops": {k: round(v / 1e9) for k, v in peaks.items()},
        "settings": rows,
        "ratio_fp32": ratio(("gptkit", "float32", False), ("transformers", "float32", False)),
        "ratio_fp32_same_allocator": ratio(("gptkit", "float32", False), ("transformers_same_allocator", "float32", False)),
        "fastest_gptkit": "_".join(str(x) for x in fastest("gptkit")),
        "fastest_transformers": "_".join(str(x) for x in fastest("transformers")),
        "ratio_fastest": ratio(fastest("gptkit"), fastest("transformers")),
    }
    print(f"gptkit / transformers, fp32: {result['ratio_fp32']:.2f}x "
          f"({result['ratio_fp32_same_allocator']:.2f}x with the same allocator setting); "
          f"fastest / fastest: {result['ratio_fastest']:.2f}x")  # fmt: skip
    if a.loop:
        loop = loop_tokens_per_s(shape, a.loop_steps)
        result["gptkit_train_loop_tokens_per_s"] = round(loop)
        print(f"gptkit train() loop, fp32: {loop:,.0f} tok/s (its own log; the step alone: "
              f"{rows['gptkit_float32']['tokens_per_s']:,} tok/s)")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
