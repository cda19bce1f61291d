"""Ablation of the speedrun preset: switch one option back to the GPT-2/AdamW baseline at a time.

Wall-clock budgets on a shared 2-core machine mix two things and the machine's drift (the same
preset ran 20 % more or fewer steps from one minute to the next), so each variant is measured
twice, separately:
- quality per step: validation loss on the whole split after --steps steps, the learning rate
  decaying over those steps (deterministic: the same number on any machine, within kernel
  rounding);
- speed: milliseconds per training step, median over interleaved rounds in one process, so drift
  hits every variant alike.

    python benchmarks/ablation.py [--steps 400] [--rounds 7] [--preset configs/speedrun-shakespeare-cpu.yaml]

Prints a table (variant, loss, change, ms/step, speed against the preset) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import training_step

from gptkit.config import load_config
from gptkit.data import bundled_corpus, prepare
from gptkit.runtime import keep_freed_memory  # noqa: E402
from gptkit.training.train import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "speedrun preset": [],
    "AdamW (lr 1e-3) instead of Muon": ["train.optimizer=adamw", "train.lr=1e-3"],
    "learned positions instead of RoPE": ["model.pos_embedding=learned"],
    "RMSNorm instead of LayerNorm": ["model.norm=rmsnorm"],
    "no QK-norm": ["model.qk_norm=false"],
    "GELU instead of ReLU^2": ["model.mlp=gelu"],
    "tied head": ["model.tie_embeddings=true"],
    "fp32 instead of bf16 autocast": ["train.dtype=float32"],
    "exportable (Qwen3: RMSNorm, SwiGLU, learned QK-norm)": [
        "model.norm=rmsnorm", "model.mlp=swiglu", "model.qk_norm_weight=true",
    ],
    "GPT-2 + AdamW + fp32 (all switches off)": [
        "train.optimizer=adamw", "train.lr=1e-3", "model.pos_embedding=learned", "model.norm=layernorm",
        "model.qk_norm=false", "model.mlp=gelu", "model.tie_embeddings=true", "train.dtype=float32",
    ],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="training steps per variant (for the loss)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (for the speed)")
    ap.add_argument("--preset", default=str(ROOT / "configs" / "speedrun-shakespeare-cpu.yaml"))
    ap.add_argument("--only", nargs="+", default=[], help="run only the variants whose names contain one of these")
    a = ap.parse_args()
    keep_freed_memory()
    chosen = {n: v for n, v in VARIANTS.items() if n == "speedrun preset" or not a.only or any(o in n for o in a.only)}
    configs = {name: load_config(a.preset, [f"train.max_steps={a.steps}", "train.sample_tokens=0", *sets])
               for name, sets in chosen.items()}  # fmt: skip

    steps = {name: training_step(cfg) for name, cfg in configs.items()}
    for fn in steps.values():
        fn()
        fn()
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.rounds):
        for name, fn in steps.items():
            fn()
            times = []
            for _ in range(10):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            ms[name].append(1e3 * statistics.median(times))
    del steps

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(bundled_corpus())], data, "char", progress=False)
        for i, (name, cfg) in enumerate(configs.items()):
            cfg.data.dir = str(data)
            r = train(cfg, Path(tmp) / f"run{i}", progress=False, quiet=True)
            speed = statistics.median(p / v for p, v in zip(ms["speedrun preset"], ms[name]))
            results[name] = {"val_loss": round(r.val["loss"], 4), "ms_per_step": round(statistics.median(ms[name]), 1),
                             "speed_vs_preset": round(speed, 3)}  # fmt: skip
            base = results["speedrun preset"]["val_loss"]
            print(f"{name:42s} val loss {r.val['loss']:.4f} ({r.val['loss'] - base:+.4f}) after {a.steps} steps   "
                  f"{results[name]['ms_per_step']:6.1f} ms/step ({speed:.2f}x the preset's speed)", flush=True)  # fmt: skip
    print(json.dumps({"steps": a.steps, "results": results}))


if __name__ == "__main__":
    main()
