"""nanoGPT's CPU recipe, in gptkit and in plain PyTorch written the straightforward way, side by side.

The recipe (nanoGPT's Shakespeare-char CPU example): 4 layers x 4 heads x 128 wide, context 64,
batch 12, no dropout, no biases, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices),
100 warm-up steps then cosine to 1e-4 over 2000 steps, gradient clipping at 1.0, fp32, on the
bundled tiny Shakespeare, characters. gptkit runs it with `gptkit.train.train` (benchmarks/
speedrun.py's BASELINE with nanoGPT's exact GELU, `model.mlp=gelu_exact`); the reference is this
file's own loop: a GPT as a reader of the textbook would write it (nn.Embedding, nn.LayerNorm,
F.scaled_dot_product_attention, GELU MLP, tied head, torch.optim.AdamW with its defaults on a
CPU), random windows of the same data.
They alternate, ABAB (--pairs), in fresh processes; each reports its training time (evaluation
excluded) and its validation loss over the whole split at the end.

    python benchmarks/nanogpt_recipe.py [--pairs 2] [--steps 2000]

Ends with one JSON line: gptkit_s, reference_s (medians), speedup (the median of the pairs'
reference / gptkit), gptkit_val_loss, reference_val_loss.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETA2, CLIP = 1e-3, 1e-4, 100, 0.1, 0.99, 1.0


def reference(steps: int, data_dir: Path) -> dict:
    """The recipe in plain PyTorch: the loop a reader writes from the textbook."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(1337)
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
    gen = np.random.default_rng(1337)

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
            total += model(x, y).item() * x.numel()
            count += x.numel()
    return {"train_s": train_s, "val_loss": total / count}


def ours(steps: int, data_dir: Path, run_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speedrun import BASELINE

    from gptkit.config import load_config
    from gptkit.train import train

    # nanoGPT's GELU, as the reference's: the exact one (gptkit's GPT-2 default is the tanh form,
    # twice its cost on a CPU), so both sides train the same model.
    cfg = load_config(None, BASELINE + ["model.mlp=gelu_exact", f"train.max_steps={steps}", "train.sample_tokens=0"])
    cfg.data.dir = str(data_dir)
    res = train(cfg, run_dir, progress=False, quiet=True)
    return {"train_s": res.train_s, "val_loss": res.val["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:  # one side, in a process of its own (allocator and threads are per process)
        fn = ours(a.steps, Path(a.data), Path(a.run)) if a.worker == "ours" else reference(a.steps, Path(a.data))
        print(json.dumps(fn))
        return
    from gptkit.data import bundled_corpus, prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(bundled_corpus())], data, "char", progress=False)
        results: dict[str, list[dict]] = {"ours": [], "reference": []}
        for i in range(a.pairs):
            for who in ("ours", "reference") if i % 2 == 0 else ("reference", "ours"):
                cmd = [sys.executable, __file__, "--worker", who, "--steps", str(a.steps), "--data", str(data),
                       "--run", str(Path(tmp) / f"run{i}")]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[who].append(json.loads(out.strip().splitlines()[-1]))
                print(f"pair {i + 1} {who:>9}: {results[who][-1]['train_s']:.1f} s, val {results[who][-1]['val_loss']:.4f}",
                      flush=True)  # fmt: skip
    speedups = [r["train_s"] / o["train_s"] for o, r in zip(results["ours"], results["reference"])]
    summary = {
        "gptkit_s": statistics.median(r["train_s"] for r in results["ours"]),
        "reference_s": statistics.median(r["train_s"] for r in results["reference"]),
        "speedup": statistics.median(speedups),
        "speedups": speedups,
        "gptkit_val_loss": statistics.median(r["val_loss"] for r in results["ours"]),
        "reference_val_loss": statistics.median(r["val_loss"] for r in results["reference"]),
        "steps": a.steps,
    }
    print(f"gptkit {summary['gptkit_s']:.1f} s (val {summary['gptkit_val_loss']:.4f}), reference {summary['reference_s']:.1f} s "
          f"(val {summary['reference_val_loss']:.4f}): gptkit {summary['speedup']:.2f}x as fast")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
