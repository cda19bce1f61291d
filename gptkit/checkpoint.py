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

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import Config, load_config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer, load_tokenizer

CKPT = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "optimizer.safetensors"


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / CKPT).is_dir()


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


def optimizer_to_flat(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state dicts -> tensors (for safetensors) + JSON-able metadata, no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []
    for k, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for name, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim{k}.{idx}.{name}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(idx), {})[name] = value
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars, "indices": [str(i) for i in sd["state"]]})
    return tensors, meta


def optimizer_from_flat(
    optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: list[dict[str, Any]]
) -> None:
    for k, (opt, m) in enumerate(zip(optimizers, meta)):
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim{k}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, name = key[len(prefix) :].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        for idx, scalars in m["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})


@dataclass
class TrainingState:
    """What a resumed run needs beyond the weights."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # RNG and sampler states
    optimizer_meta: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(
    run_dir: Path,
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    state: TrainingState,
) -> Path:
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / f"{CKPT}.tmp", run_dir / CKPT, run_dir / f"{CKPT}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model.state_dict_for_save(), str(tmp / MODEL_FILE))
    opt_tensors, opt_meta = optimizer_to_flat(optimizers)
    save_file({**opt_tensors, **{f"rng.{k}": v.contiguous() for k, v in state.tensors.items()}}, str(tmp / STATE_FILE))
    info = {"step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s, "optimizers": opt_meta}
    write_state_json(tmp, info, [MODEL_FILE, STATE_FILE])
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


def write_state_json(ckpt: Path, info: dict[str, Any], names: list[str]) -> None:
    """Flush the checkpoint's files to disk and record their sizes and hashes in state.json."""
    files = {}
    for name in names:
        _fsync(ckpt / name)
        files[name] = {"bytes": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)}
    (ckpt / "state.json").write_text(json.dumps({**info, "files": files}, indent=1))
    _fsync(ckpt / "state.json")
    _fsync(ckpt)


def checkpoint_dir(run_dir: Path) -> Path:
    """The latest whole checkpoint; falls back to the previous one if a crash hit mid-swap."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptkitError(f"{run_dir}: no such run folder")
    for name in (CKPT, f"{CKPT}.old"):
        if (run_dir / name / "state.json").is_file():
            return run_dir / name
    raise GptkitError(f"{run_dir}: no checkpoint in this run folder (expected {run_dir / CKPT}/)")


def _read_info(ckpt: Path, verify: bool) -> dict[str, Any]:
    try:
        info = json.loads((ckpt / "state.json").read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise GptkitError(f"{ckpt}/state.json is corrupt ({e}); the checkpoint cannot be used") from None
    for name, expect in files.items():
        p = ckpt / name
        if not p.is_file():
            raise GptkitError(f"{p} is missing; the checkpoint is incomplete")
        if p.stat().st_size != expect["bytes"]:
            raise GptkitError(f"{p} is truncated ({p.stat().st_size} of {expect['bytes']} bytes); the checkpoint is corrupt")
        if verify and _sha256(p) != expect["sha256"]:
            raise GptkitError(f"{p} does not match its recorded checksum; the checkpoint is corrupt")
    return info


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptkitError(f"{path}: cannot read weights ({e}); the checkpoint is corrupt") from None


def load_run_config(run_dir: Path) -> Config:
    f = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise GptkitError(f"{run_dir}: no such run folder")
    if not f.is_file():
        raise GptkitError(f"{run_dir}: not a gptkit run folder (no config.yaml)")
    return load_config(f)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> tuple[GPT, Tokenizer, Config]:
    """The trained model (in eval mode), its tokenizer and its config, from a run folder."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = checkpoint_dir(run_dir)
    _read_info(ckpt, verify)
    tok = load_tokenizer(run_dir / "tokenizer")
    model = GPT(cfg.model)
    try:
        model.load_saved_state(_load_tensors(ckpt / MODEL_FILE))
    except (KeyError, RuntimeError) as e:
        raise GptkitError(f"{ckpt / MODEL_FILE}: weights do not fit the run's config.yaml ({e})") from None
    return model.to(device).eval(), tok, cfg


def load_for_finetune(run_dir: str | Path, block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """A run's weights in a fresh model for further training, optionally with a shorter context
    (the first block_size position embeddings are kept) and a different dropout."""
    import copy

    base, _, cfg = load_model(run_dir, "cpu")
    mcfg = copy.deepcopy(cfg.model)
    mcfg.dropout = dropout
    mcfg.block_size = min(block_size or mcfg.block_size, mcfg.block_size)
    model = GPT(mcfg)
    sd = base.state_dict_for_save()
    if "wpe.weight" in sd:
        sd["wpe.weight"] = sd["wpe.weight"][: mcfg.block_size]
    model.load_saved_state(sd)
    return model.train()


def load_training_state(run_dir: Path, model: GPT, optimizers: list[torch.optim.Optimizer]) -> TrainingState:
    ckpt = checkpoint_dir(run_dir)
    info = _read_info(ckpt, verify=True)
    device = next(model.parameters()).device
    try:
        model.load_saved_state(_load_tensors(ckpt / MODEL_FILE, str(device)))
    except (KeyError, RuntimeError) as e:
        raise GptkitError(f"{ckpt / MODEL_FILE}: weights do not fit the run's config.yaml ({e})") from None
    tensors = _load_tensors(ckpt / STATE_FILE)
    opt_tensors = {k: v.to(device) if not k.endswith(".step") else v for k, v in tensors.items() if k.startswith("optim")}
    optimizer_from_flat(optimizers, opt_tensors, info["optimizers"])
    return TrainingState(
        step=info["step"],
        tokens_seen=info["tokens_seen"],
        elapsed_s=info["elapsed_s"],
        tensors={k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
        optimizer_meta=info["optimizers"],
    )
