"""`gptkit runs`: the runs under a folder compared at a glance, without any tracker.

A table (name, kind, steps, training time, best validation loss, and each run's configuration
where it differs from the first run's) read from the run folders themselves (config.yaml,
metrics.jsonl, the checkpoint's state.json), and the loss curves of several runs overlaid in
one PNG."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptkit.checkpoint import RunFolder, checkpoint_info, has_checkpoint, load_run_config
from gptkit.config import Config
from gptkit.errors import GptkitError


@dataclass
class RunSummary:
    path: Path
    name: str
    kind: str  # pretrain, finetune, finetune+lora, int8, int4
    steps: int
    train_s: float
    best_val_loss: float  # nan when the run was never evaluated
    config: Config
    differences: dict[str, Any] = field(default_factory=dict)  # key -> value, against the first


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = RunFolder(run).metrics
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: the rows before it still count
    return rows


def _kind(cfg: Config) -> str:
    if cfg.model.quantization != "none":
        return cfg.model.quantization
    if cfg.finetune.base:
        return f"finetune+{cfg.finetune.method}" if cfg.adapted else "finetune"
    return "pretrain"


def summarize(run: Path) -> RunSummary:
    """One run folder's row of the table."""
    cfg = load_run_config(run)
    rows = read_metrics(run)
    vals = [r[k] for r in rows for k in ("val_loss", "final_val_loss") if k in r]
    steps = max((r["step"] for r in rows), default=0)
    train_s = 0.0
    if has_checkpoint(run):
        info = checkpoint_info(run)
        steps = max(steps, info["step"])
        train_s = info.get("train_s", info.get("elapsed_s", 0.0))
    best = min(vals) if vals else math.nan
    return RunSummary(run, run.name, _kind(cfg), steps, train_s, best, cfg)


def find_runs(folder: str | Path) -> list[Path]:
    """The run folders at or below folder (a folder with config.yaml and metrics.jsonl or a
    checkpoint), in name order; a run's own subfolders are not searched."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptkitError(f"{folder}: no such folder")
    found: list[Path] = []

    def walk(d: Path) -> None:
        if RunFolder(d).config.is_file() and (RunFolder(d).metrics.is_file() or has_checkpoint(d)):
            found.append(d)
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(sub)

    walk(folder)
    return found


def compare(runs: list[Path]) -> list[RunSummary]:
    """Summaries of runs, each with the configuration keys whose values differ from the first
    run's (bookkeeping such as the data folder and the base's checksum left out)."""
    summaries = [summarize(r) for r in runs]
    if not summaries:
        return summaries
    first = _flat(summaries[0].config)
    for s in summaries[1:]:
        mine = _flat(s.config)
        s.differences = {k: v for k, v in mine.items() if first.get(k) != v}
    return summaries


IGNORED = ("data.dir", "finetune.data", "lineage.", "track.")


def _flat(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat().items() if not k.startswith(IGNORED)}


def runs_table(folder: str | Path) -> list[RunSummary]:
    """The summaries of every run under folder; refuses a folder with none."""
    runs = find_runs(folder)
    if not runs:
        raise GptkitError(
            f"{folder}: no gptkit runs here (a run folder holds config.yaml and metrics.jsonl)"
        )
    return compare(runs)


def print_table(summaries: list[RunSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(summaries)} runs")
    for col in ("run", "kind", "steps", "train time", "best val loss", "differs from the first"):
        table.add_column(col, justify="right" if col in ("steps", "train time") else "left")
    for s in summaries:
        diff = ", ".join(f"{k}={v}" for k, v in s.differences.items()) or "-"
        best = f"{s.best_val_loss:.4f}" if not math.isnan(s.best_val_loss) else "-"
        table.add_row(s.name, s.kind, str(s.steps), f"{s.train_s:.0f} s", best, diff)
    Console().print(table)


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """The training and validation loss curves of runs overlaid in one PNG (one colour a run:
    a line for training, dots for validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for i, run in enumerate(Path(r) for r in runs):
        load_run_config(run)  # a clear error for a folder that is not a run
        rows = read_metrics(run)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        colour = f"C{i % 10}"
        if train:
            ax.plot(
                *zip(*train),
                color=colour,
                lw=1,
                alpha=0.8,
                marker="." if len(train) < 20 else None,  # a short run still shows
                label=f"{run.name} (train)",
            )
        if val:
            ax.plot(*zip(*val), "o", color=colour, ms=4, label=f"{run.name} (validation)")
        drawn += bool(train or val)
    if not drawn:
        plt.close(fig)
        raise GptkitError("none of these runs has logged a loss yet (metrics.jsonl is empty)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # glyphs a font lacks draw as boxes
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
