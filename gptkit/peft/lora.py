"""LoRA: low-rank adapters on frozen Linear layers (Hu et al., 2021).

    y = W x + (alpha / r) * B (A dropout(x))      A: (r, in), B: (out, r), B starts at zero

Only A and B train, so the model starts exactly at the base and the adapter file is small.
Rows of the token embedding (and an untied head) added for new tokens train too: a frozen
random row could never learn what <|assistant|> means. `merge` folds B A into W and gives back
a plain GPT whose logits equal the adapted model's (gptkit.peft.methods.merge_adapters).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import LoraConfig
from gptkit.model import GPT
from gptkit.peft.base import Adapters, find_targets, finish, freeze, replace


class LowRankLinear(nn.Module):
    """A frozen Linear plus an update scale * B D, D = down() of shape (rank, in): the forward,
    the merge and `weight` that LoRA (D = A) and AdaLoRA (D = diag(E) Q) share. A subclass
    registers lora_B and what down() reads."""

    lora_B: nn.Parameter

    def __init__(self, base: nn.Module, scale: float, dropout: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.dropout = nn.Dropout(dropout)

    def down(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale goes on B (out x rank), not on the (tokens x out) product, dropout only when
        # it drops, and the sum in the product's own kernel (addmm): on a CPU each pass over the
        # whole activation costs about as much as the adapter (a LoRA step 98 -> 92 ms against a
        # separate add, at benchmarks/peft_methods.py's shape).
        low = F.linear(self.dropout(x) if self.dropout.p > 0 else x, self.down())
        y = self.base(x)
        flat = torch.addmm(
            y.reshape(-1, y.size(-1)), low.reshape(-1, low.size(-1)), (self.lora_B * self.scale).t()
        )
        return flat.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.down().float()) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


class LoRALinear(LowRankLinear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, alpha / rank, dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def down(self) -> torch.Tensor:
        return self.lora_A


def apply_lora(model: GPT, cfg: LoraConfig, base_vocab_size: int | None = None) -> Adapters:
    """Freeze the model, wrap the target Linears with adapters, and let the embedding rows from
    base_vocab_size on train. Returns what was adapted (also kept as model.adapters)."""
    chosen = find_targets(model, cfg.targets, "lora.targets")
    freeze(model)
    for name in chosen:
        base = model.get_submodule(name)
        replace(model, name, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
    return finish(model, "lora", chosen, base_vocab_size)
