"""Synthetic instruction tasks a small model can truly learn: the fine-tuning demo and test.

Five tasks over words of tiny Shakespeare and small numbers: reverse a word, sort its letters,
add two one-digit numbers, uppercase a phrase, and count a word's letters. Words are split by a
hash into train (80%) and test (20%), so held-out examples use words the fine-tune never saw.
Addition has only 100 one-digit facts, all of which training covers: it is recall, not
generalisation, and the README says so.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

from gptkit.data import bundled_corpus

TASKS = ("reverse", "sort", "add", "upper", "length")


def _is_test(key: str) -> bool:
    return zlib.crc32(key.encode()) % 5 == 0


def _words() -> list[str]:
    text = bundled_corpus().read_text(encoding="utf-8").lower()
    return sorted({w for w in re.findall(r"[a-z]+", text) if 3 <= len(w) <= 7})


def make_tasks(
    n: int, split: str = "train", seed: int = 0, tasks: tuple[str, ...] = TASKS
) -> list[dict[str, str]]:
    """n Alpaca records ({instruction, input, output}), tasks in turn."""
    if split not in ("train", "test"):
        raise ValueError("split must be train or test")
    want_test = split == "test"
    rng = random.Random(f"{seed}-{split}")
    words = [w for w in _words() if _is_test(w) == want_test]
    pairs = [(a, b) for a in range(10) for b in range(10)]
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        w = rng.choice(words)
        if task == "reverse":
            rec = ("Reverse the word.", w, w[::-1])
        elif task == "sort":
            rec = ("Sort the letters.", w, "".join(sorted(w)))
        elif task == "add":
            a, b = rng.choice(pairs)
            rec = ("Add the numbers.", f"{a} + {b}", str(a + b))
        elif task == "upper":
            phrase = f"{w} {rng.choice(words)}"
            rec = ("Write it in capitals.", phrase, phrase.upper())
        else:
            rec = ("Count the letters.", w, str(len(w)))
        out.append({"instruction": rec[0], "input": rec[1], "output": rec[2]})
    return out


def write_tasks(path: str | Path, n: int, split: str = "train", seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in make_tasks(n, split, seed)))
    return path
