"""Int8 and int4 quantized Linear layers, for fast decoding on the CPU.

Decoding one token at batch 1 reads every weight once, so its speed is the speed at which the
weights stream from memory: int8 weights are a quarter of fp32's bytes. Each output channel
(a row of a Linear's weight) gets one symmetric scale, absmax / 127, and the matrix product runs
in PyTorch's int8-weight CPU kernel (`_weight_int8pack_mm`: bf16 activations, int8 weights,
per-channel scales). One row at a time -- decoding at batch 1 -- the row's activations are
quantized to int8 as well (over the row's own min and max), and the product runs in fbgemm's
int8 x int8 kernel (`quantized::linear_dynamic`), about twice as fast here; llama.cpp's q8_0
does the same per 32 values. `--activations bf16` keeps every product weight-only. Embeddings,
norms and biases stay fp32; the LM head, the largest matrix of a small model, is quantized too
(a tied head gets its own int8 copy; the embedding lookup keeps the fp32 table).

`--scheme int4` halves the bytes again: groups of 32 weights along a row share a bf16 scale and
zero (w = (q - 8) * scale + zero, q in 0..15, chosen for the group's min and max), through
PyTorch's int4-weight CPU kernel (`_weight_int4pack_mm_for_cpu`). The checkpoint keeps the 4-bit
values two to a byte in plain row order; the kernel's own packed layout is made at load.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT, rope_tables

SCHEMES = ("int8", "int4")


ACTIVATIONS = ("int8", "bf16")


GROUP = 32  # int4: weights per scale and zero
# rows_alone(): set on the thread that checks a draft's guesses
_ROWS_ALONE = threading.local()


@contextlib.contextmanager
def rows_alone() -> Iterator[None]:
    """Inside it, an int8-activation product of several rows runs a row at a time, so that each
    row's numbers are exactly those it gets alone (the kernel quantizes its whole input over one
    range): a speculative verification of k + 1 positions then gives the logits that k + 1
    decoding steps give. The weight is in cache after the first row, but each row still costs
    about what a decoding step's product does."""
    _ROWS_ALONE.on = True
    try:
        yield
    finally:
        _ROWS_ALONE.on = False


class QuantizedLinear(nn.Module):
    """y = x W^T + b through one of PyTorch's quantized CPU kernels: the shape handling, the
    bias and the kernel-side weights made once (and made again after new weights load) are
    here; a subclass holds its weights and computes `_product` of (N, in_features) rows."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel: Any = None  # the kernel-side weights, made at the first call

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach().float())

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._kernel = None  # new weights: the kernel's copy is made again at the next call
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """W in fp32, (out_features, in_features)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        rows = x.reshape(-1, self.in_features)
        # Under a LoRA fine-tune of a quantized base (QLoRA), gradients flow through to x
        y = (_FrozenProduct.apply(rows, self) if x.requires_grad else self._product(rows)).to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


class _FrozenProduct(torch.autograd.Function):
    """y = x W^T with W frozen and quantized: the kernel forward, dL/dx = dL/dy W backward with W
    dequantized for the moment (one layer's fp32 copy at a time, never kept)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.dtype = layer, x.dtype
        # in x's dtype, so that the gradient arrives in it too (not rounded to the kernel's bf16)
        return layer._product(x).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return (grad.float() @ ctx.layer.dequantized()).to(ctx.dtype), None


class Int8Linear(QuantizedLinear):
    """W stored as int8 rows and one bf16 scale per row. int8_activations: a single row's
    product quantizes the row too (see the module's docstring)."""

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.int8_activations = True  # swap_linears sets the run's choice
        # The weight-only kernel reads rows in blocks of 16 values: the odd widths of small
        # models are zero-padded (the weight once, the input each call).
        self.pad = -in_features % 16
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # bf16 scales: the kernel's fast path takes bf16 activations and scales of their dtype.
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None)
        # The scale is rounded to bf16 first, so the int8 values are chosen for the one in use.
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16).float()
        out.weight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        out.scale.copy_(scale)
        out._copy_bias(linear)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One row (batch-1 decoding): straight to the int8 x int8 kernel, bias included, with
        # no reshaping around it -- at 121 products a token, each call's overhead counts.
        if self.int8_activations and x.dtype == torch.float32 and not x.requires_grad:
            rows = x.numel() // self.in_features
            one = rows == 1 or getattr(_ROWS_ALONE, "on", False)
            if one:
                if self._kernel is None:
                    self._make_kernel()
                if self._kernel[1] is None:
                    self._kernel[1] = _fbgemm_pack(self.weight, self.scale, self.bias)
            if one and self._kernel[1] is not False:
                product = _int8_product()
                if rows == 1:
                    return product(x.contiguous(), self._kernel[1])
                x = x.contiguous()
                return torch.cat([product(x[:, t], self._kernel[1]) for t in range(rows)])[None]
        return super().forward(x)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def _make_kernel(self) -> None:
        # [padded weight, fbgemm's packed weight: made at the first single row, or False, and
        # native.py's second packing for several rows at once: made at the first verification]
        self._kernel = [F.pad(self.weight, (0, self.pad)) if self.pad else self.weight, None, None]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self._make_kernel()
        x = F.pad(x, (0, self.pad)) if self.pad else x
        x = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int8pack_mm(x, self._kernel[0], self.scale)


def _scripted_product(
    x: torch.Tensor, w: torch.classes.quantized.LinearPackedParamsBase
) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, w)


