"""Experiment trackers (gptkit/training/trackers.py): what a run logs to TensorBoard, W&B (offline)
and MLflow (SQLite) is read back with each tool's own library and equals metrics.jsonl."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptkit.config import load_config
from gptkit.errors import GptkitError
from gptkit.training.train import train

from .conftest import tiny_overrides


def _train(run: Path, data: Path, sample: object = None, **extra: object) -> None:
    sets = {"train.max_steps": 20, "train.log_interval": 2, "train.eval_interval": 10,
            "train.checkpoint_interval": 10, **extra}  # fmt: skip
    cfg = load_config(None, tiny_overrides(**sets))
    cfg.data.dir = str(data)
    train(cfg, run, progress=False, quiet=True, resume=(run / "checkpoint").is_dir(), sample=sample)


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 1e-9) -> bool:
    """The same steps, and the same values (to float32's precision where a tool keeps that)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def _jsonl(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _mlflow(run: Path, key: str) -> tuple[list[tuple[int, float]], object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow.db'}")
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["id"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return history, client.get_run(run_id)


def _wandb_records(run: Path) -> list:
    """Every record of the run's offline W&B files, parsed with wandb's own record schema. The
    file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then records in
    32 KiB blocks, each chunk with a 7-byte header (CRC, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, chunks = 7, b""
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:  # a block's tail too short for a header is padding
                pos += room
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            chunks += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # full, or the last chunk of a record
                rec = pb.Record()
                rec.ParseFromString(chunks)
                records.append(rec)
                chunks = b""
    return records


def _wandb_history(run: Path, key: str) -> list[tuple[int, float]]:
    out = []
    for rec in _wandb_records(run):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            if key in items:
                out.append((rec.history.step.num, json.loads(items[key])))
    return sorted(out)


def test_every_tracker_reads_back_what_metrics_jsonl_holds(tmp_path: Path, small_data: Path) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"

    def sample(run_dir: Path) -> str:  # what `gptkit train` prints at the end
        return f"a sample from {run_dir.name}"

    _train(run, small_data, sample, **{"train.tensorboard": True, "track.backends": "wandb,mlflow",
                                       "track.project": "tests"})  # fmt: skip
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        want = _jsonl(run, key)
        assert want, key
        got, mlrun = _mlflow(run, key)
        assert _same(got, want), key
        assert _same(_wandb_history(run, key), want), key
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert _same([(e.step, e.value) for e in events.Scalars(key)], want, rel=1e-6), key
    # the resolved configuration as the run's parameters, and the final metrics
    assert mlrun.data.params["model.n_layer"] == "2" and mlrun.data.params["train.max_steps"] == "20"
    final = _jsonl(run, "final_val_loss")[-1][1]
    assert mlrun.data.metrics["final_val_loss"] == pytest.approx(final)
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["final_sample"] == "a sample from run"
    records = _wandb_records(run)
    configs = [r.run.config for r in records if r.WhichOneof("record_type") == "run"]
    configs += [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {item.key: json.loads(item.value_json) for c in configs for item in c.update}
    assert keys["model.n_layer"] == 2 and keys["train.max_steps"] == 20
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}  # fmt: skip
    assert summary["sample"] == "a sample from run" and summary["val_loss"] == pytest.approx(final)


def test_resume_continues_the_same_tracker_runs(tmp_path: Path, small_data: Path) -> None:
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    _train(run, small_data, **{"train.max_steps": 10, "track.backends": "mlflow"})
    _, first_run = _mlflow(run, "loss")
    assert first_run.info.status == "FINISHED" and not _artifacts(run, first_run.info.run_id)
    first = json.loads((run / "trackers.json").read_text())["mlflow"]["id"]
    _train(run, small_data, **{"train.max_steps": 20, "track.backends": "mlflow"})
    assert json.loads((run / "trackers.json").read_text())["mlflow"]["id"] == first  # the same run
    got, _ = _mlflow(run, "loss")
    steps = [s for s, _ in got]
    assert steps == sorted(set(steps)) == [s for s, _ in _jsonl(run, "loss")]  # no gap, no repeat
    assert steps[-1] == 20


def test_mlflow_rows_committed_before_a_kill_are_not_sent_again(tmp_path: Path) -> None:
    """The window a kill -9 can hit: MLflow committed steps past the checkpoint and nothing of
    ours recorded it. A reopened tracker asks the store, so the redone steps are sent once."""
    pytest.importorskip("mlflow")
    from gptkit.training.trackers import Mlflow

    cfg = load_config(None, tiny_overrides(**{"track.backends": "mlflow"}))
    first = Mlflow(tmp_path, cfg, None)
    for step in (5, 10, 15):  # checkpoint at 10; 15 reached the store before the kill
        first.log(step, {"loss": 1.0 / step, "lr": 0.1})
    first.log(15, {"val_loss": 2.0})
    again = Mlflow(tmp_path, cfg, first.id)
    for step in (15, 20):  # redone after --resume
        again.log(step, {"loss": 1.0 / step, "lr": 0.1})
    again.log(15, {"val_loss": 2.0})
    again.log(20, {"val_loss": 1.5})
    for key, steps in (("loss", [5, 10, 15, 20]), ("lr", [5, 10, 15, 20]), ("val_loss", [15, 20])):
        history = sorted(m.step for m in again.client.get_metric_history(first.id, key))
        assert history == steps, (key, history)


def _artifacts(run: Path, run_id: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow.db'}")
    return [a.path for a in client.list_artifacts(run_id, "checkpoint")]


def test_the_checkpoint_is_an_artifact_only_when_asked(tmp_path: Path, small_data: Path) -> None:
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    _train(run, small_data, **{"train.max_steps": 10, "track.backends": "mlflow", "track.artifact": True})
    _, mlrun = _mlflow(run, "loss")
    stored = _artifacts(run, mlrun.info.run_id)
    assert "checkpoint/model.safetensors" in stored and "checkpoint/state.json" in stored
    assert (run / "mlartifacts").is_dir() and not Path("mlruns").exists()  # beside the store


@pytest.mark.slow
def test_kill_9_and_resume_leave_no_gap_and_no_repeated_step(tmp_path: Path, small_text: Path) -> None:
    """A real SIGKILL between two checkpoints: the steps after the checkpoint reached MLflow
    before the kill and are redone after --resume; its curve then holds every logged step once,
    with metrics.jsonl's values (the redone steps compute the same losses)."""
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    sets = tiny_overrides(**{"train.max_steps": 300, "train.batch_size": 32, "train.log_interval": 5,
                             "train.checkpoint_interval": 100, "train.eval_interval": 1000,
                             "track.backends": "mlflow"})  # fmt: skip
    args = [sys.executable, "-m", "gptkit", "train", "--text", str(small_text), "--out", str(run), "--no-progress"]
    proc = subprocess.Popen([*args, *(a for kv in sets for a in ("--set", kv))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [s for s, _ in _jsonl(run, "loss")] if (run / "metrics.jsonl").is_file() else []
        if steps and steps[-1] >= 130:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _jsonl(run, "loss")[-1][0]
    saved = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert saved < killed_at < 300, (saved, killed_at)  # rows past the checkpoint reached MLflow
    p = subprocess.run([sys.executable, "-m", "gptkit", "train", "--resume", str(run), "--no-progress"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    want = _jsonl(run, "loss")
    assert [s for s, _ in want] == list(range(5, 301, 5))
    got, mlrun = _mlflow(run, "loss")
    assert [s for s, _ in got] == [s for s, _ in want], (saved, killed_at, got)
    assert _same(got, want, rel=1e-5) and mlrun.info.status == "FINISHED"


def test_a_pruned_trial_is_marked_in_the_tracker(tmp_path: Path, small_data: Path) -> None:
    """A trial that Optuna prunes ends by the exception its on_eval raises; the tracker run says so."""
    pytest.importorskip("mlflow")
    optuna = pytest.importorskip("optuna")
    run = tmp_path / "run"

    def prune(step: int, val_loss: float) -> None:
        raise optuna.TrialPruned(f"pruned at step {step}")

    cfg = load_config(None, tiny_overrides(**{"train.max_steps": 20, "train.eval_interval": 5,
                                              "track.backends": "mlflow"}))  # fmt: skip
    cfg.data.dir = str(small_data)
    with pytest.raises(optuna.TrialPruned):
        train(cfg, run, progress=False, quiet=True, on_eval=prune)
    _, mlrun = _mlflow(run, "loss")
    assert mlrun.info.status == "KILLED" and "pruned at step 5" in mlrun.data.tags["final_stopped"]


def test_a_missing_tracker_package_is_one_line(tmp_path: Path, small_data: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    with pytest.raises(GptkitError, match=r"pip install 'gptkit\[track\]'"):
        _train(tmp_path / "run", small_data, **{"track.backends": "wandb"})


def test_tracker_flags_on_the_command_line(tmp_path: Path, small_text: Path) -> None:
    base = [sys.executable, "-m", "gptkit", "train", "--text", str(small_text)]
    sets = [a for kv in tiny_overrides(**{"train.max_steps": 4}) for a in ("--set", kv)]
    p = subprocess.run([*base, "--out", str(tmp_path / "a"), *sets, "--tracker", "none"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "a" / "tensorboard").exists() and (tmp_path / "a" / "metrics.jsonl").is_file()
    p = subprocess.run([*base, "--out", str(tmp_path / "b"), *sets, "--tracker", "none", "--tracker", "wandb"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "cannot be combined" in p.stderr and not (tmp_path / "b").exists()
    p = subprocess.run([*base, "--out", str(tmp_path / "c"), *sets, "--set", "track.backends=comet"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "unknown tracker 'comet'" in p.stderr and p.stderr.count("\n") == 1
