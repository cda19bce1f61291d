"""The fine-tuning methods through gptkit's own commands (gptkit/peft/methods.py): AdaLoRA runs
print and save their ranks, merge to the same logits and resume to the same adapter; adapter
runs load over their base everywhere and refuse what needs whole weights; bad settings are one
line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptkit.finetune.instruct import finetune, finetune_config, merge, resume_finetune
from gptkit.finetune.tasks import write_tasks
from gptkit.loader import load_model
from gptkit.peft.adalora import SVDLinear, ranks
from gptkit.peft.methods import adapter_state
from tests.conftest import DEVICE, cli
from tests.test_finetune import FT_SET, gptkit_cli


def in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`gptkit ARGS` in this process: the exit status and stderr."""
    code, _, err = cli(capsys, *args)
    return code, err


ADALORA = ["train.patience=0", "train.lr=1e-2", "adalora.init_r=4", "adalora.target_r=2", "adalora.tinit=3",
           "adalora.tfinal=6", "adalora.deltaT=2"]  # fmt: skip


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks") / "train.jsonl", 200, "train")


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, tasks_file: Path) -> Path:
    out = tmp_path_factory.mktemp("ft") / "adalora"
    r = gptkit_cli("finetune", str(trained_run), "--data", str(tasks_file), "--out", str(out), "--method", "adalora",
                   "--no-progress", *sum((["--set", s] for s in FT_SET + ADALORA + ["train.max_steps=20"]), []))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (out / "stdout.txt").write_text(r.stdout)
    return out


def test_adalora_run_prints_and_saves_its_ranks(adalora_run: Path) -> None:
    out = (adalora_run / "stdout.txt").read_text()
    saved = json.loads((adalora_run / "ranks.json").read_text())
    assert "AdaLoRA rank 4 -> 2" in out and "AdaLoRA ranks (" in out and "attn.c_attn" in out
    # 2 blocks x 4 targets (c_attn, attn.c_proj, c_fc, mlp.c_proj): the budget is 2 a matrix
    assert len(saved) == 8 and sum(saved.values()) == 16 and all(0 <= r <= 4 for r in saved.values())
    model, _, cfg = load_model(adalora_run)
    assert cfg.finetune.method == "adalora" and cfg.adalora.total_step == 20  # resolved, saved
    assert ranks(model) == saved
    adapter = load_file(str(adalora_run / "checkpoint" / "adapter.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in adapter} >= {"lora_A", "lora_E", "lora_B"}
    assert not any(k.endswith(".weight") and ".lora_" not in k and "new_rows" not in k for k in adapter)


def test_adalora_merges_to_the_same_logits(adalora_run: Path, tmp_path: Path) -> None:
    model, tok, _ = load_model(adalora_run)
    assert any(isinstance(m, SVDLinear) for m in model.modules())
    merged, _, cfg = load_model(merge(adalora_run, tmp_path / "merged"))
    assert cfg.finetune.method == "full" and not any(isinstance(m, SVDLinear) for m in merged.modules())
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], merged(x)[0], atol=1e-5, rtol=0)


def test_adalora_resume_equals_straight_run(trained_run: Path, tasks_file: Path, tmp_path: Path) -> None:
    """The allocator's scores and final pattern travel in the checkpoint: pausing inside the
    budget phase and resuming gives the adapter of the uninterrupted run."""
    sets = FT_SET + ADALORA + ["train.max_steps=14", "train.checkpoint_interval=100", "finetune.method=adalora"]
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    finetune(trained_run, [str(tasks_file)], straight, finetune_config(None, sets), progress=False, quiet=True)
    r = finetune(trained_run, [str(tasks_file)], paused, finetune_config(None, sets), progress=False, quiet=True,
                 stop_at=5)  # fmt: skip
    assert r.interrupted and r.step == 5
    resume_finetune(paused, progress=False, quiet=True)
    a, b = adapter_state(load_model(straight)[0]), adapter_state(load_model(paused)[0])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert json.loads((paused / "ranks.json").read_text()) == json.loads((straight / "ranks.json").read_text())


