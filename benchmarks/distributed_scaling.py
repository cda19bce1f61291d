"""Data-parallel scaling on this machine: training tokens/s with 1 and 2 processes (torchrun,
gloo on CPU; NCCL on a GPU machine), measured side by side in one run.

    python benchmarks/distributed_scaling.py [--steps 150] [--repeats 3]

Each configuration trains the main job's model (4x192, context 128, global batch 16) for
--steps steps; tokens/s is the median of the logged rates after the first quarter. On CPU,
"1 process" gets both cores (2 threads) and each of 2 processes gets one, so the comparison is
at equal hardware; scaling efficiency = tokens/s(2 processes) / (2 x tokens/s(1 process, 1 thread)).
Ends with one JSON line.
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

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, threads: int, steps: int, data: Path, out: Path, dtype: str) -> float:
    sets = [f"train.max_steps={steps}", "train.log_interval=10", "train.eval_interval=100000", f"train.threads={threads}",
            "train.max_time_s=0", "train.sample_tokens=0", "train.tensorboard=false", f"train.dtype={dtype}",
            "train.checkpoint_interval=100000"]  # fmt: skip
    preset = ROOT / "gptkit" / "presets" / "shakespeare-char.yaml"
    args = ["train", "--config", str(preset), "--data", str(data), "--out", str(out),
            "--overwrite", "--no-progress"] + sum((["--set", s] for s in sets), [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gptkit", *args]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    rates = [r["tokens_per_s"] for r in rows[len(rows) // 4 :]]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gptkit.data import bundled_corpus, prepare

    tmp = Path(tempfile.mkdtemp(prefix="gptkit-dist-"))
    data = tmp / "data"
    prepare([str(bundled_corpus())], data, "char", progress=False)
    configs = {"1 process, 2 threads": (1, 2), "1 process, 1 thread": (1, 1), "2 processes, 1 thread each": (2, 1)}
    results: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # interleaved: noise hits every configuration alike
        for name, (nproc, threads) in configs.items():
            tps = run(nproc, threads, args.steps, data, tmp / "run", args.dtype)
            results[name].append(tps)
            print(f"{name}: {tps:,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "tokens_per_s_1proc_2threads": round(med["1 process, 2 threads"]),
        "tokens_per_s_1proc_1thread": round(med["1 process, 1 thread"]),
        "tokens_per_s_2proc": round(med["2 processes, 1 thread each"]),
        "speedup_2proc_vs_1proc_same_cores": round(med["2 processes, 1 thread each"] / med["1 process, 2 threads"], 3),
        "scaling_efficiency": round(med["2 processes, 1 thread each"] / (2 * med["1 process, 1 thread"]), 3),
        "dtype": args.dtype,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
