"""Typed configuration: dataclasses loadable from YAML/TOML, overridable with dotted keys.

A run's whole configuration is one `Config`; it is saved beside every checkpoint as
`config.yaml`, so a run can be reproduced and resumed from its folder alone.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptkit.errors import GptkitError


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the tokenizer
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # Modern options; the defaults give the GPT-2 architecture.
    pos_embedding: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False
    mlp: Literal["gelu", "gelu_exact", "relu2", "swiglu"] = "gelu"
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True
    zero_init_head: bool = False  # only for an untied head
    logit_softcap: float = 0.0  # 0: off; else logits = c * tanh(logits / c)
    n_kv_head: int = 0  # 0: same as n_head; fewer gives grouped-query attention
    # What the Llama / Qwen families need besides (all neutral by default):
    head_size: int = 0  # 0: n_embd / n_head; else each head's width (Qwen3: 128 at any n_embd)
    mlp_size: int = 0  # 0: from mlp_ratio; else the MLP's hidden width (HF's intermediate_size)
    norm_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm (HF's rms_norm_eps)
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)
    qk_norm_weight: bool = False  # qk_norm with learned per-dimension gains for q and k (Qwen3)
    rope_scaling: Literal["none", "llama3"] = "none"  # Llama 3's long-context frequency scaling
    rope_factor: float = 8.0  # llama3 scaling: factor, low/high frequency factors, the context
    rope_low_freq_factor: float = 1.0  # the frequencies were trained for
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    # Weight-only quantization of every Linear, for inference (gptkit quantize; quantize.py).
    quantization: Literal["none", "int8", "int4"] = "none"
    # int8 at one row a product (batch-1 decoding): the row's activations quantized to int8 too,
    # per row, for an int8 x int8 kernel (about twice the speed here); "bf16": weight-only always.
    int8_activations: Literal["int8", "bf16"] = "int8"

    # Derived sizes, computed in one place.
    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or one per query head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        """Units of the MLP's hidden layer. SwiGLU has two input matrices instead of one, so it
        takes 2/3 of the plain MLP's width and keeps its parameter count."""
        if self.mlp_size:
            return self.mlp_size
        hidden = int(self.mlp_ratio * self.n_embd)
        return int(2 * hidden / 3) if self.mlp == "swiglu" else hidden


def model_config_from_base(
    base: ModelConfig, block_size: int = 0, dropout: float = 0.0, vocab_size: int = 0
) -> ModelConfig:
    """The architecture of a run that starts from a base run's weights: the base's, with the
    context cut to block_size (0: the base's; never longer, there are no position embeddings
    past it), its own dropout, and the vocabulary grown to vocab_size (never shrunk)."""
    return dataclasses.replace(
        base,
        block_size=min(block_size or base.block_size, base.block_size),
        dropout=dropout,
        vocab_size=max(base.vocab_size, vocab_size),
    )


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 16  # sequences per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final learning rate = lr * min_lr_ratio
    warmup_steps: int = 100
    # wsd: warm-up, stable, linear warm-down
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmdown_frac: float = 0.3  # share of steps spent decaying, for schedule=wsd
    # muon: Muon for hidden matrices, AdamW for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    eval_interval: int = 250
    # batches per periodic evaluation (0: the whole split); the final one covers it all
    eval_batches: int = 20
    eval_every_s: float = 0.0  # also evaluate every this many seconds of training (0: off)
    # stop after this many evaluations without a lower validation loss, keeping the best weights (0:
    # off)
    patience: int = 0
    # early stopping: a new best must be lower by this share of the best (counted as >= 0.1 nats)
    min_delta: float = 0.01
    log_interval: int = 10
    checkpoint_interval: int = 1000
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; weights stay fp32
    compile: bool = False
    # under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP
    fsdp: bool = False
    max_time_s: float = 0.0  # 0: no limit; else stop (and save) after this many seconds of training
    tensorboard: bool = True
    sample_tokens: int = 0  # print a sample of this many tokens at the end (0: none)
    sample_prompt: str = ""  # what the sample continues ("": a new line, or nothing for BPE)
    threads: int = 0  # 0: let torch decide


@dataclass
class DataConfig:
    dir: str = ""  # a folder made by `gptkit prepare`
    tokenizer: str = "char"  # char | bpe | gpt2:PATH | run:RUN_DIR (the tokenizer of another run)
    vocab_size: int = 4096  # for tokenizer=bpe
    val_fraction: float = 0.1


