"""Data-parallel training for real: torchrun starts 2 CPU processes (gloo), and the results are
compared with one process doing the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptkit.config import load_config
from gptkit.training.train import train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow  # several processes under torchrun: end-to-end, run by .ci/run

SETS = {
    "train.batch_size": 8,  # the global batch: 4 rows per process when 2 run
    "train.max_steps": 12,
    "train.lr": 3e-3,
    "train.log_interval": 1,
    "train.eval_interval": 6,
    "train.eval_batches": 2,
    "train.checkpoint_interval": 100,
    "train.threads": 1,
    "train.grad_accum": 2,
    "model.dropout": 0.0,
    "train.schedule": "constant",  # the learning rate does not depend on max_steps, so runs can be extended
}


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None, wait: bool = True):  # noqa: ANN201
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gptkit", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun's workers live in their own groups)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cli_sets(**extra: object) -> list[str]:
    """The same configuration as `single`: GPT-2 defaults (an empty config file), tiny sizes."""
    empty = Path(__file__).parent / "data" / "empty.yaml"
    return ["--config", str(empty)] + sum((["--set", s] for s in tiny_overrides(**{**SETS, **extra})), [])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """One process, global batch 8, the reference for the 2-process runs."""
    run = tmp_path_factory.mktemp("dist") / "single"
    cfg = load_config(None, tiny_overrides(**SETS))
    cfg.data.dir = str(small_data)
    train(cfg, run, progress=False, quiet=True)
    return run


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(mode: str, single: Path, small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / mode
    extra = ["--fsdp"] if mode == "fsdp" else ["--tracker", "mlflow"]  # DDP: trackers too
    r = torchrun(2, "train", "--data", str(small_data), "--out", str(out), "--no-progress", *extra, *cli_sets())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("gptkit: done at step 12") == 1  # only rank 0 speaks
    assert_same_weights(single, out)
    la, lb = losses(single), losses(out)
    assert la and la.keys() == lb.keys()  # non-empty: the comparison below is not vacuous
    if mode == "ddp":  # only rank 0 logs: one tracker run, each step once
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("gptkit").experiment_id])
        assert len(runs) == 1
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        assert steps == sorted(set(steps)) == sorted(lb)
    assert all(abs(la[k] - lb[k]) < 1e-5 for k in la)
    # The final evaluation is averaged over the ranks' shares of the validation split.
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "final_val_loss" in x][-1]
    ref = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines() if "final_val_loss" in x][-1]
    assert abs(final["final_val_loss"] - ref["final_val_loss"]) < 1e-5


def test_killed_two_process_run_resumes_on_one(small_data: Path, tmp_path: Path) -> None:
    """A crash (SIGKILL to every process) after a checkpoint; the run resumes on one process,
    across world sizes, and its losses and weights continue as an uninterrupted run's."""
    out = tmp_path / "crash"
    proc = torchrun(2, "train", "--data", str(small_data), "--out", str(out), "--no-progress",
                    *cli_sets(**{"train.checkpoint_interval": 3, "train.max_steps": 100000}), wait=False)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint" / "state.json").is_file():
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert step >= 3 and step % 3 == 0
    end = step + 5
    r = subprocess.run([sys.executable, "-m", "gptkit", "train", "--resume", str(out), "--no-progress",
                        "--set", f"train.max_steps={end}"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    straight = tmp_path / "straight"
    cfg = load_config(None, tiny_overrides(**{**SETS, "train.max_steps": end}))
    cfg.data.dir = str(small_data)
    train(cfg, straight, progress=False, quiet=True)
    assert_same_weights(straight, out)
    la, lb = losses(straight), losses(out)
    assert la and la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la)


def test_one_process_run_resumes_on_two(single: Path, small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "grow"
    cfg = load_config(None, tiny_overrides(**SETS))
    cfg.data.dir = str(small_data)
    result = train(cfg, out, progress=False, quiet=True, stop_at=5)
    assert result.interrupted and result.step == 5
    r = torchrun(2, "train", "--resume", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(single, out)


def test_fsdp_checkpoint_resumes_under_fsdp_and_alone(single: Path, small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp-pause"
    r = torchrun(2, "train", "--data", str(small_data), "--out", str(out), "--no-progress", "--fsdp",
                 *cli_sets(**{"train.max_steps": 6}))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(weights(out)) == set(weights(single))  # a whole checkpoint, in the one-process format
    r = torchrun(2, "train", "--resume", str(out), "--no-progress", "--fsdp", "--set", "train.max_steps=9")
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "gptkit", "train", "--resume", str(out), "--no-progress", "--set",
                        "train.max_steps=12"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(single, out)


def test_bad_world_size_and_unreachable_rendezvous(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    r = torchrun(2, "train", "--data", str(small_data), "--out", str(out), "--no-progress",
                 *cli_sets(**{"train.batch_size": 7}))  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.count("gptkit: error: train.batch_size (7) must be divisible by the number of processes (2)") == 1
    assert not (out / "checkpoint").exists()
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "GPTKIT_DIST_TIMEOUT_S": "3"}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "gptkit", "train", "--data", str(small_data), "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 2 and "cannot join the process group" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
