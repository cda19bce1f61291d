from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch

from gptkit import checkpoint as ckpt_mod
from gptkit.checkpoint import load_model, load_run_config
from gptkit.config import load_config
from gptkit.errors import GptkitError
from gptkit.optim import lr_factor
from gptkit.train import train

from .conftest import tiny_overrides


def cfg_for(data: Path, **extra: object):  # noqa: ANN201
    cfg = load_config(None, tiny_overrides(**extra))
    cfg.data.dir = str(data)
    return cfg


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_loss_falls(trained_run: Path) -> None:
    rows = metrics(trained_run)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    final = [r["final_val_loss"] for r in rows if "final_val_loss" in r]
    assert len(val) >= 2 and len(final) == 1
    assert final[0] < val[0] - 0.2
    assert final[0] < 3.0  # well below the uniform 4.19 nats of a 66-token vocabulary
    for f in ("config.yaml", "loss.png", "tokenizer/gptkit_tokenizer.json", "checkpoint/model.safetensors"):
        assert (trained_run / f).is_file(), f
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_matches_uninterrupted_run(tmp_path: Path, small_data: Path) -> None:
    """20 steps straight vs 10 + resume + 10: equal losses step for step."""
    extra = {"model.dropout": 0.1, "train.grad_accum": 2, "train.checkpoint_interval": 7}
    straight = train(cfg_for(small_data, **extra), tmp_path / "a", progress=False, quiet=True)
    first = train(cfg_for(small_data, **extra), tmp_path / "b", progress=False, quiet=True, stop_at=10)
    assert first.interrupted and first.step == 10
    second = train(load_run_config(tmp_path / "b"), tmp_path / "b", resume=True, progress=False, quiet=True)
    assert second.step == 20
    resumed = first.losses + second.losses
    assert [s for s, _ in resumed] == [s for s, _ in straight.losses] == list(range(1, 21))
    for (_, a), (_, b) in zip(straight.losses, resumed):
        assert abs(a - b) <= 1e-6
    assert abs(straight.val["loss"] - second.val["loss"]) <= 1e-6
    steps = [r["step"] for r in metrics(tmp_path / "b") if "loss" in r]
    assert steps == list(range(1, 21))


def test_refuses_existing_run_without_flag(tmp_path: Path, small_data: Path) -> None:
    run = tmp_path / "r"
    train(cfg_for(small_data, **{"train.max_steps": 3}), run, progress=False, quiet=True)
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(GptkitError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg_for(small_data, **{"train.max_steps": 3}), run, progress=False, quiet=True)
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights
    r = train(cfg_for(small_data, **{"train.max_steps": 4}), run, overwrite=True, progress=False, quiet=True)
    assert r.step == 4


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, small_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "r"
    train(cfg_for(small_data, **{"train.max_steps": 4}), run, progress=False, quiet=True)
    before = (run / "checkpoint" / "model.safetensors").read_bytes()

    def crash(tensors: dict, path: str) -> None:  # the disk fills up half-way through a write
        Path(path).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    cfg = load_run_config(run)
    cfg.train.max_steps = 8
    with pytest.raises(OSError):
        train(cfg, run, resume=True, progress=False, quiet=True)
    monkeypatch.undo()
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before
    model, _, _ = load_model(run)  # still whole
    assert model.config.n_layer == 2


def test_crash_between_renames_falls_back_to_previous(tmp_path: Path, small_data: Path) -> None:
    run = tmp_path / "r"
    train(cfg_for(small_data, **{"train.max_steps": 4}), run, progress=False, quiet=True)
    os.replace(run / "checkpoint", run / "checkpoint.old")  # the state right after the first rename
    model, _, _ = load_model(run)
    assert model is not None
    cfg = load_run_config(run)
    cfg.train.max_steps = 6
    assert train(cfg, run, resume=True, progress=False, quiet=True).step == 6


def test_truncated_and_corrupt_checkpoints(tmp_path: Path, small_data: Path) -> None:
    run = tmp_path / "r"
    train(cfg_for(small_data, **{"train.max_steps": 2}), run, progress=False, quiet=True)
    f = run / "checkpoint" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(GptkitError, match="truncated"):
        load_model(run)
    f.write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(GptkitError, match="checksum"):
        load_model(run)
    with pytest.raises(GptkitError, match="no such run folder"):
        load_model(tmp_path / "missing")


def test_weights_are_safetensors_not_pickle(trained_run: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        tensors = safetensors.torch.load_file(str(trained_run / "checkpoint" / name))
        assert tensors
    pickles = [p for ext in ("*.pt", "*.pth", "*.pkl", "*.bin") for p in trained_run.rglob(ext)]
    assert pickles == []  # the run trained from a data folder elsewhere, so no token shards here either


def test_corpus_shorter_than_context(tmp_path: Path) -> None:
    tiny = tmp_path / "t.txt"
    tiny.write_text("to be or not to be\n")
    cfg = load_config(None, tiny_overrides())
    with pytest.raises(GptkitError, match="fewer than one context window"):
        train(cfg, tmp_path / "r", text=str(tiny), progress=False, quiet=True)


def test_lr_schedule() -> None:
    cfg = load_config(None, ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    mids = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:]))
    cfg.schedule = "wsd"
    cfg.warmdown_frac = 0.2
    assert lr_factor(50, cfg) == 1.0 and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(20, cfg, time_frac=1.0) == pytest.approx(0.1)  # a spent time budget ends the decay


def test_sigint_saves_and_exits_cleanly(tmp_path: Path, small_data: Path) -> None:
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "gptkit", "train", "--data", str(small_data), "--out", str(run), "--no-progress"]
    cmd += [a for kv in tiny_overrides(**{"train.max_steps": 100000, "train.checkpoint_interval": 100000}) for a in ("--set", kv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "checkpoint saved" in out
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] > 0
    model, _, _ = load_model(run)
    assert model.config.n_embd == 32


FAULTS_SCRIPT = """
import json, resource, torch
from gptkit.config import ModelConfig
from gptkit.model import GPT
from gptkit.train import keep_freed_memory

torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
opt = torch.optim.AdamW(model.parameters(), fused=True)
x = torch.randint(0, 65, (16, 64))

def faults_per_step():
    def step():  # activations and gradients allocated and freed every step, as in training
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 20

before = faults_per_step()
applied = keep_freed_memory()
print(json.dumps({"applied": applied, "before": before, "after": faults_per_step()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_keep_freed_memory_stops_page_faults_per_step() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["applied"]
    # Freed activations are reused instead of being handed back and faulted in again.
    assert r["before"] > 100 and r["after"] < r["before"] / 4, r
    # A user's own allocator settings are left alone.
    env["MALLOC_ARENA_MAX"] = "2"
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert not json.loads(out.stdout)["applied"]
