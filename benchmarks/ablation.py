"""Ablation of the speedrun preset: switch one option back to the GPT-2/AdamW baseline at a time
and measure the validation loss (whole split) at an equal wall-clock budget.

    python benchmarks/ablation.py [--budget 60] [--preset configs/speedrun-shakespeare-cpu.yaml]

Prints a table (variant, final loss, change against the full preset) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gptkit.config import load_config
from gptkit.data import bundled_corpus, prepare
from gptkit.train import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "speedrun preset": [],
    "AdamW (lr 1e-3) instead of Muon": ["train.optimizer=adamw", "train.lr=1e-3"],
    "learned positions instead of RoPE": ["model.pos_embedding=learned"],
    "LayerNorm instead of RMSNorm": ["model.norm=layernorm"],
    "no QK-norm": ["model.qk_norm=false"],
    "GELU instead of ReLU^2": ["model.mlp=gelu"],
    "tied head": ["model.tie_embeddings=true"],
    "GPT-2 + AdamW (all switches off)": [
        "train.optimizer=adamw", "train.lr=1e-3", "model.pos_embedding=learned", "model.norm=layernorm",
        "model.qk_norm=false", "model.mlp=gelu", "model.tie_embeddings=true",
    ],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of training per variant")
    ap.add_argument("--preset", default=str(ROOT / "configs" / "speedrun-shakespeare-cpu.yaml"))
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(bundled_corpus())], data, "char", progress=False)
        for i, (name, sets) in enumerate(VARIANTS.items()):
            cfg = load_config(a.preset, [f"train.max_time_s={a.budget}", "train.sample_tokens=0", *sets])
            cfg.data.dir = str(data)
            r = train(cfg, Path(tmp) / f"run{i}", progress=False, quiet=True)
            results[name] = {"val_loss": round(r.val["loss"], 4), "steps": r.step}
            base = results["speedrun preset"]["val_loss"]
            print(f"{name:36s} val loss {r.val['loss']:.4f}  ({r.val['loss'] - base:+.4f})  {r.step} steps", flush=True)
    print(json.dumps({"budget_s": a.budget, "results": results}))


if __name__ == "__main__":
    main()