@dataclass
class FinetuneConfig:
    """Instruction fine-tuning (`gptkit finetune`); empty `base` means pretraining."""

    base: str = ""  # the base run folder the weights come from
    # instruction files, JSON or JSONL (Alpaca or chat format)
    data: list[str] = field(default_factory=list)
    val_fraction: float = 0.1  # share of examples held out for the validation loss
    # > 0: train this many passes over the training examples (sets train.max_steps)
    epochs: float = 0.0
    block_size: int = 0  # 0: the base's context; else examples are cut to this many tokens
    skip_invalid: bool = False  # skip malformed records (counted) instead of stopping at the first
    # full: every weight trains; lora, adapter, adalora: a small module over the frozen base
    # (sections lora, adapter, adalora), saved apart from it
    method: Literal["full", "lora", "adapter", "adalora"] = "full"
    # instruct: instruction or chat records; classify: {"text", label} records, the label as the
    # answer (gptkit/classify.py)
    task: Literal["instruct", "classify"] = "instruct"
    label_field: str = "label"  # classify: the record key that holds the label
    labels: list[str] = field(default_factory=list)  # classify: the labels, found in the data


@dataclass
class Lineage:
    """Bookkeeping gptkit writes when a fine-tune starts; never the user's (--set refuses it)."""

    base_vocab_size: int = 0  # rows of the base model's embedding; rows past it are new tokens
    base_sha256: str = ""  # checksum of the base weights, so an adapter never meets the wrong base


@dataclass
class LoraConfig:
    enabled: bool = False  # kept in step with finetune.method == "lora" (older runs set only this)
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    # Linear names (suffixes)
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])


@dataclass
class AdapterConfig:
    """Bottleneck adapters (Houlsby et al. 2019): h + up(act(down(h))) on a sublayer's output h,
    before the residual add; `pfeiffer` places one after the MLP only (Pfeiffer et al. 2021)."""

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = 16  # bottleneck width = n_embd // reduction_factor
    activation: Literal["swish", "relu", "gelu", "tanh"] = "swish"
    # Houlsby's paper also trains the layer norms; the adapters library leaves them frozen
    train_norms: bool = False


@dataclass
class AdaLoraConfig:
    """AdaLoRA (Zhang et al. 2023): the update P diag(E) Q over init_r singular triplets, pruned by
    importance to an average of target_r a matrix on a cubic schedule. Names and meaning as PEFT's
    AdaLoraConfig: warm-up tinit steps at init_r, the budget falls until total_step - tfinal, a
    reallocation every deltaT steps, EMA betas of sensitivity and uncertainty, orth_reg_weight on
    ||P^T P - I|| + ||Q Q^T - I||."""

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int = 0  # 0: train.max_steps (with finetune.epochs, the steps they come to)
    alpha: float = 8.0  # the update is scaled by alpha / init_r, as in PEFT (lora_alpha)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])


TRACKERS = ("wandb", "mlflow")  # beside TensorBoard (train.tensorboard) and metrics.jsonl


@dataclass
class TrackConfig:
    """Experiment trackers (`--tracker`); each package is imported only when chosen."""

    backends: list[str] = field(default_factory=list)  # wandb, mlflow
    project: str = "gptkit"  # the W&B project / MLflow experiment
    name: str = ""  # the tracker run's name ("": the run folder's)
    group: str = ""  # a W&B group / MLflow tag, e.g. a tuning study
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: `wandb sync` uploads later
    mlflow_uri: str = ""  # "": a local SQLite store, RUN/mlflow.db
    artifact: bool = False  # upload the final checkpoint as an artifact


