"""Decoding in one native call a step (csrc/decode.cpp).

Eager PyTorch spends 1-3 us of dispatch and allocation on each small operation, and a decode
step has about fifty of them a layer around its four products (norms, rotary, the cache write,
attention for one query, activations, residuals). At batch 1 on a CPU those add up to as much
time as the products themselves at SmolLM2-135M's 30 narrow layers. The native step runs the
int8 and int4 products in the PyTorch kernels eager decoding calls (fbgemm's int8 x int8, the
int8/int4 weight-only ones), fp32 products as a row-parallel GEMV (MKL's single-row product
reads a large matrix at half the memory bandwidth here), and everything between them as plain
C++ loops.

Several rows in one call -- a speculative verification (rows of one sequence, `step_at`) or one
token for each sequence of a batch (`step_rows`: generate's batches, the serving engine's pool)
-- give each row bit for bit the numbers it gets alone, with the weights read once for all of
them (int8: through a second packing that reproduces fbgemm's single-row numbers,
decode.cpp's Linear::int8_rows). What a step computes for a sequence then does not depend on
the rest of its batch; eager batched int8 quantizes the whole batch's activations with one scale.

The extension is compiled once per machine at its first use (about 30 s on 2 cores; cached by
`torch.utils.cpp_extension` under ~/.cache/torch_extensions) and loaded in a fraction of a second
after that. Where it cannot be built or a model has something it does not cover (adapters over
the weights, dropout in training mode, another device or dtype), decoding stays eager.
`GPTKIT_NATIVE=0` keeps every step eager.

Its numbers are eager decoding's up to the order of a sum (norms, softmax, attention, an fp32
product's row; the quantized products are the same kernels, and the elementwise steps round the
same way): logits agree to ~1e-5 and greedy tokens equal the eager ones on the test models
(tests/test_native.py).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptkit.inference.qlinear import Int4Linear, Int8Linear, _fbgemm_pack
from gptkit.model import GPT, MLP, Block, CausalSelfAttention, KVCache, RMSNorm

SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
# -ffp-contract=off: no fused multiply-adds, so elementwise steps round as PyTorch's do.
# -fopenmp: ATen's parallel_for (its OpenMP runtime, the one PyTorch already loaded)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
MLP_KINDS = {"gelu": 0, "gelu_exact": 1, "relu2": 2, "swiglu": 3}
_BUILD_LOCK = threading.Lock()
# What happened at the build: the seconds it took, or why there is no extension
build_info: dict[str, Any] = {}


def enabled() -> bool:
    return os.environ.get("GPTKIT_NATIVE", "1") != "0"


@functools.cache
def extension() -> Any:
    """The compiled module, or None where it cannot be built (the reason: build_info)."""
    with _BUILD_LOCK:
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            # -march=native: a build per instruction set, for a home folder shared by machines
            isa = torch.backends.cpu.get_cpu_capability().lower()
            module = load(
                f"gptkit_decode_{isa}",
                [str(SOURCE)],
                extra_cflags=FLAGS,
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, a failed build: decode eagerly
            last = (str(e).strip().splitlines() or [""])[-1]  # a build log ends in the reason
            build_info.update(error=f"{type(e).__name__}: {last}")
            print(
                f"gptkit: the native decode step could not be built ({build_info['error']}); "
                "decoding eagerly",
                file=sys.stderr,
            )
            return None
        build_info["seconds"] = round(time.perf_counter() - start, 2)
        if build_info["seconds"] > 2:  # compiled now, not loaded from the cache: say so once
            print(
                f"gptkit: built the native decode step in {build_info['seconds']:.0f} s (once "
                "per machine; GPTKIT_NATIVE=0 decodes eagerly)",
                file=sys.stderr,
            )
        return module


def supported(model: GPT) -> bool:
    """Whether every module of the model is one the native step computes exactly as eager
    decoding does: plain or quantized Linears, the model's own norms, no hooks, no adapters,
    fp32 on the CPU, and no dropout left on."""
    cfg = model.config
    if model.adapters is not None or (model.training and cfg.dropout > 0):
        return False
    if cfg.mlp not in MLP_KINDS or cfg.n_head % cfg.kv_heads:
        return False
    allowed = (GPT, Block, CausalSelfAttention, MLP, RMSNorm, nn.LayerNorm, nn.Embedding,
               nn.Dropout, nn.ModuleList, nn.Linear, Int8Linear, Int4Linear)  # fmt: skip
    for m in model.modules():
        if type(m) not in allowed or m._forward_hooks or m._forward_pre_hooks:
            return False
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype not in (
            torch.float32, torch.bfloat16)):  # fmt: skip
            return False
    return all(p.dtype == torch.float32 for p in model.parameters())


def _linear(decoder: Any, layer: int, which: int, m: nn.Module, int8: list) -> None:
    """Hand one Linear to the native decoder, with the kernel eager decoding would run; an
    int8 x int8 one is also listed in int8."""
    empty = None
    if isinstance(m, Int8Linear):
        if m._kernel is None:
            m._make_kernel()
        if m.int8_activations and m._kernel[1] is None:
            m._kernel[1] = _fbgemm_pack(m.weight, m.scale, m.bias)
        if m.int8_activations and m._kernel[1] is not False:
            args = (1, m.in_features, m.out_features, 0, empty, empty, empty, m._kernel[1])
            int8.append((layer, which, m))
        else:
            args = (2, m.in_features, m.out_features, m.pad, m._kernel[0], m.bias, m.scale, None)
    elif isinstance(m, Int4Linear):
        if m._kernel is None:
            m._make_kernel()
        packed, sz = m._kernel
        pad = m.weight.size(1) * 2 - m.in_features
        args = (3, m.in_features, m.out_features, pad, packed, m.bias, sz, None)
    else:
        assert isinstance(m, nn.Linear)
        args = (0, m.in_features, m.out_features, 0, m.weight.detach(), _opt(m.bias), empty, None)
    decoder.set_linear(layer, which, *args)


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _norm(m: nn.Module | None) -> list[torch.Tensor]:
    """(weight, bias) of a norm, empty tensors for those it lacks."""
    none = torch.empty(0)
    if m is None:
        return [none, none]
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return [none if w is None else w.detach(), none if b is None else b.detach()]


class NativeDecoder:
    """One decode step in a single native call; see the module's docstring."""

    def __init__(self, model: GPT, ext: Any) -> None:
        cfg = model.config
        qk = 2 if cfg.qk_norm_weight else (1 if cfg.qk_norm else 0)
        rope = cfg.pos_embedding == "rope"
        ints = [cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.n_embd, cfg.vocab_size,
                int(cfg.norm == "rmsnorm"), MLP_KINDS[cfg.mlp], qk, int(rope),
                int(model.wpe is not None), cfg.mlp_hidden]  # fmt: skip
        none = torch.empty(0)
        tables = [
            model.wte.weight.detach(),
            model.wpe.weight.detach() if model.wpe is not None else none,
            model.rope_cos if rope else none,
            model.rope_sin if rope else none,
            *_norm(model.ln_f),
        ]
        self._d = ext.Decoder(ints, cfg.norm_eps, cfg.logit_softcap, tables)
        self._int8: list[tuple[int, int, Int8Linear]] = []  # int8 x int8 Linears, for _rows
        self._rows = False  # whether they have their several-row packing
        for i, b in enumerate(model.blocks):
            a = b.attn
            gains = [_norm(a.q_norm)[0], _norm(a.k_norm)[0]]
            self._d.set_norms(i, _norm(b.ln_1) + _norm(b.ln_2) + gains)
            for which, m in enumerate((a.c_attn, a.c_proj, b.mlp.c_fc, b.mlp.c_proj)):
                _linear(self._d, i, which, m, self._int8)
        _linear(self._d, -1, 0, model.lm_head, self._int8)

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (1, T, V) after tokens (a tensor of T ids) from position cache.pos on, whose
        keys and values go to those slots; advances cache.pos, as GPT.forward does."""
        ids = tokens.flatten().tolist()
        logits = self.step_at(ids, cache.pos, cache.pos, 0, cache.k, cache.v)
        cache.pos += len(ids)
        return logits

    def step_at(
        self, tokens: list[int], pos: int, slot: int, first: int, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Logits (1, T, V) after each of tokens, the first at position pos of its sequence,
        their keys and values going to slots slot.. of k and v (n_layer, 1, n_kv_head, max_len,
        head_dim), the first seeing slots first..slot and each next one more: a row of the
        serving engine's pool left-padded by `first` slots, or a speculative verification (each
        row's logits those it gets decoded alone). Does not move a cache's position."""
        self._ready_for(len(tokens))
        return self._d.step(tokens, pos, slot, first, k, v)

    def step_rows(
        self, tokens: list[int], pos: list[int], first: list[int], slot: int,
        k: torch.Tensor, v: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Logits (B, V) after one token for each of B sequences, the rows of k and v (n_layer,
        B, n_kv_head, max_len, head_dim): sequence b's at position pos[b], its key and value
        written to `slot` of its row, seeing slots first[b]..slot (a left-padded batch, the
        serving engine's pool). Each row's logits are those it gets decoded alone, whatever
        else is in the batch. Does not move a cache's position."""
        self._ready_for(len(tokens))
        return self._d.step_rows(tokens, pos, first, slot, k, v)[0]

    def step_batch(
        self, tokens: torch.Tensor, cache: KVCache, pad: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits (B, 1, V) after one token a row (tokens: (B,)) at cache.pos, rows left-padded
        by pad[b] slots; advances cache.pos, as GPT.forward does."""
        if tokens.numel() == 1 and pad is None:
            return self.step(tokens, cache)
        ids, at = tokens.flatten().tolist(), cache.pos
        first = pad.tolist() if pad is not None else [0] * len(ids)
        logits = self.step_rows(ids, [at - f for f in first], first, at, cache.k, cache.v)
        cache.pos += 1
        return logits.view(len(ids), 1, -1)

    def _ready_for(self, rows: int) -> None:
        """The several-row packing, made at the first call with more than one row."""
        if rows > 1 and not self._rows:
            self._several_rows()

    def _several_rows(self) -> None:
        """Give each int8 x int8 Linear a second packing of its weights (scale 1, a zero column),
        made once per layer and kept with it, through which several rows take one product with
        the numbers each gets alone (decode.cpp: Linear::int8_rows). A verification then reads
        the weights once, not once a row; it costs a second copy of the int8 weights."""
        for layer, which, m in self._int8:
            if m._kernel[2] is None:
                w = torch.cat([m.weight, torch.zeros(m.out_features, 1, dtype=torch.int8)], 1)
                unit = _fbgemm_pack(w, torch.ones(m.out_features), None)
                rowsum = m.weight.sum(1, dtype=torch.int32).float()
                m._kernel[2] = (unit, rowsum, m.scale.float())
            unit, rowsum, wscale = m._kernel[2]
            if unit is not False:
                self._d.set_rows(layer, which, unit, rowsum, wscale, _opt(m.bias))
        self._rows = True


def decoder(model: GPT) -> NativeDecoder | None:
    """A native decoder for this model's decode steps, or None where decoding stays eager
    (GPTKIT_NATIVE=0, a model it does not cover, no compiler)."""
    if not enabled() or not supported(model):
        return None
    ext = extension()
    return None if ext is None else NativeDecoder(model, ext)
