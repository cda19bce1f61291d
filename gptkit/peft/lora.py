"""LoRA: low-rank adapters on frozen Linear layers (Hu et al., 2021).

    y = W x + (alpha / r) * B (A dropout(x))      A: (r, in), B: (out, r), B starts at zero

Only A and B train, so the model starts exactly at the base and the adapter file is small.
Rows of the token embedding (and an untied head) added for new tokens train too: a frozen
random row could never learn what <|assistant|> means. `merge` folds B A into W and gives back
a plain GPT whose logits equal the adapted model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from gptkit.config import LoraConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT

NEW_ROWS = ".new_rows"  # adapter-file suffix for the trainable rows of wte / lm_head


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale goes on B (out x rank), not on the (tokens x out) product, and dropout only
        # when it drops: on a CPU each whole-activation pass costs about as much as the adapter.
        low = F.linear(self.dropout(x) if self.dropout.p > 0 else x, self.lora_A)
        return torch.add(self.base(x), F.linear(low, self.lora_B * self.scale))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _targets(model: GPT, targets: list[str]) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if "lm_head" in chosen and model.config.tie_embeddings:
        raise GptkitError(
            "lora.targets: lm_head shares its weight with the token embedding here (tied), so an "
            "adapter on it "
            "could not be merged; leave lm_head out"
        )
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            names = sorted(
                {n.split(".", 2)[-1] for n in linears if n.startswith("blocks.")} | {"lm_head"}
            )
            raise GptkitError(
                f"lora.targets: {t!r} names no Linear layer of this model; choose from "
                f"{', '.join(names)}"
            )
    return chosen


@dataclass
class Adapters:
    """What apply_lora did to a model, kept as `model.adapters`: which Linears carry adapters,
    and which embedding matrices train only their rows from `new_rows_from` on (new tokens).
    The optimizers take `row_params` apart: weight decay there would move the frozen rows."""

    targets: list[str]
    new_rows_from: int
    row_params: list[nn.Parameter] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)


def apply_lora(model: GPT, cfg: LoraConfig, base_vocab_size: int | None = None) -> Adapters:
    """Freeze the model, wrap the target Linears with adapters, and let the embedding rows from
    base_vocab_size on train. Returns what was adapted (also kept as model.adapters)."""
    chosen = _targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    start = base_vocab_size if base_vocab_size is not None else model.config.vocab_size
    adapters = Adapters(chosen, start, _new_row_params(model, start))
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
        params.append(
            model.lm_head.weight
            if isinstance(model.lm_head, nn.Linear)
            else model.lm_head.base.weight
        )
    return params


def _adapters(model: GPT) -> Adapters:
    if model.adapters is None:
        raise ValueError("the model has no LoRA adapters (apply_lora)")
    return model.adapters


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def parameter_counts(model: GPT) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if model.adapters is not None:  # rows of wte/lm_head that are masked do not train
        n = model.adapters.new_rows_from
        trainable -= sum(p[:n].numel() for p in model.adapters.row_params)
    return {"trainable": trainable, "total": total}


def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores: A and B of every adapter and the new embedding rows."""
    sd = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".lora_" in n}
    adapters = _adapters(model)
    n = adapters.new_rows_from
    for name, p in zip(("wte", "lm_head"), adapters.row_params):
        sd[name + NEW_ROWS] = p.detach()[n:].contiguous()
    return sd


@torch.no_grad()
def load_adapter_state(model: GPT, sd: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    adapters = _adapters(model)
    rows = list(zip(("wte", "lm_head"), adapters.row_params))
    expected = {n for n in params if ".lora_" in n} | {name + NEW_ROWS for name, _ in rows}
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise KeyError(
            f"adapter does not match the model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    n = adapters.new_rows_from
    for name, p in rows:
        p[n:] = sd[name + NEW_ROWS].to(p.dtype)
    for k, v in sd.items():
        if ".lora_" in k:
            params[k].copy_(v)


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight; returns the same model, plain and trainable."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
    if model.adapters is not None:
        for hook in model.adapters.hooks:
            hook.remove()
        model.adapters = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model