@pytest.mark.cuda
def test_adapter_run_loads_over_its_base_and_refuses_whole_weight_work(
    trained_run: Path, tasks_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "adapter"
    cfg = finetune_config(None, FT_SET + ["train.lr=1e-2", "adapter.reduction_factor=4", "finetune.method=adapter"])
    finetune(trained_run, [str(tasks_file)], out, cfg, progress=False, quiet=True)
    adapter = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    assert {k.split(".adapter.")[0] for k in adapter if ".adapter." in k} == {
        f"blocks.{i}.{p}" for i in range(2) for p in ("attn.c_proj", "mlp.c_proj")}  # fmt: skip
    model, _, _ = load_model(out, DEVICE, merge_adapters=True)  # not mergeable: kept over the base
    assert model.adapters is not None and model.adapters.method == "adapter"
    base, _, _ = load_model(trained_run, DEVICE)
    trained = {n: p for n, p in model.named_parameters() if ".adapter." not in n and "wte" not in n}
    for n, p in base.named_parameters():  # the base's weights are untouched
        if "wte" not in n and "lm_head" not in n:
            key = n.replace("attn.c_proj.", "attn.c_proj.base.").replace("mlp.c_proj.", "mlp.c_proj.base.")
            torch.testing.assert_close(trained[key], p, atol=0, rtol=0)
    r = gptkit_cli("generate", str(out), "--prompt", "abc", "--max-new-tokens", "4")
    assert r.returncode == 0 and "cannot be merged" in r.stderr and str(trained_run) in r.stderr, r.stderr
    for args, message in [
        (["merge", str(out)], "bottleneck adapters are layers of their own"),
        (["export", str(out), "--to-hf", str(tmp_path / "hf")], "no whole weights to export"),
        (["export", str(out), "--to-gguf", str(tmp_path / "m.gguf")], "no whole weights to export"),
        (["quantize", str(out), "--out", str(tmp_path / "q")], "no whole weights to quantize"),
        (["finetune", "--resume", str(out), "--method", "lora"], "fine-tuned with adapter"),
    ]:
        code, err = in_process(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "adalora", "--set", "adalora.target_r=20"], "adalora.target_r (20) is above adalora.init_r"),
        (["--method", "adalora", "--set", "train.patience=0", "--set", "adalora.targets=c_attn,q_proj"],
         "'q_proj' names no Linear layer"),
        (["--method", "adalora"], "AdaLoRA's rank schedule needs its step count up front"),
        (["--method", "adalora", "--set", "adalora.total_step=9999"], "beyond train.max_steps"),
        (["--method", "adalora", "--set", "train.patience=0", "--set", "adalora.tinit=4000", "--set",
          "adalora.tfinal=1000"], "no step is left to reallocate"),
        (["--method", "adapter", "--set", "adapter.placement=middle"], "adapter.placement"),
        (["--method", "ia3"], "invalid choice"),
        (["--lora", "--method", "adapter"], "disagree"),
    ],
)  # fmt: skip
def test_bad_method_settings(trained_run: Path, tasks_file: Path, tmp_path: Path, args: list[str], message: str,
                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "bad"
    code, err = in_process(capsys, "finetune", str(trained_run), "--data", str(tasks_file), "--out", str(out),
                           "--no-progress", *args)  # fmt: skip
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_every_method_key_has_help() -> None:
    from gptkit.config import all_keys

    r = gptkit_cli("finetune", "--help")
    out = r.stdout
    keys = [k for k in all_keys() if k.split(".")[0] in ("lora", "adalora", "adapter") and k != "lora.enabled"]
    assert len(keys) == 20 and all(f"  {k} " in out for k in keys), [k for k in keys if f"  {k} " not in out]
