"""GGUF export: a gptkit run as one file that llama.cpp, Ollama and LM Studio run on their own.

The file is written with `gguf`, ggml's own Python writer. It carries the architecture's
hyperparameters, the weights (f32, f16, bf16, or q8_0 and q4_0 from the package's own
quantizer), the byte-level BPE tokenizer and the chat template. Two layout facts decide the
tensor mapping:

- ggml lists a tensor's dimensions innermost first, so a PyTorch (out, in) weight is written
  as it is and reads as {in, out}: nn.Linear needs no transpose.
- llama.cpp's `llama` architecture rotates adjacent pairs of a head's dimensions, gptkit (like
  transformers) rotates the first half against the second. The query and key rows of each head
  are reordered to match; `qwen2` and `qwen3` rotate halves as gptkit does and need nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptkit.errors import GptkitError

try:
    import gguf
except ImportError:  # an optional extra: say how to get it
    raise GptkitError(
        "GGUF export needs the gguf package: pip install 'gptkit[gguf]' (or pip install gguf)"
    ) from None

from gptkit.checkpoint import MODEL_FILE, RunFolder, checkpoint_dir, load_run_config
from gptkit.config import ModelConfig
from gptkit.formats.hf import _read_safetensors, export_family
from gptkit.model import rope_frequencies
from gptkit.template import SPECIAL_TEMPLATE, jinja_source
from gptkit.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_OUTTYPE = "f16"

# The pre-tokenizer regexes of published tokenizer.json files, by llama.cpp's name for them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def export_gguf(
    run_dir: str | Path,
    out: str | Path,
    outtype: str = DEFAULT_OUTTYPE,
    overwrite: bool = False,
) -> Path:
    """A gptkit run -> one GGUF file for llama.cpp (`llama-cli -m FILE`), Ollama and LM Studio.
    Written under a temporary name and renamed, so FILE is either whole or untouched."""
    run_dir, out = Path(run_dir), Path(out)
    if outtype not in OUTTYPES:
        raise GptkitError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    cfg = load_run_config(run_dir)
    family = export_family(cfg)
    if cfg.model.mlp == "gelu_exact":
        raise GptkitError(
            "this run uses the exact GELU (model.mlp=gelu_exact); llama.cpp's GPT-2 computes the "
            "tanh one, so the file would not compute this model: export it with --to-hf instead"
        )
    ckpt = checkpoint_dir(run_dir)
    tok = _gguf_tokenizer(run_dir)
    if out.is_dir():
        raise GptkitError(f"{out} is a folder; --to-gguf names a file, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise GptkitError(f"{out} exists; pass --overwrite or choose another file")
    out.parent.mkdir(parents=True, exist_ok=True)

    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), family)
    try:
        writer.add_name(run_dir.resolve().name)
        writer.add_file_type(_FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, cfg.model, family)
        _add_tokenizer(writer, tok, cfg.model.vocab_size)
        tensors = _read_safetensors(ckpt / MODEL_FILE)
        mapped = (
            _gpt2_tensors(tensors, cfg.model)
            if family == "gpt2"
            else _llama_tensors(tensors, cfg.model, family)
        )
        for name, t in mapped:
            _add_tensor(writer, name, t, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return out


def _gguf_tokenizer(run_dir: Path) -> HFTokenizer:
    if not RunFolder(run_dir).tokenizer.is_dir():
        raise GptkitError(f"{run_dir}: no tokenizer folder; a GGUF file must carry its tokenizer")
    tok = load_tokenizer(RunFolder(run_dir).tokenizer)
    if not isinstance(tok, HFTokenizer):
        raise GptkitError(
            "a character-level tokenizer has no llama.cpp equivalent; train with --tokenizer bpe "
            "(or gpt2:PATH) to export to GGUF"
        )
    return tok


# --- hyperparameters ---


def _add_hyperparameters(w: gguf.GGUFWriter, m: ModelConfig, family: str) -> None:
    w.add_context_length(m.block_size)
    w.add_embedding_length(m.n_embd)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.mlp_hidden)
    w.add_head_count(m.n_head)
    w.add_vocab_size(m.vocab_size)
    if family == "gpt2":
        w.add_layer_norm_eps(m.norm_eps)
        return
    w.add_head_count_kv(m.kv_heads)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_rope_freq_base(m.rope_base)
    w.add_rope_dimension_count(m.head_dim)
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)


# --- the tokenizer ---


def llama_cpp_pre(tok: HFTokenizer, spec: dict | None = None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (how text is split before BPE), or one
    line saying it has none that gptkit knows. spec: the tokenizer's JSON, if already parsed."""
    spec = spec if spec is not None else json.loads(tok.tok.to_str())  # type: ignore[attr-defined]
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    norm = spec.get("normalizer")
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GptkitError(
            "only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2 style) can be written "
            "to GGUF; this one is a SentencePiece-style or other tokenizer"
        )
    if norm is not None and norm.get("type") != "NFC":
        raise GptkitError(
            f"the tokenizer's normalizer ({norm.get('type')}) has no llama.cpp equivalent"
        )
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            if regex in SPLIT_PRE:
                return SPLIT_PRE[regex]
    raise GptkitError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one "
        "gptkit can name for llama.cpp (GPT-2's, Llama 3's, Qwen2's or SmolLM2's)"
    )


