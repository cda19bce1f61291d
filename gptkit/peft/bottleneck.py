"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP").

A small two-layer network on a sublayer's output h, inside the residual branch:

    h' = h + up(act(down(h)))        down: n_embd -> n_embd / reduction_factor, up back

`houlsby` places one after the attention's output projection and one after the MLP's, in every
block, so h is the sublayer's output; `pfeiffer` one a block, after the MLP (Pfeiffer et al.,
2021, "AdapterFusion"), on the residual stream after the MLP's add (where a post-norm model has
its Add & Norm): x' = x + h, out = x' + up(act(down(x'))). Half the parameters and half the extra
latency. The base stays frozen; with adapter.train_norms the layer
norms train too, as in Houlsby's paper (the `adapters` library leaves them frozen by default).
`up` starts at zero, so the adapted model starts exactly at its base (the paper's near-identity
initialisation taken to its limit, as LoRA's B = 0); `down` from N(0, 0.02^2).

The forward equals the `adapters` library's DoubleSeqBnConfig / SeqBnConfig for the same
weights (tests/test_bottleneck.py runs both). Unlike LoRA, an adapter is a layer of its own,
not an update of a weight: it cannot be merged, so a run that uses one always loads its base
and the adapter, and GGUF export refuses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import AdapterConfig
from gptkit.model import GPT, RMSNorm
from gptkit.peft.base import Adapters, finish, freeze, replace

ACTIVATIONS = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h)))"""

    def __init__(self, n: int, width: int, activation: str, device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(n, width, device=device)
        self.up = nn.Linear(width, n, device=device)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdaptedLinear(nn.Module):
    """A sublayer's output projection followed by an adapter on its output (Houlsby)."""

    def __init__(self, base: nn.Linear, adapter: Bottleneck) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def apply_bottleneck(
    model: GPT, cfg: AdapterConfig, base_vocab_size: int | None = None
) -> Adapters:
    """Freeze the model and add adapters where cfg.placement says; returns what was adapted
    (also kept as model.adapters)."""
    freeze(model)
    n = model.config.n_embd
    width, dev = max(1, n // cfg.reduction_factor), model.wte.weight.device
    chosen, hooks = [], []
    for i, block in enumerate(model.blocks):
        if cfg.placement == "houlsby":
            for place in ("attn.c_proj", "mlp.c_proj"):
                name = f"blocks.{i}.{place}"
                base = model.get_submodule(name)
                replace(model, name, AdaptedLinear(base, Bottleneck(n, width, cfg.activation, dev)))
                chosen.append(name)
        else:  # on the block's output: the residual stream after the MLP's add
            block.adapter = Bottleneck(n, width, cfg.activation, dev)
            hooks.append(block.register_forward_hook(lambda m, args, out: m.adapter(out)))
            chosen.append(f"blocks.{i}")
    if cfg.train_norms:
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                for p in m.parameters():
                    p.requires_grad_(True)
    adapters = finish(model, "adapter", chosen, base_vocab_size, mergeable=False)
    adapters.hooks.extend(hooks)
    return adapters
