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
