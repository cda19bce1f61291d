"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow.

Every tracker gets the same scalars the run writes to metrics.jsonl (loss, validation loss,
learning rate, tokens/s, ...), the resolved configuration as the run's parameters, and the final
metrics at the end; the checkpoint as an artifact only with `track.artifact`. Each package is
imported only when its tracker is chosen, and a missing one is one line naming the extra to
install. Only the main process (rank 0 under torchrun) opens trackers.

The ids of the tracker runs are kept in RUN/trackers.json, so `--resume` continues the same W&B
and MLflow runs instead of starting new ones (`Trackers`).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from gptkit.checkpoint import RunFolder
from gptkit.config import Config
from gptkit.errors import GptkitError


class Tracker:
    """What the training loop calls; each backend implements these."""

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None  # events past it are redone
        self.writer = SummaryWriter(str(RunFolder(run_dir).tensorboard), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        self.writer.close()


def _require(module: str, name: str) -> Any:
    """The tracker's package, or one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptkitError(f"--tracker {module} needs {name}: pip install 'gptkit[track]'") from None


def flat_config(cfg: Config) -> dict[str, Any]:
    """The configuration as section.key -> value, the form trackers show as parameters."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in cfg.flat().items()}


class Wandb(Tracker):
    """A W&B run in the run folder (RUN/wandb/); offline by default (`wandb sync` uploads it)."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None) -> None:
        wandb = _require("wandb", "Weights & Biases")
        t = cfg.track
        run_id = run_id or uuid.uuid4().hex[:8]
        options = dict(
            project=t.project,
            name=t.name or Path(run_dir).resolve().name,
            group=t.group or None,
            dir=str(run_dir),
            mode=t.wandb_mode,
            id=run_id,
            resume="allow",
            config=flat_config(cfg),
            settings=wandb.Settings(
                silent=True, console="off", x_disable_stats=True, x_disable_meta=True
            ),
            reinit="create_new",
        )
        # After a kill -9 the killed process's W&B service holds the run for a few seconds more,
        # until it sees its parent gone: resuming waits for it.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.run = wandb.init(**options)
                break
            except Exception as e:
                if "in use" not in str(e) or time.monotonic() > deadline:
                    raise GptkitError(f"W&B could not open run {run_id}: {e}") from None
                time.sleep(1)
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        import wandb

        for k, v in summary.items():
            self.run.summary[k] = v
        if checkpoint is not None:
            artifact = wandb.Artifact(f"{self.run.id}-checkpoint", type="model")
            artifact.add_dir(str(checkpoint))
            self.run.log_artifact(artifact)
        self.run.finish()


class Mlflow(Tracker):
    """An MLflow run of the experiment `track.project`, in `track.mlflow_uri` (by default a local
    SQLite store, RUN/mlflow.db).

    A resumed run redoes the steps after its checkpoint exactly (the same losses;
    tests/test_train.py). Each log_batch is a committed SQL transaction, so on resume the store
    itself says which steps it already holds (`self.last`, the last step of each key), and those
    rows are not sent again: the curve has no gap and no repeated step, whenever a kill -9 came.
    (Keeping that count in a file of our own would leave a window between MLflow's commit and the
    file's write.)"""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None) -> None:
        _require("mlflow", "MLflow")
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # MLflow and alembic announce every schema step on the root logger's handlers
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        t = cfg.track
        uri = t.mlflow_uri or f"sqlite:///{(Path(run_dir).resolve() / 'mlflow.db')}"
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(t.project)
        if exp is None:
            # Artifacts beside a SQLite store (MLflow's default is ./mlruns in whatever folder
            # the command ran from); a server's store keeps its own default.
            where = None
            if uri.startswith("sqlite:///"):
                where = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(t.project, artifact_location=where)
        else:
            exp_id = exp.experiment_id
        self.last: dict[str, int] = {}
        if run_id is None:
            tags = {"gptkit.run_dir": str(Path(run_dir).resolve())}
            if t.group:
                tags["gptkit.group"] = t.group
            name = t.name or Path(run_dir).resolve().name
            run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flat_config(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
            for key in self.client.get_run(run_id).data.metrics:
                history = self.client.get_metric_history(run_id, key)
                self.last[key] = max((m.step for m in history), default=-1)
        self.id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step) for k, v in values.items() if step > self.last.get(k, -1)
        ]
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float)):
                self.client.log_metric(self.id, f"final_{k}", float(v))
            else:
                self.client.set_tag(self.id, f"final_{k}", str(v)[:5000])
        if checkpoint is not None:
            self.client.log_artifacts(self.id, str(checkpoint), "checkpoint")
        ended = summary.get("interrupted") or summary.get("stopped")
        self.client.set_terminated(self.id, "KILLED" if ended else "FINISHED")


class Trackers:
    """The trackers of one run, and their run ids in RUN/trackers.json, so `--resume` continues
    the same W&B and MLflow runs. MLflow skips the redone rows it already holds (`Mlflow`). W&B's
    service buffers rows for seconds, so after a kill -9 it may not hold what it was sent: it gets
    every row, and its own resume keeps each step once. TensorBoard drops its own events past the
    checkpoint (purge_step)."""

    def __init__(
        self, run_dir: Path, cfg: Config, tensorboard: bool, resume_step: int | None
    ) -> None:
        self.path = Path(run_dir) / "trackers.json"
        self.tensorboard = None
        if tensorboard:
            try:
                self.tensorboard = TensorBoard(run_dir, resume_step)
            except ImportError:
                pass  # TensorBoard is a core dependency; a broken install only loses its events
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.named: dict[str, Tracker] = {}
        for name in cfg.track.backends:
            kind = Wandb if name == "wandb" else Mlflow
            self.named[name] = kind(run_dir, cfg, state.get(name, {}).get("id"))
        if self.named:
            tmp = self.path.with_suffix(".tmp")  # a kill mid-write leaves the previous file whole
            tmp.write_text(json.dumps({name: {"id": t.id} for name, t in self.named.items()}))
            tmp.replace(self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.log(step, values)
        for tracker in self.named.values():
            tracker.log(step, values)

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        for tracker in [self.tensorboard, *self.named.values()]:
            if tracker is not None:
                tracker.finish(summary, checkpoint)
        self.tensorboard, self.named = None, {}
