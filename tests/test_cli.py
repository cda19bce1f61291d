"""The command line end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli, tiny_overrides


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
    # The samples decode together (through the engine), each what it is alone: sample 2 has seed 1 + 1.
    alone = gptkit("generate", str(run), "--prompt", "KING", "--max-new-tokens", "30", "--seed", "2")
    assert alone.returncode == 0 and p.stdout.split("--- sample 2 ---\n")[1] == alone.stdout
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
    from gptkit import __version__

    p = gptkit("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"gptkit {__version__}"
    p = gptkit("generate", "--help")
    assert "sampling temperature (0 = greedy) (default: 0.8)" in " ".join(p.stdout.split())
    assert "(default: 0)" in p.stdout  # --top-k: a falsy default is still shown


def test_every_option_has_a_description() -> None:
    import argparse

    from gptkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {' '.join(act.option_strings)}"
        for name, parser in sub.choices.items()
        for act in parser._actions
        if act.option_strings and act.dest != "help" and not act.help
    ]
    assert missing == []


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
        (["train", "--set", "model.mlp_ratio=0.001"], "model.mlp_ratio (0.001) gives an MLP of 0 units"),
        (["train", "--set", "train.device=meta"], "train.device must be auto, cpu, cuda, cuda:N or mps"),
        (["train", "--set", "train.muon_lr=-1"], "train.muon_lr must be positive"),
        (["train", "--set", "model.rope_base=0"], "model.rope_base must be > 1"),
        (["train", "--set", "model.logit_softcap=inf"], "model.logit_softcap must be a finite number"),
        (["train", "--set", "train.max_steps=many"], "must be an integer"),
        (["generate", "/nonexistent_run", "--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA GPU"),
    ],
)
def test_bad_input_is_one_clear_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # the command line's main() in this process (a subprocess each: seconds)
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


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
        (short, "shorter than one context window"),
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


def test_default_preset_is_the_shipped_file() -> None:
    from gptkit.config import load_config
    from gptkit.data import default_preset, preset

    # One copy of the main job's configuration, inside the package (configs/ has none).
    assert default_preset() == preset("shakespeare-char") and default_preset().is_file()
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


def test_init_from_with_data_and_no_config_keeps_the_data(tmp_path: Path, trained_run: Path, small_text: Path) -> None:
    """`--init-from RUN --data DIR` without --config once rebuilt the config after --data (and --fsdp) had been
    applied to it, and so lost them."""
    data = tmp_path / "data"
    assert (
        gptkit("prepare", str(small_text), "--out", str(data), "--tokenizer", f"run:{trained_run}", "--no-progress").returncode
        == 0
    )
    out = tmp_path / "ft"
    p = gptkit("train", "--init-from", str(trained_run), "--data", str(data), "--out", str(out), "--no-progress",
               "--set", "train.max_steps=3", "--set", "train.tensorboard=false", "--set", "train.dtype=float32")  # fmt: skip
    assert p.returncode == 0, p.stderr
    from gptkit.checkpoint import load_run_config

    assert Path(load_run_config(out).data.dir) == data.resolve()
    assert "54,000 train tokens" in p.stdout  # the data folder's 90% of 60,000 characters, not tiny Shakespeare's 1M


# --- the faults of the issue "the newcomer's path and the CLI under faults" ---


def folder_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_refused_resume_leaves_every_file_as_it_was(tmp_path: Path, small_text: Path) -> None:
    run = tmp_path / "run"
    assert (
        gptkit("train", "--text", str(small_text), "--out", str(run), "--no-progress", *sets(**{"train.max_steps": 3})).returncode
        == 0
    )
    before = folder_digest(run)
    p = gptkit("train", "--resume", str(run), "--set", "model.n_layer=5", "--no-progress")
    assert p.returncode == 2 and "cannot change model.n_layer (2 -> 5)" in p.stderr, p.stderr
    assert folder_digest(run) == before
    # Refused later, when the checkpoint is read: the new config must not have been written either.
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = folder_digest(run)
    p = gptkit("train", "--resume", str(run), "--set", "train.lr=0.5", "--set", "train.max_steps=9", "--no-progress")
    assert p.returncode == 2 and "truncated" in p.stderr
    assert folder_digest(run) == before
    for cmd in (["eval", str(run)], ["generate", str(run)]):  # the run still says what it is
        assert "truncated" in gptkit(*cmd).stderr


def test_bad_sampling_and_eval_numbers_are_one_line(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = [
        (["generate", str(trained_run), "--temperature", "nan"], "temperature must be a finite number"),
        (["generate", str(trained_run), "--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
        (["generate", str(trained_run), "--repetition-penalty", "1e-300"], "repetition_penalty must be >= 0.01"),
        (["generate", str(trained_run), "--top-p", "0"], "top_p must be > 0"),
        (["eval", str(trained_run), "--max-batches", "0"], "max_batches must be >= 1"),
        (["eval", str(trained_run), "--batch-size", "-3"], "batch_size must be >= 1"),
        (["eval", str(trained_run), "--batch-size", "0"], "batch_size must be >= 1"),  # used the config's before
    ]
    for args, message in bad:
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    # A temperature too small for float32 is greedy in effect, not a crash.
    tiny = gptkit("generate", str(trained_run), "--prompt", "ROMEO", "--temperature", "1e-40", "--max-new-tokens", "20")
    greedy = gptkit("generate", str(trained_run), "--prompt", "ROMEO", "--temperature", "0", "--max-new-tokens", "20")
    assert tiny.returncode == 0, tiny.stderr
    assert tiny.stdout == greedy.stdout


def test_eval_text_with_bad_utf8_offers_an_option_it_has(trained_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"First Citizen:\nBefore we proceed \xff any further, hear me speak.\n" * 20)
    p = gptkit("eval", str(trained_run), "--text", str(bad))
    assert p.returncode == 2 and "--errors replace" in p.stderr
    # The option exists and works: the bytes become U+FFFD, which this character-level run then
    # names as outside its vocabulary (a BPE run would score it).
    p = gptkit("eval", str(trained_run), "--text", str(bad), "--errors", "replace")
    assert p.returncode == 2 and "U+FFFD" in p.stderr and "not in this character tokenizer" in p.stderr, p.stderr


def test_printed_commands_are_shell_quoted_and_cjk_names_plot_quietly(tmp_path: Path, small_text: Path) -> None:
    import shlex

    run = tmp_path / "my run 数据"
    args = ["train", "--text", str(small_text), "--out", str(run), "--no-progress"]
    p = gptkit(*args, *sets(**{"train.sample_tokens": 10}))
    assert p.returncode == 0, p.stderr
    assert "Glyph" not in p.stderr and "Warning" not in p.stderr, p.stderr
    assert f"gptkit generate {shlex.quote(str(run))} --prompt" in p.stdout
    assert "the whole command took" in p.stdout
    p = gptkit(*args, *sets())
    assert p.returncode == 2 and f"--resume {shlex.quote(str(run))} to continue" in p.stderr


def test_a_run_killed_before_its_first_checkpoint_is_not_stuck(tmp_path: Path, small_text: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptkit", "train", "--text", str(small_text), "--out", str(run), "--no-progress",
           *sets(**{"train.max_steps": 10**6, "train.checkpoint_interval": 10**6})]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "config.yaml").is_file() and not (run / "checkpoint").exists()
    p = gptkit("train", "--resume", str(run), "--no-progress", "--set", "train.max_steps=3")
    assert p.returncode == 0 and "starting it afresh" in p.stdout, p.stderr
    (run / "checkpoint" / "state.json").unlink()
    p = gptkit("train", "--text", str(small_text), "--out", str(run), "--no-progress", *sets(**{"train.max_steps": 2}))
    assert p.returncode == 0 and "starting it afresh" in p.stdout, p.stderr


def test_resume_says_its_limits_and_extends_a_spent_budget(tmp_path: Path, small_text: Path) -> None:
    run = tmp_path / "run"
    p = gptkit("train", "--text", str(small_text), "--out", str(run), "--no-progress",
               *sets(**{"train.max_steps": 10**6, "train.max_time_s": 1}))  # fmt: skip
    assert p.returncode == 0 and "stops at step 1000000 or after 1 s of training" in p.stdout
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    p = gptkit("train", "--resume", str(run), "--no-progress")
    assert p.returncode == 2 and "already reached its limit" in p.stderr
    p = gptkit("train", "--resume", str(run), "--no-progress", "--set", f"train.max_steps={step + 5}")
    assert p.returncode == 0, p.stderr
    assert "replaces the run's time budget" in p.stdout and f"resuming at step {step}" in p.stdout
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == step + 5


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0
    )


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 3 MB file system of our own (needs root, as CI and these machines have)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous(small_disk: Path, small_data: Path) -> None:
    run = small_disk / "run"
    p = gptkit("train", "--data", str(small_data), "--out", str(run), "--no-progress", *sets(**{"train.max_steps": 3}))
    assert p.returncode == 0, p.stderr
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill what is left but a few kilobytes
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    filler.write_bytes(filler.read_bytes()[: -16 * 4096])
    p = gptkit("train", "--resume", str(run), "--no-progress", "--set", "train.max_steps=6")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "no space left" in p.stderr and str(run) in p.stderr
    assert not (run / "checkpoint.tmp").exists()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 3
    filler.unlink()
    assert gptkit("eval", str(run)).returncode == 0  # the previous checkpoint is whole


def test_read_only_folders_are_one_line(tmp_path: Path, small_text: Path, small_data: Path) -> None:
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        run = disk / "run"
        p = gptkit("train", "--data", str(small_data), "--out", str(run), "--no-progress", *sets(**{"train.max_steps": 2}))
        assert p.returncode == 0, p.stderr
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0
        cases = [
            (["train", "--resume", str(run), "--no-progress", "--set", "train.max_steps=4"], str(run)),
            (["train", "--text", str(small_text), "--out", str(disk / "new"), "--no-progress", *sets()], str(disk / "new")),
            (["prepare", str(small_text), "--out", str(disk / "data"), "--no-progress"], str(disk / "data")),
        ]
        for args, path in cases:
            p = gptkit(*args)
            assert p.returncode == 2, (args, p.stderr)
            assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
            assert "read-only" in p.stderr and path in p.stderr, p.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
