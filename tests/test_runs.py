"""`gptkit runs` (gptkit/runs.py): the table of runs under a folder and the overlaid loss plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptkit.config import load_config
from gptkit.errors import GptkitError
from gptkit.runs import plot_runs, runs_table
from gptkit.training.train import train

from .conftest import tiny_overrides


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    root = tmp_path_factory.mktemp("many")
    for name, lr in (("a", 1e-3), ("b", 1e-2)):
        cfg = load_config(None, tiny_overrides(**{"train.lr": lr, "train.max_steps": 20}))
        cfg.data.dir = str(small_data)
        train(cfg, root / "group" / name, progress=False, quiet=True)
    return root


def test_the_table_reads_each_run_and_names_what_differs(two_runs: Path) -> None:
    rows = runs_table(two_runs)
    assert [r.name for r in rows] == ["a", "b"]
    for r in rows:
        metrics = [json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()]
        vals = [m[k] for m in metrics for k in ("val_loss", "final_val_loss") if k in m]
        assert r.kind == "pretrain" and r.steps == 20 and r.best_val_loss == min(vals)
        assert r.train_s > 0
    assert rows[0].differences == {} and rows[1].differences == {"train.lr": 1e-2}


def test_the_plot_overlays_the_runs(two_runs: Path, tmp_path: Path) -> None:
    out = plot_runs([two_runs / "group" / "a", two_runs / "group" / "b"], tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_runs_on_the_command_line(two_runs: Path, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "gptkit", "runs", str(two_runs)], capture_output=True, text=True)
    assert p.returncode == 0 and "train.lr=0.01" in p.stdout and "2 runs" in p.stdout, p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "gptkit", "runs", str(empty)], capture_output=True, text=True)
    assert p.returncode == 2 and "no gptkit runs here" in p.stderr and p.stderr.count("\n") == 1
    p = subprocess.run([sys.executable, "-m", "gptkit", "runs", "--plot", str(empty), "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "not a gptkit run folder" in p.stderr and not (tmp_path / "x.png").exists()


def test_a_folder_without_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="no gptkit runs here"):
        runs_table(tmp_path)
