"""Run folders and their checkpoints.

    RUN/config.yaml          the whole configuration (reproduce or resume from the folder alone)
    RUN/tokenizer/           the tokenizer
    RUN/checkpoint/          model.safetensors, optimizer.safetensors (optimizer + RNG + sampler
                             state), state.json (step, sizes and hashes of the two files)
    RUN/metrics.jsonl, RUN/loss.png, RUN/tensorboard/

A checkpoint is written to RUN/checkpoint.tmp, flushed to disk, then swapped in with renames, so
a crash mid-save never leaves a broken latest checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import Config, load_config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.peft.methods import adapter_state, has_adapters, load_adapter_state

CKPT = "checkpoint"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class RunFolder:
    """Every path of a run folder, named once (the layout is in this module's docstring)."""

    root: Path

    def _at(self, name: str) -> Path:
        return Path(self.root) / name

    config = property(lambda self: self._at("config.yaml"))
    tokenizer = property(lambda self: self._at("tokenizer"))
    checkpoint = property(lambda self: self._at(CKPT))
    metrics = property(lambda self: self._at("metrics.jsonl"))
    loss_plot = property(lambda self: self._at("loss.png"))
    tensorboard = property(lambda self: self._at("tensorboard"))
    ranks = property(lambda self: self._at("ranks.json"))  # AdaLoRA: the rank of each matrix


def refuse_nonempty(out: Path, overwrite: bool, choose: str = "choose another --out") -> None:
    """Writers of a whole folder (merge, import, export) keep whatever is there unless told
    otherwise."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GptkitError(f"{out} exists and is not empty; pass --overwrite or {choose}")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Write into a sibling temporary folder; only a complete result replaces `out`."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_run(folder: Path) -> bool:
    return RunFolder(folder).config.is_file() or (folder / CKPT).is_dir()


def has_checkpoint(folder: Path) -> bool:
    """A whole checkpoint (or the previous one, after a crash mid-swap) is there to resume from."""
    return any((Path(folder) / name / "state.json").is_file() for name in (CKPT, f"{CKPT}.old"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_flat(
    states: list[dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state dicts -> tensors (for safetensors) + JSON-able metadata, no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []
    for k, sd in enumerate(states):
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for name, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim{k}.{idx}.{name}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(idx), {})[name] = value
        meta.append(
            {
                "param_groups": sd["param_groups"],
                "scalars": scalars,
                "indices": [str(i) for i in sd["state"]],
            }
        )
    return tensors, meta


def optimizer_from_flat(
    tensors: dict[str, torch.Tensor], meta: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The state dicts optimizer_to_flat stored (index-keyed, as one process's optimizers have
    them)."""
    out = []
    for k, m in enumerate(meta):
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim{k}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, name = key[len(prefix) :].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        for idx, scalars in m["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        out.append({"state": state, "param_groups": m["param_groups"]})
    return out


@dataclass
class TrainingState:
    """What a resumed run needs beyond the weights."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # wall-clock time of the run so far
    train_s: float = 0.0  # of which training (not evaluation): the time budget counts this
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # RNG and sampler states
    # early stopping: {step, val_loss, evals_since}
    best: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    run_dir: Path,
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    state: TrainingState,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint atomically. weights / optimizer_states, when given, are the whole
    tensors gathered from a sharded run; by default they come from model and optimizers."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / f"{CKPT}.tmp", run_dir / CKPT, run_dir / f"{CKPT}.old"
    weights_file, weights = weights_to_save(model, weights)
    opt_tensors, opt_meta = optimizer_to_flat(
        optimizer_states or [opt.state_dict() for opt in optimizers]
    )
    extra = {f"rng.{k}": v.contiguous() for k, v in state.tensors.items()}
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / weights_file))
        save_file({**opt_tensors, **extra}, str(tmp / STATE_FILE))
        info = {
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "elapsed_s": state.elapsed_s,
            "train_s": state.train_s,
            "best": state.best,
            "optimizers": opt_meta,
        }
        write_state_json(tmp, info, [weights_file, STATE_FILE])
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half-written behind
        os_error = _as_os_error(e, tmp)
        if os_error is None:
            raise
        if os_error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise os_error from None
        need = sum(
            t.numel() * t.element_size() for d in (weights, opt_tensors, extra) for t in d.values()
        )
        raise _no_space(run_dir, need) from None
    # Swap: the old checkpoint stays whole until the new one is in place.
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


def _no_space(run_dir: Path, need: int) -> GptkitError:
    """A full disk at a checkpoint: what it needs, what is free, and what is still on disk."""
    kept = "no earlier checkpoint exists"
    if has_checkpoint(run_dir):
        step = read_info(checkpoint_dir(run_dir), False)["step"]
        kept = f"the checkpoint of step {step} is intact"
    return GptkitError(
        f"no space left on the device for the checkpoint in {run_dir}: it needs about "
        f"{need / 1e6:.1f} MB, {shutil.disk_usage(run_dir).free / 1e6:.1f} MB are free; {kept}. "
        "Free some space and run again (with --resume to continue)"
    )


def weights_to_save(
    model: GPT, weights: dict[str, torch.Tensor] | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """The file name and tensors a checkpoint stores: a LoRA run only its adapter (and new
    embedding rows), since the base run holds the rest; else the whole (given or own) weights."""
    if has_adapters(model):
        return ADAPTER_FILE, weights if weights is not None else adapter_state(model)
    return MODEL_FILE, weights if weights is not None else model.state_dict_for_save()


BEST_FILE = "best.safetensors"


def save_best(run_dir: Path, model: GPT, step: int, val_loss: float) -> None:
    """Early stopping keeps the weights of the best evaluation so far in RUN/best.safetensors,
    replaced atomically (one file, one rename)."""
    _, weights = weights_to_save(model)
    tmp = Path(run_dir) / (BEST_FILE + ".tmp")
    save_file(weights, str(tmp), metadata={"step": str(step), "val_loss": repr(val_loss)})
    os.replace(tmp, Path(run_dir) / BEST_FILE)


def load_best(run_dir: Path, model: GPT) -> None:
    """Put the best evaluation's weights (save_best) back into the model."""
    sd = _load_tensors(Path(run_dir) / BEST_FILE, str(next(model.parameters()).device))
    if has_adapters(model):
        load_adapter_state(model, sd)
    else:
        model.load_saved_state(sd)


def _as_os_error(e: Exception, path: Path) -> OSError | None:
    """safetensors reports a failed write as its own error type with the OS error in the text."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) if m else None


def write_state_json(ckpt: Path, info: dict[str, Any], names: list[str]) -> None:
    """Flush the checkpoint's files to disk and record their sizes and hashes in state.json."""
    files = {}
    for name in names:
        _fsync(ckpt / name)
        files[name] = {"bytes": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)}
    (ckpt / "state.json").write_text(json.dumps({**info, "files": files}, indent=1))
    _fsync(ckpt / "state.json")
    _fsync(ckpt)


def write_weights_only(run_dir: Path, sd: dict[str, torch.Tensor]) -> None:
    """A checkpoint of weights alone (an import, a quantization): no optimizer state to resume."""
    (run_dir / CKPT).mkdir()
    save_file(sd, str(run_dir / CKPT / MODEL_FILE))
    info = {"step": 0, "tokens_seen": 0, "elapsed_s": 0.0, "optimizers": [], "weights_only": True}
    write_state_json(run_dir / CKPT, info, [MODEL_FILE])


def checkpoint_dir(run_dir: Path) -> Path:
    """The latest whole checkpoint; falls back to the previous one if a crash hit mid-swap."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptkitError(f"{run_dir}: no such run folder")
    for name in (CKPT, f"{CKPT}.old"):
        if (run_dir / name / "state.json").is_file():
            return run_dir / name
    raise GptkitError(f"{run_dir}: no checkpoint in this run folder (expected {run_dir / CKPT}/)")


def read_info(ckpt: Path, verify: bool) -> dict[str, Any]:
    try:
        info = json.loads((ckpt / "state.json").read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise GptkitError(
            f"{ckpt}/state.json is corrupt ({e}); the checkpoint cannot be used"
        ) from None
    for name, expect in files.items():
        p = ckpt / name
        if not p.is_file():
            raise GptkitError(f"{p} is missing; the checkpoint is incomplete")
        if p.stat().st_size != expect["bytes"]:
            raise GptkitError(
                f"{p} is truncated ({p.stat().st_size} of {expect['bytes']} bytes); the checkpoint "
                "is corrupt"
            )
        if verify and _sha256(p) != expect["sha256"]:
            raise GptkitError(
                f"{p} does not match its recorded checksum; the checkpoint is corrupt"
            )
    return info


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptkitError(f"{path}: cannot read weights ({e}); the checkpoint is corrupt") from None


def load_run_config(run_dir: Path) -> Config:
    f = RunFolder(run_dir).config
    if not Path(run_dir).is_dir():
        raise GptkitError(f"{run_dir}: no such run folder")
    if not f.is_file():
        raise GptkitError(f"{run_dir}: not a gptkit run folder (no config.yaml)")
    return load_config(f)


def load_weights(
    model: GPT, ckpt: Path, device: str | torch.device = "cpu", block_size: int = 0
) -> None:
    """The checkpoint's full weights, or its adapter into a model that already holds the base.
    block_size: keep the first block_size position embeddings (a shorter context)."""
    name = ADAPTER_FILE if has_adapters(model) else MODEL_FILE
    if not (ckpt / name).is_file():
        raise GptkitError(
            f"{ckpt / name} is missing; the checkpoint does not match the run's config.yaml"
        )
    sd = _load_tensors(ckpt / name, str(device))
    if block_size and "wpe.weight" in sd:
        sd["wpe.weight"] = sd["wpe.weight"][:block_size]
    try:
        if has_adapters(model):
            load_adapter_state(model, sd)
        else:
            model.load_saved_state(sd)
    except (KeyError, RuntimeError) as e:
        raise GptkitError(
            f"{ckpt / name}: weights do not fit the run's config.yaml ({e})"
        ) from None


def checkpoint_info(run_dir: str | Path) -> dict[str, Any]:
    """The latest checkpoint's state.json (step, tokens seen, file sizes and checksums), checked
    for completeness but not re-hashed."""
    return read_info(checkpoint_dir(Path(run_dir)), verify=False)


def weights_sha256(run_dir: str | Path) -> str:
    """The recorded checksum of a run's full weights (from state.json, nothing re-read)."""
    info = checkpoint_info(run_dir)
    if MODEL_FILE not in info["files"]:
        raise GptkitError(
            f"{run_dir} holds a LoRA adapter, not full weights; merge it first with: gptkit merge "
            f"{run_dir}"
        )
    return info["files"][MODEL_FILE]["sha256"]


def read_training_state(run_dir: Path, model: GPT) -> tuple[TrainingState, list[dict[str, Any]]]:
    """Load the checkpoint's weights into model (unwrapped, before any sharding) and return the
    training state with the optimizers' whole, index-keyed state dicts."""
    ckpt = checkpoint_dir(run_dir)
    info = read_info(ckpt, verify=True)
    device = next(model.parameters()).device
    load_weights(model, ckpt, device)
    tensors = _load_tensors(ckpt / STATE_FILE)
    opt_tensors = {
        k: v.to(device) if not k.endswith(".step") else v
        for k, v in tensors.items()
        if k.startswith("optim")
    }
    state = TrainingState(
        step=info["step"],
        tokens_seen=info["tokens_seen"],
        elapsed_s=info["elapsed_s"],
        train_s=info.get("train_s", info["elapsed_s"]),  # checkpoints from before train_s was kept
        best=info.get("best", {}),
        tensors={k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
    )
    return state, optimizer_from_flat(opt_tensors, info["optimizers"])
