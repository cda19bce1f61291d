"""The training loop: one loop for pretraining and fine-tuning.

AdamW (or Muon + AdamW), warm-up then cosine decay, gradient clipping and accumulation,
optional autocast and torch.compile, periodic evaluation, a progress bar, metrics to
metrics.jsonl and TensorBoard, checkpoints that resume exactly, and a clean stop on
Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gptkit.checkpoint import (
    BEST_FILE,
    RunFolder,
    TrainingState,
    checkpoint_info,
    has_checkpoint,
    is_run,
    load_best,
    load_run_config,
    read_training_state,
    save_best,
    save_checkpoint,
)
from gptkit.config import Config, TrainConfig, all_keys, apply_overrides, load_config
from gptkit.data import Batch, Batches, DataSet, bundled_corpus, default_preset, prepare, windows
from gptkit.errors import DivergedError, GptkitError, quote
from gptkit.evaluate.loss import predicted_bytes, sum_losses, summarize
from gptkit.loader import load_for_finetune, refuse_quantized
from gptkit.model import GPT
from gptkit.runs import read_metrics
from gptkit.runtime import (
    autocast_context,
    cpu_has_fast_bf16,
    cpuinfo,
    keep_freed_memory,
    resolve_dtype,
    user_cache_dir,
)
from gptkit.tokenizer import Tokenizer
from gptkit.training import distributed
from gptkit.training.distill import distill_loss, load_teacher, resolved_teacher
from gptkit.training.distributed import DistContext
from gptkit.training.optim import build_optimizers, lr_factor
from gptkit.training.trackers import Trackers


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val: dict[str, Any] = field(default_factory=dict)  # final evaluation over the whole split
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) as logged
    interrupted: str = ""  # "SIGINT"/"SIGTERM" when a signal stopped the run
    elapsed_s: float = 0.0
    train_s: float = 0.0  # elapsed_s less the time spent in periodic evaluations
    best_step: int = 0  # with early stopping (train.patience): the step whose weights the run keeps
    sample: str = ""  # TrainOptions.sample's text, when given


class _StopFlag:
    """Ctrl-C and SIGTERM set a flag; the loop saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.signal = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _absolute_or_relative(path: Path, run_dir: Path) -> str:
    """Paths inside the run folder are stored relative to it, so the folder can move."""
    path, run_dir = path.resolve(), run_dir.resolve()
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def init_run_folder(run_dir: Path, resume: bool, overwrite: bool, quiet: bool = False) -> None:
    """Refuse to clobber a run unless asked; clear it for --overwrite, or when it stopped before
    its first checkpoint (there is nothing in it to keep or to resume)."""
    if resume:
        if not is_run(run_dir):
            raise GptkitError(f"--resume {run_dir}: not a gptkit run folder (no config.yaml)")
    elif is_run(run_dir):
        saved = has_checkpoint(run_dir)
        if saved and not overwrite:
            raise GptkitError(
                f"{run_dir} already holds a run; pass --resume {quote(run_dir)} to continue it, "
                "--overwrite to replace it, "
                "or choose another --out"
            )
        if not saved and not quiet:
            print(
                f"gptkit: {run_dir} holds no checkpoint (its run stopped before the first save); "
                "starting it afresh"
            )
        for name in (
            "checkpoint",
            "checkpoint.old",
            "checkpoint.tmp",
            "tensorboard",
            "wandb",
            "mlartifacts",
            "data",
            "tokenizer",
        ):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        # a new run is new tracker runs too
        for name in ("metrics.jsonl", "loss.png", "config.yaml", "trackers.json", "mlflow.db"):
            (run_dir / name).unlink(missing_ok=True)


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """A run's saved config with --set overrides, checked before anything is written: the model's
    shape cannot change (the weights would not fit), and an explicit train.max_steps replaces the
    time budget unless train.max_time_s is set too (the user asked for steps)."""
    saved = load_run_config(Path(run_dir))
    refuse_quantized(saved, Path(run_dir), "resume training")
    cfg = apply_overrides(copy.deepcopy(saved), overrides or []).validate()
    changed = [
        k
        for k in all_keys(cfg)
        if k.startswith("model.") and k != "model.dropout" and _get(cfg, k) != _get(saved, k)
    ]
    if changed:
        k = changed[0]
        raise GptkitError(
            f"--resume cannot change {k} ({_get(saved, k)} -> {_get(cfg, k)}): the checkpoint's "
            "weights have the old shape; "
            f"start a new run from its weights with --init-from {quote(run_dir)}, or train a new "
            "one with --out"
        )
    keys = {o.split("=", 1)[0].strip() for o in overrides or []}
    if "train.max_steps" in keys and "train.max_time_s" not in keys and saved.train.max_time_s > 0:
        cfg = cfg.updated({"train.max_time_s": 0.0})
        print(
            f"gptkit: train.max_steps={cfg.train.max_steps} replaces the run's time budget "
            f"({saved.train.max_time_s:g} s); "
            "add --set train.max_time_s=N to keep one"
        )
    return cfg


@dataclass
class NewRun:
    """A new run's whole configuration, resolved once from the command line (new_run_config)."""

    config: Config
    name: str  # the default run folder's name (runs/NAME)
    text: str | None = None  # a text file to prepare into the run folder
    init_from: GPT | None = None  # the base run's weights, for --init-from