@functools.cache
def _int8_product() -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """fbgemm's int8 x int8 product, called through TorchScript where this build has it.
    Called from Python, the op's handling of its packed-weight argument (a TorchScript object)
    costs about 13 us a call, most of it unwinding C++ exceptions (perf); a scripted function
    takes the argument typed. Measured: 5 against 18 us a call for a 16 x 16 matrix (one
    thread); a decode step 10.3 -> 9.4 ms at GPT-2's shape (49 products), 22.0 -> 19.2 ms at
    SmolLM2's (121)."""
    try:
        with warnings.catch_warnings():  # torch.jit.script is marked deprecated
            warnings.simplefilter("ignore")
            return torch.jit.script(_scripted_product)
    except Exception:  # no TorchScript here: the plain call, the same numbers
        return torch.ops.quantized.linear_dynamic


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """The same int8 weights, scales and bias in the layout of PyTorch's int8 x int8 CPU kernel,
    or False where this build has none (the weight-only kernel is used then)."""
    try:
        with warnings.catch_warnings():  # PyTorch's quantized tensors are marked deprecated
            warnings.simplefilter("ignore")
            zeros = torch.zeros(weight.size(0), dtype=torch.long)
            q = torch._make_per_channel_quantized_tensor(weight, scale.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(q, bias)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Int4Linear(QuantizedLinear):
    """W in groups of GROUP along each row: 4-bit values q, and per group a bf16 scale and
    zero, w = (q - 8) * scale + zero. Rows are zero-padded to a whole number of groups, and the
    kernel's output columns to a multiple of 16 (its tile)."""

    scheme = f"int4 g{GROUP}"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        width = -(-in_features // GROUP) * GROUP
        # two 4-bit values a byte: column 2j in the low half, 2j+1 in the high half
        self.register_buffer("weight", torch.zeros(out_features, width // 2, dtype=torch.uint8))
        groups = (out_features, width // GROUP)
        self.register_buffer("scale", torch.ones(groups, dtype=torch.bfloat16))
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = F.pad(linear.weight.detach().float(), (0, out.weight.size(1) * 2 - linear.in_features))
        groups = w.view(w.size(0), -1, GROUP)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        # scale and zero rounded to bf16 first, so the values are chosen for the ones in use
        scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        q = ((groups - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
        q = q.view(w.shape).to(torch.uint8)
        out.weight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        out.scale.copy_(scale)
        out.zero.copy_(zero)
        out._copy_bias(linear)
        return out

    def dequantized(self) -> torch.Tensor:
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=2).flatten(1).float()
        groups = q.view(q.size(0), -1, GROUP)
        w = (groups - 8) * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(q.shape)[:, : self.in_features]

    def _make_kernel(self) -> None:
        # the kernel's packed weight and (groups, columns, 2) scales and zeros
        pad = -self.out_features % 16
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=2).flatten(1)
        q = F.pad(q.to(torch.int32), (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([self.scale, self.zero], dim=2).transpose(0, 1)
        self._kernel = (packed, F.pad(sz, (0, 0, 0, pad)).contiguous())

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self._make_kernel()
        packed, sz = self._kernel
        pad = self.weight.size(1) * 2 - self.in_features
        x = F.pad(x, (0, pad)) if pad else x
        x = x.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
        return y[:, : self.out_features]


def swap_linears(
    model: GPT, quantize: bool, scheme: str = "int8", activations: str = "int8"
) -> GPT:
    """Every nn.Linear of the model replaced by an Int8Linear (or Int4Linear): quantized from
    its weights (quantize=True), or empty, for a quantized checkpoint to load into."""
    kind: type[Int8Linear | Int4Linear] = Int4Linear if scheme == "int4" else Int8Linear
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                new = (
                    kind.from_linear(child)
                    if quantize
                    else kind(child.in_features, child.out_features, child.bias is not None)
                )
                if isinstance(new, Int8Linear):
                    new.int8_activations = activations == "int8"
                setattr(module, name, new)
    return model


def empty_quantized(cfg: ModelConfig, activations: str = "int8") -> GPT:
    """A quantized model for a checkpoint to load into, without ever allocating fp32 Linear
    weights: built on the meta device, its Linears swapped for int8/int4 layers, the rest
    allocated uninitialised (the checkpoint fills it) and the RoPE tables made again."""
    with torch.device("meta"):
        model = GPT(cfg)
    swap_linears(model, quantize=False, scheme=cfg.quantization, activations=activations)
    model.to_empty(device="cpu")
    if cfg.pos_embedding == "rope":
        model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.block_size)
    return model


def unquantize_head(model: GPT) -> None:
    """The LM head back in full precision, for adapting a quantized base: tied to the embedding
    again where the config ties them (its int8 copy was made from that table), else its weights
    dequantized. New tokens' rows train there, and the fused loss needs a plain Linear."""
    head = model.lm_head
    if not isinstance(head, QuantizedLinear):
        return
    linear = nn.Linear(head.in_features, head.out_features, bias=False)
    if model.config.tie_embeddings:
        linear.weight = model.wte.weight
    else:
        linear.weight = nn.Parameter(head.dequantized())
    model.lm_head = linear


def check_device(device: str | torch.device) -> None:
    """The int8 and int4 kernels are CPU ones: say so, and name the fallback, elsewhere."""
    if torch.device(device).type != "cpu":
        raise GptkitError(
            "quantized runs decode on the CPU only (PyTorch's int8/int4-weight kernels); use "
            "--device cpu, "
            f"or the run it was quantized from on {torch.device(device).type}"
        )
