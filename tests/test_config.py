from __future__ import annotations

from pathlib import Path

import pytest

from gptkit.config import Config, all_keys, apply_overrides, load_config
from gptkit.errors import GptkitError


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert len(all_keys()) == len(set(all_keys()))


def test_yaml_and_toml_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.0005\n")
    t = tmp_path / "c.toml"
    t.write_text("[model]\nn_layer = 3\n[train]\nlr = 0.0005\n")
    for f in (y, t):
        cfg = load_config(f, ["train.max_steps=7", "model.bias=false", "train.dtype=bfloat16"])
        assert cfg.model.n_layer == 3 and cfg.train.lr == 5e-4
        assert cfg.train.max_steps == 7 and cfg.model.bias is False and cfg.train.dtype == "bfloat16"


def test_round_trip_through_saved_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.n_layer=5", "data.tokenizer=bpe", "train.lr=3e-4"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_unknown_key_names_nearest() -> None:
    with pytest.raises(GptkitError, match=r"unknown config key 'model.n_layers'.*'model.n_layer'"):
        load_config(None, ["model.n_layers=3"])
    with pytest.raises(GptkitError, match="train.lr"):
        Config.from_dict({"train": {"lrr": 1}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_embd=100", "divisible"),
        ("model.n_layer=0", "positive"),
        ("train.batch_size=-4", "positive"),
        ("train.lr=fast", "must be a number"),
        ("train.max_steps=many", "must be an integer"),
        ("model.mlp_ratio=0.001", "mlp_ratio"),
        ("train.device=meta", "train.device must be"),
        ("train.muon_lr=-0.02", "muon_lr must be positive"),
        ("model.rope_base=0", "rope_base"),
        ("model.logit_softcap=inf", "finite"),
        ("train.lr=nan", "finite"),
        ("train.max_time_s=.inf", "finite"),
        ("model.dropout=1.5", "dropout"),
        ("train.dtype=int8", "dtype"),
        ("data.tokenizer=words", "tokenizer"),
        ("model.n_kv_head=4", "n_kv_head"),
        ("model.n_layer", "key=value"),
    ],
)
def test_bad_values_are_clear(override: str, message: str) -> None:
    with pytest.raises(GptkitError, match=message):
        load_config(None, [override])


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(GptkitError, match="cannot parse"):
        load_config(bad)


def test_override_keeps_types() -> None:
    cfg = apply_overrides(Config(), ["train.max_steps=1e3", "train.compile=yes"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.compile is True


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("model.pos_embedding", "alibi", "learned or rope"),
        ("model.norm", "batchnorm", "layernorm or rmsnorm"),
        ("model.mlp", "geglu", "gelu, gelu_exact, relu2 or swiglu"),
        ("train.schedule", "linear", "cosine, wsd or constant"),
        ("train.optimizer", "sgd", "adamw or muon"),
        ("train.dtype", "fp8", "auto, float32, bfloat16 or float16"),
    ],
)
def test_allowed_values_come_from_the_types(key: str, value: str, allowed: str) -> None:
    """Each Literal field refuses a value outside its type by name, listing what it allows."""
    with pytest.raises(GptkitError, match=rf"{key} must be {allowed}, got '{value}'"):
        load_config(None, [f"{key}={value}"])
    with pytest.raises(GptkitError, match=rf"{key} must be {allowed}"):
        Config.from_dict({key.split(".")[0]: {key.split(".")[1]: value}})


def test_derived_sizes() -> None:
    m = load_config(None, ["model.n_embd=384", "model.n_head=6", "model.n_kv_head=2"]).model
    assert (m.head_dim, m.kv_heads, m.mlp_hidden) == (64, 2, 1536)
    m = load_config(None, ["model.n_embd=384", "model.n_head=6", "model.mlp=swiglu"]).model
    assert (m.kv_heads, m.mlp_hidden) == (6, 1024)  # SwiGLU: 2/3 of the width, same parameters


def test_lineage_is_bookkeeping_not_a_setting(tmp_path: Path) -> None:
    """lineage.* is written by gptkit and refused from --set; a config.yaml from before it
    existed (finetune.base_sha256) still loads, into lineage."""
    with pytest.raises(GptkitError, match=r"lineage.base_sha256 is bookkeeping.*cannot be set"):
        load_config(None, ["lineage.base_sha256=abc"])
    assert "lineage.base_sha256" not in all_keys()
    old = tmp_path / "config.yaml"
    old.write_text("finetune:\n  base: /x\n  base_sha256: abc\n  base_vocab_size: 65\n")
    cfg = load_config(old)
    assert (cfg.finetune.base, cfg.lineage.base_sha256, cfg.lineage.base_vocab_size) == (
        "/x",
        "abc",
        65,
    )
    cfg.save(tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_updated_is_a_validated_copy() -> None:
    cfg = load_config()
    new = cfg.updated({"train.max_steps": "30", "model.n_layer": 3})
    assert (new.train.max_steps, new.model.n_layer) == (30, 3)
    assert cfg.train.max_steps != 30 and cfg.model.n_layer != 3  # the original is untouched
    with pytest.raises(GptkitError, match="train.lr must be positive"):
        cfg.updated({"train.lr": -1.0})


def test_model_config_from_base() -> None:
    """A run started from a base keeps its architecture: the context never grows past the
    base's, the vocabulary never shrinks, dropout is the new run's."""
    from gptkit.config import model_config_from_base

    base = load_config(None, ["model.block_size=256", "model.vocab_size=65", "model.n_layer=3"]).model
    m = model_config_from_base(base, block_size=128, dropout=0.1, vocab_size=69)
    assert (m.block_size, m.dropout, m.vocab_size, m.n_layer) == (128, 0.1, 69, 3)
    m = model_config_from_base(base, block_size=1024, vocab_size=10)
    assert (m.block_size, m.vocab_size, m.dropout) == (256, 65, 0.0)
    assert model_config_from_base(base).block_size == 256  # 0: the base's
    assert base.block_size == 256 and base.vocab_size == 65  # the base's config is not changed