def new_run_config(
    config: str | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
    text: str | None = None,
    init_from: str | None = None,
    fsdp: bool = False,
) -> NewRun:
    """`gptkit train`'s configuration, built once: the defaults, then the file (or the bundled CPU
    preset when training from scratch: its schedule is not for fine-tuning, so --init-from starts
    from the plain defaults), then --data and --fsdp, then --set, then --init-from's base run,
    whose architecture and tokenizer the run keeps (the config may shorten the context and set
    dropout). With no data named anywhere the run trains on the bundled tiny Shakespeare."""
    flags = ([f"data.dir={data}"] if data else []) + (["train.fsdp=true"] if fsdp else [])
    cfg = load_config(
        config or (None if init_from else default_preset()), flags + list(overrides or [])
    )
    if not data and not text and not cfg.data.dir:
        text = str(bundled_corpus())
    name = (
        "shakespeare-char"
        if text == str(bundled_corpus())
        else Path(data or text or cfg.data.dir).stem
    )
    if not init_from:
        return NewRun(cfg, name, text)
    model = load_for_finetune(init_from, cfg.model.block_size, cfg.model.dropout)
    cfg = cfg.with_model(model.config)
    if not data:
        cfg = cfg.updated({"data.tokenizer": f"run:{init_from}"})
    return NewRun(cfg, name, text, model)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _shard_data(
    cfg: Config, run_dir: Path, opts: TrainOptions, ctx: DistContext
) -> tuple[Config, ShardData]:
    """Pretraining data, and the run's config resolved against it: the data folder (prepared
    into the run folder from opts.text, rank 0 writing), its tokenizer, and model.vocab_size
    from it. Returns a new config; the caller's is left as it was."""
    changes: dict[str, Any] = {}
    if opts.text is not None and not opts.resume:
        d = cfg.data
        ctx.on_main(
            lambda: prepare(
                [opts.text],
                run_dir / "data",
                d.tokenizer,
                d.vocab_size,
                d.val_fraction,
                overwrite=True,
                progress=opts.progress and ctx.main,
            )
        )
        changes["data.dir"] = "data"
    data_dir = changes.get("data.dir", cfg.data.dir)
    if not data_dir:
        raise GptkitError(
            "no training data: pass --data DATA_DIR (from `gptkit prepare`) or --text FILE"
        )
    data_path = Path(data_dir)
    if not data_path.is_absolute() and (opts.resume or opts.text is not None):
        data_path = run_dir / data_path  # the run's own data/ folder
    ds = DataSet(data_path)
    if not opts.resume:
        changes["data.dir"] = _absolute_or_relative(data_path, run_dir)
        changes["data.tokenizer"] = (
            cfg.data.tokenizer if opts.text is not None else ds.tokenizer.kind
        )
    if cfg.model.vocab_size == 0:
        changes["model.vocab_size"] = ds.tokenizer.vocab_size
    elif cfg.model.vocab_size < ds.tokenizer.vocab_size:
        raise GptkitError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({ds.tokenizer.vocab_size}); leave it 0 to take the tokenizer's"
        )
    cfg = cfg.updated(changes)
    return cfg, ShardData(ds, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)