@dataclass
class DistillConfig:
    """Knowledge distillation: the run learns a teacher's next-token distributions as well as the
    data's tokens (a draft for speculative decoding that guesses what its target would say)."""

    teacher: str = ""  # a run folder sharing this run's tokenizer ("": no teacher)
    # the loss: (1 - weight) * cross-entropy + weight * temperature^2 * KL(teacher || student)
    weight: float = 0.5
    temperature: float = 1.0  # both distributions are softened by it before the KL


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    adalora: AdaLoraConfig = field(default_factory=AdaLoraConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lineage: Lineage = field(default_factory=Lineage)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        if not isinstance(d, dict):
            raise GptkitError(
                f"{source}: expected a mapping of sections (model, train, data), got "
                f"{type(d).__name__}"
            )
        for section, values in d.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise GptkitError(
                    f"{source}: section '{section}' must be a mapping of keys to values"
                )
            for key, value in values.items():
                # config.yaml of runs made before Lineage
                if section == "finetune" and key in LINEAGE_KEYS:
                    section_key = f"lineage.{key}"
                else:
                    section_key = f"{section}.{key}"
                set_key(cfg, section_key, value, source=source, internal=True)
        return cfg

    def with_model(self, model: ModelConfig) -> Config:
        """A validated copy whose architecture is `model` (a base run's, for a run that starts
        from its weights)."""
        return self.updated(
            {f"model.{f.name}": getattr(model, f.name) for f in dataclasses.fields(model)}
        )

    def updated(self, changes: dict[str, Any]) -> Config:
        """A validated copy with `changes` ({"section.key": value}) applied, typed as --set is; the
        original is left as it was. Resolving a run's config builds it with this, once."""
        cfg = copy.deepcopy(self)
        for key, value in changes.items():
            set_key(cfg, key, value, source="config", internal=True)
        return cfg.validate()

    def flat(self) -> dict[str, Any]:
        """Every key, gptkit's bookkeeping included, as {"section.key": value}."""
        return {
            f"{s.name}.{f.name}": getattr(getattr(self, s.name), f.name)
            for s in dataclasses.fields(self)
            for f in dataclasses.fields(getattr(self, s.name))
        }

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> Config:
        # finetune.method and lora.enabled say the same for LoRA; runs made before the method
        # key set only lora.enabled
        if self.lora.enabled and self.finetune.method == "full":
            self.finetune.method = "lora"
        self.lora.enabled = self.finetune.method == "lora"
        validate(self)
        return self

    @property
    def adapted(self) -> bool:
        """The run trains (and saves) a small module over a frozen base run."""
        return self.finetune.method != "full"


INTERNAL_SECTIONS = ("lineage",)
LINEAGE_KEYS = tuple(f.name for f in dataclasses.fields(Lineage))


def all_keys(cfg: Config | None = None, internal: bool = False) -> list[str]:
    """Every section.key a user may set (with internal: gptkit's bookkeeping too)."""
    cfg = cfg or Config()
    return [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(cfg)
        if internal or s.name not in INTERNAL_SECTIONS
        for f in dataclasses.fields(getattr(cfg, s.name))
    ]


def _unknown_key(key: str, source: str) -> GptkitError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; see the README for the list of keys"
    return GptkitError(f"{source}: unknown config key '{key}'{hint}")


_NO = object()  # a converter's "this value is not of my type"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _as_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return _NO


def _as_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _NO
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value.replace("_", ""))  # 5_000 and 1e4 as YAML and shells write them
        except ValueError:
            return _NO
        return int(f) if f.is_integer() else _NO
    return _NO


def _as_float(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return _NO
    return _NO


def _as_str(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return _NO


_CONVERTERS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Turn a YAML value or a --set string into the field's type, or say why it cannot be."""
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        if value in allowed:
            return value
        choices = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise GptkitError(f"{source}: {key} must be {choices}, got {value!r}")
    if typing.get_origin(typ) is list:
        if isinstance(value, str):  # --set lora.targets=c_attn,c_fc
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (str, int, float)) for v in value
        ):
            return [str(v) for v in value]
        raise GptkitError(
            f"{source}: {key} must be a list of strings (YAML list or comma-separated), got "
            f"{value!r}"
        )
    converter = _CONVERTERS.get(typ)
    out = converter(value) if converter is not None else _NO
    if out is _NO:
        raise GptkitError(f"{source}: {key} must be {_KINDS.get(typ, str(typ))}, got {value!r}")
    return out


