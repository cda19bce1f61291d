"""What `gptkit.training.train.keep_freed_memory` buys: training steps with glibc's default trimming and
with freed memory kept, toggled between interleaved rounds in one process.

"Default" here is glibc's starting thresholds (128 KiB) set explicitly, which also switches off
glibc's dynamic mmap threshold; a fresh process starts from the same values.

    python benchmarks/allocator.py [--rounds 8] [--steps 10]

Settings: the 4x128 baseline (GPT-2 architecture, AdamW, fp32) and the speedrun preset in fp32
and bf16 autocast. Prints milliseconds a step and minor page faults a step for each, the
speed-up from keeping memory, and one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import time
from pathlib import Path

from common import training_step

from gptkit.config import load_config
from gptkit.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.bias=false",
            "train.batch_size=12", "train.dtype=float32"]  # fmt: skip
SETTINGS = {
    "baseline fp32": (None, BASELINE),
    "speedrun preset fp32": (ROOT / "configs" / "speedrun-shakespeare-cpu.yaml", ["train.dtype=float32"]),
    "speedrun preset bf16": (ROOT / "configs" / "speedrun-shakespeare-cpu.yaml", ["train.dtype=bfloat16"]),
}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
libc = ctypes.CDLL(None)


def keep(on: bool) -> None:
    if on:
        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() did not apply (not Linux, LD_PRELOAD or MALLOC_* set)")
    else:  # glibc's starting thresholds, held fixed, and the heap trimmed back
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
        libc.malloc_trim(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting per round")
    a = ap.parse_args()
    steps = {name: training_step(load_config(*s)) for name, s in SETTINGS.items()}
    ms = {(name, on): [] for name in steps for on in (False, True)}
    faults = {(name, on): [] for name in steps for on in (False, True)}
    for _ in range(a.rounds):
        for on in (False, True):
            keep(on)
            for name, fn in steps.items():
                fn()
                f0, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
                for _ in range(a.steps):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                faults[(name, on)].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / a.steps)
                ms[(name, on)].append(1e3 * statistics.median(times))
    result = {}
    for name in steps:
        off, on = ms[(name, False)], ms[(name, True)]
        speedup = statistics.median(x / y for x, y in zip(off, on))
        result[name] = {"default_ms": round(statistics.median(off), 1), "kept_ms": round(statistics.median(on), 1),
                        "default_faults_per_step": round(statistics.median(faults[(name, False)])),
                        "kept_faults_per_step": round(statistics.median(faults[(name, True)])),
                        "speedup": round(speedup, 2)}  # fmt: skip
        r = result[name]
        print(f"{name:24s} glibc default {r['default_ms']:6.1f} ms ({r['default_faults_per_step']:5d} faults/step)   "
              f"memory kept {r['kept_ms']:6.1f} ms ({r['kept_faults_per_step']:4d} faults/step)   {speedup:.2f}x")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