def _write_run(run_dir: Path, tok: Tokenizer, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(RunFolder(run_dir).tokenizer)
    cfg.save(RunFolder(run_dir).config)


class TrainData(Protocol):
    """What the training loop needs from its data: pretraining shards and instruction
    examples both provide it, so one loop serves both."""

    tokenizer: Tokenizer
    description: str  # for the start-up line, e.g. "1,003,854 train tokens"

    def bind(self, ctx: DistContext) -> None: ...  # under torchrun: this rank's share of batches

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # (x, y); y == -100: no loss

    def state(self) -> torch.Tensor: ...  # the sampler's state, saved in checkpoints

    def load_state(self, state: torch.Tensor) -> None: ...

    # all of the validation data, or a sample
    def val_batches(
        self, batch_size: int, max_batches: int | None = None, gen: torch.Generator | None = None
    ) -> Iterable[Batch]: ...


class ShardData:
    """Pretraining: random windows of the train shard; validation over the val shard."""

    def __init__(self, ds: DataSet, block_size: int, batch_size: int, seed: int) -> None:
        self.tokenizer = ds.tokenizer
        self.train_tokens, self.val_tokens = ds.split("train"), ds.split("val")
        n = len(self.train_tokens) + len(self.val_tokens)
        if n <= block_size + 1:
            raise GptkitError(
                f"{ds.folder}: the corpus is {n} tokens, shorter than one context window "
                f"(model.block_size={block_size}); "
                "use a larger corpus or a smaller model.block_size"
            )
        if len(self.val_tokens) < 2:
            raise GptkitError(
                f"{ds.folder}: the validation split is empty; use a larger --val-fraction or corpus"
            )
        # Every rank draws the global batch from the same generator and keeps its own rows.
        self.batches = Batches(self.train_tokens, block_size, batch_size, seed, "train")
        self.block_size, self.batch_size = block_size, batch_size
        self.ctx = DistContext()
        self.description = f"{len(self.train_tokens):,} train tokens"
        self.state, self.load_state = self.batches.state, self.batches.load_state

    def bind(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.next()
        rows = self.ctx.shard(self.batch_size)
        return x[rows], y[rows]

    def val_batches(
        self, batch_size: int, max_batches: int | None = None, gen: torch.Generator | None = None
    ) -> Iterable[Batch]:
        # Under DDP each rank scores its share of the windows; the caller sums. FSDP's forward is
        # a collective, so there every rank scores all windows alike.
        split = (self.ctx.rank, self.ctx.world) if self.ctx.enabled and not self.ctx.fsdp else None
        return windows(self.val_tokens, self.block_size, batch_size, max_batches, gen, split)


class MetricsLog:
    """metrics.jsonl always; the trackers the run chose (TensorBoard by default, W&B, MLflow)
    get the same rows."""

    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None = None) -> None:
        path = RunFolder(run_dir).metrics
        if resume_step is not None and path.exists():
            # Rows logged after the checkpoint we resume from are about to be redone.
            rows = [
                r
                for r in path.read_text().splitlines()
                if r.strip() and json.loads(r)["step"] <= resume_step
            ]
            path.write_text("".join(r + "\n" for r in rows))
        self.file = open(path, "a")
        self.trackers = Trackers(run_dir, cfg, cfg.train.tensorboard, resume_step)

    def log(self, step: int, **values: float) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        self.trackers.log(step, values)

    def close(self) -> None:
        self.file.close()

    def finish(self, summary: dict[str, Any], checkpoint: Path | None) -> None:
        """The trackers' final metrics (and the checkpoint, when asked), then their end."""
        self.trackers.finish(summary, checkpoint)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    final = [(r["step"], r["final_val_loss"]) for r in rows if "final_val_loss" in r][-1:]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), label="validation (estimate)", marker="o", ms=3)
    if final:
        (step, loss) = final[0]
        ax.plot([step], [loss], "k*", ms=11, label=f"validation, whole split: {loss:.4f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = RunFolder(run_dir).loss_plot
    # a run name in a script the font lacks (CJK) draws boxes, not warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def progress_fraction(step: int, train_s: float, tc: TrainConfig) -> float:
    """How far the run is towards whichever of its limits (steps, time budget) comes first."""
    by_time = train_s / tc.max_time_s if tc.max_time_s > 0 else 0.0
    return min(1.0, max(step / tc.max_steps, by_time))


class _Bar:
    """A rich progress bar showing the step, loss, tokens/s and an ETA towards whichever limit
    (steps or time budget) comes first (nothing when disabled)."""

    def __init__(self, enabled: bool, tc: TrainConfig, step: int, train_s: float) -> None:
        self.p, self.tc = None, tc
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            limit = f"/{tc.max_steps}" + (f" or {tc.max_time_s:g} s" if tc.max_time_s > 0 else "")
            self.p = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("step {task.fields[step]}" + limit),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  ETA"),
                TimeRemainingColumn(),
            )
            done = progress_fraction(step, train_s, tc)
            self.task = self.p.add_task(
                "train", total=1.0, completed=done, step=step, loss="-", tps="-"
            )
            self.p.start()

    def update(
        self, step: int, train_s: float, loss: float | None = None, tps: float | None = None
    ) -> None:
        if self.p is not None:
            fields: dict[str, Any] = {"step": step}
            if loss is not None:
                fields.update(loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
            self.p.update(self.task, completed=progress_fraction(step, train_s, self.tc), **fields)

    def finish(self) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=1.0)

    def print(self, msg: str) -> None:
        if self.p is not None:
            self.p.console.print(msg)
        else:
            print(msg, flush=True)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()


class Clock:
    """Training time and evaluation time kept apart, across resumes: the time budget
    (train.max_time_s) and the learning-rate schedule count training time only."""

    def __init__(self, train_s: float = 0.0, elapsed_s: float = 0.0) -> None:
        self.t0, self.prior_train_s, self.prior_elapsed_s, self.eval_s = (
            time.perf_counter(),
            train_s,
            elapsed_s,
            0.0,
        )

    @property
    def elapsed_s(self) -> float:
        return self.prior_elapsed_s + time.perf_counter() - self.t0

    @property
    def train_s(self) -> float:
        return self.prior_train_s + time.perf_counter() - self.t0 - self.eval_s

    @contextlib.contextmanager
    def evaluating(self) -> Any:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.eval_s += time.perf_counter() - t

    def budget_spent(self, tc: TrainConfig) -> bool:
        return tc.max_time_s > 0 and self.train_s >= tc.max_time_s


def limits(tc: TrainConfig) -> str:
    """The limits of a run in words, for its start-up line."""
    if tc.max_time_s > 0:
        return (
            f"stops at step {tc.max_steps} or after {tc.max_time_s:g} s of training, whichever "
            "comes first"
        )
    return f"stops at step {tc.max_steps} (no time budget)"


def _refuse_finished(run_dir: Path, state: TrainingState, tc: TrainConfig) -> None:
    """A resume with nothing left to do is refused before anything is written."""
    reached = []
    if state.step >= tc.max_steps:
        reached.append(f"step {state.step} of train.max_steps={tc.max_steps}")
    if tc.max_time_s > 0 and state.train_s >= tc.max_time_s:
        reached.append(f"{state.train_s:.0f} s of train.max_time_s={tc.max_time_s:g}")
    if tc.patience and state.best.get("evals_since", 0) >= tc.patience:
        raise GptkitError(
            f"{run_dir} stopped early at step {state.step}: validation loss flat for "
            f"{state.best['evals_since']} evaluations "
            f"(best at step {state.best['step']}); to go on, raise train.patience or set it to 0 "
            "(--set train.patience=0)"
        )
    if reached:
        raise GptkitError(
            f"{run_dir} has already reached its limit ({' and '.join(reached)}); continue it with "
            "--set train.max_steps=N (which replaces the time budget) or --set train.max_time_s=N "
            "(0: no limit)"
        )


