"""Knowledge distillation (gptkit/training/distill.py): the loss against its formula, and a
student trained with a teacher that is measurably closer to it than one trained on the data alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.config import load_config
from gptkit.data import DataSet
from gptkit.loader import load_model
from gptkit.training.distill import distill_loss
from gptkit.training.train import train
from tests.conftest import cli, tiny_overrides


def reference(logits, teacher, targets, weight, temperature, vocab):  # noqa: ANN001, ANN201
    """The loss written out position by position, the way the docstring states it."""
    ces, kls = [], []
    for s, t, y in zip(logits.reshape(-1, logits.size(-1)), teacher.reshape(-1, teacher.size(-1)), targets.reshape(-1)):
        if y == -100:
            continue
        s, t = s[:vocab].double(), t[:vocab].double()
        ces.append(-torch.log_softmax(s, 0)[y])
        p, q = torch.softmax(t / temperature, 0), torch.softmax(s / temperature, 0)
        kls.append((p * (p.log() - q.log())).sum())
    ce, kl = torch.stack(ces).mean(), torch.stack(kls).mean()
    return (1 - weight) * ce + weight * temperature**2 * kl, ce, kl


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 3), cols=st.integers(1, 5), vocab=st.integers(2, 9), pad=st.integers(0, 3),
    weight=st.floats(0, 1), temperature=st.floats(0.25, 4), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_loss_is_the_formula_over_the_positions_with_targets(
    rows: int, cols: int, vocab: int, pad: int, weight: float, temperature: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, vocab + pad, generator=g) * 3
    teacher = torch.randn(rows, cols, vocab + pad, generator=g) * 3
    targets = torch.randint(0, vocab, (rows, cols), generator=g)
    targets[torch.rand(rows, cols, generator=g) < 0.3] = -100
    targets[0, 0] = 1  # at least one position counts
    got = distill_loss(logits, teacher, targets, weight, temperature, vocab)
    want = reference(logits, teacher, targets, weight, temperature, vocab)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-5)
    # what masked positions and padded columns hold does not matter
    logits2 = logits.clone()
    logits2[targets == -100] = 50.0
    logits2[..., vocab:] = -7.0
    assert distill_loss(logits2, teacher, targets, weight, temperature, vocab)[0].item() == pytest.approx(
        got[0].item(), rel=1e-5, abs=1e-6
    )
    # a student that is its teacher pays cross-entropy only
    same = distill_loss(teacher, teacher, targets, weight, temperature, vocab)
    assert same[2].item() == pytest.approx(0.0, abs=1e-5)


def closeness(student: Path, teacher: Path, data: Path) -> tuple[float, float]:
    """Mean KL(teacher || student) and the share of positions where both pick the same token,
    over validation batches."""
    s, _, _ = load_model(student)
    t, _, _ = load_model(teacher)
    x = torch.from_numpy(DataSet(data).split("val")[: 64 * 32].astype("int64")).view(64, 32)
    with torch.no_grad():
        ls, lt = s(x)[0], t(x)[0]
    kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), reduction="batchmean", log_target=True)
    return kl.item() / 32, (ls.argmax(-1) == lt.argmax(-1)).float().mean().item()


def test_a_distilled_student_is_closer_to_its_teacher(trained_run: Path, small_data: Path, tmp_path: Path) -> None:
    student = {"model.n_layer": 1, "model.n_embd": 16, "train.max_steps": 60, "train.batch_size": 16,
               "train.lr": 1e-2, "train.eval_interval": 1000}  # fmt: skip
    runs = {}
    for name, extra in (("plain", {}), ("distilled", {"distill.teacher": str(trained_run), "distill.weight": 1.0})):
        cfg = load_config(None, tiny_overrides(**student, **extra))
        cfg.data.dir = str(small_data)
        train(cfg, tmp_path / name, progress=False, quiet=True)
        runs[name] = closeness(tmp_path / name, trained_run, small_data)
    (kl_plain, agree_plain), (kl_kd, agree_kd) = runs["plain"], runs["distilled"]
    assert kl_kd < 0.8 * kl_plain, runs
    assert agree_kd > agree_plain, runs
    saved = yaml.safe_load((tmp_path / "distilled" / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == str(trained_run.resolve())
    rows = [line for line in (tmp_path / "distilled" / "metrics.jsonl").read_text().splitlines() if "distill_kl" in line]
    assert rows, "the KL from the teacher is logged"


def test_bad_teachers_are_one_clear_line(
    capsys: pytest.CaptureFixture, trained_run: Path, bpe_runs: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    common = ["train", "--data", str(small_data), "--no-progress", *sum((["--set", s] for s in tiny_overrides()), [])]
    code, _, err = cli(capsys, *common, "--out", str(tmp_path / "a"), "--teacher", str(bpe_runs["gpt2"]))
    assert code == 2 and "another tokenizer" in err and "Traceback" not in err
    code, _, err = cli(capsys, *common, "--out", str(tmp_path / "b"), "--teacher", str(tmp_path / "nowhere"))
    assert code == 2 and "no such run folder" in err
    code, _, err = cli(capsys, *common, "--out", str(tmp_path / "c"), "--teacher", str(trained_run),
                       "--set", "model.block_size=64")  # fmt: skip
    assert code == 2 and "shorter than this run's model.block_size (64)" in err
    code, _, err = cli(capsys, *common, "--out", str(tmp_path / "d"), "--set", "distill.weight=2")
    assert code == 2 and "distill.weight must be in [0, 1]" in err
    # nothing was written for the refused runs
    assert not any((tmp_path / n / "checkpoint").exists() for n in "abcd")
