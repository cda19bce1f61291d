"""The machine a run executes on: which device, which precision, what the hardware does fast,
and the process settings that make training fast there. Every stage imports these from here."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptkit.errors import GptkitError

# Attention in bf16 training on a CPU with contexts up to CPU_SHORT_CONTEXT tokens: "formula"
# writes softmax(QK^T/sqrt(d) + causal bias) V out as two batched matmuls and a softmax
# (model.causal_attention), faster there than SDPA's flash kernel (its backward) and its math
# kernel (which adds checks for fully masked rows): whole steps 1.28x math's at context 128,
# 1.18x flash's at 256 and 1.15x at 512; at 1024 flash is ahead (benchmarks/attention_backend.py).
# "math" and "flash" restrict SDPA to that kernel. In fp32, or with longer contexts, SDPA chooses.
CPU_TRAIN_ATTENTION = "formula"
CPU_SHORT_CONTEXT = 512


@functools.cache
def cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo's first processor ("model name", "flags"); "" where none."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""
    return line.split(":", 1)[1].strip() if ":" in line else ""


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run several times faster than fp32 on this CPU."""
    flags = cpuinfo("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_low_precision_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is fast (CUDA, CPUs with AVX-512 BF16 / AMX); float32 elsewhere, where bf16
    matrix products are emulated: 90x slower than float32 for Muon's batched products on an
    AVX2-only CPU (measured: 186 ms against 2 ms at the main job's shape)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def user_cache_dir() -> Path:
    """Where gptkit keeps what it measured about this machine: $GPTKIT_CACHE_DIR, or
    $XDG_CACHE_HOME/gptkit (~/.cache/gptkit)."""
    if os.environ.get("GPTKIT_CACHE_DIR"):
        return Path(os.environ["GPTKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptkit"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GptkitError(
            f"train.device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptkitError(
            "train.device=cuda but no CUDA GPU is available; use train.device=cpu or auto"
        )
    return dev


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the OS.

    By default glibc serves blocks over 128 KiB-32 MiB with mmap and trims the heap when
    they are freed, so every training step page-faults its activations in again: thousands of
    faults a step at the 4x128 baseline shape, and steps 1.1x-2.6x slower depending on the model
    and the run (benchmarks/allocator.py). Blocks above 32 MiB are still mapped and unmapped;
    the cost is that the process keeps its peak heap. Skipped where the user chose an allocator
    (LD_PRELOAD) or glibc settings (MALLOC_* variables), and off Linux. Returns whether it
    applied."""
    if not sys.platform.startswith("linux") or "LD_PRELOAD" in os.environ:
        return False
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_train_attention(device: torch.device, seq_len: int) -> str | None:
    """CPU_TRAIN_ATTENTION in bf16 training on a CPU with a short context; None elsewhere (SDPA
    with all its kernels)."""
    cpu_bf16_training = (
        device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    )
    return CPU_TRAIN_ATTENTION if cpu_bf16_training and seq_len <= CPU_SHORT_CONTEXT else None


def sdpa_kernels(kind: str | None) -> Any:
    """The SDPA kernels to allow: the one cpu_train_attention named, or all of them (None, or
    "formula" where the formula does not apply)."""
    if kind == "math":
        return sdpa_kernel([SDPBackend.MATH])
    if kind == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()