def early_stopping_update(state: TrainingState, val_loss: float, min_delta: float) -> bool:
    """Track the best validation loss in state.best; True when this evaluation is the new best.
    A new best must improve on the old by min_delta of it (of 0.1 nats at least, so that losses
    near zero, which keep creeping down long after the answers are right, count as flat)."""
    if not state.best or val_loss < state.best["val_loss"] - min_delta * max(
        state.best["val_loss"], 0.1
    ):
        state.best = {"step": state.step, "val_loss": val_loss, "evals_since": 0}
        return True
    state.best["evals_since"] += 1
    return False


def divergence_message(
    step: int,
    loss: float,
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    tc: TrainConfig,
    run_dir: Path,
) -> str:
    """Say what diverged (the loss alone, or the parameters of which optimizer), what is saved."""
    lr_key = {"Muon": f"train.muon_lr={tc.muon_lr:g}"}
    broken = []
    for opt in optimizers:
        params = [q for g in opt.param_groups for q in g["params"]]
        if any(not bool(torch.isfinite(q).all()) for q in params):
            name = type(opt).__name__
            broken.append(f"{name} ({lr_key.get(name, f'train.lr={tc.lr:g}')})")
    what = (
        f"the parameters trained by {' and '.join(broken)} are no longer finite; lower that "
        "learning rate "
        "or raise train.warmup_steps"
        if broken
        else "the parameters are still finite, so the forward pass overflowed; try "
        "train.dtype=float32, a lower "
        "train.lr or model.logit_softcap"
    )
    if has_checkpoint(run_dir):
        saved = (
            f"the last checkpoint, at step {checkpoint_info(run_dir)['step']}, is kept in {run_dir}"
        )
    else:
        saved = (
            f"no checkpoint was saved (the first is due at step {tc.checkpoint_interval}), so "
            "there is nothing to resume"
        )
    return (
        f"training diverged at step {step} (loss {loss}): {what}. {saved[0].upper() + saved[1:]}."
    )


@dataclass
class TrainOptions:
    """How `train` runs a config (everything that is not saved in config.yaml)."""

    resume: bool = False  # continue the run in run_dir from its last checkpoint
    overwrite: bool = False  # replace a run already in run_dir
    text: str | None = None  # a text file, prepared into RUN/data with data.tokenizer
    progress: bool = True  # a progress bar
    # (step, val_loss) after each periodic evaluation
    on_eval: Callable[[int, float], None] | None = None
    init_from: GPT | None = None  # start from these weights instead of a fresh initialisation
    quiet: bool = False  # no start-up and summary lines
    stop_at: int | None = None  # pause after this step with a checkpoint, as an interruption would
    # replaces the config's token shards (fine-tuning's instruction examples)
    data: TrainData | None = None
    # the run folder -> a sample of text from its final checkpoint, for the trackers and the
    # caller (the CLI samples through the inference package; training never imports it)
    sample: Callable[[Path], str] | None = None


def train(
    cfg: Config, run_dir: str | Path, opts: TrainOptions | None = None, **options: Any
) -> TrainResult:
    """Train (or resume) the run in `run_dir` as `cfg` says; returns the final evaluation.
    Options are a TrainOptions, or its fields as keywords; `cfg` itself is not changed."""
    opts = dataclasses.replace(opts or TrainOptions(), **options)
    if cfg.model.quantization != "none" and not cfg.adapted:
        raise GptkitError(
            f"model.quantization={cfg.model.quantization} is for inference; train in full "
            "precision, then: gptkit quantize RUN --out RUN_Q"
        )
    tc = cfg.train
    ctx, device = distributed.setup(tc.device, tc.fsdp, tc.batch_size)
    threads = torch.get_num_threads()
    try:
        result = Trainer(cfg, Path(run_dir), opts, ctx, device).run()
        # Every rank leaves together: a rank that tears down gloo while rank 0 still writes its plot
        # aborted now and then ("terminate called without an active exception").
        ctx.barrier()
        return result
    finally:
        # train.threads is the run's setting: a caller's later work (another run, in one test
        # session) keeps its own, and with it the same numerics.
        torch.set_num_threads(threads)
        distributed.shutdown(ctx)


def _refuse_with_fsdp(cfg: Config, ctx: DistContext) -> None:
    tc = cfg.train
    if ctx.fsdp and ctx.enabled and (tc.optimizer == "muon" or cfg.adapted or tc.patience):
        raise GptkitError(
            "--fsdp shards every matrix, but Muon, adapters (LoRA, AdaLoRA, bottleneck) and early "
            "stopping (train.patience) need whole ones here; use train.optimizer=adamw, "
            "--method full and train.patience=0, or plain data parallelism (no --fsdp)"
        )


def _configure_process(tc: TrainConfig, device: torch.device) -> None:
    """Process-wide settings a run makes before it builds its model."""
    if device.type == "cpu":
        keep_freed_memory()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)


AUTO_DTYPE_CACHE = "dtype-auto.json"


