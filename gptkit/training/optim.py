"""Optimizers and the learning-rate schedule.

AdamW decays matrices only (not biases, gains or embeddings' neighbours of that kind). Muon
(momentum orthogonalised by a Newton-Schulz iteration) trains the hidden matrices, with AdamW
for embeddings, the head and the 1-D parameters, as the speedrun literature does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gptkit.config import TrainConfig
from gptkit.model import GPT
from gptkit.peft.base import Adapters
from gptkit.runtime import fast_low_precision_dtype

WARMUP_TIME_SHARE = 0.1  # with a time budget, warm-up never takes more than this share of it


def lr_factor(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """The learning rate at `step` as a fraction of the peak: linear warm-up, then cosine decay,
    a stable phase and a linear warm-down (wsd), or constant.

    With a time budget (train.max_time_s), time_frac is the share of it spent: progress is
    whichever of steps and time has run further, so the decay ends when the budget does, and
    warm-up ends after at most WARMUP_TIME_SHARE of the budget. The factor is the lower of the
    warm-up ramp and the decay curve, so a run that is slower than its step count assumed (still
    warming up when time runs out) ends annealed all the same."""
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = min(1.0, max((step + 1) / cfg.warmup_steps, time_frac / WARMUP_TIME_SHARE))
    if cfg.schedule == "constant":
        return warm
    floor = cfg.min_lr_ratio
    by_steps = max(0.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    progress = min(1.0, max(by_steps, time_frac))
    if cfg.schedule == "wsd":
        start = 1 - cfg.warmdown_frac
        decay = (
            1.0
            if progress < start
            else 1.0 - (1.0 - floor) * (progress - start) / max(cfg.warmdown_frac, 1e-9)
        )
    else:
        decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return min(warm, decay)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonal matrices with the singular vectors of g, (m, n) or (batch, m, n),
    singular
    values pushed towards 1, by a quintic Newton-Schulz iteration, in bf16 where the hardware
    makes it fast (the iteration tolerates its precision) and in float32 elsewhere."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(fast_low_precision_dtype(g.device))
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batched = x.dim() == 3
    x = x if batched else x[None]
    for _ in range(steps):
        # x <- a x + (b S + c S^2) x with S = x x^T, as two fused multiply-adds: on a CPU the
        # separate scalings and sums cost as much as the matmuls (17 -> 11 ms at the speedrun
        # shape).
        s = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)
    x = x if batched else x[0]
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised, for 2-D hidden weights.
    Matrices of the same shape are orthogonalised together in one batched iteration: on a CPU
    the many small matmuls of one-at-a-time cost more in overhead than in arithmetic."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                grads = [p.grad for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                nesterov = torch.stack(grads).lerp_(torch.stack(bufs), group["momentum"])
                updates = newton_schulz(nesterov).unbind(0)
                # Same update RMS whatever the matrix's aspect ratio.
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, updates, alpha=-group["lr"] * scale)


def build_optimizers(
    model: GPT, cfg: TrainConfig, device: torch.device, adapters: Adapters | None = None
) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon (hidden matrices) + AdamW (everything else). Each group's `base_lr`
    is scaled by lr_factor every step. With LoRA `adapters`, the embeddings of which only the
    new rows train get no weight decay: it would move the frozen rows too."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    partial = {id(p) for p in adapters.row_params} if adapters is not None else set()
    embed_or_head = {n for n in params if n.startswith(("wte", "wpe", "lm_head"))}
    matrices = [p for n, p in params.items() if p.dim() >= 2 and n not in embed_or_head]
    embeddings = [
        p for n, p in params.items() if p.dim() >= 2 and n in embed_or_head and id(p) not in partial
    ]
    vectors = [p for n, p in params.items() if p.dim() < 2 or id(p) in partial]
    adam_kw: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        # One kernel for all parameters. On a CPU PyTorch's default is a Python loop over the
        # tensors: 5.1 ms against 1.2 ms per step at the 4x128 baseline shape, 52 tensors.
        adam_kw["fused"] = True
    if cfg.optimizer == "muon":
        muon = Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum)
        adam = torch.optim.AdamW(
            [
                {"params": embeddings, "weight_decay": cfg.weight_decay},
                {"params": vectors, "weight_decay": 0.0},
            ],
            **adam_kw,
        )
        optimizers: list[torch.optim.Optimizer] = [muon, adam]
    else:
        adam = torch.optim.AdamW(
            [
                {"params": matrices + embeddings, "weight_decay": cfg.weight_decay},
                {"params": vectors, "weight_decay": 0.0},
            ],
            **adam_kw,
        )
        optimizers = [adam]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers
