"""The training loop: one loop for pretraining and fine-tuning.

AdamW (or Muon + AdamW), warm-up then cosine decay, gradient clipping and accumulation,
optional autocast and torch.compile, periodic evaluation, a progress bar, metrics to
metrics.jsonl and TensorBoard, checkpoints that resume exactly, and a clean stop on
Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gptkit import distributed
from gptkit.checkpoint import (
    BEST_FILE,
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
from gptkit.config import Config, TrainConfig, all_keys, apply_overrides
from gptkit.data import Batches, DataSet, prepare
from gptkit.distributed import DistContext
from gptkit.errors import DivergedError, GptkitError, quote
from gptkit.evaluate import predicted_bytes, summarize, token_losses
from gptkit.model import GPT
from gptkit.optim import build_optimizers, lr_factor
from gptkit.runtime import autocast_context, keep_freed_memory, resolve_dtype
from gptkit.tokenizer import Tokenizer


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
                f"{run_dir} already holds a run; pass --resume {quote(run_dir)} to continue it, --overwrite to replace it, "
                "or choose another --out"
            )
        if not saved and not quiet:
            print(f"gptkit: {run_dir} holds no checkpoint (its run stopped before the first save); starting it afresh")
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "tensorboard", "data", "tokenizer"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png", "config.yaml"):
            (run_dir / name).unlink(missing_ok=True)


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """A run's saved config with --set overrides, checked before anything is written: the model's
    shape cannot change (the weights would not fit), and an explicit train.max_steps replaces the
    time budget unless train.max_time_s is set too (the user asked for steps)."""
    saved = load_run_config(Path(run_dir))
    cfg = apply_overrides(copy.deepcopy(saved), overrides or []).validate()
    changed = [k for k in all_keys(cfg) if k.startswith("model.") and k != "model.dropout" and _get(cfg, k) != _get(saved, k)]
    if changed:
        k = changed[0]
        raise GptkitError(
            f"--resume cannot change {k} ({_get(saved, k)} -> {_get(cfg, k)}): the checkpoint's weights have the old shape; "
            f"start a new run from its weights with --init-from {quote(run_dir)}, or train a new one with --out"
        )
    keys = {o.split("=", 1)[0].strip() for o in overrides or []}
    if "train.max_steps" in keys and "train.max_time_s" not in keys and saved.train.max_time_s > 0:
        cfg.train.max_time_s = 0.0
        print(
            f"gptkit: train.max_steps={cfg.train.max_steps} replaces the run's time budget ({saved.train.max_time_s:g} s); "
            "add --set train.max_time_s=N to keep one"
        )
    return cfg


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def setup_run(
    cfg: Config, run_dir: Path, resume: bool, overwrite: bool, text: str | None, progress: bool, ctx: DistContext | None = None,
    quiet: bool = False,
) -> DataSet:  # fmt: skip
    """Check the run folder and prepare data if asked (rank 0 writes; every rank ends with the same
    config and data set). The config and tokenizer are written once training is sure to start."""
    ctx = ctx or DistContext()
    ctx.on_main(lambda: init_run_folder(run_dir, resume, overwrite, quiet))
    if text is not None and not resume:
        data_dir = run_dir / "data"
        ctx.on_main(lambda: prepare(
            [text], data_dir, cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.val_fraction, overwrite=True, progress=progress
        ))  # fmt: skip
        cfg.data.dir = "data"
    if not cfg.data.dir:
        raise GptkitError("no training data: pass --data DATA_DIR (from `gptkit prepare`) or --text FILE")
    data_path = Path(cfg.data.dir)
    if not data_path.is_absolute():
        data_path = run_dir / data_path if (resume or text is not None) else data_path
    ds = DataSet(data_path)
    if not resume:
        cfg.data.dir = _absolute_or_relative(data_path, run_dir)
        cfg.data.tokenizer = cfg.data.tokenizer if text is not None else ds.tokenizer.kind
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = ds.tokenizer.vocab_size
    elif cfg.model.vocab_size < ds.tokenizer.vocab_size:
        raise GptkitError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({ds.tokenizer.vocab_size}); leave it 0 to take the tokenizer's"
        )
    return ds


def _write_run(run_dir: Path, tok: Tokenizer, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(run_dir / "tokenizer")
    cfg.save(run_dir / "config.yaml")


class TrainData(Protocol):
    """What the training loop needs from its data: pretraining shards and instruction
    examples both provide it, so one loop serves both."""

    tokenizer: Tokenizer
    description: str  # for the start-up line, e.g. "1,003,854 train tokens"

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # (x, y); y == -100: no loss

    def state(self) -> torch.Tensor: ...

    def load_state(self, state: torch.Tensor) -> None: ...

    def evaluate(
        self, model: GPT, batch_size: int, device: torch.device, amp: Any, max_batches: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[float, int, np.ndarray]: ...  # fmt: skip


class ShardData:
    """Pretraining: random windows of the train shard; validation over the val shard."""

    def __init__(self, ds: DataSet, block_size: int, batch_size: int, seed: int, ctx: DistContext | None = None) -> None:
        self.tokenizer = ds.tokenizer
        self.train_tokens, self.val_tokens = ds.split("train"), ds.split("val")
        n = len(self.train_tokens) + len(self.val_tokens)
        if n <= block_size + 1:
            raise GptkitError(
                f"{ds.folder}: the corpus is {n} tokens, shorter than one context window (model.block_size={block_size}); "
                "use a larger corpus or a smaller model.block_size"
            )
        if len(self.val_tokens) < 2:
            raise GptkitError(f"{ds.folder}: the validation split is empty; use a larger --val-fraction or corpus")
        # Every rank draws the global batch from the same generator and keeps its own rows.
        self.batches = Batches(self.train_tokens, block_size, batch_size, seed, "train")
        self.ctx = ctx or DistContext()
        self.rows = self.ctx.shard(batch_size)
        self.description = f"{len(self.train_tokens):,} train tokens"
        self.state, self.load_state = self.batches.state, self.batches.load_state

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.next()
        return x[self.rows], y[self.rows]

    def evaluate(
        self, model: GPT, batch_size: int, device: torch.device, amp: Any, max_batches: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[float, int, np.ndarray]:  # fmt: skip
        # Under DDP each rank scores its share of the windows; the caller sums. FSDP's forward is
        # a collective, so there every rank scores all windows alike.
        split = (self.ctx.rank, self.ctx.world) if self.ctx.enabled and not self.ctx.fsdp else None
        return token_losses(model, self.val_tokens, batch_size, device, amp, max_batches, generator, split)


class MetricsLog:
    """metrics.jsonl always; TensorBoard when it is installed and enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None) -> None:
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            # Rows logged after the checkpoint we resume from are about to be redone.
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= resume_step]
            path.write_text("".join(r + "\n" for r in rows))
        self.file = open(path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, **values: float) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
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
    out = run_dir / "loss.png"
    with warnings.catch_warnings():  # a run name in a script the font lacks (CJK) draws boxes, not warnings
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
            self.task = self.p.add_task("train", total=1.0, completed=done, step=step, loss="-", tps="-")
            self.p.start()

    def update(self, step: int, train_s: float, loss: float | None = None, tps: float | None = None) -> None:
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
        self.t0, self.prior_train_s, self.prior_elapsed_s, self.eval_s = time.perf_counter(), train_s, elapsed_s, 0.0

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
        return f"stops at step {tc.max_steps} or after {tc.max_time_s:g} s of training, whichever comes first"
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
            f"{run_dir} stopped early at step {state.step}: validation loss flat for {state.best['evals_since']} evaluations "
            f"(best at step {state.best['step']}); to go on, raise train.patience or set it to 0 (--set train.patience=0)"
        )
    if reached:
        raise GptkitError(
            f"{run_dir} has already reached its limit ({' and '.join(reached)}); continue it with "
            f"--set train.max_steps=N (which replaces the time budget) or --set train.max_time_s=N (0: no limit)"
        )


