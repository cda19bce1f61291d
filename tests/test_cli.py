"""The command line end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_overrides


def gptkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def sets(**extra: object) -> list[str]:
    return [a for kv in tiny_overrides(**extra) for a in ("--set", kv)]


def test_prepare_train_generate_eval(tmp_path: Path, small_text: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    p = gptkit("prepare", str(small_text), "--out", str(data), "--tokenizer", "bpe", "--vocab-size", "300", "--no-progress")
    assert p.returncode == 0, p.stderr
    meta = json.loads(p.stdout)
    assert meta["vocab_size"] == 300 and meta["train_tokens"] > 0
    p = gptkit("train", "--data", str(data), "--out", str(run), "--no-progress", *sets(**{"train.sample_tokens": 20}))
    assert p.returncode == 0, p.stderr
    assert "validation loss" in p.stdout and "--- sample ---" in p.stdout
    p = gptkit("generate", str(run), "--prompt", "KING", "--max-new-tokens", "30", "--seed", "1", "--num-samples", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("KING") >= 2 and "--- sample 2 ---" in p.stdout
    p = gptkit("eval", str(run))
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens"}


def test_train_text_with_config_file_and_resume(tmp_path: Path, small_text: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 16\n  block_size: 16\ntrain:\n  max_steps: 6\n")
    run = tmp_path / "run"
    base = [
        "--no-progress",
        "--set",
        "train.tensorboard=false",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "train.eval_interval=3",
    ]
    p = gptkit("train", "--config", str(cfg), "--text", str(small_text), "--out", str(run), *base)
    assert p.returncode == 0, p.stderr
    assert (run / "data" / "train.bin").is_file()
    p = gptkit("train", "--resume", str(run), "--set", "train.max_steps=9", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 9
    # The run folder alone is enough: move it and evaluate.
    moved = tmp_path / "moved"
    run.rename(moved)
    assert gptkit("eval", str(moved)).returncode == 0


def test_python_m_and_help() -> None:
    p = gptkit("--help")
    assert p.returncode == 0 and "prepare" in p.stdout and "generate" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "model.n_layers=2"], "did you mean 'model.n_layer'"),
        (["train", "--set", "model.n_embd=100", "--set", "model.n_head=3"], "divisible"),
        (["train", "--set", "train.batch_size=0"], "train.batch_size must be positive"),
        (["train", "--text", "/nonexistent/corpus.txt"], "no such file"),
        (["train", "--config", "/nonexistent.yaml"], "config file not found"),
        (["train", "--resume", "/nonexistent_run"], "no such run folder"),
        (["generate", "/tmp", "--prompt", "x"], "not a gptkit run folder"),
        (["generate", "/nonexistent_run", "--prompt", "x"], "no such run folder"),
        (["eval", "/nonexistent_run"], "no such run folder"),
        (["prepare", "/nonexistent.txt", "--out", "x"], "no such file"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    p = gptkit(*args, cwd=tmp_path)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_bad_corpora_on_the_command_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\xc3\x28 more")
    short = tmp_path / "short.txt"
    short.write_text("a tiny corpus\n")
    for f, message in (
        (empty, "corpus is empty"),
        (bad, "invalid UTF-8 at byte offset 10"),
        (short, "fewer than one context window"),
    ):
        p = gptkit("train", "--text", str(f), "--out", str(tmp_path / f.stem), *sets())
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def test_existing_run_and_corrupt_checkpoint(tmp_path: Path, small_text: Path) -> None:
    run = tmp_path / "run"
    assert (
        gptkit("train", "--text", str(small_text), "--out", str(run), "--no-progress", *sets(**{"train.max_steps": 2})).returncode
        == 0
    )
    weights = run / "checkpoint" / "model.safetensors"
    before = weights.read_bytes()
    p = gptkit("train", "--text", str(small_text), "--out", str(run), *sets())
    assert p.returncode == 2 and "already holds a run" in p.stderr
    assert weights.read_bytes() == before
    weights.write_bytes(before[:100])
    for cmd in (["generate", str(run), "--prompt", "a"], ["eval", str(run)], ["train", "--resume", str(run)]):
        p = gptkit(*cmd)
        assert p.returncode == 2 and "truncated" in p.stderr, p.stderr
    assert weights.read_bytes() == before[:100]  # nothing was overwritten


def test_unknown_prompt_character(tmp_path: Path, trained_run: Path) -> None:
    p = gptkit("generate", str(trained_run), "--prompt", "héllo")
    assert p.returncode == 2 and "U+00E9" in p.stderr


def test_convert_and_export_commands(tmp_path: Path, trained_run: Path) -> None:
    hf = tmp_path / "hf"
    p = gptkit("export", str(trained_run), "--to-hf", str(hf))
    assert p.returncode == 0, p.stderr
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    p = gptkit("convert", "--from-hf", str(hf), "--out", str(tmp_path / "back"))
    assert p.returncode == 0, p.stderr
    p = gptkit("generate", str(tmp_path / "back"), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20")
    q = gptkit("generate", str(trained_run), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20")
    assert p.returncode == 0 and p.stdout == q.stdout
    p = gptkit("export", str(trained_run), "--to-hf", str(hf))
    assert p.returncode == 2 and "not empty" in p.stderr
    p = gptkit("convert", "--from-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "no config.json" in p.stderr and not (tmp_path / "x").exists()


def test_default_preset_is_the_configs_file() -> None:
    from gptkit.config import load_config
    from gptkit.data import default_preset

    from .conftest import ROOT

    assert load_config(ROOT / "configs" / "shakespeare-char.yaml") == load_config(default_preset())
    cfg = load_config(default_preset())
    assert cfg.train.max_time_s <= 280  # the main job must finish within five minutes


def test_init_from_fine_tunes_a_run(tmp_path: Path, trained_run: Path, small_text: Path) -> None:
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("model:\n  block_size: 16\n  dropout: 0.1\ntrain:\n  max_steps: 5\n  lr: 0.0003\n  log_interval: 1\n")
    out = tmp_path / "ft"
    args = ["--set", "train.tensorboard=false", "--set", "train.dtype=float32", "--no-progress"]
    p = gptkit(
        "train", "--init-from", str(trained_run), "--config", str(cfg), "--text", str(small_text), "--out", str(out), *args
    )
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base_final = [json.loads(r) for r in (trained_run / "metrics.jsonl").read_text().splitlines() if "final" in r][0]
    first = next(r["loss"] for r in rows if "loss" in r)
    assert first < base_final["final_val_loss"] + 0.3  # starts where the base run ended, not from scratch (~4.2)
    saved = (out / "config.yaml").read_text()
    assert "block_size: 16" in saved and "n_embd: 32" in saved and "run:" in saved