def measure_cpu_dtype(cfg: Config, budget_s: float = 2.0) -> tuple[torch.dtype, str]:
    """train.dtype=auto on a CPU with fast bf16 (AVX-512 BF16 / AMX): bf16 autocast is not
    always the faster there (issue #22, on another such CPU: 16.5k against 26.0k tokens/s in
    fp32 at the speedrun baseline's shape; here the main job is faster in bf16) -- so time steps of
    this run's shape (its model, batch and optimizer, on random tokens) in each precision,
    interleaved, for about budget_s, and take the faster. Cached per machine, threads, torch
    and shape in the user's cache folder. Returns the dtype and what it was chosen on."""
    tc = cfg.train
    key = json.dumps(
        [cpuinfo("model name"), torch.get_num_threads(), torch.__version__,
         dataclasses.asdict(cfg.model), tc.batch_size, tc.optimizer],
        sort_keys=True,
    )  # fmt: skip
    path = user_cache_dir() / AUTO_DTYPE_CACHE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    got = cached.get(key) if isinstance(cached, dict) else None
    if not isinstance(got, dict) or got.get("dtype") not in ("float32", "bfloat16"):
        got = _time_dtypes(cfg, budget_s)
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = got
        try:  # a cache that cannot be written only costs the measurement next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached))
            tmp.replace(path)
        except OSError:
            pass
        how = "measured at this shape"
    else:
        how = f"measured earlier at this shape, cached in {path}"
    note = (
        f"auto: {got['bfloat16_ms']:.0f} ms a step in bf16 against {got['float32_ms']:.0f} ms "
        f"in fp32, {how}"
    )
    return getattr(torch, got["dtype"]), note


def _time_dtypes(cfg: Config, budget_s: float) -> dict[str, Any]:
    n = torch.get_num_threads()
    settings = {"float32": (torch.float32, n), "bfloat16": (torch.bfloat16, n)}
    ms = _time_steps(cfg, settings, budget_s)
    return {
        "dtype": min(ms, key=ms.__getitem__),
        "float32_ms": ms["float32"],
        "bfloat16_ms": ms["bfloat16"],
    }


def measure_cpu_threads(cfg: Config, dtype: torch.dtype, budget_s: float = 1.0) -> tuple[int, str]:
    """train.threads=0 on a CPU: all the threads torch would use, unless a step on one thread is
    more than 1.5x faster -- which it is when other work keeps a core busy: two intra-op threads
    then wait on the one that shares its core (the speedrun baseline ran 13x slower, 1,600
    against 20,000 tokens/s, with one of two cores taken). Timed at the run's shape at every
    start (load comes and goes, so nothing is cached). Returns the threads and the reason."""
    n = torch.get_num_threads()
    ms = _time_steps(cfg, {"all": (dtype, n), "one": (dtype, 1)}, budget_s)
    # Only a clear loss is acted on: small models often run a little faster on one thread, and a
    # run that changes its threads with the noise would not repeat its own numbers.
    threads = 1 if ms["one"] * 1.5 < ms["all"] else n
    note = (
        f"{threads} of {n} threads: {ms['one']:.0f} ms a step with one against {ms['all']:.0f} "
        f"ms with {n}"
    )
    return threads, note


