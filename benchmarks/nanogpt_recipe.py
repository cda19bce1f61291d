"""nanoGPT's CPU recipe, in gptkit and in plain PyTorch written the straightforward way, side by side.

The recipe (nanoGPT's Shakespeare-char CPU example): 4 layers x 4 heads x 128 wide, context 64,
batch 12, no dropout, no biases, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices),
100 warm-up steps then cosine to 1e-4 over 2000 steps, gradient clipping at 1.0, fp32, on the
bundled tiny Shakespeare, characters. gptkit runs it with `gptkit.training.train.train` (benchmarks/
speedrun.py's BASELINE with nanoGPT's exact GELU, `model.mlp=gelu_exact`); the reference is this
file's own loop: a GPT as a reader of the textbook would write it (nn.Embedding, nn.LayerNorm,
F.scaled_dot_product_attention, GELU MLP, tied head, GPT-2's initialisation as nanoGPT has it,
torch.optim.AdamW with its defaults on a CPU), random windows of the same data, in fp32 (nanoGPT
on a CPU trains in fp32).
gptkit runs twice: with the precision fixed to fp32 (the same arithmetic as the reference: what
is left is the step itself), and with `train.dtype=auto`, its default, which times a few steps in
each precision at start-up and takes the faster (bf16 autocast on CPUs with AMX/AVX-512 BF16);
the reference runs twice too, the second time with its forward under bf16 autocast (the loop a
reader who knows autocast writes). The four alternate, rotating their order (--rounds; round i
seeds all four with 1337 + i, so the losses' medians are over seeds), in fresh processes, each
gptkit run with an empty cache (its start-up timing is paid every time); each reports its
training time (the loop, evaluation excluded), the wall time of the whole call (start-up, loop,
checkpoints, the final evaluation over the whole validation split) and that validation loss.

    python benchmarks/nanogpt_recipe.py [--rounds 3] [--steps 2000]

Ends with one JSON line: the medians of each side's times, speedup (the median of the rounds'
reference / gptkit-auto training times), speedup_fp32 (the same against gptkit in fp32),
speedup_wall (whole calls, gptkit-auto), speedup_vs_bf16_reference (gptkit-auto against the
reference loop under bf16 autocast, a fourth side), the validation losses and the dtype auto chose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETA2, CLIP = 1e-3, 1e-4, 100, 0.1, 0.99, 1.0


def reference(steps: int, data_dir: Path, seed: int, bf16: bool = False) -> dict:
    """The recipe in plain PyTorch: the loop a reader writes from the textbook; with bf16, its
    forward under torch.autocast, as PyTorch's documentation shows it."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    t_call = time.perf_counter()
    torch.manual_seed(seed)
    meta = json.loads((data_dir / "meta.json").read_text())
    vocab = meta["vocab_size"]
    train_tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    val_tokens = np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(WIDTH, bias=False), nn.LayerNorm(WIDTH, bias=False)
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
            self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
            self.fc = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
            self.out = nn.Linear(4 * WIDTH, WIDTH, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln = nn.LayerNorm(WIDTH, bias=False)
            self.head = nn.Linear(WIDTH, vocab, bias=False)
            self.head.weight = self.tok.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
            for block in self.blocks:  # GPT-2's (and nanoGPT's) smaller start for the residual projections
                for w in (block.proj.weight, block.out.weight):
                    nn.init.normal_(w, std=0.02 / math.sqrt(2 * LAYERS))

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln(x))
            return F.cross_entropy(logits.view(-1, vocab), targets.reshape(-1))

    model = Model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, BETA2))  # fmt: skip
    gen = np.random.default_rng(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = gen.integers(0, len(train_tokens) - CONTEXT - 1, BATCH)
        x = torch.from_numpy(np.stack([train_tokens[i : i + CONTEXT] for i in ix]))
        y = torch.from_numpy(np.stack([train_tokens[i + 1 : i + 1 + CONTEXT] for i in ix]))
        return x, y

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)

    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    total = count = 0.0
    with torch.no_grad():  # the whole validation split, in consecutive windows
        n = (len(val_tokens) - 1) // CONTEXT
        for lo in range(0, n, 64):
            rows = range(lo, min(n, lo + 64))
            x = torch.from_numpy(np.stack([val_tokens[i * CONTEXT : (i + 1) * CONTEXT] for i in rows]))
            y = torch.from_numpy(np.stack([val_tokens[i * CONTEXT + 1 : (i + 1) * CONTEXT + 1] for i in rows]))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                total += model(x, y).item() * x.numel()
            count += x.numel()
    return {"train_s": train_s, "wall_s": time.perf_counter() - t_call, "val_loss": total / count,
            "dtype": "bfloat16" if bf16 else "float32"}  # fmt: skip


