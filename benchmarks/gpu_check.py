"""The GPU path in one go: correctness and speed on a CUDA GPU, unattended, in under 8 minutes.

    python benchmarks/gpu_check.py             # on a CUDA machine (about 7 minutes on one H200)
    python benchmarks/gpu_check.py --dry-run   # anywhere: tiny shapes, a few steps (CI runs it)

1. tests: the suite's device-sensitive tests (`pytest -m cuda`) with GPTKIT_TEST_DEVICE=cuda;
   fp32 tolerances as on the CPU. (The dry run: a few of them, on the CPU.)
2. train: tokens/s at the GPT-2 124M shape (context 1024, batch 16, bf16 autocast, flash SDPA,
   torch.compile, fused AdamW) for gptkit's training step against transformers'
   GPT2LMHeadModel (bf16 autocast, attn_implementation="sdpa", torch.compile, fused AdamW), in
   interleaved rounds; the ratio and MFU against the GPU's bf16 dense peak (datasheet) and the
   measured 8192^3 bf16 matmul rate.
3. decode: 128 new tokens, greedy, batch 1 and 16, GPT-2 124M shape in bf16: gptkit's
   generate_ids (ordinary, and static=True: the decode step captured in a CUDA graph) against
   transformers' generate() (default dynamic cache, and cache_implementation="static", which it
   compiles itself), interleaved rounds.
4. speedrun: the nanoGPT CPU baseline and gptkit's speedrun preset on the bundled Shakespeare,
   on this device: the time each takes to the baseline's final validation loss.
5. One JSON line with every figure (the same keys in the dry run; null where a part failed,
   with the error under "errors").

Each part is bounded by its own time budget (--budget-scale scales them all). Runs from a
checkout with nothing installed but PyTorch and transformers: the repository root goes on
sys.path, and the tests that need a package the machine lacks (openai, fastapi) are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s.
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
# Seconds of timed rounds per part; compilation and warm-up come on top (about 3 minutes).
BUDGET_S = {"tests": 150, "train": 40, "decode": 45, "speedrun": 60}
DRY_BUDGET_S = {"tests": 180, "train": 5, "decode": 5, "speedrun": 10}
KEYS = [
    "mode", "device", "gpu", "torch", "transformers", "date", "wall_s", "errors",
    "tests_passed", "tests_failed", "tests_skipped", "tests_errors", "tests_timed_out", "tests_failures", "tests_s",
    "train_shape", "train_gptkit_tokens_per_s", "train_hf_tokens_per_s", "train_ratio", "train_mfu",
    "train_mfu_vs_measured", "peak_bf16_datasheet", "peak_bf16_measured", "train_rounds",
    "decode_gptkit_b1", "decode_gptkit_graph_b1", "decode_hf_b1", "decode_hf_static_b1",
    "decode_gptkit_b16", "decode_gptkit_graph_b16", "decode_hf_b16", "decode_hf_static_b16",
    "decode_ratio_graph_vs_hf_default_b1", "decode_ratio_graph_vs_hf_static_b1", "decode_ratio_graph_vs_hf_default_b16",
    "decode_graph_equals_eager", "decode_graph_captured", "decode_graph_error", "decode_rounds",
    "speedrun_target_loss", "speedrun_baseline_s", "speedrun_s", "speedrun_ratio",
]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rounds(settings: dict[str, Callable[[], float]], budget: float, min_rounds: int, max_rounds: int) -> dict[str, list[float]]:
    """Each setting's figure, in interleaved rounds (the order turned round each time) until the
    budget is spent, at least min_rounds."""
    out: dict[str, list[float]] = {k: [] for k in settings}
    start = time.monotonic()
    for r in range(max_rounds):
        if r >= min_rounds and time.monotonic() - start > budget:
            break
        names = list(settings) if r % 2 == 0 else list(reversed(settings))
        for name in names:
            out[name].append(settings[name]())
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --- 1. the device-sensitive tests ---


def part_tests(dry: bool, device: torch.device, budget: float) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "GPTKIT_TEST_DEVICE": str(device), "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE", str(ROOT / "tests")]
    if dry:  # the outer suite runs them all on the CPU already: here only the plumbing
        cmd += ["-k", "static_decoding_step_equals_the_cached_step and gpt2"]
    t = time.monotonic()
    timed_out = False
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        timed_out = True
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", tail)}
    failures = [line[:300] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))][:30]
    print(f"tests: {tail or '(no summary)'}" + (" [timed out]" if timed_out else ""), flush=True)
    for line in failures:
        print("  " + line, flush=True)
    return {
        "tests_passed": counts.get("passed", 0), "tests_failed": counts.get("failed", 0),
        "tests_skipped": counts.get("skipped", 0), "tests_errors": counts.get("error", 0) + counts.get("errors", 0),
        "tests_timed_out": timed_out, "tests_failures": failures, "tests_s": round(time.monotonic() - t, 1),
    }  # fmt: skip


# --- 2. training throughput ---


def hf_training_step(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, compile_: bool) -> Callable[[], None]:
    from train_throughput import CLIP, LR, WEIGHT_DECAY
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    L, H, C, T, B, V = shape
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").to(device).train()
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    x = torch.randint(0, V, (B, T), device=device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measured_bf16_peak(device: torch.device, dry: bool) -> float:
    n = 512 if dry else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [seconds(lambda: a @ b, device) for _ in range(10)]
    return 2 * n**3 / statistics.median(times)


def part_train(dry: bool, device: torch.device, budget: float) -> dict:
    from common import training_step
    from train_throughput import gptkit_config

    from gptkit.model import GPT

    shape = (2, 2, 64, 64, 4, 512) if dry else (12, 12, 768, 1024, 16, 50304)
    L, H, C, T, B, V = shape
    cuda = device.type == "cuda"
    dtype_name = "bfloat16" if cuda else "float32"  # bf16 is emulated, slowly, on most CPUs
    cfg = gptkit_config(shape, dtype_name, compile_=cuda, extra=(f"train.device={device}",))
    steps = {
        "gptkit": training_step(cfg, vocab=V, device=str(device)),
        "hf": hf_training_step(shape, device, getattr(torch, dtype_name), compile_=cuda),
    }
    for step in steps.values():  # compile and warm up
        for _ in range(3):
            step()
    sync(device)
    n = 2 if dry else 10

    def tokens_per_s(step: Callable[[], None]) -> Callable[[], float]:
        return lambda: B * T * n / seconds(lambda: [step() for _ in range(n)], device)

    got = rounds({k: tokens_per_s(v) for k, v in steps.items()}, budget, 2, 3 if dry else 15)
    with torch.device("meta"):
        flops = GPT(dataclasses.replace(cfg.model, vocab_size=V)).flops_per_token(T)
    ours, theirs = median(got["gptkit"]), median(got["hf"])
    name = torch.cuda.get_device_name(device) if cuda else ""
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    measured = measured_bf16_peak(device, dry)
    ratio = median([a / b for a, b in zip(got["gptkit"], got["hf"])])
    print(f"train {shape}: gptkit {ours:,.0f} tok/s, transformers {theirs:,.0f} tok/s, ratio {ratio:.2f}", flush=True)
    return {
        "train_shape": list(shape), "train_gptkit_tokens_per_s": ours, "train_hf_tokens_per_s": theirs,
        "train_ratio": ratio, "train_mfu": ours * flops / datasheet if datasheet else None,
        "train_mfu_vs_measured": ours * flops / measured, "peak_bf16_datasheet": datasheet,
        "peak_bf16_measured": measured, "train_rounds": len(got["gptkit"]),
    }  # fmt: skip


# --- 3. decoding ---


def part_decode(dry: bool, device: torch.device, budget: float) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from gptkit.config import ModelConfig
    from gptkit.inference.generate import SamplingParams, StaticDecoder, generate_ids
    from gptkit.model import GPT

    logging.set_verbosity_error()
    L, H, C, T, V, new = (2, 2, 64, 128, 512, 16) if dry else (12, 12, 768, 1024, 50257, 128)
    batches = (1, 2) if dry else (1, 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = GPT(ModelConfig(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=V)).to(device, dtype).eval()
    hf_cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, bos_token_id=0, eos_token_id=0)
    theirs = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").to(device, dtype).eval()
    params = SamplingParams(max_new_tokens=new, temperature=0, stop_at_eot=False)
    prompts = {b: torch.randint(0, V, (b, 16), device=device) for b in batches}
    outputs: dict[str, torch.Tensor] = {}

    def gptkit_run(b: int, static: bool) -> Callable[[], float]:
        def run() -> float:
            def go() -> None:
                outputs[f"{b}-{static}"] = torch.stack(list(generate_ids(ours, prompts[b], params, static=static)), 1)

            return b * new / seconds(go, device)

        return run

    def hf_run(b: int, static: bool) -> Callable[[], float]:
        kw = {"cache_implementation": "static"} if static else {}

        def run() -> float:
            def go() -> None:
                with torch.no_grad():
                    theirs.generate(prompts[b], attention_mask=torch.ones_like(prompts[b]), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)  # fmt: skip

            return b * new / seconds(go, device)

        return run

    settings = {}
    for b in batches:
        settings[f"decode_gptkit_b{b}"] = gptkit_run(b, False)
        settings[f"decode_gptkit_graph_b{b}"] = gptkit_run(b, True)
        settings[f"decode_hf_b{b}"] = hf_run(b, False)
        settings[f"decode_hf_static_b{b}"] = hf_run(b, True)
    for fn in settings.values():  # warm-up: CUDA graph capture, transformers' own compile
        fn()
    probe = StaticDecoder(ours, 1, device, dtype)  # did the capture work, or did it fall back?
    with torch.no_grad():
        probe.prefill(prompts[1], None)
        probe.step(prompts[1][:, -1], None)
    got = rounds(settings, budget, 2, 3 if dry else 10)
    res: dict = {k.replace("_b2", "_b16"): median(v) for k, v in got.items()}  # the dry run's batch 2 stands for 16
    same = all(torch.equal(outputs[f"{b}-False"], outputs[f"{b}-True"]) for b in batches)

    def ratio(a: str, b: str) -> float | None:
        return res[a] / res[b] if res.get(a) and res.get(b) else None

    res.update({
        "decode_ratio_graph_vs_hf_default_b1": ratio("decode_gptkit_graph_b1", "decode_hf_b1"),
        "decode_ratio_graph_vs_hf_static_b1": ratio("decode_gptkit_graph_b1", "decode_hf_static_b1"),
        "decode_ratio_graph_vs_hf_default_b16": ratio("decode_gptkit_graph_b16", "decode_hf_b16"),
        "decode_graph_equals_eager": same, "decode_graph_captured": probe.graph is not None,
        "decode_graph_error": probe.graph_error or None, "decode_rounds": len(next(iter(got.values()))),
    })  # fmt: skip
    for k, v in res.items():
        if k.startswith("decode_") and isinstance(v, float):
            print(f"{k}: {v:,.2f}", flush=True)
    return res


# --- 4. time to quality ---


def part_speedrun(dry: bool, device: torch.device, budget: float) -> dict:
    from speedrun import BASELINE, curve, time_to

    from gptkit.config import load_config
    from gptkit.data import bundled_corpus, prepare
    from gptkit.training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(bundled_corpus())], data, "char", progress=False)
        # dry: a few batches an evaluation (a whole split each half second was most of CI's time here)
        evals = [f"train.device={device}", f"train.eval_batches={4 if dry else 0}", "train.sample_tokens=0",
                 f"train.eval_every_s={0.5 if dry else 1.0}"]  # fmt: skip
        short = ["train.max_steps=30", "train.warmup_steps=5"] if dry else []
        cfg = load_config(None, BASELINE + evals + short + [f"train.max_time_s={budget / 2}"])
        cfg.data.dir = str(data)
        base = train(cfg, Path(tmp) / "baseline", progress=False, quiet=True)
        pts = curve(Path(tmp) / "baseline") + [(base.train_s, base.val["loss"])]
        target = pts[-1][1]
        ta = time_to(pts, target)
        preset = load_config(ROOT / "configs" / "speedrun-shakespeare-cpu.yaml",
                             evals + [f"train.max_time_s={min(base.train_s, budget / 2)}"])  # fmt: skip
        if device.type != "cuda":
            preset.train.dtype = "float32"
        preset.data.dir = str(data)
        res = train(preset, Path(tmp) / "speedrun", progress=False, quiet=True)
        tb = time_to(curve(Path(tmp) / "speedrun") + [(res.train_s, res.val["loss"])], target)
    print(f"speedrun: baseline {ta:.1f} s to {target:.4f}; preset {tb if tb is None else round(tb, 1)} s", flush=True)
    return {"speedrun_target_loss": target, "speedrun_baseline_s": ta, "speedrun_s": tb,
            "speedrun_ratio": tb / ta if ta and tb else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes and a few steps, on the CPU if no GPU")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="scale every part's time budget")
    ap.add_argument("--parts", default="tests,train,decode,speedrun")
    a = ap.parse_args()
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        sys.exit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    out: dict = dict.fromkeys(KEYS)
    out.update(mode="dry-run" if a.dry_run else "full", device=str(device), torch=torch.__version__,
               gpu=torch.cuda.get_device_name(0) if cuda else None, transformers=hf_version,
               date=time.strftime("%Y-%m-%d"), errors={})  # fmt: skip
    budgets = DRY_BUDGET_S if a.dry_run else BUDGET_S
    parts = {"tests": part_tests, "train": part_train, "decode": part_decode, "speedrun": part_speedrun}
    for name in a.parts.split(","):
        try:
            out.update(parts[name](a.dry_run, device, budgets[name] * a.budget_scale))
        except Exception as e:  # noqa: BLE001 -- one broken part must not cost the others' figures
            traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {e}"[:500]
        if cuda:
            torch.cuda.empty_cache()
    out["wall_s"] = round(time.monotonic() - start, 1)
    assert list(out) == KEYS, set(out) ^ set(KEYS)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
