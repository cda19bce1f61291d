"""Hyperparameter search: real Optuna studies in real SQLite files, real training runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptkit.config import load_config
from gptkit.errors import GptkitError

optuna = pytest.importorskip("optuna")
from gptkit.tune import load_space, parse_budget, tune  # noqa: E402

from .conftest import tiny_overrides  # noqa: E402

SPACE = {
    "train.lr": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True},
    "model.n_layer": {"type": "int", "low": 1, "high": 2},
    "train.batch_size": {"type": "categorical", "choices": [8, 16]},
}


def write_space(tmp_path: Path, space: dict) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space))
    return p


def base_config(tmp_path: Path) -> Path:
    cfg = load_config(None, tiny_overrides())
    p = tmp_path / "base.yaml"
    cfg.save(p)
    return p


def test_budget_parsing() -> None:
    assert parse_budget("60s").kind == "seconds" and parse_budget("60s").amount == 60
    assert parse_budget("2m").amount == 120
    assert parse_budget("2000steps").kind == "steps"
    b = parse_budget("5Mtokens")
    assert b.kind == "tokens" and b.amount == 5e6
    cfg = load_config(None, ["train.batch_size=10", "model.block_size=100"])
    b.apply(cfg)
    assert cfg.train.max_steps == 5000  # 5M tokens / (10 x 100) per step
    for bad in ("fast", "10 parsecs", "-5s", "0steps"):
        with pytest.raises(GptkitError, match="--budget"):
            parse_budget(bad)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lrr": {"type": "float", "low": 1, "high": 2}}, "did you mean 'train.lr'"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "empty range"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.1}}, "empty range"),
        ({"train.batch_size": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"train.lr": {"type": "normal", "low": 0, "high": 1}}, "type must be"),
        ({"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale"),
        ({"model.n_layer": {"type": "int", "low": "a", "high": 3}}, "numbers"),
    ],
)
def test_bad_spaces(tmp_path: Path, space: dict, message: str) -> None:
    with pytest.raises(GptkitError, match=message):
        load_space(write_space(tmp_path, space))


def test_study_writes_best_config_and_plots(tmp_path: Path, small_data: Path) -> None:
    out = tmp_path / "study"
    summary = tune(
        str(write_space(tmp_path, SPACE)), 4, "15steps", out, data=str(small_data),
        config=str(base_config(tmp_path)), pruner="none",
    )  # fmt: skip
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["best_value"] is not None and set(summary["best_params"]) == set(SPACE)
    best = load_config(summary["best_config"])
    assert best.train.max_steps == 15 and best.train.lr == pytest.approx(summary["best_params"]["train.lr"])
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "trials").iterdir())) == 4
    study = optuna.load_study(study_name="gptkit", storage=f"sqlite:///{out / 'study.db'}")
    assert min(t.value for t in study.trials) == summary["best_value"]
    # The same command again: the study is complete, nothing new runs, nothing is lost.
    again = tune(str(write_space(tmp_path, SPACE)), 4, "15steps", out, data=str(small_data), config=str(base_config(tmp_path)))
    assert again["completed"] == 4 and again["best_value"] == summary["best_value"]


def test_each_trial_is_a_tracker_run_of_the_study(tmp_path: Path, small_data: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "study"
    tune(
        str(write_space(tmp_path, SPACE)), 2, "10steps", out, data=str(small_data),
        config=str(base_config(tmp_path)), overrides=["track.backends=mlflow"], pruner="none",
    )  # fmt: skip
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptkit").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["trial-0000", "trial-0001"]
    for r in runs:
        assert r.data.tags["gptkit.group"] == "study" and "train.lr" in r.data.params
        assert r.info.status == "FINISHED" and "final_val_loss" in r.data.metrics


def test_divergent_trials_fail_and_the_study_goes_on(tmp_path: Path, small_data: Path) -> None:
    space = {"train.lr": {"type": "categorical", "choices": [1e6, 3e-3]}}
    summary = tune(
        str(write_space(tmp_path, space)), 4, "10steps", tmp_path / "s", data=str(small_data),
        config=str(base_config(tmp_path)), overrides=["train.grad_clip=0", "train.warmup_steps=0"], pruner="none",
    )  # fmt: skip
    assert summary["completed"] + summary["failed"] == 4
    assert summary["failed"] >= 1  # lr 1e6 without clipping diverges
    if summary["completed"]:
        assert summary["best_params"]["train.lr"] == 3e-3


@pytest.mark.slow
def test_killed_study_continues(tmp_path: Path, small_data: Path) -> None:
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "gptkit", "tune", "--data", str(small_data), "--space", str(write_space(tmp_path, SPACE))]
    cmd += ["--trials", "5", "--budget", "60steps", "--out", str(out), "--config", str(base_config(tmp_path)), "--pruner", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240

    def completed() -> list:
        # Read the study only once a trial has started: the tune process has created its tables by then, and
        # opening the database while it still creates them could make that process fail (seen once in CI).
        if not (out / "trials").exists():
            return []
        try:
            study = optuna.load_study(study_name="gptkit", storage=f"sqlite:///{out / 'study.db'}")
        except Exception:  # not created yet, or its tables are being written right now
            return []
        return [t for t in study.trials if t.state.name == "COMPLETE"]

    while time.time() < deadline and len(completed()) < 2:
        time.sleep(0.3)
    time.sleep(0.5)  # now inside a later trial
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = {t.number: t.value for t in completed()}
    assert len(before) >= 2
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    after = {t.number: t.value for t in completed()}
    assert all(after[n] == v for n, v in before.items())  # completed trials are kept
    assert summary["completed"] == 5 and summary["completed"] + summary["pruned"] + summary["failed"] >= 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "soon"], "--budget"),
        (["--storage", "notadb://x"], "--storage"),
        (["--trials", "0"], "--trials"),
    ],
)
def test_bad_command_lines(tmp_path: Path, small_data: Path, extra: list[str], message: str) -> None:
    args = {"--budget": "10steps", "--trials": "2", "--storage": None}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    cmd = [sys.executable, "-m", "gptkit", "tune", "--data", str(small_data), "--space", str(write_space(tmp_path, SPACE))]
    cmd += ["--out", str(tmp_path / "s"), "--config", str(base_config(tmp_path))]
    for k, v in args.items():
        if v is not None:
            cmd += [k, v]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_parallel_workers_share_the_study(tmp_path: Path, small_data: Path) -> None:
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    summary = tune(
        str(write_space(tmp_path, space)), 4, "10steps", tmp_path / "s", data=str(small_data),
        config=str(base_config(tmp_path)), workers=2, pruner="none",
    )  # fmt: skip
    # Two processes each finish the trial they are in when the count is reached: 4 or 5 trials.
    assert 4 <= summary["completed"] <= 5
    trials = list((tmp_path / "s" / "trials").iterdir())
    assert len(trials) == summary["completed"]


@pytest.mark.slow
def test_search_over_a_fine_tune_of_an_imported_model(tmp_path: Path) -> None:
    """`gptkit tune --finetune BASE --instructions FILE`: every trial is a fine-tune of an
    imported Llama through its own chat template (the fine-tuning preset, LoRA switched by the
    space), scored on its held-out response loss."""
    pytest.importorskip("transformers")
    from gptkit.finetune.tasks import write_tasks
    from gptkit.formats.hf import import_hf

    from .hf_models import hf_model

    base = import_hf(hf_model(tmp_path / "hf", "llama"), tmp_path / "base")
    tasks = write_tasks(tmp_path / "tasks.jsonl", 60)
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "lora.enabled": {"type": "categorical", "choices": [True, False]}}  # fmt: skip
    cmd = [sys.executable, "-m", "gptkit", "tune", "--finetune", str(base), "--instructions", str(tasks),
           "--space", str(write_space(tmp_path, space)), "--trials", "3", "--budget", "6steps", "--out", str(tmp_path / "s"),
           "--pruner", "none", "--set", "train.batch_size=4", "--set", "train.dtype=float32"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["completed"] == 3 and summary["best_value"] is not None
    best = load_config(summary["best_config"])
    assert best.finetune.base == str(base.resolve()) and best.train.max_steps == 6
    trial = next((tmp_path / "s" / "trials").iterdir())
    assert (trial / "tokenizer" / "chat_template.jinja").is_file()  # the model's own template
    p = subprocess.run([*cmd[:4], "--finetune", str(base), "--space", cmd[9], "--trials", "1", "--budget", "2steps",
                        "--out", str(tmp_path / "t")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "--instructions" in p.stderr
