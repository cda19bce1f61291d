from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gptkit import checkpoint as ckpt_mod
from gptkit.checkpoint import load_run_config
from gptkit.config import load_config
from gptkit.errors import DivergedError, GptkitError
from gptkit.loader import load_model
from gptkit.runtime import cpu_has_fast_bf16
from gptkit.training.optim import lr_factor
from gptkit.training.train import train

from .conftest import tiny_overrides


def cfg_for(data: Path, **extra: object):  # noqa: ANN201
    cfg = load_config(None, tiny_overrides(**extra))
    cfg.data.dir = str(data)
    return cfg


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cuda
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


@pytest.mark.cuda
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
    with pytest.raises(GptkitError, match="shorter than one context window"):
        train(cfg, tmp_path / "r", text=str(tiny), progress=False, quiet=True)
    tiny.write_text("abc")  # said "the validation split is empty" before
    with pytest.raises(GptkitError, match=r"corpus is 3 tokens, shorter than one context window \(model.block_size=32\)"):
        train(cfg, tmp_path / "r3", text=str(tiny), progress=False, quiet=True, overwrite=True)


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


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_time_budget_spent_during_warmup_still_ends_annealed(schedule: str) -> None:
    """The main job on a slow machine: the budget ran out at step 47 of a 50-step warm-up, at
    94% of the peak rate. Warm-up now takes at most a share of the budget, and the rate is the
    lower of the warm-up ramp and the decay, so the end of the budget is the end of the decay."""
    cfg = load_config(None, ["train.max_steps=5000", "train.warmup_steps=50", "train.min_lr_ratio=0.1",
                             f"train.schedule={schedule}"]).train  # fmt: skip
    assert lr_factor(47, cfg, time_frac=1.0) == pytest.approx(0.1)
    assert lr_factor(47, cfg, time_frac=0.999) < 0.11
    # Warm-up over by time after 10% of the budget: the rate is the decay curve's there (cosine has begun to fall).
    assert lr_factor(3, cfg, time_frac=0.1) == pytest.approx(lr_factor(50, cfg, time_frac=0.1))  # as past warm-up
    assert lr_factor(3, cfg, time_frac=0.1) > 0.97
    assert lr_factor(3, cfg, time_frac=0.05) == pytest.approx(0.5)  # half-way through its time share
    factors = [lr_factor(min(s, 49), cfg, time_frac=s / 100) for s in range(101)]
    assert max(factors) > 0.9 and factors[-1] == pytest.approx(0.1)


def test_time_boxed_run_warms_up_and_ends_annealed(tmp_path: Path, small_data: Path) -> None:
    """A budget of a few seconds that ends long before the step-counted warm-up would."""
    cfg = cfg_for(small_data, **{"train.max_steps": 10**6, "train.warmup_steps": 10**5, "train.max_time_s": 3,
                                 "train.eval_interval": 10**6, "train.lr": 1e-3, "train.min_lr_ratio": 0.1})  # fmt: skip
    result = train(cfg, tmp_path / "r", progress=False, quiet=True)
    lrs = [r["lr"] for r in metrics(tmp_path / "r") if "lr" in r]
    assert result.step < 10**5 and len(lrs) > 20
    assert max(lrs) > 0.8e-3  # warm-up finished by time, not by its 100,000 steps
    assert lrs[-1] <= 0.12e-3  # and the last step ran at the floor of the decay


def test_progress_follows_the_limit_that_comes_first() -> None:
    from gptkit.training.train import progress_fraction

    tc = load_config(None, ["train.max_steps=5000", "train.max_time_s=260"]).train
    assert progress_fraction(47, 259.0, tc) == pytest.approx(259 / 260)  # the bar once showed 47/5000, ETA hours
    assert progress_fraction(2500, 10.0, tc) == pytest.approx(0.5)
    tc.max_time_s = 0
    assert progress_fraction(47, 10**6, tc) == pytest.approx(47 / 5000)


def test_evaluation_time_does_not_count_against_the_budget_across_resumes(tmp_path: Path, small_data: Path) -> None:
    """state.json keeps training time apart from evaluation time, and a resumed run's budget
    counts training only (it used to restart from elapsed time, evaluations included)."""
    cfg = cfg_for(small_data, **{"train.max_steps": 40, "train.eval_interval": 1, "train.eval_batches": 0})
    train(cfg, tmp_path / "r", progress=False, quiet=True, stop_at=20)
    info = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert 0 < info["train_s"] < info["elapsed_s"] / 2  # whole-split evaluations every step dominate
    cfg = load_run_config(tmp_path / "r")
    cfg.train.max_time_s = (info["train_s"] + info["elapsed_s"]) / 2  # spent if evaluations counted, not if not
    result = train(cfg, tmp_path / "r", resume=True, progress=False, quiet=True)
    assert result.step > 20


