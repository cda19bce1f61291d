"""benchmarks/gpu_check.py, the GPU path's one prepared check, cannot rot: its dry run (tiny
shapes, a few steps, on the CPU here) goes through every part and prints the JSON line of a
real run, keys and all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_dry_run_goes_through_every_part_and_prints_the_full_json_line() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import KEYS

    assert list(out) == KEYS and out["mode"] == "dry-run"
    assert out["errors"] == {}, out["errors"]
    # The device-sensitive tests ran (a few of them) and passed.
    assert out["tests_passed"] > 0 and out["tests_failed"] == out["tests_errors"] == 0 and not out["tests_timed_out"]
    for key in ("train_gptkit_tokens_per_s", "train_hf_tokens_per_s", "train_ratio", "peak_bf16_measured",
                "decode_gptkit_graph_b1", "decode_hf_static_b16", "decode_ratio_graph_vs_hf_default_b1",
                "speedrun_baseline_s", "speedrun_target_loss"):  # fmt: skip
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["decode_graph_equals_eager"] is True
    assert out["decode_graph_captured"] is False  # no CUDA here: the static step ran eagerly