def set_key(
    cfg: Config, key: str, value: Any, source: str = "--set", internal: bool = False
) -> None:
    """Set section.key from a YAML value or a --set string, typed by the field. Bookkeeping
    sections (INTERNAL_SECTIONS) are written by gptkit only (internal=True)."""
    parts = key.split(".")
    if (
        len(parts) != 2
        or not hasattr(cfg, parts[0])
        or not dataclasses.is_dataclass(getattr(cfg, parts[0]))
    ):
        raise _unknown_key(key, source)
    if parts[0] in INTERNAL_SECTIONS and not internal:
        raise GptkitError(
            f"{source}: {key} is bookkeeping that gptkit writes when a fine-tune starts; it cannot "
            "be set"
        )
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise _unknown_key(key, source)
    setattr(section, parts[1], _coerce(value, hints[parts[1]], key, source))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides or []:
        if "=" not in item:
            raise GptkitError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "", source="--set")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the file (YAML or TOML), then `key=value` overrides; validated."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise GptkitError(f"config file not found: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib  # type: ignore[no-redef]
                data = tomllib.loads(text)
            else:
                data = yaml.safe_load(text) or {}
        except Exception as e:  # a syntax error in the user's file
            raise GptkitError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from e
        cfg = Config.from_dict(data, source=str(p))
    apply_overrides(cfg, overrides or [])
    return cfg.validate()


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise GptkitError(msg)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# Bounds on single keys, one rule each: "> 0", ">= 0", or an interval such as "[0, 1)". The note
# says what the edge value means or what is usual, and goes into the error message.
BOUNDS: list[tuple[str, str, str]] = [
    ("model.block_size", "> 0", ""),
    ("model.n_layer", "> 0", ""),
    ("model.n_head", "> 0", ""),
    ("model.n_embd", "> 0", ""),
    ("model.vocab_size", ">= 0", "0 = from the tokenizer"),
    ("model.dropout", "[0, 1)", ""),
    ("model.logit_softcap", ">= 0", "0 = off"),
    ("model.rope_base", "> 1", "10000 is usual"),
    ("model.head_size", ">= 0", ""),
    ("model.mlp_size", ">= 0", ""),
    ("model.rope_original_context", ">= 0", ""),
    ("model.norm_eps", "> 0", "1e-5 is usual"),
    ("train.eval_batches", ">= 0", "0 = the whole split"),
    ("train.min_delta", "[0, 1)", ""),
    ("train.patience", ">= 0", "0 = no early stopping"),
    ("train.eval_every_s", ">= 0", "0 = off"),
    ("train.max_steps", "> 0", ""),
    ("train.batch_size", "> 0", ""),
    ("train.grad_accum", "> 0", ""),
    ("train.eval_interval", "> 0", ""),
    ("train.log_interval", "> 0", ""),
    ("train.checkpoint_interval", "> 0", ""),
    ("train.lr", "> 0", ""),
    ("train.muon_lr", "> 0", ""),
    ("train.muon_momentum", "[0, 1)", ""),
    ("train.warmup_steps", ">= 0", ""),
    ("train.min_lr_ratio", "[0, 1]", ""),
    ("train.warmdown_frac", "[0, 1]", ""),
    ("train.weight_decay", ">= 0", ""),
    ("train.beta1", "[0, 1)", ""),
    ("train.beta2", "[0, 1)", ""),
    ("train.grad_clip", ">= 0", "0 = off"),
    ("train.max_time_s", ">= 0", "0 = no limit"),
    ("train.threads", ">= 0", ""),
    ("data.val_fraction", "(0, 1)", ""),
    ("distill.weight", "[0, 1]", "1 = the teacher alone"),
    ("distill.temperature", "> 0", "1 = the teacher's own distribution"),
    ("finetune.val_fraction", "[0, 1)", ""),
    ("finetune.epochs", ">= 0", "0 = train.max_steps decides"),
    ("finetune.block_size", ">= 0", "0 = the base's context"),
    ("lora.rank", "> 0", ""),
    ("lora.alpha", "> 0", ""),
    ("lora.dropout", "[0, 1)", ""),
    ("adapter.reduction_factor", "> 0", ""),
    ("adalora.init_r", "> 0", ""),
    ("adalora.target_r", "> 0", ""),
    ("adalora.tinit", ">= 0", ""),
    ("adalora.tfinal", ">= 0", ""),
    ("adalora.deltaT", "> 0", ""),
    ("adalora.beta1", "(0, 1)", ""),
    ("adalora.beta2", "(0, 1)", ""),
    ("adalora.orth_reg_weight", ">= 0", ""),
    ("adalora.total_step", ">= 0", "0 = train.max_steps"),
    ("adalora.alpha", "> 0", ""),
    ("adalora.dropout", "[0, 1)", ""),
]


def _within(value: float, rule: str) -> bool:
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    above = value >= lo if rule[0] == "[" else value > lo
    return above and (value <= hi if rule[-1] == "]" else value < hi)


