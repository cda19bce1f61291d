"""Hyperparameter search with Optuna: every trial is an ordinary gptkit training run (the same
loop) under an equal budget; intermediate validation losses feed a pruner; the study lives in
a database (SQLite in the study folder by default), so re-running the same command continues it.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptkit.checkpoint import load_run_config
from gptkit.config import Config, load_config, set_key
from gptkit.data import prepare, preset
from gptkit.errors import DivergedError, GptkitError
from gptkit.finetune.instruct import finetune
from gptkit.finetune.instructions import load_conversations
from gptkit.training.train import train


@dataclass
class Budget:
    kind: str  # "seconds" | "steps" | "tokens"
    amount: float

    def apply(self, cfg: Config) -> None:
        t = cfg.train
        if self.kind == "seconds":
            t.max_time_s, t.max_steps = self.amount, 10**9
            t.eval_every_s, t.eval_interval = self.amount / 6, 10**9
        else:
            per_step = t.batch_size * t.grad_accum * cfg.model.block_size
            steps = (
                int(self.amount)
                if self.kind == "steps"
                else max(1, math.ceil(self.amount / per_step))
            )
            t.max_steps, t.max_time_s = steps, 0.0
            t.eval_interval, t.eval_every_s = max(1, steps // 6), 0.0
            t.warmup_steps = min(t.warmup_steps, steps // 10)  # a short budget still gets to decay


def parse_budget(text: str) -> Budget:
    """60s | 2m | 2000steps | 5Mtokens (K, M, G suffixes for tokens)."""
    m = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|steps?|([kmg]?)tokens?)\s*", text.lower()
    )
    if not m:
        raise GptkitError(f"--budget {text!r}: expected e.g. 60s, 2m, 2000steps or 5Mtokens")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise GptkitError(f"--budget {text!r}: must be positive")
    if unit in ("s", "sec"):
        return Budget("seconds", value)
    if unit in ("m", "min"):
        return Budget("seconds", value * 60)
    if unit.startswith("step"):
        return Budget("steps", value)
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(3)]
    return Budget("tokens", value * scale)


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """A YAML mapping of config keys to {type: float|int|categorical, low, high, log, choices}."""
    p = Path(path)
    if not p.is_file():
        raise GptkitError(f"search space file not found: {p}")
    try:
        space = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise GptkitError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(space, dict) or not space:
        raise GptkitError(f"{p}: expected a non-empty mapping of config keys to ranges")
    probe = Config()
    for key, spec in space.items():
        if not isinstance(spec, dict):
            raise GptkitError(
                f"{p}: {key}: expected a mapping like {{type: float, low: 1e-4, high: 1e-2, log: "
                f"true}}"
            )
        kind = spec.get("type")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise GptkitError(f"{p}: {key}: categorical needs a non-empty list of choices")
            for c in choices:
                set_key(probe, key, c, source=str(p))  # names the key and checks each value's type
        elif kind in ("float", "int"):
            if "low" not in spec or "high" not in spec:
                raise GptkitError(f"{p}: {key}: {kind} needs low and high")
            low, high = spec["low"], spec["high"]
            if not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)
            ):
                raise GptkitError(f"{p}: {key}: low and high must be numbers")
            if low >= high:
                raise GptkitError(f"{p}: {key}: empty range (low {low} must be below high {high})")
            if spec.get("log") and low <= 0:
                raise GptkitError(f"{p}: {key}: a log scale needs low > 0")
            set_key(probe, key, low, source=str(p))
        else:
            raise GptkitError(f"{p}: {key}: type must be float, int or categorical, got {kind!r}")
    return space


def _suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(
            key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log"))
        )
    return trial.suggest_float(
        key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log"))
    )


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise GptkitError(f"--pruner {name!r}: use median, hyperband or none")


def _storage(url: str) -> Any:
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():
            # heartbeats are stable in practice
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=15, grace_period=60)
    except Exception as e:
        raise GptkitError(f"--storage {url!r}: cannot open ({str(e).splitlines()[0]})") from None


@dataclass
class TuneJob:
    base: Config
    space: dict[str, dict[str, Any]]
    budget: Budget
    out: Path
    data_dir: Path | None  # pretraining data; None when each trial fine-tunes finetune_base
    objective: str = "loss"  # loss | bits_per_byte
    pruner: str = "median"
    threads: int = 0
    finetune_base: str | None = None  # each trial fine-tunes this run on instructions
    instructions: tuple[str, ...] = ()

    def config_for(self, params: dict[str, Any]) -> Config:
        """The base config with a trial's parameters and the budget: what a trial trains, and
        what best.yaml holds for the best one."""
        cfg = copy.deepcopy(self.base)
        for key, value in params.items():
            set_key(cfg, key, value, source="search space")
        self.budget.apply(cfg)
        if self.data_dir is not None:
            cfg.data.dir = str(self.data_dir)
        if self.finetune_base is not None:  # best.yaml says what was fine-tuned, on what
            cfg.finetune.base = str(Path(self.finetune_base).resolve())
            cfg.finetune.data = list(self.instructions)
        return cfg

    def objective_fn(self, trial: Any) -> float:
        import optuna

        cfg = self.config_for({key: _suggest(trial, key, spec) for key, spec in self.space.items()})
        quiet: dict[str, Any] = {"train.sample_tokens": 0, "train.tensorboard": False}
        # Each trial is a tracker run of one group, the study, so the tracker compares them.
        quiet["track.group"] = self.base.track.group or self.out.resolve().name
        quiet["track.name"] = f"trial-{trial.number:04d}"
        if not self.base.track.mlflow_uri:  # one MLflow store for the study, not one a trial
            quiet["track.mlflow_uri"] = f"sqlite:///{self.out.resolve() / 'mlflow.db'}"
        if self.threads:
            quiet["train.threads"] = self.threads
        try:
            cfg = cfg.updated(quiet)  # validated here
        except GptkitError as e:  # e.g. n_embd not divisible by a sampled n_head: not a valid trial
            raise optuna.TrialPruned(str(e)) from None

        def report(step: int, val_loss: float) -> None:
            trial.report(val_loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (val loss {val_loss:.4f})")

        run = self.out / "trials" / f"trial-{trial.number:04d}"
        try:
            if (
                self.finetune_base is not None
            ):  # the same loop, on the base run and the instructions
                result = finetune(
                    self.finetune_base,
                    list(self.instructions),
                    run,
                    cfg,
                    overwrite=True,
                    progress=False,
                    quiet=True,
                    on_eval=report,
                )
            else:
                result = train(cfg, run, overwrite=True, progress=False, quiet=True, on_eval=report)
        except DivergedError:
            return float("nan")  # Optuna marks the trial failed; the study goes on
        value = (
            result.val["bits_per_byte"] if self.objective == "bits_per_byte" else result.val["loss"]
        )
        print(f"trial {trial.number}: {self.objective} {value:.4f}  {trial.params}", flush=True)
        return value


INTERRUPTED = "interrupted_trials"  # study attribute: numbers of trials killed with an earlier run


def _worker(job: TuneJob, url: str, trials: int, seed: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name="gptkit", storage=_storage(url), pruner=_pruner(job.pruner)
    )
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    _optimize(study, job, trials)


def _finished(study: Any) -> int:
    """Trials that count towards --trials: completed, pruned, or failed by themselves (a trial
    that was killed with its study is retried instead)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    killed = set(study.user_attrs.get(INTERRUPTED, []))
    trials = study.get_trials(deepcopy=False, states=states)
    # Studies from before INTERRUPTED was a study attribute marked the trial itself.
    return sum(t.number not in killed and not t.user_attrs.get("interrupted") for t in trials)


