"""Int8 weight-only quantization, for fast decoding on the CPU.

Decoding one token at batch 1 reads every weight once, so its speed is the speed at which the
weights stream from memory: int8 weights are a quarter of fp32's bytes. Each output channel
(a row of a Linear's weight) gets one symmetric scale, absmax / 127, and the matrix product runs
in PyTorch's int8-weight CPU kernel (`_weight_int8pack_mm`: fp32 activations, int8 weights,
per-channel scales). Embeddings, norms and biases stay fp32; the LM head, the largest matrix of a
small model, is quantized too (a tied head gets its own int8 copy; the embedding lookup keeps
the fp32 table).

`gptkit quantize RUN --out RUN_Q` writes a run folder whose config says `model.quantization:
int8` and whose checkpoint holds the int8 weights and their scales, loadable without the fp32
ones; every command that samples (generate, chat, serve, eval) loads it as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import Config
from gptkit.errors import GptkitError
from gptkit.model import GPT

SCHEMES = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and one bf16 scale per row."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # bf16 scales: the kernel's fast path takes bf16 activations and scales of their dtype.
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None)
        # The scale is rounded to bf16 first, so the int8 values are chosen for the one in use.
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16).float()
        out.weight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        out.scale.copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach().float())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        # The kernel reads rows in blocks of 16 values: the odd widths of small models are
        # zero-padded (the weight once, the input each call).
        pad = -self.in_features % 16
        weight = self.weight
        if pad:
            if getattr(self, "_padded", None) is None:
                self._padded = F.pad(self.weight, (0, pad))
            weight, x = self._padded, F.pad(x, (0, pad))
        y = torch.ops.aten._weight_int8pack_mm(x, weight, self.scale).to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def swap_linears(model: GPT, quantize: bool) -> GPT:
    """Every nn.Linear of the model replaced by an Int8Linear: quantized from its weights
    (quantize=True), or empty, for a quantized checkpoint to load into."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                new = (
                    Int8Linear.from_linear(child)
                    if quantize
                    else Int8Linear(child.in_features, child.out_features, child.bias is not None)
                )
                setattr(module, name, new)
    return model


def quantize_run(
    run_dir: str | Path, out: str | Path, scheme: str = "int8", overwrite: bool = False
) -> Path:
    """A run -> a new run folder with int8 weights (config, tokenizer, weights-only checkpoint)."""
    # checkpoint.py loads quantized runs through this module: its names are imported here, late.
    from gptkit.checkpoint import (
        load_model,
        load_run_config,
        refuse_nonempty,
        staged_folder,
        write_weights_only,
    )

    run_dir, out = Path(run_dir), Path(out)
    if scheme not in SCHEMES:
        raise GptkitError(f"unknown --scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    cfg = load_run_config(run_dir)
    if cfg.model.quantization != "none":
        raise GptkitError(
            f"{run_dir} is already quantized ({cfg.model.quantization}); quantize the run it "
            "was quantized from"
        )
    if cfg.lora.enabled:
        raise GptkitError(
            f"{run_dir} holds a LoRA adapter; merge it first: gptkit merge {run_dir} --out MERGED, "
            "then quantize MERGED"
        )
    refuse_nonempty(out, overwrite)
    model, _, _ = load_model(run_dir)
    swap_linears(model, quantize=True)
    qcfg = cfg.updated({"model.quantization": scheme})
    with staged_folder(out) as tmp:
        qcfg.save(tmp / "config.yaml")
        shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
        write_weights_only(tmp, model.state_dict_for_save())
    return out


def refuse_quantized(cfg: Config, run_dir: Path, doing: str = "train or fine-tune") -> None:
    """Quantized runs are for inference: one line naming what to use instead."""
    if cfg.model.quantization != "none":
        raise GptkitError(
            f"{run_dir} is quantized ({cfg.model.quantization}) for inference; to {doing}, use "
            "the run it was quantized from"
        )


def check_device(device: str | torch.device) -> None:
    """The int8 kernel is a CPU one: say so, and name the fallback, on any other device."""
    if torch.device(device).type != "cpu":
        raise GptkitError(
            f"int8 runs decode on the CPU only (PyTorch's int8-weight kernel); use --device cpu, "
            f"or the run it was quantized from on {torch.device(device).type}"
        )
