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
from safetensors import safe_open
from safetensors.torch import save_file

from gptkit.checkpoint import (
    CKPT,
    MODEL_FILE,
    checkpoint_dir,
    load_run_config,
    refuse_nonempty,
    staged_folder,
    write_state_json,
)
from gptkit.config import Config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import EOT, HFTokenizer, load_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older versions


def _hf_config_to_ours(hf: dict, source: Path) -> Config:
    if hf.get("model_type") != "gpt2":
        raise GptkitError(
            f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2'; only GPT-2 checkpoints "
            "convert"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptkitError(
            f"{source}: activation_function {act!r} is not GPT-2's tanh GELU; cannot convert "
            "exactly"
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
    m.tie_embeddings = hf.get("tie_word_embeddings", True)
    m.dropout = 0.0
    cfg.validate()
    return cfg


def _open_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    st = folder / "model.safetensors"
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:
            if isinstance(e, GptkitError):
                raise
            raise GptkitError(
                f"{st}: cannot read ({e}); the file is truncated or corrupt"
            ) from None
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
    raise GptkitError(f"{folder}: no model.safetensors or pytorch_model.bin")


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
    """A Hugging Face GPT2LMHeadModel folder -> a gptkit run folder (config, weights, tokenizer)."""
    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise GptkitError(f"{folder}: no config.json; expected a Hugging Face model folder")
    refuse_nonempty(out, overwrite)
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise GptkitError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    cfg = _hf_config_to_ours(hf_cfg, folder / "config.json")
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = {k: tuple(v.shape) for k, v in GPT(cfg.model).state_dict().items()}
    if cfg.model.tie_embeddings:
        expected.pop("lm_head.weight", None)

    tok = None
    if tokenizer:
        tok = HFTokenizer.gpt2(tokenizer.removeprefix("gpt2:"))
    elif any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json", "encoder.json")):
        tok = HFTokenizer.gpt2(folder)
    if tok is not None and tok.vocab_size > cfg.model.vocab_size:
        raise GptkitError(
            f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only "
            f"{cfg.model.vocab_size} embeddings"
        )

    with staged_folder(out) as tmp:
        sd: dict[str, torch.Tensor] = {}
        for hf_name, t in _open_hf_weights(folder):
            name = _our_name(hf_name)
            if name is None or (name == "lm_head.weight" and cfg.model.tie_embeddings):
                continue
            if name.endswith(CONV1D):
                t = t.t()
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
        cfg.train.dtype = "float32"
        cfg.data.tokenizer = f"gpt2:{tokenizer or folder}" if tok is not None else "gpt2:"
        cfg.save(tmp / "config.yaml")
        if tok is not None:
            tok.save(tmp / "tokenizer")
        (tmp / CKPT).mkdir()
        save_file(sd, str(tmp / CKPT / MODEL_FILE))
        del sd
        # A weights-only checkpoint: no optimizer state.
        info = {
            "step": 0,
            "tokens_seen": 0,
            "elapsed_s": 0.0,
            "optimizers": [],
            "weights_only": True,
        }
        write_state_json(tmp / CKPT, info, [MODEL_FILE])
    return out


def check_exportable(cfg: Config) -> None:
    if cfg.lora.enabled:
        raise GptkitError(
            "this run holds a LoRA adapter, not full weights; merge it first: gptkit merge RUN "
            "--out MERGED"
        )
    m = cfg.model
    problems = []
    if m.pos_embedding != "learned":
        problems.append("model.pos_embedding=learned")
    if m.norm != "layernorm":
        problems.append("model.norm=layernorm")
    if m.mlp != "gelu":
        problems.append("model.mlp=gelu")
    if m.qk_norm:
        problems.append("model.qk_norm=false")
    if m.logit_softcap:
        problems.append("model.logit_softcap=0")
    if m.n_kv_head not in (0, m.n_head):
        problems.append("model.n_kv_head=0")
    if problems:
        raise GptkitError(
            f"this run is not a GPT-2 architecture; export needs {', '.join(problems)}"
        )


def export_hf(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A gptkit run -> a folder that transformers' AutoModelForCausalLM / AutoTokenizer load
    offline."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    check_exportable(cfg)
    ckpt = checkpoint_dir(run_dir)
    refuse_nonempty(out, overwrite, "choose another folder")
    tok = load_tokenizer(run_dir / "tokenizer") if (run_dir / "tokenizer").is_dir() else None
    m = cfg.model
    with staged_folder(out) as tmp:
        sd: dict[str, torch.Tensor] = {}
        with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
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
            "n_inner": int(m.mlp_ratio * m.n_embd),
            "activation_function": "gelu_new",
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
            "max_new_tokens": 256,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tok is not None:
            _export_tokenizer(tok, tmp, m.block_size)
    return out


def _export_tokenizer(tok: object, folder: Path, max_len: int) -> None:
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
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": EOT,
                "eos_token": EOT,
                "unk_token": EOT,
                "model_max_length": max_len,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT})
    )
