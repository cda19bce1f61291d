"""Speedrun: time to the nanoGPT CPU baseline's validation loss, baseline vs our speedrun preset.

(a) the baseline in our code: 4 layers x 4 heads x 128 wide, context 64, batch 12, AdamW lr 1e-3
    (cosine to 1e-4, warm-up 100, beta2 0.99), 2000 steps, no dropout, GPT-2 architecture, fp32;
(b) configs/speedrun-shakespeare-cpu.yaml, whose learning rate decays over its time budget: run
    once with 0.3x (a)'s time to target (for the time to target) and once with (a)'s whole
    training time (for the loss at (a)'s end).
Both are evaluated on the whole validation split every --eval-every seconds of training (the
evaluation time is not counted). Prints each one's time to --target, the ratio (b)/(a), and each
one's loss at (a)'s end; plots both curves against time.

The machine's speed changes with its load (the baseline ran twice as fast on an idle machine as on
a busy one, the speedrun preset did not), so the runs alternate, ABAB: --pairs baseline/speedrun
pairs (default 2), each pair's ratio from its own baseline; the result is the median ratio with
its spread. The fp32 and bf16 matmul peaks and the load average are printed at the start. --load
starts a process that keeps one core busy for the whole benchmark (a loaded machine, on purpose).

    python benchmarks/speedrun.py [--target 1.88] [--eval-every 5] [--pairs 2] [--load] [--out benchmarks/results]

Ends with one JSON line: target_loss, baseline_time_to_target_s, speedrun_time_to_target_s (the
medians), ratio (the median of the pairs' ratios), ratio_min, ratio_max, ratios, load, the matmul
peaks, baseline_loss_at_end, speedrun_loss_at_baseline_end (the first pair's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import matmul_peak

from gptkit.config import load_config
from gptkit.data import bundled_corpus, prepare
from gptkit.training.train import train

ROOT = Path(__file__).resolve().parents[1]
BASELINE = [
    "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.dropout=0.0",
    "model.bias=false", "train.batch_size=12", "train.lr=1e-3", "train.min_lr_ratio=0.1", "train.warmup_steps=100",
    "train.beta2=0.99", "train.max_steps=2000", "train.dtype=float32", "train.eval_interval=1000000",
    "train.tensorboard=false",
]  # fmt: skip


def curve(run: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["train_s"], r["val_loss"]) for r in rows if "val_loss" in r]


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve reaches target, interpolated linearly between evaluations."""
    prev = None
    for t, loss in points:
        if loss <= target:
            if prev is None:
                return t
            (t0, l0) = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        prev = (t, loss)
    return None


def loss_at(points: list[tuple[float, float]], when: float) -> float:
    before = [loss for t, loss in points if t <= when]
    return before[-1] if before else float("nan")


