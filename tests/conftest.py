from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Everything the tests read is in the repository: a user's clone passes with nothing beside it.
DATA = ROOT / "tests" / "data"
SHAKESPEARE = ROOT / "gptkit" / "data" / "tinyshakespeare.txt"

# The device of the tests marked `cuda` (the model, cache, generation, training, fine-tuning,
# LoRA, HF-parity and serving tests): benchmarks/gpu_check.py runs them with
# GPTKIT_TEST_DEVICE=cuda; everywhere else they run on the CPU like the rest.
DEVICE = torch.device(os.environ.get("GPTKIT_TEST_DEVICE", "cpu"))

# What gptkit measures about the machine (train.dtype=auto) goes to the session's own folder.
os.environ["GPTKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptkit-test-cache-")

# Small and deterministic on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def on_device() -> object:
    """Tensors and modules a test creates land on DEVICE (torch's default-device context)."""
    with DEVICE:
        yield DEVICE


def tiny_overrides(**extra: object) -> list[str]:
    """A model and schedule small enough that a test trains in seconds."""
    base = {
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "train.batch_size": 8,
        "train.max_steps": 20,
        "train.eval_interval": 10,
        "train.eval_batches": 2,
        "train.log_interval": 1,
        "train.warmup_steps": 2,
        "train.dtype": "float32",
        "train.tensorboard": False,
        "train.sample_tokens": 0,
        "train.device": str(DEVICE),
        # fixed threads: the same numerics in every run of a test (and no start-up timing)
        "train.threads": min(2, os.cpu_count() or 1),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60,000 characters of tiny Shakespeare."""
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> Path:
    from gptkit.data import prepare

    out = tmp_path_factory.mktemp("data") / "small"
    prepare([str(small_text)], out, "char", progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """A tiny run trained for 150 steps, shared by the read-only tests."""
    from gptkit.config import load_config
    from gptkit.training.train import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(
        None, tiny_overrides(**{"train.max_steps": 150, "train.batch_size": 32, "train.lr": 1e-2, "train.eval_interval": 50})
    )
    cfg.data.dir = str(small_data)
    train(cfg, run, progress=False, quiet=True)
    return run


# The Llama family's options (RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention).
LLAMA_OPTIONS = {"model.pos_embedding": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.bias": "false",
                 "model.n_kv_head": 1, "model.n_head": 2}  # fmt: skip


@pytest.fixture(scope="session")
def bpe_runs(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> dict[str, Path]:
    """Two runs trained for 200 steps on a 512-token byte-level BPE, GPT-2's architecture
    ("gpt2") and the Llama one ("llama"), and their data folder ("data"); shared read-only."""
    from gptkit.config import load_config
    from gptkit.data import prepare
    from gptkit.training.train import train

    tmp = tmp_path_factory.mktemp("bpe-runs")
    prepare([str(small_text)], tmp / "data", "bpe", vocab_size=512, progress=False)
    out = {"data": tmp / "data"}
    for name, options in (("gpt2", {}), ("llama", LLAMA_OPTIONS)):
        sets = {"model.n_embd": 64, "model.block_size": 64, "train.max_steps": 200, "train.lr": 3e-3,
                "train.eval_interval": 200, **options}  # fmt: skip
        cfg = load_config(None, tiny_overrides(**sets))
        cfg.data.dir = str(tmp / "data")
        train(cfg, tmp / name, progress=False, quiet=True)
        out[name] = tmp / name
    return out


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`gptkit ARGS` through the command line's own main(), in this process: the exit status,
    stdout and stderr (a subprocess each would cost seconds of start-up)."""
    from gptkit.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
