"""The fine-tuning methods behind one interface: `apply_method` adapts a model as a run's config
says (finetune.method: lora, adalora or adapter); `adapter_state` / `load_adapter_state` are
what a checkpoint of such a run stores (the method's own parameters and the new embedding rows);
`merge_adapters` folds LoRA and AdaLoRA updates into plain weights (bottleneck adapters are
layers of their own and cannot be folded)."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptkit.config import Config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.peft.adalora import apply_adalora
from gptkit.peft.base import NEW_ROWS, Adapters, replace
from gptkit.peft.bottleneck import apply_bottleneck
from gptkit.peft.lora import LowRankLinear, apply_lora

TITLES = {
    "full": "full fine-tuning",
    "lora": "LoRA",
    "adalora": "AdaLoRA",
    "adapter": "bottleneck adapters",
}


def apply_method(model: GPT, cfg: Config, base_vocab_size: int | None = None) -> Adapters | None:
    """Adapt `model` for the run `cfg` describes (nothing for full fine-tuning)."""
    method = cfg.finetune.method
    if method == "lora":
        return apply_lora(model, cfg.lora, base_vocab_size)
    if method == "adalora":
        total = cfg.adalora.total_step or cfg.train.max_steps
        return apply_adalora(model, cfg.adalora, total, base_vocab_size)
    if method == "adapter":
        return apply_bottleneck(model, cfg.adapter, base_vocab_size)
    return None


def describe(cfg: Config) -> str:
    m = cfg.finetune.method
    if m == "lora":
        return f"LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}"
    if m == "adalora":
        a = cfg.adalora
        return f"AdaLoRA rank {a.init_r} -> {a.target_r} on {','.join(a.targets)}"
    if m == "adapter":
        a = cfg.adapter
        return f"{a.placement.capitalize()} adapters, bottleneck n_embd/{a.reduction_factor}"
    return TITLES[m]


def has_adapters(model: nn.Module) -> bool:
    return getattr(model, "adapters", None) is not None


def _adapters(model: GPT) -> Adapters:
    if model.adapters is None:
        raise ValueError("the model has no adapters (apply_method)")
    return model.adapters


def parameter_counts(model: GPT) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if model.adapters is not None:  # rows of wte/lm_head that are masked do not train
        n = model.adapters.new_rows_from
        trainable -= sum(p[:n].numel() for p in model.adapters.row_params)
    return {"trainable": trainable, "total": total}


def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """What an adapted run's checkpoint stores: the method's parameters and the new rows."""
    adapters = _adapters(model)
    params = dict(model.named_parameters())
    sd = {n: params[n].detach().contiguous() for n in adapters.saved}
    n = adapters.new_rows_from
    for name, p in zip(("wte", "lm_head"), adapters.row_params):
        sd[name + NEW_ROWS] = p.detach()[n:].contiguous()
    return sd


@torch.no_grad()
def load_adapter_state(model: GPT, sd: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    adapters = _adapters(model)
    rows = list(zip(("wte", "lm_head"), adapters.row_params))
    expected = set(adapters.saved) | {name + NEW_ROWS for name, _ in rows}
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise KeyError(
            f"adapter does not match the model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    n = adapters.new_rows_from
    for name, p in rows:
        p[n:] = sd[name + NEW_ROWS].to(p.dtype)
    for k in adapters.saved:
        params[k].copy_(sd[k])


def merge_adapters(model: GPT) -> GPT:
    """Fold every LoRA or AdaLoRA update into its base weight; returns the same model, plain and
    trainable. Bottleneck adapters cannot be folded: an error says so."""
    adapters = model.adapters
    if adapters is None:
        return model
    if not adapters.mergeable:
        raise GptkitError(
            f"{TITLES[adapters.method]} are layers of their own, not an update of a weight: "
            "they cannot be merged into the base"
        )
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        if not isinstance(module.base, nn.Linear):
            raise GptkitError(
                f"{name} adapts a {module.base.scheme} weight: merging would mean quantizing "
                "again; use the run as it is (generate, chat, serve and eval load it so)"
            )
        replace(model, name, module.merged())
    for hook in adapters.hooks:
        hook.remove()
    model.adapters = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def refuse_adapted(cfg: Config, run: object, doing: str) -> None:
    """Export and quantization need whole weights: one line naming what to do instead."""
    if not cfg.adapted:
        return
    if cfg.finetune.method == "adapter":
        raise GptkitError(
            f"{run} holds bottleneck adapters, layers of their own that cannot be merged into "
            f"weights, so there are no whole weights to {doing}; fine-tune with --method lora or "
            f"adalora (then gptkit merge), or {doing} its base {cfg.finetune.base}"
        )
    raise GptkitError(
        f"{run} holds a {TITLES[cfg.finetune.method]} adapter, not whole weights; merge it first: "
        f"gptkit merge {run} --out MERGED, then {doing} MERGED"
    )