@pytest.mark.cuda
def test_resume_with_more_steps_goes_past_a_spent_time_budget(tmp_path: Path, small_data: Path) -> None:
    from gptkit.training.train import resume_config

    run = tmp_path / "r"
    first = train(cfg_for(small_data, **{"train.max_steps": 10**6, "train.max_time_s": 1}), run, progress=False, quiet=True)
    with pytest.raises(GptkitError, match=r"already reached its limit.*train.max_time_s=1.*--set train.max_steps=N"):
        train(resume_config(run), run, resume=True, progress=False, quiet=True)
    cfg = resume_config(run, [f"train.max_steps={first.step + 30}"])
    assert cfg.train.max_time_s == 0  # the steps asked for replace the spent budget
    assert train(cfg, run, resume=True, progress=False, quiet=True).step == first.step + 30
    cfg = resume_config(run, [f"train.max_steps={first.step + 60}", "train.max_time_s=10000"])  # both: both apply
    assert cfg.train.max_time_s == 10000
    assert train(cfg, run, resume=True, progress=False, quiet=True).step == first.step + 60


def test_resume_refuses_a_new_model_shape_before_writing(tmp_path: Path, small_data: Path) -> None:
    from gptkit.training.train import resume_config

    run = tmp_path / "r"
    train(cfg_for(small_data, **{"train.max_steps": 4}), run, progress=False, quiet=True)
    with pytest.raises(GptkitError, match=r"cannot change model.n_layer \(2 -> 5\).*--init-from"):
        resume_config(run, ["model.n_layer=5"])
    assert resume_config(run, ["model.dropout=0.1"]).model.dropout == 0.1  # dropout is not the shape


def test_resume_without_a_checkpoint_starts_afresh(tmp_path: Path, small_data: Path, capsys: pytest.CaptureFixture) -> None:
    """A run killed before its first save: the same command, or --resume, starts it again."""
    import shutil

    run = tmp_path / "r"
    train(cfg_for(small_data, **{"train.max_steps": 4}), run, progress=False, quiet=True)
    shutil.rmtree(run / "checkpoint")  # what a kill before the first checkpoint leaves: config.yaml, no checkpoint
    assert train(load_run_config(run), run, resume=True, progress=False).step == 4
    assert "holds no checkpoint yet" in capsys.readouterr().out
    logged = [r["step"] for r in metrics(run) if "loss" in r]
    assert logged == [1, 2, 3, 4]  # the dead attempt's rows are not kept beside the new ones
    shutil.rmtree(run / "checkpoint")
    assert train(cfg_for(small_data, **{"train.max_steps": 3}), run, progress=False).step == 3
    assert "starting it afresh" in capsys.readouterr().out


@pytest.mark.cuda
def test_divergence_names_the_optimizer_and_what_is_on_disk(tmp_path: Path, small_data: Path) -> None:
    cfg = cfg_for(small_data, **{"train.lr": 1e6, "train.max_steps": 200, "train.warmup_steps": 0, "train.grad_clip": 0,
                                 "train.checkpoint_interval": 1})  # fmt: skip
    with pytest.raises(DivergedError) as e:  # its own type: tune marks such trials failed by type, not by text
        train(cfg, tmp_path / "r", progress=False, quiet=True)
    msg = str(e.value).lower()
    assert "training diverged at step" in msg and "train.lr=1e+06" in msg, msg
    saved = (tmp_path / "r" / "checkpoint" / "state.json").is_file()
    if saved:
        step = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"]
        assert f"last checkpoint, at step {step}, is kept" in msg
    else:
        assert "no checkpoint was saved" in msg
    cfg = cfg_for(small_data, **{"train.optimizer": "muon", "train.muon_lr": 1e9, "train.lr": 1e-3, "train.max_steps": 200,
                                 "train.warmup_steps": 0, "train.grad_clip": 0, "train.checkpoint_interval": 1000})  # fmt: skip
    with pytest.raises(GptkitError, match="diverged") as e:
        train(cfg, tmp_path / "m", progress=False, quiet=True)
    assert "no checkpoint was saved" in str(e.value).lower()
    assert "Muon (train.muon_lr=1e+09)" in str(e.value) or "forward pass overflowed" in str(e.value), str(e.value)


