"""What every parameter-efficient method shares: choosing the Linear layers it adapts, freezing
the base, letting the embedding rows of new tokens train, and `Adapters`, the record of what was
done that the training loop, the checkpoint and the merge read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from gptkit.errors import GptkitError
from gptkit.model import GPT

NEW_ROWS = ".new_rows"  # adapter-file suffix for the trainable rows of wte / lm_head


class StepHooks(Protocol):
    """A method that acts in the training loop beyond its forward (AdaLoRA)."""

    def regularizer(self) -> torch.Tensor: ...  # added to each micro-batch's loss

    def after_step(self, step: int) -> None: ...  # after the optimizer step, gradients still there

    def state_tensors(self) -> dict[str, torch.Tensor]: ...  # kept in checkpoints, for resume

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Adapters:
    """What a method did to a model, kept as `model.adapters`: the method, the Linears it adapts,
    the names of its own parameters (what the adapter file keeps), and which embedding matrices
    train only their rows from `new_rows_from` on (new tokens). The optimizers take `row_params`
    apart: weight decay there would move the frozen rows."""

    method: str
    targets: list[str]
    new_rows_from: int
    saved: list[str]
    mergeable: bool = True
    row_params: list[nn.Parameter] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    step_hooks: StepHooks | None = None


def find_targets(model: GPT, targets: list[str], key: str) -> list[str]:
    """The model's Linear layers whose names end with one of `targets`; an unknown one is an
    error naming the config `key` and the choices."""
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if "lm_head" in chosen and model.config.tie_embeddings:
        raise GptkitError(
            f"{key}: lm_head shares its weight with the token embedding here (tied), so an "
            "adapter on it could not be merged; leave lm_head out"
        )
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            names = sorted(
                {n.split(".", 2)[-1] for n in linears if n.startswith("blocks.")} | {"lm_head"}
            )
            raise GptkitError(
                f"{key}: {t!r} names no Linear layer of this model; choose from {', '.join(names)}"
            )
    return chosen


def is_linear(m: nn.Module) -> bool:
    """A Linear, or the int8/int4 layer that holds one's weights in a quantized base."""
    return isinstance(m, nn.Linear) or bool(getattr(m, "scheme", ""))


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: GPT) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def finish(
    model: GPT,
    method: str,
    targets: list[str],
    base_vocab_size: int | None,
    mergeable: bool = True,
    step_hooks: StepHooks | None = None,
) -> Adapters:
    """After a method froze the base and added its trainable parameters: record them, let the
    embedding rows from base_vocab_size on train, and keep the record as model.adapters."""
    saved = [n for n, p in model.named_parameters() if p.requires_grad]
    start = base_vocab_size if base_vocab_size is not None else model.config.vocab_size
    adapters = Adapters(method, targets, start, saved, mergeable, _new_row_params(model, start))
    adapters.step_hooks = step_hooks
    for p in adapters.row_params:
        p.requires_grad_(True)
        adapters.hooks.append(
            p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:start]), g[start:]]))
        )
    model.adapters = adapters
    return adapters


def _new_row_params(model: GPT, start: int) -> list[nn.Parameter]:
    """wte and an untied head, when the vocabulary grew past the base's."""
    if start >= model.config.vocab_size:
        return []
    params = [model.wte.weight]
    if not model.config.tie_embeddings:
        head = model.lm_head
        params.append(head.weight if isinstance(head, nn.Linear) else head.base.weight)
    return params