def _add_tokenizer(w: gguf.GGUFWriter, tok: HFTokenizer, n_vocab: int) -> None:
    spec = json.loads(tok.tok.to_str())  # type: ignore[attr-defined]
    pre = llama_cpp_pre(tok, spec)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = tok.tok.get_vocab(with_added_tokens=True)  # type: ignore[attr-defined]
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    # The embedding may have more rows than the tokenizer has tokens (a padded vocabulary):
    # llama.cpp needs a token for each row; these can never come out of tokenization.
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].get("special")
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tok.eot_id
    w.add_bos_token_id(tok.bos_id if tok.bos_id is not None else eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(bool(tok.add_bos and tok.bos_id is not None))
    w.add_add_eos_token(False)
    end_of_turn = _end_of_turn(tok)
    if end_of_turn is not None:
        w.add_eot_token_id(end_of_turn)
    w.add_chat_template(jinja_source(tok))


def _end_of_turn(tok: Tokenizer) -> int | None:
    """The token that ends an assistant's turn, where it is not the end-of-sequence token."""
    if tok.chat_template:
        return tok.special_tokens[SPECIAL_TEMPLATE["end"]]
    others = [i for i in tok.extra_eos_ids if i != tok.eot_id]
    return others[0] if others else None


# --- tensors ---


def _gpt2_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], m: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """llama.cpp's `gpt2` names; it wants every bias, so a bias-free run gets zeros (the same
    function)."""
    top = {
        "wte.weight": "token_embd.weight",
        "wpe.weight": "position_embd.weight",
        "ln_f.weight": "output_norm.weight",
        "ln_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    seen: set[str] = set()
    for name, t in tensors:
        if name in top:
            out = top[name]
        else:
            _, layer, rest = name.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            out = f"blk.{layer}.{parts[part]}.{kind}"
        seen.add(out)
        yield out, t
    sizes = {
        "attn_norm": m.n_embd,
        "attn_qkv": 3 * m.n_embd,
        "attn_output": m.n_embd,
        "ffn_norm": m.n_embd,
        "ffn_up": m.mlp_hidden,
        "ffn_down": m.n_embd,
    }
    wanted = {"output_norm.bias": m.n_embd}
    wanted.update({f"blk.{i}.{p}.bias": n for i in range(m.n_layer) for p, n in sizes.items()})
    for out, size in wanted.items():
        if out not in seen:
            yield out, torch.zeros(size)


def _llama_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], m: ModelConfig, family: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """llama.cpp's `llama` / `qwen2` / `qwen3` names, q/k/v and gate/up split apart."""
    top = {"wte.weight": "token_embd.weight", "ln_f.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    single = {
        "ln_1.weight": "attn_norm.weight",
        "ln_2.weight": "ffn_norm.weight",
        "attn.c_proj.weight": "attn_output.weight",
        "mlp.c_proj.weight": "ffn_down.weight",
        "attn.q_norm.weight": "attn_q_norm.weight",
        "attn.k_norm.weight": "attn_k_norm.weight",
    }
    d = m.head_dim
    for name, t in tensors:
        if name in top:
            yield top[name], t
            continue
        _, layer, rest = name.split(".", 2)
        blk = f"blk.{layer}."
        kind = rest.rsplit(".", 1)[1]
        if rest in single:
            yield blk + single[rest], t
        elif rest.startswith("attn.c_attn."):
            q, k, v = t.split([m.n_head * d, m.kv_heads * d, m.kv_heads * d])
            if family == "llama":
                q, k = _interleave_rope_rows(q, m.n_head), _interleave_rope_rows(k, m.kv_heads)
            yield from ((blk + f"attn_{p}.{kind}", x) for p, x in zip("qkv", (q, k, v)))
        elif rest.startswith("mlp.c_fc."):
            gate, up = t.chunk(2)
            yield blk + f"ffn_gate.{kind}", gate
            yield blk + f"ffn_up.{kind}", up
        else:
            raise GptkitError(f"tensor {name!r} has no place in llama.cpp's {family}")
    if m.rope_scaling == "llama3":
        # llama.cpp divides each rotation frequency by its factor from this tensor.
        plain = ModelConfig(**{**m.__dict__, "rope_scaling": "none"})
        yield "rope_freqs.weight", rope_frequencies(plain) / rope_frequencies(m)


def _interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows (first half, second half) -> (h0[0], h1[0], h0[1], h1[1], ...): the
    rotated pairs become adjacent, as llama.cpp's `llama` rotation expects."""
    rows = w.shape[0] // heads
    return w.reshape(heads, 2, rows // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "bf16": gguf.GGMLQuantizationType.BF16,
}


def _add_tensor(w: gguf.GGUFWriter, name: str, t: torch.Tensor, outtype: str) -> None:
    """1-D tensors (norms, biases, rope factors) stay f32, as llama.cpp's converter keeps them;
    matrices take the asked-for type (q8_0 and q4_0 fall back to f16 for a row length that is not
    a multiple of their 32-value blocks)."""
    data = t.detach().to(torch.float32).contiguous().numpy()
    if data.ndim == 1 or outtype == "f32":
        w.add_tensor(name, data)
    elif outtype == "f16" or (outtype in ("q8_0", "q4_0") and data.shape[-1] % 32):
        w.add_tensor(name, data.astype(np.float16))
    else:
        qtype = QTYPES[outtype]
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