def _optimize(study: Any, job: TuneJob, trials: int) -> None:
    import optuna

    def stop_when_done(study: Any, trial: Any) -> None:
        if _finished(study) >= trials:
            study.stop()

    if _finished(study) >= trials:
        return
    study.optimize(
        job.objective_fn,
        callbacks=[stop_when_done],
        catch=(RuntimeError, ValueError, optuna.exceptions.OptunaError),
    )


def tune(
    space_file: str,
    trials: int,
    budget: str,
    out: str | Path,
    text: str | None = None,
    data: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    storage: str | None = None,
    workers: int = 1,
    pruner: str = "median",
    objective: str = "loss",
    keep_top: int = 0,
    finetune_base: str | None = None,
    instructions: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or continue) a study; returns the summary that the CLI prints as JSON. With
    finetune_base, each trial fine-tunes that run on the instruction files (the fine-tuning
    preset is the base config) and the objective is the held-out response loss."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise GptkitError("gptkit tune needs Optuna: pip install 'gptkit[tune]'") from None
    _check_arguments(trials, workers, objective, finetune_base, instructions)
    space = load_space(space_file)
    parsed = parse_budget(budget)
    base = load_config(config or (preset("finetune") if finetune_base else None), overrides or [])
    _pruner(pruner)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = _data_dir(out, base, text, data, finetune_base)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = _open_study(url, pruner, base.train.seed, own_storage=storage is None)
    job = TuneJob(
        base,
        space,
        parsed,
        out,
        data_dir,
        objective,
        pruner,
        finetune_base=finetune_base,
        instructions=tuple(str(Path(f).resolve()) for f in instructions or []),
    )
    if workers == 1:
        _optimize(study, job, trials)
    else:
        _run_workers(study, job, url, trials, workers, base.train.seed)
    return _report(study, job, keep_top)


