"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al., 2023).

Each adapted Linear gets an update in SVD form over init_r triplets,

    y = W x + (alpha / init_r) * P diag(E) Q x      Q: (r, in), E: (r, 1), P: (out, r)

and a rank allocator prunes triplets by importance until the average rank a matrix is target_r.
A parameter's importance is s = EMA(|w * grad|) * EMA(| |w * grad| - EMA(|w * grad|) |) (the
smoothed sensitivity times its uncertainty, betas beta1 and beta2); a triplet's is the score of
its singular value plus the means over its column of P and its row of Q. The budget (triplets
kept over all matrices) stays at the initial total for tinit steps, then falls on a cubic curve
to target_r per matrix at total_step - tfinal; every deltaT steps the lowest-scoring triplets
get E = 0. From then on the final pattern is held. The loss gains orth_reg_weight times the mean
over P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F, keeping P and Q near-orthogonal so that E
reads as singular values.

Where the paper and PEFT (peft.AdaLoraConfig, the reference checked in tests/test_adalora.py)
differ, this follows PEFT, so that a PEFT config means the same here: the scale is alpha / init_r
and stays so as ranks fall (the paper divides by the current rank); P and Q start from N(0,
0.02^2) and E at zero; pruned triplets keep their P and Q and only E is masked, so a triplet can
return at a later reallocation. Names: lora_A is Q, lora_E is E, lora_B is P, as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptkit.config import AdaLoraConfig
from gptkit.model import GPT
from gptkit.peft.base import Adapters, find_targets, finish, freeze, replace
from gptkit.peft.lora import LowRankLinear


class SVDLinear(LowRankLinear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        # PEFT divides by (ranknum + 1e-5) with ranknum = init_r throughout
        super().__init__(base, alpha / (rank + 1e-5), dropout)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=dev) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=dev))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank, device=dev) * 0.02)

    def down(self) -> torch.Tensor:
        return self.lora_A * self.lora_E

    def rank(self) -> int:
        return int((self.lora_E != 0).sum())


class RankAllocator:
    """The importance scores, the budget schedule and the masking, for the SVDLinears of one
    model. `after_step(step)` runs after each optimizer step, before the gradients are cleared."""

    def __init__(self, layers: dict[str, SVDLinear], cfg: AdaLoraConfig, total_step: int) -> None:
        self.layers, self.cfg, self.total = layers, cfg, total_step
        self.init_budget = sum(m.lora_E.numel() for m in layers.values())
        self.target_budget = cfg.target_r * len(layers)
        self.sens: dict[str, torch.Tensor] = {}  # EMA of |w * grad|, per parameter
        self.unc: dict[str, torch.Tensor] = {}  # EMA of its deviation from that mean
        self.pattern: dict[str, torch.Tensor] = {}  # the final phase's kept triplets

    def _params(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, m in self.layers.items():
            for p in ("lora_A", "lora_B", "lora_E"):
                out[f"{name}.{p}"] = getattr(m, p)
        return out

    def budget(self, step: int) -> tuple[int, bool]:
        """Triplets to keep at `step`, and whether to mask now."""
        c, end = self.cfg, self.total - self.cfg.tfinal
        if step <= c.tinit:
            return self.init_budget, False
        if step > end:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (end - c.tinit)
        span = self.init_budget - self.target_budget
        return int(span * left**3 + self.target_budget), step % c.deltaT == 0

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, p in self._params().items():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            if name not in self.sens:
                self.sens[name] = torch.zeros_like(p)
                self.unc[name] = torch.zeros_like(p)
            self.sens[name].mul_(b1).add_(ipt, alpha=1 - b1)
            self.unc[name].mul_(b2).add_((ipt - self.sens[name]).abs(), alpha=1 - b2)

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layers:
            s = {p: self.sens[f"{name}.lora_{p}"] * self.unc[f"{name}.lora_{p}"] for p in "ABE"}
            out[name] = s["E"].view(-1) + s["A"].mean(dim=1) + s["B"].mean(dim=0)
        return out

    @torch.no_grad()
    def _mask_to(self, budget: int) -> dict[str, torch.Tensor]:
        scores = self._triplet_scores()
        k = self.init_budget - budget
        if k <= 0:
            return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        keep = {}
        for name, s in scores.items():
            keep[name] = s > threshold
            self.layers[name].lora_E.masked_fill_(~keep[name].view(-1, 1), 0.0)
        return keep

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        end = self.total - self.cfg.tfinal
        if step < end:
            self._update_scores()
            budget, mask_now = self.budget(step)
            if mask_now:
                self._mask_to(budget)
        elif step == end:  # the last reallocation: the pattern is final
            self.pattern = self._mask_to(self.target_budget)
            self.sens, self.unc = {}, {}
        else:
            if not self.pattern:  # resumed past the end from an older checkpoint
                self.pattern = {n: m.lora_E.view(-1) != 0 for n, m in self.layers.items()}
            for name, keep in self.pattern.items():
                self.layers[name].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def regularizer(self) -> torch.Tensor:
        """The mean over P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F, times the weight."""
        terms = []
        for m in self.layers.values():
            for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                eye = torch.eye(cov.size(0), device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.cfg.orth_reg_weight * torch.stack(terms).mean()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"sens.{k}": v for k, v in self.sens.items()}
        out.update({f"unc.{k}": v for k, v in self.unc.items()})
        out.update({f"pattern.{k}": v.to(torch.uint8) for k, v in self.pattern.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, v in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "pattern":
                self.pattern[name] = v.bool()
            elif kind in ("sens", "unc"):
                getattr(self, kind)[name] = v.clone()


def apply_adalora(
    model: GPT, cfg: AdaLoraConfig, total_step: int, base_vocab_size: int | None = None
) -> Adapters:
    """Freeze the model, wrap the target Linears in SVD-form adapters with a rank allocator for a
    schedule of total_step steps. Returns what was adapted (also kept as model.adapters)."""
    chosen = find_targets(model, cfg.targets, "adalora.targets")
    freeze(model)
    layers = {}
    for name in chosen:
        layers[name] = SVDLinear(model.get_submodule(name), cfg.init_r, cfg.alpha, cfg.dropout)
        replace(model, name, layers[name])
    allocator = RankAllocator(layers, cfg, total_step)
    return finish(model, "adalora", chosen, base_vocab_size, step_hooks=allocator)


def ranks(model: GPT) -> dict[str, int]:
    """The rank each adapted matrix has now (its nonzero singular values)."""
    return {n: m.rank() for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def rank_table(ranks: dict[str, int]) -> str:
    """The ranks as a table: one row a block, one column a target ("blocks.3.attn.c_proj")."""
    rows: dict[str, dict[str, int]] = {}
    for name, r in ranks.items():
        block, _, target = (
            name.partition(".")[2].partition(".") if name.startswith("blocks.") else ("-", "", name)
        )
        rows.setdefault(block, {})[target] = r
    cols = sorted({t for row in rows.values() for t in row})
    width = max(len(c) for c in cols)
    lines = ["block  " + "  ".join(c.rjust(width) for c in cols)]
    for block in sorted(rows, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0)):
        cells = (str(rows[block].get(c, "")).rjust(width) for c in cols)
        lines.append(f"{block:>5}  " + "  ".join(cells))
    return "\n".join(lines)
