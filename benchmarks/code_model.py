"""What code training buys: a code model against a prose model of the same size and steps.

Both are configs/python-code.yaml (4 layers, width 256, a 4,096-token byte-level BPE of their own
corpus), trained for the same number of steps: one on Python's standard library
(`gptkit prepare --code stdlib`), one on tiny Shakespeare. Then, side by side:

- bits per byte on the held-out standard-library files (no file of them was trained on; bits
  per byte compares models with different tokenizers);
- pass@1 (greedy) and pass@10 (10 samples at temperature 0.8) on 40 easy one-line functions
  written here (tests included), every program run in gptkit's sandbox;
- HumanEval pass@1 (greedy), which a minutes-old CPU model is not expected to pass.

    python benchmarks/code_model.py [--steps 300] [--out /tmp/code-bench]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptkit.code_data import prepare_code, stdlib_root  # noqa: E402
from gptkit.config import load_config  # noqa: E402
from gptkit.data import prepare  # noqa: E402
from gptkit.evaluate.code import CodeTask, evaluate_code, generate_completions, score  # noqa: E402
from gptkit.evaluate.loss import evaluate  # noqa: E402
from gptkit.training.train import train  # noqa: E402

# Functions a code model of minutes should manage: name | arguments | docstring | body | tests
EASY_TABLE = """
add | a, b | Return the sum of a and b. | a + b | (2, 3) == 5; (-1, 1) == 0
subtract | a, b | Return a minus b. | a - b | (5, 3) == 2; (0, 4) == -4
multiply | a, b | Return the product of a and b. | a * b | (3, 4) == 12; (0, 9) == 0
negate | x | Return -x. | -x | (3,) == -3; (-2,) == 2
square | x | Return x squared. | x * x | (3,) == 9; (-4,) == 16
cube | x | Return x cubed. | x ** 3 | (2,) == 8; (-1,) == -1
is_even | n | Return True if n is even. | n % 2 == 0 | (4,) is True; (7,) is False
is_odd | n | Return True if n is odd. | n % 2 == 1 | (3,) is True; (8,) is False
maximum | a, b | Return the larger of a and b. | max(a, b) | (2, 9) == 9; (5, 1) == 5
minimum | a, b | Return the smaller of a and b. | min(a, b) | (2, 9) == 2; (5, 1) == 1
absolute | x | Return the absolute value of x. | abs(x) | (-3,) == 3; (4,) == 4
first | items | Return the first item of a list. | items[0] | ([7, 8],) == 7; (['a'],) == 'a'
last | items | Return the last item of a list. | items[-1] | ([7, 8],) == 8; (['a'],) == 'a'
length | items | Return the number of items. | len(items) | ([1, 2, 3],) == 3; ([],) == 0
reverse_list | items | Return the list reversed. | items[::-1] | ([1, 2, 3],) == [3, 2, 1]
reverse_string | s | Return the string reversed. | s[::-1] | ('abc',) == 'cba'; ('',) == ''
upper | s | Return s in upper case. | s.upper() | ('abc',) == 'ABC'
lower | s | Return s in lower case. | s.lower() | ('AbC',) == 'abc'
double | x | Return twice x. | 2 * x | (4,) == 8; (-1,) == -2
half | n | Return n divided by two, rounded down. | n // 2 | (9,) == 4; (10,) == 5
increment | n | Return n plus one. | n + 1 | (1,) == 2; (-1,) == 0
decrement | n | Return n minus one. | n - 1 | (1,) == 0; (10,) == 9
is_empty | items | Return True if the list is empty. | len(items) == 0 | ([],) is True; ([1],) is False
total | items | Return the sum of the items. | sum(items) | ([1, 2, 3],) == 6; ([],) == 0
join_words | words | Join the words with spaces. | ' '.join(words) | (['a', 'b'],) == 'a b'
count_char | s, c | Return how many times c occurs in s. | s.count(c) | ('banana', 'a') == 3
starts_with | s, prefix | True if s starts with prefix. | s.startswith(prefix) | ('hello', 'he') is True; ('hello', 'lo') is False
ends_with | s, suffix | True if s ends with suffix. | s.endswith(suffix) | ('hello', 'lo') is True; ('hello', 'he') is False
concat | a, b | Return the two strings joined. | a + b | ('ab', 'cd') == 'abcd'
identity | x | Return x unchanged. | x | (5,) == 5; ('a',) == 'a'
to_string | x | Return x as a string. | str(x) | (12,) == '12'
to_int | s | Return the string s as an integer. | int(s) | ('42',) == 42
is_positive | x | Return True if x is greater than zero. | x > 0 | (3,) is True; (-3,) is False
is_zero | x | Return True if x is zero. | x == 0 | (0,) is True; (2,) is False
first_two | items | Return the first two items. | items[:2] | ([1, 2, 3],) == [1, 2]
rest | items | Return all items but the first. | items[1:] | ([1, 2, 3],) == [2, 3]
contains | items, x | Return True if x is in items. | x in items | ([1, 2], 2) is True; ([1, 2], 5) is False
strip | s | Return s without surrounding whitespace. | s.strip() | ('  a b ',) == 'a b'
swap | a, b | Return the pair (b, a). | (b, a) | (1, 2) == (2, 1)
average | a, b | Return the mean of a and b. | (a + b) / 2 | (2, 4) == 3; (1, 2) == 1.5
"""
EASY = [
    (name, args, doc, body, tests.split("; "))
    for name, args, doc, body, tests in (
        [field.strip() for field in line.split(" | ")] for line in EASY_TABLE.strip().splitlines()
    )
]


def easy_tasks() -> list[CodeTask]:
    tasks = []
    for name, args, doc, body, tests in EASY:
        prompt = f'def {name}({args}):\n    """{doc}"""\n'
        test = "def check(candidate):\n" + "".join(f"    assert candidate{t}\n" for t in tests)
        tasks.append(CodeTask(f"easy/{name}", prompt, test, name, f"    return {body}\n"))
    return tasks


def train_model(data: Path, out: Path, steps: int) -> float:
    cfg = load_config(ROOT / "configs" / "python-code.yaml",
                      [f"train.max_steps={steps}", "train.max_time_s=0", "train.sample_tokens=0",
                       "train.eval_interval=100000", "train.tensorboard=false"])  # fmt: skip
    cfg.data.dir = str(data)
    start = time.perf_counter()
    train(cfg, out, overwrite=True, progress=False, quiet=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="/tmp/code-bench")
    ap.add_argument("--samples", type=int, default=10)
    a = ap.parse_args()
    out = Path(a.out)
    code_data, prose_data = out / "data-code", out / "data-prose"
    prepare_code("stdlib", code_data, "bpe", 4096, 0.05, overwrite=True, progress=False)
    prepare([str(ROOT / "gptkit" / "data" / "tinyshakespeare.txt")], prose_data, "bpe", 4096,
            overwrite=True, progress=False)  # fmt: skip
    listing = json.loads((code_data / "code-files.json").read_text())
    held_out = out / "held-out-code.txt"
    held_out.write_text("\n".join((stdlib_root() / r).read_text(encoding="utf-8") for r in listing["val"]))
    assert all(easy_tasks()[i].canonical_solution for i in range(len(EASY)))
    canon = score(easy_tasks(), [[t.reference()] for t in easy_tasks()])["pass@1"]
    rows = {}
    for name, data in (("code", code_data), ("prose", prose_data)):
        run = out / f"run-{name}"
        seconds = train_model(data, run, a.steps)
        bpb = evaluate(run, text=str(held_out), device="cpu")["bits_per_byte"]
        tasks = easy_tasks()
        greedy = score(tasks, generate_completions(run, tasks, 1, 0.0, 48, "cpu"))
        sampled = score(tasks, generate_completions(run, tasks, a.samples, 0.8, 48, "cpu"), ks=(1, 10))
        human = evaluate_code(run, "humaneval", max_new_tokens=128, device="cpu")
        rows[name] = {"train_s": round(seconds, 1), "held_out_code_bits_per_byte": round(bpb, 3),
                      "easy_pass@1_greedy": greedy["pass@1"], "easy_pass@1_sampled": sampled["pass@1"],
                      "easy_pass@10": sampled["pass@10"], "humaneval_pass@1": human["pass@1"],
                      "easy_solved_greedy": sorted(k for k, v in greedy["passed"].items() if v)}  # fmt: skip
    print(f"{args_line(a)}; canonical solutions of the easy tasks: pass@1 {canon}")
    print(f"{'':32} {'code model':>12} {'prose model':>12}")
    for key in ("train_s", "held_out_code_bits_per_byte", "easy_pass@1_greedy", "easy_pass@1_sampled",
                "easy_pass@10", "humaneval_pass@1"):  # fmt: skip
        print(f"{key:32} {rows['code'][key]:>12} {rows['prose'][key]:>12}")
    print(json.dumps({"steps": a.steps, "rows": rows}))


def args_line(a: argparse.Namespace) -> str:
    return f"configs/python-code.yaml, {a.steps} steps each, {a.samples} samples for pass@10"


if __name__ == "__main__":
    main()