def _check_bounds(cfg: Config) -> None:
    for key, rule, note in BOUNDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        what = "positive" if rule == "> 0" else rule if rule[0] in "<>" else f"in {rule}"
        _check(
            _within(value, rule), f"{key} must be {what}{f' ({note})' if note else ''}, got {value}"
        )


def _check_model(m: ModelConfig) -> None:
    """The rules between model keys."""
    _check(
        m.head_size > 0 or m.n_embd % m.n_head == 0,
        f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
        f"e.g. n_embd={m.n_head * max(1, round(m.n_embd / m.n_head))}",
    )
    _check(
        m.mlp_ratio > 0 and m.mlp_hidden >= 1,
        f"model.mlp_ratio ({m.mlp_ratio}) gives an MLP of {max(m.mlp_hidden, 0)} units at "
        f"n_embd={m.n_embd}; use 4 (GPT-2) or about 2.7 (SwiGLU)",
    )
    _check(
        0 < m.kv_heads <= m.n_head and m.n_head % m.kv_heads == 0,
        f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})",
    )
    if m.pos_embedding == "rope":
        _check(m.head_dim % 2 == 0, "RoPE needs an even head size (n_embd / n_head)")
    _check(not m.qk_norm_weight or m.qk_norm, "model.qk_norm_weight needs model.qk_norm=true")
    if m.rope_scaling != "none":
        _check(m.pos_embedding == "rope", "model.rope_scaling needs model.pos_embedding=rope")
        _check(m.rope_factor >= 1, f"model.rope_factor must be >= 1, got {m.rope_factor}")
        _check(
            m.rope_high_freq_factor > m.rope_low_freq_factor > 0,
            "model.rope_high_freq_factor must exceed model.rope_low_freq_factor, both positive",
        )


def _check_adalora(cfg: Config) -> None:
    a, t = cfg.adalora, cfg.train
    _check(bool(a.targets), "adalora.targets must name at least one Linear layer, e.g. c_attn")
    _check(
        a.target_r <= a.init_r,
        f"adalora.target_r ({a.target_r}) is above adalora.init_r ({a.init_r}): the rank budget "
        "can only shrink; raise init_r or lower target_r",
    )
    if cfg.finetune.method != "adalora":
        return
    _check(
        a.total_step > 0 or cfg.finetune.epochs > 0 or t.patience == 0,
        "AdaLoRA's rank schedule needs its step count up front, and early stopping "
        "(train.patience) leaves it open: set adalora.total_step=N, or finetune.epochs=E, or "
        "train.patience=0 to train all train.max_steps",
    )
    total = a.total_step or t.max_steps
    _check(
        total <= t.max_steps,
        f"adalora.total_step ({total}) is beyond train.max_steps ({t.max_steps}): the schedule "
        "would not finish",
    )
    _check(
        a.tinit < total - a.tfinal,
        f"adalora: tinit ({a.tinit}) must end before total_step - tfinal ({total} - {a.tfinal}), "
        "or no step is left to reallocate ranks in",
    )


def validate(cfg: Config) -> None:
    # nan and inf pass every comparison below one way or the other; refuse them once, for every key.
    for key in all_keys(cfg, internal=True):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, float):
            _check(math.isfinite(value), f"{key} must be a finite number, got {value}")
    _check_bounds(cfg)
    # Bounds first: the rules between keys divide by some of them.
    _check_model(cfg.model)
    t, d = cfg.train, cfg.data
    _check(
        DEVICE_PATTERN.fullmatch(t.device) is not None,
        f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}",
    )
    _check(
        # gpt2 and hf: the kind a prepared folder's tokenizer records (its files are there)
        d.tokenizer in ("char", "bpe", "gpt2", "hf") or d.tokenizer.startswith(("gpt2:", "run:")),
        f"data.tokenizer must be char, bpe, gpt2:PATH or run:RUN_DIR, got {d.tokenizer!r}",
    )
    _check(
        d.vocab_size >= 256 or d.tokenizer != "bpe",
        f"data.vocab_size must be >= 256 for a byte-level BPE, got {d.vocab_size}",
    )
    _check(
        bool(cfg.lora.targets),
        "lora.targets must name at least one Linear layer, e.g. c_attn,c_proj,c_fc",
    )
    _check_adalora(cfg)
    for name in cfg.track.backends:
        _check(
            name in TRACKERS,
            f"track.backends: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} "
            "(TensorBoard is train.tensorboard)",
        )
