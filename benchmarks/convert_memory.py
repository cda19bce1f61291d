"""Peak memory of `gptkit convert` on a GPT-2 124M checkpoint, in copies of the weights.

Builds a GPT2LMHeadModel with random weights (no download), saves it as a Hugging Face folder,
then runs the conversion in a fresh process and reads that process's peak RSS. A process that
only imports gptkit and torch gives the baseline; (peak - baseline) / weight bytes is the number
of weight copies held at once.

    python benchmarks/convert_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# VmHWM (the peak resident set of this process image): unlike ru_maxrss it is not inherited
# from the parent across fork + exec.
CODE = """
import sys
import torch, gptkit.convert, gptkit.checkpoint
if sys.argv[1] == "convert":
    gptkit.convert.import_hf(sys.argv[2], sys.argv[3])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(int(hwm.split()[1]) * 1024)
"""


def peak(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config())
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "hf")
        del model
        base = peak("baseline")
        top = peak("convert", str(Path(tmp) / "hf"), str(Path(tmp) / "run"))
    copies = (top - base) / weight_bytes
    print(f"weights {weight_bytes / 2**20:.0f} MiB; peak RSS {top / 2**20:.0f} MiB over a {base / 2**20:.0f} MiB baseline")
    print(json.dumps({"weights_mib": round(weight_bytes / 2**20), "peak_rss_mib": round(top / 2**20),
                      "baseline_rss_mib": round(base / 2**20), "weight_copies": round(copies, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