def run_pair(a: argparse.Namespace, with_full: bool) -> dict:
    """One baseline run, then the speedrun preset with a budget of a.ratio_goal x the baseline's
    time to target (and, with_full, once more for the baseline's whole time: the loss at its end)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(bundled_corpus())], data, "char", progress=False)
        evals = [f"train.eval_every_s={a.eval_every}", "train.eval_batches=0", "train.sample_tokens=0"]

        cfg_a = load_config(None, BASELINE + evals)
        cfg_a.data.dir = str(data)
        res_a = train(cfg_a, Path(tmp) / "baseline", progress=False, quiet=True)
        pts_a = curve(Path(tmp) / "baseline") + [(res_a.train_s, res_a.val["loss"])]
        end_a = res_a.train_s
        # If the baseline stops short of the target on this machine, the ratio is taken at the loss
        # the baseline did reach (its final loss): the same comparison at a slightly easier mark.
        target = a.target if time_to(pts_a, a.target) is not None else pts_a[-1][1]
        ta = time_to(pts_a, target)

        def speedrun(name: str, budget: float) -> list[tuple[float, float]]:
            cfg = load_config(a.preset, evals + [f"train.max_time_s={budget}", *a.set])
            cfg.data.dir = str(data)
            res = train(cfg, Path(tmp) / name, progress=False, quiet=True)
            return curve(Path(tmp) / name) + [(res.train_s, res.val["loss"])]

        # The preset's learning rate decays over its budget, so time to target is measured with a
        # budget of a third of the baseline's time to target, and the loss at the baseline's end
        # with the baseline's whole time.
        pts_short = speedrun("speedrun-short", a.ratio_goal * ta) if ta else []
        pts_b = speedrun("speedrun", end_a) if with_full else []
    times = [t for t in (time_to(pts_short, target), time_to(pts_b, target)) if t is not None]
    tb = min(times) if times else None
    ratio = tb / ta if ta and tb else None
    print(f"pair: baseline {ta if ta is None else round(ta, 1)} s to {target:.4f} ({end_a:.0f} s in all), speedrun "
          f"{tb if tb is None else round(tb, 1)} s, ratio {ratio if ratio is None else round(ratio, 3)}", flush=True)  # fmt: skip
    return {"ta": ta, "tb": tb, "ratio": ratio, "target": target, "end_a": end_a, "pts_a": pts_a, "pts_b": pts_b,
            "pts_short": pts_short}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--eval-every", type=float, default=5.0, help="seconds of training between evaluations")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--preset", default=str(ROOT / "configs" / "speedrun-shakespeare-cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], help="extra overrides for the speedrun preset")
    ap.add_argument("--ratio-goal", type=float, default=0.3, help="the short run's budget, as a share of (a)'s time")
    ap.add_argument("--pairs", type=int, default=2, help="baseline/speedrun pairs, run alternately")
    ap.add_argument("--load", action="store_true", help="keep one core busy with another process throughout")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.load else None
    try:
        peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
        print(f"matmul peaks: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
              f"load average {os.getloadavg()[0]:.2f}{' (with --load: one core kept busy)' if a.load else ''}",
              flush=True)  # fmt: skip
        pairs = [run_pair(a, i == 0) for i in range(a.pairs)]
    finally:
        if busy is not None:
            busy.kill()
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    first = pairs[0]
    pts_a, pts_b, pts_short, target, end_a = first["pts_a"], first["pts_b"], first["pts_short"], first["target"], first["end_a"]
    ta = statistics.median(p["ta"] for p in pairs if p["ta"] is not None) if any(p["ta"] for p in pairs) else None
    tbs = [p["tb"] for p in pairs if p["tb"] is not None]
    tb = statistics.median(tbs) if tbs else None
    result = {
        "target_loss": target,
        "requested_target_loss": a.target,
        "baseline_time_to_target_s": ta,
        "speedrun_time_to_target_s": tb,
        "ratio": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "ratios": ratios,
        "load": a.load,
        "matmul_fp32_gflops": peaks["fp32"] / 1e9,
        "matmul_bf16_gflops": peaks["bf16"] / 1e9,
        "baseline_loss_at_end": pts_a[-1][1],
        "speedrun_loss_at_baseline_end": loss_at(pts_b, end_a + 1e-6) if pts_b else None,
        "baseline_end_s": end_a,
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*pts_a), marker="o", ms=3, label="(a) baseline: GPT-2 arch, AdamW")
    if pts_b:
        ax.plot(*zip(*pts_b), marker="o", ms=3, label="(b) speedrun preset")
    if pts_short:
        ax.plot(*zip(*pts_short), marker="o", ms=3, label="(b) speedrun preset, short budget")
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (whole split)")
    ax.set_ylim(top=min(3.5, max(v for _, v in pts_a + pts_b + pts_short)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedrun.png", dpi=110)
    print(f"(a) baseline: {ta if ta is None else round(ta, 1)} s to {target:.4f}, {pts_a[-1][1]:.4f} at its end ({end_a:.0f} s)")
    at_end = result["speedrun_loss_at_baseline_end"]
    print(f"(b) speedrun: {tb if tb is None else round(tb, 1)} s to {target:.4f}, {at_end:.4f} at {end_a:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