def _check_arguments(
    trials: int,
    workers: int,
    objective: str,
    finetune_base: str | None,
    instructions: list[str] | None,
) -> None:
    """Every argument the study needs, checked before it starts."""
    if trials < 1:
        raise GptkitError(f"--trials must be >= 1, got {trials}")
    if workers < 1:
        raise GptkitError(f"--workers must be >= 1, got {workers}")
    if objective not in ("loss", "bits_per_byte"):
        raise GptkitError(f"--objective must be loss or bits_per_byte, got {objective!r}")
    if finetune_base is None:
        return
    if not instructions:
        raise GptkitError(
            "--finetune BASE needs --instructions FILE (JSON or JSONL, Alpaca or chat)"
        )
    if objective == "bits_per_byte":
        raise GptkitError(
            "--objective bits_per_byte is for pretraining; a fine-tune minimises its response loss"
        )
    load_run_config(Path(finetune_base))  # a clear error for a wrong folder before the study
    load_conversations([str(f) for f in instructions])


def _data_dir(
    out: Path, base: Config, text: str | None, data: str | None, finetune_base: str | None
) -> Path | None:
    """The prepared data every trial reads: --text prepared once into out/data, or --data."""
    if text is not None:
        data_dir = out / "data"
        if not (data_dir / "meta.json").exists():
            d = base.data
            prepare([text], data_dir, d.tokenizer, d.vocab_size, d.val_fraction, progress=False)
        return data_dir
    if data is not None:
        return Path(data).resolve()
    if finetune_base is not None:
        return None
    raise GptkitError(
        "no data: pass --text FILE, --data DATA_DIR or --finetune BASE --instructions FILE"
    )


def _open_study(url: str, pruner: str, seed: int, own_storage: bool) -> Any:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="gptkit",
        storage=_storage(url),
        direction="minimize",
        load_if_exists=True,
        pruner=_pruner(pruner),
    )
    # A seeded sampler makes a fresh search repeatable; offset by the trials already run, so a
    # resumed study does not propose its first points again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    if own_storage:
        # Our own SQLite file: nobody else runs trials in it, so a trial left RUNNING was killed
        # with an earlier run of this command. Close it and run its parameters again.
        killed = list(study.user_attrs.get(INTERRUPTED, []))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            killed.append(t.number)
            study.enqueue_trial(t.params, skip_if_exists=False)
        study.set_user_attr(INTERRUPTED, killed)
    return study


def _run_workers(study: Any, job: TuneJob, url: str, trials: int, workers: int, seed: int) -> None:
    """Trials in `workers` processes sharing the study's storage, the cores split among them."""
    job.threads = max(1, (mp.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    # one sampler stream each
    seeds = [seed + 1000 * (k + 1) + len(study.trials) for k in range(workers)]
    procs = [ctx.Process(target=_worker, args=(job, url, trials, s)) for s in seeds]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def _report(study: Any, job: TuneJob, keep_top: int) -> dict[str, Any]:
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    done = [t for t in all_trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "completed": len(done),
        "pruned": sum(t.state == TrialState.PRUNED for t in all_trials),
        "failed": sum(
            t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") for t in all_trials
        ),
        "interrupted": sum(bool(t.user_attrs.get("interrupted")) for t in all_trials),
        "best_value": None,
        "best_params": None,
        "best_config": None,
    }
    _print_table(all_trials, job.objective)
    if not done:
        return summary
    best = study.best_trial
    best_file = job.out / "best.yaml"
    job.config_for(best.params).save(best_file)
    summary.update(best_value=best.value, best_params=best.params, best_config=str(best_file))
    _plots(study, job.out)
    if keep_top > 0:
        keep = {t.number for t in sorted(done, key=lambda t: t.value)[:keep_top]}
        for t in all_trials:
            if t.number not in keep:
                shutil.rmtree(job.out / "trials" / f"trial-{t.number:04d}", ignore_errors=True)
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_table(trials: list[Any], objective: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trials")
    for col in ("#", "state", objective, "params"):
        table.add_column(col)
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        table.add_row(str(t.number), t.state.name.lower(), value, json.dumps(t.params))
    Console(stderr=True).print(table)


def _plots(study: Any, out: Path) -> None:
    """Optimisation history, parameter importances and parallel coordinates as PNG files."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    plots = {
        "history.png": ov.plot_optimization_history,
        "importances.png": ov.plot_param_importances,
        "parallel_coordinates.png": ov.plot_parallel_coordinate,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        for name, fn in plots.items():
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(out / name, dpi=100)
                plt.close(fig)
            except Exception as e:  # too few trials for importances, and the like
                print(f"gptkit: skipped {name}: {e}", flush=True)