def ours(steps: int, data_dir: Path, run_dir: Path, dtype: str, seed: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speedrun import BASELINE

    from gptkit.config import load_config
    from gptkit.training.train import train

    t_call = time.perf_counter()
    # nanoGPT's GELU, as the reference's: the exact one (gptkit's GPT-2 default is the tanh form,
    # twice its cost on a CPU), so both sides train the same model.
    sets = ["model.mlp=gelu_exact", f"train.max_steps={steps}", "train.sample_tokens=0", f"train.dtype={dtype}",
            f"train.seed={seed}"]  # fmt: skip
    cfg = load_config(None, BASELINE + sets)
    cfg.data.dir = str(data_dir)
    res = train(cfg, run_dir, progress=False, quiet=True)
    chosen, timing = dtype, ""
    if dtype == "auto":  # what its start-up timing chose: the one entry of its fresh cache
        from gptkit.runtime import user_cache_dir
        from gptkit.training.train import AUTO_DTYPE_CACHE

        (got,) = json.loads((user_cache_dir() / AUTO_DTYPE_CACHE).read_text()).values()
        chosen, timing = got["dtype"], f"{got['bfloat16_ms']:.0f} against {got['float32_ms']:.0f} ms in fp32"
    return {"train_s": res.train_s, "wall_s": time.perf_counter() - t_call, "val_loss": res.val["loss"], "dtype": chosen,
            "timing": timing}  # fmt: skip


SIDES = {"gptkit": "auto", "gptkit_fp32": "float32", "reference": "float32", "reference_bf16": "bfloat16"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:  # one side, in a process of its own (allocator and threads are per process)
        if a.worker.startswith("reference"):
            fn = reference(a.steps, Path(a.data), a.seed, bf16=SIDES[a.worker] == "bfloat16")
        else:
            fn = ours(a.steps, Path(a.data), Path(a.run), SIDES[a.worker], a.seed)
        print(json.dumps(fn))
        return
    from gptkit.data import bundled_corpus, prepare

    order = list(SIDES)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(bundled_corpus())], data, "char", progress=False)
        results: dict[str, list[dict]] = {who: [] for who in SIDES}
        for i in range(a.rounds):
            for who in order[i % len(order) :] + order[: i % len(order)]:  # a different side first each round
                run = Path(tmp) / f"run{i}{who}"
                env = {**os.environ, "GPTKIT_CACHE_DIR": str(run) + "-cache"}  # start-up timing paid each time
                cmd = [sys.executable, __file__, "--worker", who, "--steps", str(a.steps), "--data", str(data), "--run", str(run),
                       "--seed", str(1337 + i)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results[who].append(r)
                how = r["dtype"] + (f", {r['timing']}" if r.get("timing") else "")
                print(f"round {i + 1} (seed {1337 + i}) {who:>14} ({how}): training {r['train_s']:.1f} s, "
                      f"whole call {r['wall_s']:.1f} s, "
                      f"val {r['val_loss']:.4f}", flush=True)  # fmt: skip

    def med(who: str, key: str) -> float:
        return statistics.median(r[key] for r in results[who])

    def ratios(who: str, key: str, against: str = "reference") -> list[float]:
        return [ref[key] / r[key] for r, ref in zip(results[who], results[against])]

    summary = {
        "gptkit_s": med("gptkit", "train_s"),
        "gptkit_fp32_s": med("gptkit_fp32", "train_s"),
        "reference_s": med("reference", "train_s"),
        "speedup": statistics.median(ratios("gptkit", "train_s")),
        "speedups": ratios("gptkit", "train_s"),
        "speedup_fp32": statistics.median(ratios("gptkit_fp32", "train_s")),
        "speedups_fp32": ratios("gptkit_fp32", "train_s"),
        "speedup_wall": statistics.median(ratios("gptkit", "wall_s")),
        "speedup_wall_fp32": statistics.median(ratios("gptkit_fp32", "wall_s")),
        "reference_bf16_s": med("reference_bf16", "train_s"),
        "speedup_vs_bf16_reference": statistics.median(ratios("gptkit", "train_s", "reference_bf16")),
        "gptkit_val_loss": med("gptkit", "val_loss"),
        "gptkit_fp32_val_loss": med("gptkit_fp32", "val_loss"),
        "reference_val_loss": med("reference", "val_loss"),
        "reference_bf16_val_loss": med("reference_bf16", "val_loss"),
        "auto_dtype": sorted({r["dtype"] for r in results["gptkit"]}),
        "auto_timings": [r["timing"] for r in results["gptkit"]],
        "steps": a.steps,
    }
    print(f"training: gptkit (dtype=auto: {', '.join(summary['auto_dtype'])}) {summary['gptkit_s']:.1f} s, val "
          f"{summary['gptkit_val_loss']:.4f}; gptkit fp32 {summary['gptkit_fp32_s']:.1f} s, "
          f"val {summary['gptkit_fp32_val_loss']:.4f}; "
          f"reference (fp32) {summary['reference_s']:.1f} s, val {summary['reference_val_loss']:.4f}; "
          f"reference in bf16 {summary['reference_bf16_s']:.1f} s, val {summary['reference_bf16_val_loss']:.4f}")  # fmt: skip
    print(f"gptkit {summary['speedup']:.2f}x as fast as the reference ({summary['speedup_wall']:.2f}x whole calls); "
          f"in fp32 {summary['speedup_fp32']:.2f}x ({summary['speedup_wall_fp32']:.2f}x); "
          f"{summary['speedup_vs_bf16_reference']:.2f}x the reference in bf16")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