def early_stopping_update(state: TrainingState, val_loss: float, min_delta: float) -> bool:
    """Track the best validation loss in state.best; True when this evaluation is the new best.
    A new best must improve on the old by min_delta of it (of 0.1 nats at least, so that losses
    near zero, which keep creeping down long after the answers are right, count as flat)."""
    if not state.best or val_loss < state.best["val_loss"] - min_delta * max(state.best["val_loss"], 0.1):
        state.best = {"step": state.step, "val_loss": val_loss, "evals_since": 0}
        return True
    state.best["evals_since"] += 1
    return False


def divergence_message(
    step: int, loss: float, model: GPT, optimizers: list[torch.optim.Optimizer], tc: TrainConfig, run_dir: Path
) -> str:
    """Say what diverged (the loss alone, or the parameters of which optimizer) and what is on disk."""
    lr_key = {"Muon": f"train.muon_lr={tc.muon_lr:g}"}
    broken = []
    for opt in optimizers:
        params = [q for g in opt.param_groups for q in g["params"]]
        if any(not bool(torch.isfinite(q).all()) for q in params):
            name = type(opt).__name__
            broken.append(f"{name} ({lr_key.get(name, f'train.lr={tc.lr:g}')})")
    what = (
        f"the parameters trained by {' and '.join(broken)} are no longer finite; lower that learning rate "
        "or raise train.warmup_steps"
        if broken
        else "the parameters are still finite, so the forward pass overflowed; try train.dtype=float32, a lower "
        "train.lr or model.logit_softcap"
    )
    if has_checkpoint(run_dir):
        saved = f"the last checkpoint, at step {checkpoint_info(run_dir)['step']}, is kept in {run_dir}"
    else:
        saved = f"no checkpoint was saved (the first is due at step {tc.checkpoint_interval}), so there is nothing to resume"
    return f"training diverged at step {step} (loss {loss}): {what}. {saved[0].upper() + saved[1:]}."