def _time_steps(
    cfg: Config, settings: dict[str, tuple[torch.dtype, int]], budget_s: float
) -> dict[str, float]:
    """The median milliseconds of a training step of cfg's shape (its model, batch and
    optimizer, on random tokens) under each (dtype, threads) setting, the settings interleaved
    and each first in turn, for about budget_s (at least 2 and at most 6 rounds)."""
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # the run's own seeding is not disturbed
        torch.manual_seed(0)
        model = GPT(cfg.model)
        optimizers = build_optimizers(model, cfg.train, cpu)
        shape = (cfg.train.batch_size, cfg.model.block_size)
        x = torch.randint(0, cfg.model.vocab_size, shape)
        y = torch.randint(0, cfg.model.vocab_size, shape)

        def step(dtype: torch.dtype, threads: int) -> float:
            torch.set_num_threads(threads)
            t = time.perf_counter()
            with autocast_context(cpu, dtype):
                loss = model(x, y)[1]
            assert loss is not None
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {name: [] for name in settings}
        try:
            for setting in settings.values():  # warm-up: first steps allocate
                step(*setting)
            start, rounds = time.perf_counter(), 0
            while rounds < 2 or (time.perf_counter() - start < budget_s and rounds < 6):
                names = list(settings) if rounds % 2 else list(reversed(settings))
                for name in names:
                    times[name].append(step(*settings[name]))
                rounds += 1
        finally:
            torch.set_num_threads(before)
    return {name: 1000 * sorted(v)[len(v) // 2] for name, v in times.items()}


class Trainer:
    """One run in progress: its resolved config, model, optimizers, data, clock and logs. `run`
    is the loop; each of its steps is a small method below."""

    def __init__(
        self, cfg: Config, run_dir: Path, opts: TrainOptions, ctx: DistContext, device: torch.device
    ) -> None:
        _refuse_with_fsdp(cfg, ctx)
        self.run_dir, self.opts, self.ctx, self.device = run_dir, opts, ctx, device
        self.quiet = opts.quiet or not ctx.main  # one rank speaks
        ctx.on_main(lambda: init_run_folder(run_dir, opts.resume, opts.overwrite, self.quiet))
        if opts.data is None:
            cfg, data = _shard_data(cfg, run_dir, opts, ctx)
        else:
            data = opts.data
        data.bind(ctx)
        if cfg.distill.teacher:  # saved absolute: a resume from another folder finds it
            cfg = cfg.updated({"distill.teacher": resolved_teacher(cfg.distill)})
        self.cfg, self.tc, self.data = cfg, cfg.train, data  # from here on the config is read-only
        _configure_process(self.tc, device)
        self._choose_threads_and_precision(device.type == "cpu" and not ctx.enabled)
        self.model = self._initial_model().to(device)
        self.teacher = load_teacher(cfg.distill, data.tokenizer, cfg.model.block_size, device)
        adapters = self.model.adapters
        self.step_hooks = adapters.step_hooks if adapters is not None else None
        self.resumed = opts.resume and has_checkpoint(run_dir)
        restarted = opts.resume and not self.resumed  # it stopped before its first save
        if restarted and not self.quiet:
            print(
                f"gptkit: {run_dir} holds no checkpoint yet (its run stopped before the first "
                "save); starting it afresh"
            )
        self.state, opt_states = (
            self._read_checkpoint() if self.resumed else (TrainingState(), None)
        )
        # The command is accepted: only now is anything in the run folder written.
        ctx.on_main(lambda: _write_run(run_dir, data.tokenizer, cfg))
        self.wrapped = distributed.wrap(self.model, ctx, device)
        self.optimizers = build_optimizers(self.model, self.tc, device, self.model.adapters)
        if opt_states is not None:
            distributed.load_full_optimizer_states(self.model, self.optimizers, opt_states, ctx)
        self.forward = torch.compile(self.wrapped) if self.tc.compile else self.wrapped
        self.amp = autocast_context(device, self.dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        # On resume, rows past the checkpoint are about to be redone; on a restart, all of them are.
        keep_to = self.state.step if self.resumed or restarted else None
        self.log = MetricsLog(run_dir, cfg, keep_to) if ctx.main else None
        self.byte_lengths = data.tokenizer.token_byte_lengths()
        self.result = TrainResult(run_dir=run_dir, step=self.state.step)
        self.clock = Clock(self.state.train_s, self.state.elapsed_s)
        self.bar = _Bar(
            opts.progress and not self.quiet, self.tc, self.state.step, self.clock.train_s
        )
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        self.kl_sum = torch.zeros((), device=device)  # the KL from the teacher, when there is one
        self.grad_norm: torch.Tensor | None = None  # the latest step's, with train.grad_clip > 0
        self.loss_steps = 0
        self.tokens_since_log, self.train_s_at_log = 0, self.clock.train_s
        self.last_eval_s = self.clock.train_s  # training time at the last periodic evaluation

    def _choose_threads_and_precision(self, alone_on_cpu: bool) -> None:
        """On one CPU process, what is faster here is measured (several processes keep the rules:
        every rank must agree without timing): the threads, then the precision."""
        cfg = self.cfg
        self.dtype = resolve_dtype(self.tc.dtype, self.device)
        self.threads_note = self.dtype_note = ""
        if alone_on_cpu and not self.tc.threads and torch.get_num_threads() > 1:
            threads, self.threads_note = measure_cpu_threads(cfg, self.dtype)
            torch.set_num_threads(threads)
        if alone_on_cpu and self.tc.dtype == "auto" and cpu_has_fast_bf16():
            self.dtype, self.dtype_note = measure_cpu_dtype(cfg)

    def _initial_model(self) -> GPT:
        init = self.opts.init_from
        if init is None:
            return GPT(self.cfg.model)
        if self.data.tokenizer.vocab_size > init.config.vocab_size:
            raise GptkitError(
                f"the data's tokenizer has {self.data.tokenizer.vocab_size} tokens but the model "
                f"starts from one with {init.config.vocab_size}; prepare the data with the base "
                "run's tokenizer (data.tokenizer=run:BASE_RUN)"
            )
        return init

    def _read_checkpoint(self) -> tuple[TrainingState, list[dict[str, Any]]]:
        """Resuming: the weights into the unwrapped model, the RNG and sampler states; returns the
        training state and the optimizers' states, loaded once the optimizers are built."""
        state, opt_states = read_training_state(self.run_dir, self.model)
        _refuse_finished(self.run_dir, state, self.tc)
        torch.set_rng_state(state.tensors["torch"])
        self.data.load_state(state.tensors["sampler"])
        if self.step_hooks is not None:
            self.step_hooks.load_state_tensors(
                {k[7:]: v for k, v in state.tensors.items() if k.startswith("method.")}
            )
        if self.device.type == "cuda" and "cuda" in state.tensors:
            torch.cuda.set_rng_state(state.tensors["cuda"])
        return state, opt_states

    # --- the loop ---

    def run(self) -> TrainResult:
        self._announce()
        self.model.train()
        try:
            with _StopFlag() as stop:
                while self.state.step < self.tc.max_steps:
                    factor = self._set_learning_rate()
                    self._optimizer_step()
                    self._log(factor)
                    if self._evaluation_due():
                        self._evaluate_periodically()
                    signalled, limit_reached = self._should_stop(stop)
                    if (
                        signalled
                        or limit_reached
                        or self.state.step % self.tc.checkpoint_interval == 0
                    ):
                        self._checkpoint()
                    if signalled:
                        self._interrupted(stop.signal)
                        break
                    if limit_reached:
                        break
                if not self.result.interrupted:
                    self.bar.finish()  # a limit was reached, whichever it was
                    self._checkpoint()
        except BaseException as e:  # a divergence, a pruned trial: the trackers say why it ended
            if self.log is not None:
                self.result.step = self.state.step
                self.log.finish({**self._summary(), "stopped": f"{type(e).__name__}: {e}"}, None)
            raise
        finally:
            self.bar.stop()
            if self.log is not None:
                self.log.close()
        self.result.step = self.state.step
        self.result.elapsed_s, self.result.train_s = self.clock.elapsed_s, self.clock.train_s
        if not self.result.interrupted:
            self._final_evaluation()
            if self.opts.sample is not None and self.ctx.main:
                self.result.sample = self.opts.sample(self.run_dir)
        if self.log is not None:
            self.log.finish(self._summary(), self._artifact())
        return self.result

    def _summary(self) -> dict[str, Any]:
        """What the trackers keep as the run's final figures."""
        r = self.result
        out: dict[str, Any] = {"step": r.step, "train_s": r.train_s, "interrupted": r.interrupted}
        for k, v in (r.val or {}).items():
            out[f"val_{k}"] = v
        if r.sample:
            out["sample"] = r.sample
        return out

    def _artifact(self) -> Path | None:
        if not self.cfg.track.artifact or self.result.interrupted:
            return None
        return RunFolder(self.run_dir).checkpoint

    def _set_learning_rate(self) -> float:
        time_frac = self.clock.train_s / self.tc.max_time_s if self.tc.max_time_s else 0.0
        factor = lr_factor(self.state.step, self.tc, time_frac)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        return factor

    def _optimizer_step(self) -> None:
        """grad_accum micro-steps, clipping, one step of every optimizer."""
        tc, scaler, hooks = self.tc, self.scaler, self.step_hooks
        for micro in range(tc.grad_accum):
            x, y = self.data.next()
            self.tokens_since_log += x.numel() * self.ctx.world
            self.state.tokens_seen += x.numel() * self.ctx.world
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with distributed.sync_context(self.wrapped, self.ctx, micro == tc.grad_accum - 1):
                with self.amp:
                    objective, loss = self._losses(x, y)
                # a method's own term (AdaLoRA's orthogonality), in fp32, not logged as loss
                if hooks is not None:
                    objective = objective + hooks.regularizer()
                scaler.scale(objective / tc.grad_accum).backward()
            self.loss_sum += loss.detach() / tc.grad_accum
        if tc.grad_clip > 0:
            for opt in self.optimizers:
                scaler.unscale_(opt)
            # kept on the device: read only when a row is logged
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        for opt in self.optimizers:
            scaler.step(opt)
        scaler.update()
        self.state.step += 1
        if hooks is not None:  # AdaLoRA reallocates ranks from this step's gradients
            hooks.after_step(self.state.step)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.loss_steps += 1

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the step minimizes, the cross-entropy logged as its loss): the same, unless a
        teacher is distilled from (training/distill.py)."""
        if self.teacher is None:
            _, loss = self.forward(x, y)
            assert loss is not None
            return loss, loss
        with torch.no_grad():
            teacher_logits, _ = self.teacher(x)
        logits, _ = self.forward(x)
        d = self.cfg.distill
        assert logits is not None and teacher_logits is not None
        objective, ce, kl = distill_loss(
            logits, teacher_logits, y, d.weight, d.temperature, self.data.tokenizer.vocab_size
        )
        self.kl_sum += kl.detach() / self.tc.grad_accum
        return objective, ce

    def _log(self, factor: float) -> None:
        """Every log_interval steps: the mean loss since the last log (one sync), tokens/s of
        training time, a metrics row; a non-finite loss ends the run with DivergedError."""
        step, tc = self.state.step, self.tc
        if step % tc.log_interval and step != tc.max_steps:
            self.bar.update(step, self.clock.train_s)
            return
        loss, kl = (
            v / self.ctx.world
            for v in self.ctx.sum(
                [(self.loss_sum / self.loss_steps).item(), (self.kl_sum / self.loss_steps).item()],
                self.device,
            )
        )
        self.loss_sum.zero_()
        self.kl_sum.zero_()
        self.loss_steps = 0
        if not math.isfinite(loss):
            raise DivergedError(
                divergence_message(step, loss, self.model, self.optimizers, tc, self.run_dir)
            )
        train_s = self.clock.train_s
        tps = self.tokens_since_log / max(train_s - self.train_s_at_log, 1e-9)
        self.tokens_since_log, self.train_s_at_log = 0, train_s
        if self.log is not None:
            row = {"loss": loss, "lr": tc.lr * factor, "tokens_per_s": tps}
            if tc.optimizer == "muon":
                row["lr_muon"] = tc.muon_lr * factor
            if self.grad_norm is not None:  # before clipping, as clip_grad_norm_ returns it
                row["grad_norm"] = float(self.grad_norm)
            if self.teacher is not None:
                row["distill_kl"] = kl
            self.log.log(step, **row, elapsed_s=self.clock.elapsed_s)
        self.result.losses.append((step, loss))
        self.bar.update(step, train_s, loss, tps)

    def _evaluation_due(self) -> bool:
        step, tc = self.state.step, self.tc
        by_time = tc.eval_every_s > 0 and self.clock.train_s - self.last_eval_s >= tc.eval_every_s
        return (step % tc.eval_interval == 0 or by_time) and step < tc.max_steps

    def _evaluate_periodically(self) -> None:
        """A validation estimate on eval_batches random batches (a fresh generator: training's
        RNG is untouched), or on all of it; early stopping keeps the best weights."""
        step, tc = self.state.step, self.tc
        train_s = self.last_eval_s = self.clock.train_s
        with self.clock.evaluating():
            gen = torch.Generator().manual_seed(tc.seed + step) if tc.eval_batches else None
            total, count, _ = self._validation(tc.eval_batches or None, gen)
            val_loss = total / count
            if self.log is not None:
                self.log.log(
                    step,
                    val_loss=val_loss,
                    val_perplexity=math.exp(min(val_loss, 700)),
                    train_s=train_s,
                )
            if not self.quiet:
                self.bar.print(f"step {step}: val loss {val_loss:.4f} ({train_s:.0f}s)")
            if self.opts.on_eval is not None:
                self.opts.on_eval(step, val_loss)
            if tc.patience and early_stopping_update(self.state, val_loss, tc.min_delta):
                self.ctx.on_main(lambda: save_best(self.run_dir, self.model, step, val_loss))

    def _validation(
        self, max_batches: int | None = None, gen: torch.Generator | None = None
    ) -> tuple[float, int, int]:
        """Validation (loss sum, predictions, bytes), summed over the ranks that share the work."""
        batches = self.data.val_batches(self.tc.batch_size, max_batches, gen)
        total, count, predicted = sum_losses(self.model, batches, self.device, self.amp)
        n_bytes = predicted_bytes(predicted, self.byte_lengths)
        if self.ctx.enabled and not self.ctx.fsdp:
            total, count, n_bytes = self.ctx.sum([total, count, n_bytes], self.device)
        return total, int(count), int(n_bytes)

    def _should_stop(self, stop: _StopFlag) -> tuple[bool, bool]:
        """(a signal or stop_at asks to pause, a limit ends the run): the time budget spent, or
        patience run out. Every rank decides alike, so all stop (and checkpoint) at one step."""
        tc, step = self.tc, self.state.step
        out_of_patience = bool(tc.patience) and self.state.best.get("evals_since", 0) >= tc.patience
        limit_reached = self.clock.budget_spent(tc) or out_of_patience
        if self.opts.stop_at is not None and self.opts.stop_at <= step < tc.max_steps:
            stop.signal = "stop_at"
        if self.ctx.enabled:
            signalled, limit_reached = self.ctx.any([bool(stop.signal), limit_reached], self.device)
            stop.signal = stop.signal or ("SIGTERM" if signalled else "")
        return bool(stop.signal), limit_reached

    def _checkpoint(self) -> None:
        state = self.state
        state.tensors = {"torch": torch.get_rng_state(), "sampler": self.data.state()}
        if self.step_hooks is not None:
            for k, v in self.step_hooks.state_tensors().items():
                state.tensors[f"method.{k}"] = v.contiguous().cpu()
        if self.device.type == "cuda":
            state.tensors["cuda"] = torch.cuda.get_rng_state()
        state.elapsed_s, state.train_s = self.clock.elapsed_s, self.clock.train_s
        # Gathering is collective under FSDP; writing is rank 0's.
        weights = distributed.gathered_model_state(self.model, self.ctx)
        opt_states = distributed.full_optimizer_states(self.model, self.optimizers, self.ctx)
        self.ctx.on_main(
            lambda: save_checkpoint(
                self.run_dir, self.model, self.optimizers, state, weights, opt_states
            )
        )

    def _interrupted(self, signal_name: str) -> None:
        self.result.interrupted = signal_name
        self.bar.stop()
        if not self.quiet:
            print(
                f"gptkit: {signal_name} received; checkpoint saved at step {self.state.step}. "
                f"Continue with: gptkit train --resume {quote(self.run_dir)}",
                flush=True,
            )

    # --- start and end ---

    def _announce(self) -> None:
        if self.quiet:
            return
        state, model = self.state, self.model
        start = (
            f"resuming at step {state.step} ({state.train_s:.0f} s trained); "
            if self.resumed
            else ""
        )
        print(
            f"gptkit: {model.num_params() / 1e6:.2f}M parameters, "
            f"{model.flops_per_token() / 1e6:.1f} MFLOPs/token "
            f"(training), {self.device.type} {str(self.dtype).replace('torch.', '')}"
            f"{f' ({self.dtype_note})' if self.dtype_note else ''}"
            f"{f', {self.threads_note}' if self.threads_note else ''}, "
            f"{self.data.description}, "
            f"run folder {self.run_dir}; {start}{limits(self.tc)}",
            flush=True,
        )

    def _final_evaluation(self) -> None:
        """The whole validation split, with the best weights when early stopping kept better ones
        than the last; metrics, loss.png and the summary line."""
        run_dir, state, tc, result = self.run_dir, self.state, self.tc, self.result
        with self.clock.evaluating():
            total, count, n_bytes = self._validation()
            if tc.patience and state.best and (run_dir / BEST_FILE).is_file():
                # the last weights are not the best: keep those that were
                if total / count >= state.best["val_loss"]:
                    load_best(run_dir, self.model)
                    self._checkpoint()
                    total, count, n_bytes = self._validation()
                self.ctx.on_main(lambda: (run_dir / BEST_FILE).unlink())
                result.best_step = (
                    state.best["step"] if state.best["val_loss"] <= total / count else state.step
                )
        result.val = summarize(total, count, n_bytes)
        if tc.patience and not self.quiet:
            flat = state.best.get("evals_since", 0) >= tc.patience
            why = (
                f"validation loss flat for {state.best['evals_since']} evaluations"
                if flat
                else "limit reached"
            )
            print(
                f"gptkit: stopped at step {state.step}: {why}; the run keeps the weights of step "
                f"{result.best_step}"
            )
        if self.ctx.main:
            _append_final(run_dir, state.step, result.val)
            plot_losses(run_dir)
        if not self.quiet:
            print(
                f"gptkit: done at step {state.step} after {result.train_s:.0f} s of training: "
                "validation loss "
                f"{result.val['loss']:.4f} (whole split, {result.val['tokens']:,} tokens), "
                "bits/byte "
                f"{result.val['bits_per_byte']:.3f}",
                flush=True,
            )


def _append_final(run_dir: Path, step: int, val: dict[str, Any]) -> None:
    with open(RunFolder(run_dir).metrics, "a") as f:
        f.write(
            json.dumps(
                {
                    "step": step,
                    "final_val_loss": val["loss"],
                    "final_val_bits_per_byte": val["bits_per_byte"],
                }
            )
            + "\n"
        )
