"""A GPT decoder, as the textbooks draw it.

    x = token embedding + position embedding
    for each of N blocks:
        x = x + Attention(LayerNorm(x))      # causal multi-head self-attention
        x = x + MLP(LayerNorm(x))
    logits = LMHead(LayerNorm(x))            # P(y_t | y_<t) = softmax(logits_t)

The defaults are GPT-2's architecture, so weights convert both ways with Hugging Face
`transformers`. Modern options (RoPE, RMSNorm, QK-norm, ReLU^2/SwiGLU, untied head, logit
soft-capping, grouped-query attention) are config switches, all off by default.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptkit.config import ModelConfig
from gptkit.runtime import cpu_train_attention, sdpa_kernels

Rope = tuple[Tensor, Tensor]  # cos and sin tables of the positions in a forward pass


class RMSNorm(nn.Module):
    """x / rms(x) * weight; no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gain in the input's dtype: under bf16 autocast a float32 gain sends rms_norm down
        # its slow, unfused path.
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotation frequency of each pair of a head's dimensions: base^(-2i/d). With Llama 3's
    scaling, wavelengths longer than the trained context / low_freq_factor turn rope_factor times
    slower, those shorter than context / high_freq_factor stay, and those between blend."""
    d = cfg.head_dim
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "llama3":
        context, factor = cfg.rope_original_context, cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        periods_in_context = context * freqs / (2 * math.pi)  # context / wavelength
        blend = ((periods_in_context - low) / (high - low)).clamp(0.0, 1.0)
        freqs = (1 - blend) * freqs / factor + blend * freqs
    return freqs


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, shape (length, head_dim): dimensions i and i + D/2
    are a pair rotated by the same angle, so each half repeats the frequencies; the sin table
    carries the rotation's signs (-sin on the first half, +sin on the second) for apply_rope."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(cfg))
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1_i, x2_i) = (x_i, x_{i+D/2}) of the head dimension by its position's
    angle: (x1 cos - x2 sin, x2 cos + x1 sin). With rope_tables' signed sin that is
    x * cos + swap_halves(x) * sin, and swapping the halves is a roll by D/2: four kernels
    where splitting and concatenating the halves takes eight. x: (B, T, H, D), cos and sin:
    (T, 1, D), or (B, T, 1, D) when positions differ by row."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


@dataclass
class KVCache:
    """Keys and values of past positions, per layer, so each new token costs one position's work."""

    k: torch.Tensor  # (n_layer, B, n_kv_head, max_len, head_dim)
    v: torch.Tensor
    pos: int = 0  # how many positions are filled
    # Static decoding: a (B,) tensor with the slot each row's one new token goes to. Each step
    # then has the same shapes whatever the position -- it attends over every slot, masking those
    # past `at` -- so it can be captured once in a CUDA graph and replayed (generate.StaticDecoder).
    at: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # One view per layer: indexing it is cheaper than indexing the 5-D tensor (measured:
        # 4 % of a SmolLM2 decoding step), and torch.compile updates a layer's own tensor in
        # place, where a write into the shared 5-D one is compiled as a copy of all of it.
        self.layer_k = [self.k[i] for i in range(self.k.size(0))]
        self.layer_v = [self.v[i] for i in range(self.v.size(0))]

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        zeroed: bool = False,
    ) -> KVCache:
        """zeroed: for static decoding, which reads unwritten slots (masked, but 0 * NaN is NaN)."""
        shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
        make = torch.zeros if zeroed else torch.empty
        return cls(make(shape, device=device, dtype=dtype), make(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.size(3)


def attention_mask(
    past: int, T: int, pad: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Which keys each of T new queries may see, built once per forward for every layer; None
    for the plain causal case (SDPA's is_causal). Query i sits at position past + i and sees keys
    0 .. past + i -- SDPA's is_causal aligns top-left, right only when past == 0 -- and, in a
    left-padded batch, not its row's first pad[b] keys."""
    mask = None
    if past > 0 and T > 1:
        mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
    if pad is not None:
        keys = torch.arange(past + T, device=device)
        visible = (keys[None, :] >= pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
        mask = visible if mask is None else visible & mask
        if past == 0 and T > 1:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # A fully padded query row would make softmax NaN; let it see itself (its output is unused).
        mask = mask | (keys[None, :] == past + torch.arange(T, device=device)[:, None])
    return mask


@functools.cache
def _causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0 on and below the diagonal, -inf above: added to the scores, it hides later positions."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """softmax(Q K^T / sqrt(d) + causal bias) V, written out; q (B, H, T, D), k and v (B, H_kv,
    T, D). SDPA computes the same; this form is the faster one in bf16 training on a CPU with
    short contexts (runtime.CPU_TRAIN_ATTENTION)."""
    B, H, T, D = q.shape
    if k.size(1) != H:  # grouped keys and values: each serves H / H_kv query heads
        k, v = (t.repeat_interleave(H // k.size(1), dim=1) for t in (k, v))
    # One (B*H)-batched product with the bias added in: baddbmm is a single kernel.
    att = torch.baddbmm(
        _causal_bias(T, q.dtype, q.device),
        q.reshape(B * H, T, D),
        k.reshape(B * H, T, D).transpose(1, 2),
        alpha=D**-0.5,
    )
    att = F.dropout(att.softmax(-1), dropout) if dropout else att.softmax(-1)
    return torch.bmm(att, v.reshape(B * H, T, D)).view(B, H, T, D)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    # Decoding runs hundreds of these a token: skip the call itself when it does nothing.
    return F.dropout(x, p, training) if training and p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.kv_heads
        self.head_dim = cfg.head_dim
        # Q, K and V projections fused into one matmul (GPT-2's c_attn).
        qkv_width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_width, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        # Learned QK-norm (Qwen3): queries and keys each have their own gains.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm_weight else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm_weight else None
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, rope: Rope | None, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        # Queries and keys are normalised and rotated together: half the small kernels.
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        elif self.qk_norm:
            qk = F.rms_norm(qk, (self.head_dim,))
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)  # (B, H, T, D)
        v = v.transpose(1, 2)

        past = 0
        if cache is not None and cache.at is not None:  # static decoding: one token per row
            rows = torch.arange(B, device=x.device)
            cache.k[self.layer, rows, :, cache.at] = k[:, :, 0]
            cache.v[self.layer, rows, :, cache.at] = v[:, :, 0]
            k, v = cache.k[self.layer], cache.v[self.layer]
        elif cache is not None:
            past = cache.pos
            ck, cv = cache.layer_k[self.layer], cache.layer_v[self.layer]
            # narrow: one view each, where slicing [:, :, a:b] makes three (decoding runs four a
            # layer per token)
            ck.narrow(2, past, T).copy_(k)
            cv.narrow(2, past, T).copy_(v)
            k, v = ck.narrow(2, 0, past + T), cv.narrow(2, 0, past + T)

        # softmax(Q K^T / sqrt(d) + causal mask) V: the plain causal case needs no mask tensor;
        # otherwise GPT.forward built one for all layers (attention_mask).
        if T == 1 and not self.training:
            # One query a head (decoding): with grouped keys each key/value head's queries are
            # its rows -- enable_gqa's numbers, without repeating the keys and values -- and the
            # output is already in (B, 1, C) order.
            group = self.n_head // self.n_kv_head
            q = q.reshape(B, self.n_kv_head, group, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.c_proj(y.reshape(B, 1, self.n_head * self.head_dim))
        dropout = self.dropout if self.training else 0.0
        kind = cpu_train_attention(x.device, T)
        if kind == "formula" and mask is None and past == 0:
            y = causal_attention(q, k, v, dropout)
        else:
            kwargs = dict(
                attn_mask=mask,
                is_causal=False if T == 1 else mask is None,
                dropout_p=dropout,
                enable_gqa=self.n_kv_head != self.n_head,
            )
            with sdpa_kernels(kind):
                y = F.scaled_dot_product_attention(q, k, v, **kwargs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return _dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.mlp_hidden
        # SwiGLU's gate and up projections are one matmul: c_fc gives both halves.
        self.c_fc = nn.Linear(
            cfg.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.bias
        )
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        elif self.kind == "gelu_exact":
            h = F.gelu(h)  # x * Phi(x), nanoGPT's and BERT's; half the tanh form's cost on a CPU
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return _dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rope: Rope | None, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                "model.vocab_size must be set (from the tokenizer) before building the model"
            )
        self.config = cfg
        # What a fine-tuning method did to this model (gptkit.peft.lora.Adapters), set by the method
        # itself: the model knows nothing of the methods that wrap it.
        self.adapters: Any = None
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = (
            nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual-stream output projections by 1/sqrt(2 * n_layer) so the
        # residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        elif cfg.zero_init_head:
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        pad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, V) -- (B, 1, V) with last_only -- and,
        given targets (-100 marks positions without loss), the mean cross-entropy. In training
        with a large vocabulary (_fused_loss) the logits are not made: (None, loss).

        pad (B,): rows of a batch of unequal prompts are left-padded by pad[b] tokens, which no
        position attends to and which do not count as positions, so each row computes what it
        would alone."""
        B, T = idx.shape
        if cache is not None and cache.at is not None:
            return self._static_step(idx, cache, pad)
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the context "
                f"({self.config.block_size})"
            )
        x = self.wte(idx)
        pos = torch.arange(past, past + T, device=idx.device)
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        elif pad is None:
            # (T, 1, D)
            rope = (self.rope_cos[past : past + T, None], self.rope_sin[past : past + T, None])
        else:
            # (B, T, 1, D)
            rope = (self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None])
        x = self.drop(x)
        mask = attention_mask(past, T, pad, idx.device)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        if targets is not None and self._fused_loss(x):
            # Training with a large vocabulary: the same loss, without the (B*T, V) logits.
            loss = linear_cross_entropy(
                x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                self.config.logit_softcap,
            )  # fmt: skip
            return None, loss
        logits = self._head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def _fused_loss(self, x: Tensor) -> bool:
        """Whether the training loss goes through linear_cross_entropy: only when gradients are
        wanted (so the logits are not), from a plain head, and once the logits would pass 4M
        numbers (16 MiB in fp32), where making and freeing them costs more than it saves. On a
        CPU only, where it was measured, and not under torch.compile, which fuses the plain
        loss itself (and would stop at the chunks' data-dependent row count)."""
        return (
            self.training
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and type(self.lm_head) is nn.Linear
            and x.numel() // x.size(-1) * self.config.vocab_size >= 1 << 22
        )

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        if self.config.logit_softcap > 0:
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def _static_step(
        self, idx: torch.Tensor, cache: KVCache, pad: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        """One decode step of static decoding (KVCache.at): the same computation as forward for
        one new token per row, with shapes that do not depend on the position. Row b's token
        sits in slot at[b], is position at[b] - pad[b], and sees slots pad[b] .. at[b]."""
        at = cache.at
        assert at is not None and idx.size(1) == 1
        pad = pad if pad is not None else torch.zeros_like(at)
        pos = (at - pad)[:, None]  # (B, 1)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None])
        slots = torch.arange(cache.max_len, device=idx.device)
        mask = ((slots >= pad[:, None]) & (slots <= at[:, None]))[:, None, None, :]
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        return self._head(self.ln_f(x)), None

    @torch.no_grad()
    def grow_vocab(self, new_size: int, seed: int = 0) -> None:
        """Append rows for new tokens to the embedding (and an untied head). Each new row is drawn
        from a normal with the existing rows' mean and per-dimension spread, so a new token starts
        as a typical token, distinct from the other new ones, rather than as an outlier."""
        old = self.config.vocab_size
        if new_size <= old:
            return
        gen = torch.Generator().manual_seed(seed)

        def grown(w: torch.Tensor) -> nn.Parameter:
            mean, std = w.float().mean(0), w.float().std(0)
            rows = mean + std * torch.randn(new_size - old, w.size(1), generator=gen)
            return nn.Parameter(torch.cat([w, rows.to(w.device, w.dtype)]))

        self.wte.weight = grown(self.wte.weight)
        self.wte.num_embeddings = new_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = new_size
        self.config.vocab_size = new_size

    # --- accounting ---

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once when tied; position embeddings excluded when non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight of every Linear (the LM head included) plus the
        attention scores and weighted sum; x3 for training (forward + backward)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        # QK^T and AV, full (not halved by the mask)
        attention = 2 * 2 * cfg.n_layer * T * cfg.n_head * cfg.head_dim
        forward = 2 * linear + attention
        return 3 * forward if training else forward

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """State dict without the tied head's duplicate (safetensors stores no shared tensors)."""
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.tied:
            sd.pop("lm_head.weight", None)
        return sd

    @property
    def tied(self) -> bool:
        """The head shares the embedding's tensor (not so once quantized: it has its own)."""
        return self.lm_head.weight is self.wte.weight

    def load_saved_state(self, sd: dict[str, torch.Tensor]) -> None:
        if self.tied:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.tied)]
        if missing or unexpected:
            raise KeyError(
                f"weights do not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(x W^T) over the rows whose target is not -100, without the
    (N, V) logits: rows go through in chunks, and each chunk's share of the gradients (dL/dx,
    dL/dW) is made while its logits are at hand. At SmolLM2-135M's shape (1,024 rows, 49,152
    words) the full logits, their log-softmax and its gradient are 200 MB each, which a CPU
    page-faults in and out every step; rows without a target cost nothing at all."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        targets: Tensor,
        softcap: float,
        dtype: torch.dtype,
    ) -> Tensor:
        rows = targets.ne(-100).nonzero().squeeze(1)
        count = rows.numel()
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen head: no dW
        dx = torch.zeros_like(x)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: fp32 at least
        dw = torch.zeros_like(weight, dtype=acc) if want_dw else None
        total = torch.zeros((), device=x.device, dtype=acc)
        w = weight.to(dtype)
        every_row = count == x.size(0)  # no gather/scatter needed
        xs = (x if every_row else x[rows]).to(dtype)
        ts = targets if every_row else targets[rows]
        step = max(32, (1 << 24) // weight.size(0))  # a chunk's logits: 64 MiB in fp32
        buf = torch.empty(min(step, count), weight.size(0), device=x.device, dtype=acc)
        for lo in range(0, count, step):
            xc, tc = xs[lo : lo + step], ts[lo : lo + step]
            z = buf[: xc.size(0)]
            torch.mm(xc, w.t(), out=z) if dtype == acc else z.copy_(xc @ w.t())
            if softcap > 0:
                z.div_(softcap).tanh_()
                slope = 1 - z * z  # d(c tanh(h/c))/dh
                z.mul_(softcap)
            lse = torch.logsumexp(z, dim=1)
            total += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
            z.sub_(lse[:, None]).exp_()  # softmax
            z[torch.arange(z.size(0), device=z.device), tc] -= 1.0  # minus the one-hot target
            if softcap > 0:
                z.mul_(slope)
            g = z.to(dtype)
            if want_dx:
                part = g @ w
                if every_row:
                    dx[lo : lo + step] = part
                else:
                    dx[rows[lo : lo + step]] = part.to(dx.dtype)
            if dw is not None and dtype == acc:
                dw.addmm_(g.t(), xc)
            elif dw is not None:
                dw.add_(g.t() @ xc)
        ctx.grads = (dx, None if dw is None else dw.to(weight.dtype), count)
        return total / count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, Tensor | None, None, None, None]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran through this loss twice")
        dx, dw, count = ctx.grads
        ctx.grads = None
        scale = grad / count
        return dx.mul_(scale), None if dw is None else dw.mul_(scale), None, None, None


def linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, softcap: float = 0.0
) -> Tensor:
    """F.cross_entropy(F.linear(x, weight) [soft-capped], targets, ignore_index=-100), for
    training: the logits are never whole in memory. Under autocast the matrix products run in
    its dtype and the softmax in fp32, as they would through F.linear and F.cross_entropy."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(
        x.device.type
    ) else x.dtype  # fmt: skip
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets, softcap, dtype)