@pytest.mark.cuda
def test_early_stopping_keeps_the_best_weights(tmp_path: Path, small_data: Path) -> None:
    """A rate that first helps and then wrecks the model: the run stops after `patience` worse
    evaluations and keeps the weights of the best one, which the final whole-split loss shows."""
    cfg = cfg_for(small_data, **{"train.max_steps": 400, "train.eval_interval": 5, "train.eval_batches": 0,
                                 "train.patience": 3, "train.min_delta": 0, "train.lr": 0.3, "train.schedule": "constant",
                                 "train.warmup_steps": 0, "train.grad_clip": 0})  # fmt: skip
    result = train(cfg, tmp_path / "r", progress=False, quiet=True)
    rows = metrics(tmp_path / "r")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    best_step, best = min(val, key=lambda v: v[1])
    assert result.step < 400 and result.step == val[-1][0]  # stopped at an evaluation, early
    assert [s for s, v in val if s > best_step] == [best_step + 5 * k for k in (1, 2, 3)]
    assert result.best_step == best_step
    assert result.val["loss"] == pytest.approx(best, rel=1e-4)  # the final evaluation is of the best weights
    assert not (tmp_path / "r" / "best.safetensors").exists()
    with pytest.raises(GptkitError, match="stopped early.*train.patience"):
        train(load_run_config(tmp_path / "r"), tmp_path / "r", resume=True, progress=False, quiet=True)


@pytest.mark.cuda
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
import ctypes, json, resource, sys, torch
from gptkit.config import ModelConfig
from gptkit.model import GPT
from gptkit.runtime import keep_freed_memory

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
    for _ in range(8):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 8

# glibc's default threshold, pinned: left alone, glibc raises it by itself after the first frees,
# or not, depending on the process's history, and the faults to remove come and go by chance.
ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
if sys.argv[1:] == ["applied"]:  # only whether the setting is applied
    print(json.dumps({"applied": keep_freed_memory()}))
    sys.exit()
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
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, "applied"], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert not json.loads(out.stdout)["applied"]


def test_dtype_auto_times_both_precisions_once_per_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.dtype=auto on a CPU with fast bf16 takes the precision whose training steps were
    faster at the run's shape, says what it measured, and measures a shape once per machine."""
    from gptkit.training.train import AUTO_DTYPE_CACHE, measure_cpu_dtype

    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, tiny_overrides())
    cfg.model.vocab_size = 65
    dtype, note = measure_cpu_dtype(cfg, budget_s=0.2)
    saved = json.loads((tmp_path / "cache" / AUTO_DTYPE_CACHE).read_text())
    (entry,) = saved.values()
    assert entry["dtype"] == str(dtype).removeprefix("torch.")
    assert (entry["bfloat16_ms"] < entry["float32_ms"]) == (dtype == torch.bfloat16)
    assert "measured at this shape" in note and f"{entry['float32_ms']:.0f} ms in fp32" in note
    again, note = measure_cpu_dtype(cfg)
    assert again == dtype and "cached in" in note and len(json.loads((tmp_path / "cache" / AUTO_DTYPE_CACHE).read_text())) == 1
    cfg.model.n_embd = 48
    measure_cpu_dtype(cfg, budget_s=0.1)
    assert len(json.loads((tmp_path / "cache" / AUTO_DTYPE_CACHE).read_text())) == 2


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="dtype=auto measures only where the CPU has fast bf16")
def test_dtype_auto_start_up_line_shows_the_measurement(tmp_path: Path, small_data: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = cfg_for(small_data, **{"train.dtype": "auto", "train.max_steps": 2})
    train(cfg, tmp_path / "run", progress=False)
    assert re.search(r"cpu (bfloat16|float32) \(auto: \d+ ms a step in bf16 against \d+ ms in fp32", capsys.readouterr().out)


def test_threads_zero_times_one_thread_against_all_and_says_so() -> None:
    """train.threads=0 on a CPU: one thread only when a step was over 1.5x faster with it at the
    run's shape -- the case when other work keeps a core busy; torch's own setting is left as it was."""
    from gptkit.training.train import measure_cpu_threads

    cfg = load_config(None, tiny_overrides())
    cfg.model.vocab_size = 65
    before = torch.get_num_threads()
    threads, note = measure_cpu_threads(cfg, torch.float32, budget_s=0.2)
    assert torch.get_num_threads() == before
    m = re.fullmatch(rf"{threads} of {before} threads: (\d+) ms a step with one against (\d+) ms with {before}", note)
    assert m, note
    one, all_ = map(int, m.groups())
    assert threads in (1, before) and (threads == 1) <= (one * 1.5 <= all_ + 1)
