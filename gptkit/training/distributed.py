"""Data-parallel training on torch.distributed, launched by torchrun: DDP, or FSDP's
per-module `fully_shard` with --fsdp. Nothing here is a home-made engine: the process group,
gradient all-reduce / reduce-scatter and sharded state dicts are PyTorch's own.

`train.batch_size` is the global batch of a micro-step: each of W processes takes its own
batch_size / W rows of it (the same windows a single process would draw, split by rank), so a
run's configuration, its losses and its checkpoints do not depend on how many processes ran it.
Checkpoints are always written whole by rank 0, in the single-process format: they load, and
resume, on any number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from gptkit.errors import GptkitError
from gptkit.runtime import resolve_device

T = TypeVar("T")


class OtherRankFailed(GptkitError):
    """Raised on ranks > 0 when rank 0 reported the error; the CLI exits quietly on it."""


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run fn on rank 0 only; if it fails there, every rank fails (the others quietly)."""
        err: BaseException | None = None
        out = None
        if self.main:
            try:
                out = fn()
            except BaseException as e:  # noqa: BLE001 -- re-raised below, once the others know
                err = e
        if self.enabled:
            flag = torch.tensor([1.0 if err is not None else 0.0])
            dist.all_reduce(flag)  # a CPU tensor: gloo
            if flag.item() and err is None:
                raise OtherRankFailed("rank 0 stopped the run")
        if err is not None:
            raise err
        return out

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Per flag: did any rank raise it? Keeps stop decisions (signals, time budget) in step."""
        if not self.enabled:
            return flags
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def setup(device_name: str, fsdp: bool, batch_size: int) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group when there is one (WORLD_SIZE > 1); else a single process."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(fsdp=fsdp), resolve_device(device_name)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if batch_size % world:
        # The nearest multiple (ties: the lower).
        fits = max(world, (batch_size + (world - 1) // 2) // world * world)
        raise GptkitError(
            f"train.batch_size ({batch_size}) must be divisible by the number of processes "
            f"({world}): it is the global "
            f"batch, split evenly; use e.g. train.batch_size={fits}"
        )
    if fsdp and not _has_fully_shard():
        raise GptkitError(
            "--fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6); this is torch "
            f"{torch.__version__}"
        )
    want_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise GptkitError(
            "train.device=cuda but no CUDA GPU is available; use train.device=cpu or auto"
        )
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if want_cuda else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("GPTKIT_DIST_TIMEOUT_S", "600")))
    try:
        dist.init_process_group(backend, timeout=timeout)
    except Exception as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise GptkitError(
            f"cannot join the process group ({backend}, rendezvous {where}): "
            f"{str(e).splitlines()[0]}; check torchrun's "
            "--rdzv-endpoint (or --master-addr/--master-port) and that every node can reach it"
        ) from None
    return DistContext(rank, world, local, fsdp), device


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP, or FSDP: each block its own shard group, then the root (embeddings, head)."""
    if not ctx.enabled:
        return model
    if ctx.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # type: ignore[attr-defined]
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_context(wrapped: nn.Module, ctx: DistContext, sync: bool) -> Any:
    """Gradient accumulation: skip the all-reduce (or reduce-scatter) on inner micro-steps."""
    if not ctx.enabled:
        return contextlib.nullcontext()
    if ctx.fsdp:
        wrapped.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()  # type: ignore[operator]


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gathered_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the whole weights gathered on rank 0 (a collective: every rank must call it);
    None when the model is not sharded and its own state dict is already whole."""
    if not ctx.fsdp or not ctx.enabled:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options())
    if model.config.tie_embeddings:  # type: ignore[attr-defined]
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in sd.items()}


def _fqn_order(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def full_optimizer_states(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], ctx: DistContext
) -> list[dict[str, Any]]:
    """Each optimizer's state_dict() as one process would have it (index-keyed, whole tensors)."""
    if not ctx.fsdp or not ctx.enabled:
        return [opt.state_dict() for opt in optimizers]
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out = []
    for opt in optimizers:
        full = get_optimizer_state_dict(model, opt, options=_options())
        order = [n for group in _fqn_order(model, opt) for n in group]
        index = {n: i for i, n in enumerate(order)}
        groups = [
            {**g, "params": [index[n] for n in g["params"]]} for g in full.get("param_groups", [])
        ]
        out.append(
            {
                "state": {index[n]: s for n, s in full.get("state", {}).items()},
                "param_groups": groups,
            }
        )
    return out


def load_full_optimizer_states(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    states: list[dict[str, Any]],
    ctx: DistContext,
) -> None:
    """Load whole, index-keyed optimizer states (from any world size) into this run's optimizers."""
    if not ctx.fsdp or not ctx.enabled:
        for opt, sd in zip(optimizers, states):
            opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    for opt, sd in zip(optimizers, states):
        order = [n for group in _fqn_order(model, opt) for n in group]
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
        full = {"state": {order[int(i)]: s for i, s in sd["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
