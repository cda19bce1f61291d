"""Hugging Face interoperability: GPT-2 checkpoints in, `transformers`-loadable folders out.

Hugging Face's GPT-2 stores its projections as `Conv1D` (weight shape (in, out)); ours are
`nn.Linear` (out, in), so those weights are transposed on the way. Tensors are converted one at
a time from a lazily opened file, so a conversion holds at most the output plus one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptkit.checkpoint import (
    MODEL_FILE,
    RunFolder,
    checkpoint_dir,
    load_run_config,
    refuse_nonempty,
    staged_folder,
    write_weights_only,
)
from gptkit.config import Config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.peft.methods import refuse_adapted
from gptkit.template import ChatTemplate, jinja_source
from gptkit.tokenizer import EOT, HFTokenizer, Tokenizer, load_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older versions


def _hf_config_to_ours(hf: dict, source: Path) -> Config:
    if hf.get("model_type") != "gpt2":
        raise GptkitError(
            f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2'; only GPT-2 checkpoints "
            "convert"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise GptkitError(
            f"{source}: activation_function {act!r} is neither GPT-2's tanh GELU nor the exact "
            "one; cannot convert exactly"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise GptkitError(f"{source}: {flag}=true is not supported")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise GptkitError(
            f"{source}: layer_norm_epsilon {hf['layer_norm_epsilon']} differs from GPT-2's 1e-5"
        )
    cfg = Config()
    m = cfg.model
    m.vocab_size = hf["vocab_size"]
    m.block_size = hf.get("n_positions", hf.get("n_ctx", 1024))
    m.n_layer, m.n_head, m.n_embd = hf["n_layer"], hf["n_head"], hf["n_embd"]
    inner = hf.get("n_inner") or 4 * m.n_embd
    m.mlp_ratio = inner / m.n_embd
    m.mlp = "gelu_exact" if act == "gelu" else "gelu"
    m.tie_embeddings = hf.get("tie_word_embeddings", True)
    m.dropout = 0.0
    cfg.validate()
    return cfg


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A file's tensors one at a time, in their stored dtype (bf16 stays bf16: lossless)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for key in names:
                yield key, f.get_tensor(key)
    except (OSError, SafetensorError, ValueError) as e:
        raise GptkitError(f"{path}: cannot read ({e}); the file is truncated or corrupt") from None


def _open_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of a model folder: model.safetensors, the shards that
    model.safetensors.index.json names, or pytorch_model.bin (read without unpickling code)."""
    st, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if st.is_file():
        yield from _read_safetensors(st)
        return
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GptkitError(f"{index}: not a safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [f for f in shards if not (folder / f).is_file()]
        if missing:
            raise GptkitError(f"{index} names shard {missing[0]}, which is not in {folder}")
        for shard in shards:
            yield from _read_safetensors(folder / shard)
        return
    pt = folder / "pytorch_model.bin"
    if pt.is_file():
        try:
            sd = torch.load(str(pt), map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as e:
            raise GptkitError(f"{pt}: cannot read safely ({str(e).splitlines()[0]})") from None
        while sd:
            key = next(iter(sd))
            yield key, sd.pop(key)
        return
    raise GptkitError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _gpt2_weights(
    tensors: Iterator[tuple[str, torch.Tensor]], cfg: Config
) -> Iterator[tuple[str, str, torch.Tensor]]:
    for hf_name, t in tensors:
        name = _our_name(hf_name)
        if name is None or (name == "lm_head.weight" and cfg.model.tie_embeddings):
            continue
        yield name, hf_name, t.t() if name.endswith(CONV1D) else t


def _our_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("transformer.")
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name.startswith("h."):
        return "blocks." + name[2:]
    if name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"):
        return name
    raise GptkitError(f"cannot map tensor {hf_name!r} onto the GPT-2 architecture")


def import_hf(
    folder: str | Path, out: str | Path, tokenizer: str | None = None, overwrite: bool = False
) -> Path:
    """A Hugging Face folder (GPT-2, Llama, Qwen2, Qwen3) -> a gptkit run folder (config, weights,
    tokenizer)."""
    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise GptkitError(f"{folder}: no config.json; expected a Hugging Face model folder")
    refuse_nonempty(out, overwrite)
    kind, cfg = _read_hf_config(folder / "config.json")
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = {k: tuple(v.shape) for k, v in GPT(cfg.model).state_dict().items()}
    if cfg.model.tie_embeddings:
        expected.pop("lm_head.weight", None)
    tok = _import_tokenizer(folder, tokenizer, kind)
    if tok is not None and tok.vocab_size > cfg.model.vocab_size:
        raise GptkitError(
            f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only "
            f"{cfg.model.vocab_size} embeddings"
        )
    with staged_folder(out) as tmp:
        sd = _checked_weights(folder, kind, cfg, expected)
        if kind == "gpt2":
            spec = f"gpt2:{tokenizer or folder}" if tok is not None else "gpt2:"
        else:
            spec = f"run:{out.resolve()}"  # the run's own tokenizer, for preparing data with it
        cfg = cfg.updated({"train.dtype": "float32", "data.tokenizer": spec})
        cfg.save(RunFolder(tmp).config)
        if tok is not None:
            tok.save(RunFolder(tmp).tokenizer)
        write_weights_only(tmp, sd)
        del sd
    return out


def _read_hf_config(path: Path) -> tuple[str, Config]:
    """A transformers config.json -> (its model_type, the gptkit config of the same model)."""
    try:
        hf_cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path}: not valid JSON ({e})") from None
    kind = hf_cfg.get("model_type") if isinstance(hf_cfg, dict) else None
    if kind != "gpt2" and kind not in LLAMA_FAMILY:
        raise GptkitError(
            f"{path}: model_type {kind!r} is not supported; gptkit converts gpt2, "
            "llama (SmolLM2, TinyLlama, Llama 3), qwen2 (Qwen2.5) and qwen3"
        )
    if kind == "gpt2":
        return kind, _hf_config_to_ours(hf_cfg, path)
    return kind, llama_config_to_ours(hf_cfg, path)


def _checked_weights(
    folder: Path, kind: str, cfg: Config, expected: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The folder's tensors under gptkit's names, each checked against the config's shapes."""
    sd: dict[str, torch.Tensor] = {}
    tensors = _open_hf_weights(folder)
    mapped = _gpt2_weights(tensors, cfg) if kind == "gpt2" else fuse_llama_weights(tensors, cfg)
    for name, hf_name, t in mapped:
        if name not in expected:
            raise GptkitError(
                f"tensor {hf_name!r} has no place in the model described by config.json"
            )
        if tuple(t.shape) != expected[name]:
            raise GptkitError(
                f"tensor {hf_name!r} has shape {tuple(t.shape)}, expected {expected[name]} "
                "from config.json"
            )
        sd[name] = t.contiguous()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise GptkitError(f"{folder}: weights are missing tensors, e.g. {missing[:3]}")
    return sd


def _import_tokenizer(folder: Path, tokenizer: str | None, kind: str) -> Tokenizer | None:
    """GPT-2's BPE files for a gpt2 model; for the Llama family, the folder's (or --tokenizer
    DIR's) tokenizer.json with its special tokens and chat template."""
    if kind == "gpt2":
        if tokenizer:
            return HFTokenizer.gpt2(tokenizer.removeprefix("gpt2:"))
        names = ("vocab.json", "tokenizer.json", "encoder.json")
        return HFTokenizer.gpt2(folder) if any((folder / f).is_file() for f in names) else None
    where = Path(tokenizer) if tokenizer else folder
    if not (where / "tokenizer.json").is_file():
        raise GptkitError(
            f"{where}: no tokenizer.json; a {kind} model needs its tokenizer (pass --tokenizer DIR "
            "for a folder that has it)"
        )
    tok = HFTokenizer.from_model_folder(where)
    ChatTemplate(tok)  # a template that is not valid Jinja is refused now, not at the first chat
    return tok


def export_family(cfg: Config) -> str:
    """The transformers class a run exports as: gpt2 for GPT-2's options, a Llama-family one
    (llama, qwen2, qwen3) for RoPE + RMSNorm + SwiGLU; otherwise one line naming the keys."""
    refuse_adapted(cfg, "this run", "export")
    if cfg.model.quantization != "none":
        raise GptkitError(
            f"this run is quantized ({cfg.model.quantization}) for gptkit's own inference; export "
            "the run it was quantized from (for llama.cpp's int8, --to-gguf FILE --outtype q8_0)"
        )
    m = cfg.model
    if m.pos_embedding == "rope":
        return llama_family(cfg)
    # (what breaks GPT-2's architecture, the setting that restores it)
    rules = [
        (m.norm != "layernorm", "model.norm=layernorm"),
        (m.mlp not in ("gelu", "gelu_exact"), "model.mlp=gelu"),
        (m.qk_norm, "model.qk_norm=false"),
        (m.logit_softcap, "model.logit_softcap=0"),
        (m.kv_heads != m.n_head, "model.n_kv_head=0"),
        (m.head_size and m.head_size * m.n_head != m.n_embd, "model.head_size=0"),
        (m.qkv_bias and not m.bias, "model.qkv_bias=false"),
        (abs(m.norm_eps - 1e-5) > 1e-12, "model.norm_eps=1e-5"),
    ]
    problems = [fix for broken, fix in rules if broken]
    if problems:
        raise GptkitError(
            f"this run is not a GPT-2 architecture; export needs {', '.join(problems)} (or, for "
            "Llama/Qwen, model.pos_embedding=rope with model.norm=rmsnorm, model.mlp=swiglu and "
            "model.bias=false)"
        )
    return "gpt2"


def export_hf(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A gptkit run -> a folder that transformers' AutoModelForCausalLM / AutoTokenizer load
    offline."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    family = export_family(cfg)
    ckpt = checkpoint_dir(run_dir)
    refuse_nonempty(out, overwrite, "choose another folder")
    tok = (
        load_tokenizer(RunFolder(run_dir).tokenizer)
        if RunFolder(run_dir).tokenizer.is_dir()
        else None
    )
    with staged_folder(out) as tmp:
        if family == "gpt2":
            _export_gpt2(tmp, ckpt, cfg, tok)
        else:
            _export_llama(tmp, ckpt, cfg, tok, family)
        if tok is not None:
            _export_tokenizer(tok, tmp, cfg.model.block_size)
    return out


def _export_llama(tmp: Path, ckpt: Path, cfg: Config, tok: Tokenizer | None, family: str) -> None:
    sd: dict[str, torch.Tensor] = {}
    for name, t in _read_safetensors(ckpt / MODEL_FILE):
        sd.update(split_llama_weights(name, t, cfg))
    # The weights' own dtype: an imported bf16 model that was not trained goes back bit for bit.
    dtype = str(sd["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del sd
    hf_cfg = llama_hf_config(cfg, family, tok, dtype)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    # No max_new_tokens: it would override a caller's max_length (lm-eval's hf backend sets one).
    gen = {
        "bos_token_id": hf_cfg["bos_token_id"],
        "eos_token_id": hf_cfg["eos_token_id"],
        "do_sample": True,
        "temperature": 0.8,
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _export_gpt2(tmp: Path, ckpt: Path, cfg: Config, tok: Tokenizer | None) -> None:
    m = cfg.model
    sd: dict[str, torch.Tensor] = {}
    for name, t in _read_safetensors(ckpt / MODEL_FILE):
        if name.endswith(CONV1D):
            t = t.t().contiguous()
        hf_name = (
            "lm_head.weight"
            if name == "lm_head.weight"
            else "transformer." + name.replace("blocks.", "h.", 1)
        )
        sd[hf_name] = t
    if not m.bias:  # HF's GPT-2 always has biases: zeros are the same function
        for i in range(m.n_layer):
            for part, size in (
                ("attn.c_attn", 3 * m.n_embd),
                ("attn.c_proj", m.n_embd),
                ("mlp.c_fc", sd[f"transformer.h.{i}.mlp.c_fc.weight"].size(1)),
                ("mlp.c_proj", m.n_embd),
            ):
                sd[f"transformer.h.{i}.{part}.bias"] = torch.zeros(size)
            for ln in ("ln_1", "ln_2"):
                sd[f"transformer.h.{i}.{ln}.bias"] = torch.zeros(m.n_embd)
        sd["transformer.ln_f.bias"] = torch.zeros(m.n_embd)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del sd
    eot = tok.eot_id if tok is not None else m.vocab_size - 1
    hf_cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.block_size,
        "n_ctx": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": m.mlp_hidden,
        "activation_function": "gelu" if m.mlp == "gelu_exact" else "gelu_new",
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "do_sample": True,
        "temperature": 0.8,
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _export_tokenizer(tok: Tokenizer, folder: Path, max_len: int) -> None:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    if isinstance(tok, HFTokenizer):
        hf = tok.tok
    else:  # char-level: one word-level token per character, joined back without spaces
        vocab = {c: i for i, c in enumerate(tok.itos)}  # type: ignore[attr-defined]
        hf = HFTok(models.WordLevel(vocab, unk_token=EOT))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([EOT])
    hf.save(str(folder / "tokenizer.json"))  # type: ignore[attr-defined]
    names = {"bos_token": tok.bos_token or tok.eot_token, "eos_token": tok.eot_token}
    if tok.kind != "hf":
        names["unk_token"] = EOT
    conf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if tok.kind != "hf":
        conf["add_prefix_space"] = False
    if tok.jinja_template or tok.chat_template:  # a base model's plain fallback stays gptkit's
        conf["chat_template"] = jinja_source(tok)
    (folder / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(names))


# --- the Llama family: Llama (SmolLM2, TinyLlama, Llama 3), Qwen2 (Qwen2.5), Qwen3 ---

LLAMA_FAMILY = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Fused in gptkit: q, k and v are one matrix (c_attn), gate and up another (c_fc).
FUSED = {
    "q_proj": ("attn.c_attn", 0),
    "k_proj": ("attn.c_attn", 1),
    "v_proj": ("attn.c_attn", 2),
    "gate_proj": ("mlp.c_fc", 0),
    "up_proj": ("mlp.c_fc", 1),
}
RENAMED = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}
TOP_LEVEL = {
    "model.embed_tokens.weight": "wte.weight",
    "model.norm.weight": "ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
# The way out: gptkit's names back to the family's, and how many pieces each fused matrix has.
TOP_LEVEL_OUT = {ours: theirs for theirs, ours in TOP_LEVEL.items()}
RENAMED_OUT = {ours: theirs for theirs, ours in RENAMED.items()}
PIECES = {fused: sum(1 for f, _ in FUSED.values() if f == fused) for fused, _ in FUSED.values()}


def rope_settings(hf: dict, source: Path) -> dict:
    """theta and scaling from either spelling: transformers 5's rope_parameters, or the
    rope_theta + rope_scaling that most published config.json files carry."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise GptkitError(
            f"{source}: rope_scaling type {kind!r} is not supported (only Llama 3's 'llama3' "
            "scaling)"
        )
    out = {
        "model.rope_base": float(params.get("rope_theta", 10000.0)),
        "model.rope_scaling": "none",
    }
    if kind == "llama3":
        out.update(
            {
                "model.rope_scaling": "llama3",
                "model.rope_factor": params["factor"],
                "model.rope_low_freq_factor": params["low_freq_factor"],
                "model.rope_high_freq_factor": params["high_freq_factor"],
                "model.rope_original_context": params["original_max_position_embeddings"],
            }
        )
    return out


def llama_config_to_ours(hf: dict, source: Path) -> Config:
    """A Llama / Qwen2 / Qwen3 config.json as gptkit's model options, or one line naming the
    field gptkit cannot represent."""
    kind = hf["model_type"]
    needed = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    absent = [k for k in needed if not isinstance(hf.get(k), int)]
    if absent:
        raise GptkitError(f"{source}: a {kind} config needs {absent[0]} (an integer); it has none")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise GptkitError(
            f"{source}: mixture-of-experts models ({kind}, num_experts) are not supported"
        )
    if hf.get("use_sliding_window") or (kind == "llama" and hf.get("sliding_window")):
        raise GptkitError(
            f"{source}: use_sliding_window=true (sliding-window attention) is not supported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise GptkitError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu: SwiGLU)"
        )
    if hf.get("mlp_bias") or (kind != "qwen2" and hf.get("attention_bias")):
        field = "mlp_bias" if hf.get("mlp_bias") else "attention_bias"
        raise GptkitError(f"{source}: {field}=true is not supported (biases on every projection)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise GptkitError(
            f"{source}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported"
        )
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    changes: dict = {
        "model.vocab_size": hf["vocab_size"],
        "model.block_size": hf.get("max_position_embeddings", 2048),
        "model.n_layer": hf["num_hidden_layers"],
        "model.n_head": heads,
        "model.n_embd": hidden,
        "model.n_kv_head": hf.get("num_key_value_heads") or heads,
        "model.head_size": 0 if head_dim * heads == hidden else head_dim,
        "model.mlp": "swiglu",
        "model.mlp_size": hf["intermediate_size"],
        "model.norm": "rmsnorm",
        "model.norm_eps": hf.get("rms_norm_eps", 1e-6),
        "model.pos_embedding": "rope",
        "model.bias": False,
        "model.qkv_bias": kind == "qwen2",
        "model.qk_norm": kind == "qwen3",
        "model.qk_norm_weight": kind == "qwen3",
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.dropout": 0.0,
        **rope_settings(hf, source),
    }
    return Config().updated(changes)


def llama_name(hf_name: str) -> tuple[str, int | None] | None:
    """A Llama-family tensor's name in gptkit, with its part of a fused matrix (None: not
    fused); None for tensors with no weights (rotary tables)."""
    if hf_name in TOP_LEVEL:
        return TOP_LEVEL[hf_name], None
    parts = hf_name.split(".")
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        block, rest = f"blocks.{parts[2]}", ".".join(parts[3:])
        if rest in RENAMED:
            return f"{block}.{RENAMED[rest]}", None
        proj, _, kind = rest.rpartition(".")
        if proj.split(".")[-1] in FUSED and kind in ("weight", "bias"):
            ours, part = FUSED[proj.split(".")[-1]]
            return f"{block}.{ours}.{kind}", part
    raise GptkitError(f"cannot map tensor {hf_name!r} onto the Llama architecture")


def fuse_llama_weights(
    tensors: Iterator[tuple[str, torch.Tensor]], cfg: Config
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(gptkit name, source name, tensor) for each weight, q/k/v and gate/up fused as they are
    complete: at most one layer's pieces wait, so memory stays near one copy of the weights."""
    m = cfg.model
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, t in tensors:
        mapped = llama_name(hf_name)
        if mapped is None:
            continue
        name, part = mapped
        if name == "lm_head.weight" and m.tie_embeddings:
            continue
        if part is None:
            yield name, hf_name, t
            continue
        pending.setdefault(name, {})[part] = t
        if len(pending[name]) == PIECES[name.split(".", 2)[2].rsplit(".", 1)[0]]:
            parts = pending.pop(name)
            yield name, hf_name, torch.cat([parts[k] for k in sorted(parts)])
    if pending:
        raise GptkitError(
            f"the weights are missing parts of {sorted(pending)[:3]} (q/k/v or gate/up)"
        )


def split_llama_weights(
    name: str, t: torch.Tensor, cfg: Config
) -> Iterator[tuple[str, torch.Tensor]]:
    """gptkit's tensor -> the Llama family's name(s) and tensor(s): fused matrices split."""
    m = cfg.model
    if not name.startswith("blocks."):
        yield TOP_LEVEL_OUT[name], t
        return
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    kind = rest.rsplit(".", 1)[1]
    if rest.startswith("attn.c_attn."):
        sizes = [m.n_head * m.head_dim, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim]
        for proj, piece in zip(("q_proj", "k_proj", "v_proj"), t.split(sizes)):
            yield f"{prefix}self_attn.{proj}.{kind}", piece.contiguous()
    elif rest.startswith("mlp.c_fc."):
        for proj, piece in zip(("gate_proj", "up_proj"), t.chunk(2)):
            yield f"{prefix}mlp.{proj}.{kind}", piece.contiguous()
    else:
        yield prefix + RENAMED_OUT[rest], t


def llama_family(cfg: Config) -> str:
    """Which Llama-family class a run exports as, or one line naming the keys to change."""
    m = cfg.model
    rules = [
        (m.pos_embedding != "rope", "model.pos_embedding=rope"),
        (m.norm != "rmsnorm", "model.norm=rmsnorm"),
        (m.mlp != "swiglu", "model.mlp=swiglu"),
        (m.bias, "model.bias=false"),
        (m.logit_softcap, "model.logit_softcap=0"),
        (
            m.qk_norm and not m.qk_norm_weight,
            "model.qk_norm_weight=true (Qwen3's) or model.qk_norm=false",
        ),
        (m.qk_norm and m.qkv_bias, "model.qkv_bias=false (Qwen3 has no q/k/v biases)"),
        (m.qkv_bias and m.head_size, "model.head_size=0 (Qwen2 has no head_dim of its own)"),
    ]
    wrong = [fix for broken, fix in rules if broken]
    if wrong:
        raise GptkitError(
            "this run is neither a GPT-2 nor a Llama/Qwen architecture; to export it, train with "
            + ", ".join(wrong)
        )
    return "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"


def llama_hf_config(cfg: Config, family: str, tok: Tokenizer | None, dtype: str) -> dict:
    m = cfg.model
    rope: dict = {"rope_type": "default", "rope_theta": m.rope_base}
    if m.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=m.rope_factor,
            low_freq_factor=m.rope_low_freq_factor,
            high_freq_factor=m.rope_high_freq_factor,
            original_max_position_embeddings=m.rope_original_context,
        )
    bos = tok.bos_id if tok is not None and tok.bos_id is not None else None
    eos = tok.eos_ids if tok is not None else [m.vocab_size - 1]
    out = {
        "architectures": [LLAMA_FAMILY[family]],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.mlp_hidden,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "rope_scaling": None if m.rope_scaling == "none" else dict(rope),
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if family == "llama":
        out["mlp_bias"] = False
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out