def train(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    text: str | None = None,
    progress: bool = True,
    on_eval: Callable[[int, float], None] | None = None,
    init_from: GPT | None = None,
    quiet: bool = False,
    stop_at: int | None = None,
    data: TrainData | None = None,
) -> TrainResult:
    """Train (or resume) the run in `run_dir` as `cfg` says; returns the final evaluation.

    on_eval(step, val_loss) is called after each periodic evaluation (hyperparameter search
    uses it to prune); init_from starts from given weights instead of a fresh initialisation;
    stop_at pauses the run after that step with a checkpoint, as an interruption would; data
    replaces the config's token shards (fine-tuning passes its instruction examples)."""
    run_dir = Path(run_dir)
    tc = cfg.train
    ctx, device = distributed.setup(tc.device, tc.fsdp, tc.batch_size)
    try:
        result = _train(cfg, run_dir, ctx, device, resume, overwrite, text, progress, on_eval, init_from, quiet, stop_at, data)
        # Every rank leaves together: a rank that tears down gloo while rank 0 still writes its plot
        # aborted now and then ("terminate called without an active exception").
        ctx.barrier()
        return result
    finally:
        distributed.shutdown(ctx)


def _train(
    cfg: Config, run_dir: Path, ctx: DistContext, device: torch.device, resume: bool, overwrite: bool, text: str | None,
    progress: bool, on_eval: Callable[[int, float], None] | None, init_from: GPT | None, quiet: bool, stop_at: int | None,
    data: TrainData | None,
) -> TrainResult:  # fmt: skip
    tc = cfg.train
    quiet = quiet or not ctx.main  # one rank speaks
    if ctx.fsdp and ctx.enabled and (tc.optimizer == "muon" or cfg.lora.enabled or tc.patience):
        raise GptkitError("--fsdp shards every matrix, but Muon, LoRA and early stopping (train.patience) need whole ones "
                          "here; use train.optimizer=adamw without --lora and train.patience=0, or plain data parallelism "
                          "(no --fsdp)")  # fmt: skip
    if data is None:
        ds = setup_run(cfg, run_dir, resume, overwrite, text, progress and ctx.main, ctx, quiet)
        data = ShardData(ds, cfg.model.block_size, tc.batch_size, tc.seed, ctx)
    else:
        ctx.on_main(lambda: init_run_folder(run_dir, resume, overwrite, quiet))
        if hasattr(data, "bind"):
            data.bind(ctx)
    dtype = resolve_dtype(tc.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)

    if init_from is not None and data.tokenizer.vocab_size > init_from.config.vocab_size:
        raise GptkitError(
            f"the data's tokenizer has {data.tokenizer.vocab_size} tokens but the model starts from one with "
            f"{init_from.config.vocab_size}; prepare the data with the base run's tokenizer (data.tokenizer=run:BASE_RUN)"
        )
    model = init_from if init_from is not None else GPT(cfg.model)
    model.to(device)
    state, opt_states = TrainingState(), None
    restart = resume and not has_checkpoint(run_dir)
    if restart:
        resume = False  # it stopped before its first save: start again from its own config
        if not quiet:
            print(f"gptkit: {run_dir} holds no checkpoint yet (its run stopped before the first save); starting it afresh")
    if resume:  # whole weights into the unwrapped model; optimizer state once it is built
        state, opt_states = read_training_state(run_dir, model)
        _refuse_finished(run_dir, state, tc)
        torch.set_rng_state(state.tensors["torch"])
        data.load_state(state.tensors["sampler"])
        if device.type == "cuda" and "cuda" in state.tensors:
            torch.cuda.set_rng_state(state.tensors["cuda"])
    # The command is accepted: only now is anything in the run folder written.
    ctx.on_main(lambda: _write_run(run_dir, data.tokenizer, cfg))
    wrapped = distributed.wrap(model, ctx, device)
    optimizers = build_optimizers(model, tc, device)
    if opt_states is not None:
        distributed.load_full_optimizer_states(model, optimizers, opt_states, ctx)
    step_fn = torch.compile(wrapped) if tc.compile else wrapped
    amp = autocast_context(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # On resume, rows past the checkpoint are about to be redone; on a restart, all of them are.
    log = MetricsLog(run_dir, tc.tensorboard, state.step if resume or restart else None) if ctx.main else None
    byte_lengths = data.tokenizer.token_byte_lengths()
    result = TrainResult(run_dir=run_dir, step=state.step)
    clock = Clock(state.train_s, state.elapsed_s)

    def checkpoint() -> None:
        state.tensors = {"torch": torch.get_rng_state(), "sampler": data.state()}
        if device.type == "cuda":
            state.tensors["cuda"] = torch.cuda.get_rng_state()
        state.elapsed_s, state.train_s = clock.elapsed_s, clock.train_s
        # Gathering is collective under FSDP; writing is rank 0's.
        weights = distributed.gathered_model_state(model, ctx)
        opt_states = distributed.full_optimizer_states(model, optimizers, ctx)
        ctx.on_main(lambda: save_checkpoint(run_dir, model, optimizers, state, weights, opt_states))

    def evaluate(max_batches: int | None = None, gen: torch.Generator | None = None) -> tuple[float, int, int]:
        """Validation (loss sum, predictions, bytes), summed over the ranks that share the work."""
        total, count, predicted = data.evaluate(model, tc.batch_size, device, amp, max_batches, gen)
        n_bytes = predicted_bytes(predicted, byte_lengths)
        if ctx.enabled and not ctx.fsdp:
            total, count, n_bytes = ctx.sum([total, count, n_bytes], device)
        return total, int(count), int(n_bytes)

    if not quiet:
        start = f"resuming at step {state.step} ({state.train_s:.0f} s trained); " if resume else ""
        print(
            f"gptkit: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs/token "
            f"(training), {device.type} {str(dtype).replace('torch.', '')}, {data.description}, "
            f"run folder {run_dir}; {start}{limits(tc)}",
            flush=True,
        )
    bar = _Bar(progress and not quiet, tc, state.step, clock.train_s)
    t_log, tokens_at_log = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    loss_count = 0
    last_eval = clock.train_s  # training time at the last evaluation
    model.train()
    try:
        with _StopFlag() as stop:
            while state.step < tc.max_steps:
                time_frac = clock.train_s / tc.max_time_s if tc.max_time_s else 0.0
                factor = lr_factor(state.step, tc, time_frac)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["base_lr"] * factor
                step_tokens = 0
                for micro in range(tc.grad_accum):
                    x, y = data.next()
                    step_tokens += x.numel() * ctx.world
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with distributed.sync_context(wrapped, ctx, micro == tc.grad_accum - 1), amp:
                        _, loss = step_fn(x, y)
                        scaler.scale(loss / tc.grad_accum).backward()
                    loss_sum += loss.detach() / tc.grad_accum
                if tc.grad_clip > 0:
                    for opt in optimizers:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens_seen += step_tokens
                tokens_at_log += step_tokens
                loss_count += 1

                if state.step % tc.log_interval == 0 or state.step == tc.max_steps:
                    loss_val = ctx.sum([(loss_sum / loss_count).item()], device)[0] / ctx.world
                    loss_sum.zero_()
                    loss_count = 0
                    if not math.isfinite(loss_val):
                        raise DivergedError(divergence_message(state.step, loss_val, model, optimizers, tc, run_dir))
                    now = time.perf_counter()
                    tps = tokens_at_log / max(now - t_log, 1e-9)
                    t_log, tokens_at_log = now, 0
                    if log is not None:
                        log.log(state.step, loss=loss_val, lr=tc.lr * factor, tokens_per_s=tps, elapsed_s=clock.elapsed_s)
                    result.losses.append((state.step, loss_val))
                    bar.update(state.step, clock.train_s, loss_val, tps)
                else:
                    bar.update(state.step, clock.train_s)

                train_s = clock.train_s
                due = state.step % tc.eval_interval == 0 or (tc.eval_every_s > 0 and train_s - last_eval >= tc.eval_every_s)
                if due and state.step < tc.max_steps:
                    last_eval = train_s
                    with clock.evaluating():
                        # eval_batches random batches (a fresh generator: training's RNG is untouched), or all.
                        gen = torch.Generator().manual_seed(tc.seed + state.step) if tc.eval_batches else None
                        total, count, _ = evaluate(tc.eval_batches or None, gen)
                        val_loss = total / count
                        if log is not None:
                            log.log(state.step, val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 700)), train_s=train_s)
                        if not quiet:
                            bar.print(f"step {state.step}: val loss {val_loss:.4f} ({train_s:.0f}s)")
                        if on_eval is not None:
                            on_eval(state.step, val_loss)
                        if tc.patience and early_stopping_update(state, val_loss, tc.min_delta):
                            ctx.on_main(lambda v=val_loss: save_best(run_dir, model, state.step, v))
                    t_log, tokens_at_log = time.perf_counter(), 0  # evaluation time is not training time

                # Out of time, or out of patience: either way the run ends here, saved.
                out_of_time = clock.budget_spent(tc) or (bool(tc.patience) and state.best.get("evals_since", 0) >= tc.patience)
                if stop_at is not None and state.step >= stop_at and state.step < tc.max_steps:
                    stop.signal = "stop_at"
                if ctx.enabled:  # every rank stops (and checkpoints) at the same step
                    signalled, out_of_time = ctx.any([bool(stop.signal), out_of_time], device)
                    stop.signal = stop.signal or ("SIGTERM" if signalled else "")
                if stop.signal or out_of_time or state.step % tc.checkpoint_interval == 0:
                    checkpoint()
                if stop.signal:
                    result.interrupted = stop.signal
                    bar.stop()
                    if not quiet:
                        print(
                            f"gptkit: {stop.signal} received; checkpoint saved at step {state.step}. "
                            f"Continue with: gptkit train --resume {quote(run_dir)}",
                            flush=True,
                        )
                    break
                if out_of_time:
                    break
            if not result.interrupted:
                bar.finish()  # a limit was reached, whichever it was
                checkpoint()
    finally:
        bar.stop()
        if log is not None:
            log.close()

    result.step = state.step
    result.elapsed_s, result.train_s = clock.elapsed_s, clock.train_s
    if not result.interrupted:
        with clock.evaluating():
            total, count, n_bytes = evaluate()
            if tc.patience and state.best and (run_dir / BEST_FILE).is_file():
                if total / count >= state.best["val_loss"]:  # the last weights are not the best: keep those that were
                    load_best(run_dir, model)
                    checkpoint()
                    total, count, n_bytes = evaluate()
                ctx.on_main(lambda: (run_dir / BEST_FILE).unlink())
                result.best_step = state.best["step"] if state.best["val_loss"] <= total / count else state.step
        result.val = summarize(total, count, n_bytes)
        if tc.patience and not quiet:
            why = (
                f"validation loss flat for {state.best['evals_since']} evaluations"
                if state.best.get("evals_since", 0) >= tc.patience
                else "limit reached"
            )
            print(f"gptkit: stopped at step {state.step}: {why}; the run keeps the weights of step {result.best_step}")
        if ctx.main:
            _append_final(run_dir, state.step, result.val)
            plot_losses(run_dir)
        if not quiet:
            print(
                f"gptkit: done at step {state.step} after {result.train_s:.0f} s of training: validation loss "
                f"{result.val['loss']:.4f} (whole split, {result.val['tokens']:,} tokens), bits/byte "
                f"{result.val['bits_per_byte']:.3f}",
                flush=True,
            )
    return result


def _append_final(run_dir: Path, step: int, val: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "final_val_loss": val["loss"], "final_val_bits_per_byte": val["bits_per_byte"]}) + "\n")
