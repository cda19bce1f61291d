"""lm-eval loglikelihood speed: gptkit's in-process harness model (`gptkit eval --tasks`) against
lm-eval's own `hf` backend on the folder `gptkit export --to-hf` writes, side by side.

A multiple-choice task written here (local JSON, nothing downloaded): 250 questions from tiny
Shakespeare (about 50 tokens each) with 4 choices, so 1,000 loglikelihood requests, the choices of
a question sharing its context. A GPT-2-architecture model with random weights (6 layers, 384
wide, GPT-2's tokenizer), fp32, batch size 16 on both sides, 2 threads. Rounds alternate; medians.
Also checks that both give the same per-choice log-likelihoods.

    python benchmarks/eval_speed.py [--rounds 2] [--questions 250]

Ends with one JSON line including ratio (gptkit requests/s over hf's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT
from eval_tasks import TASKS, task_yaml

from gptkit.evaluate.harness import harness_model
from gptkit.formats.hf import export_hf, import_hf
from gptkit.loader import load_model


def main() -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import GPT2Config, GPT2LMHeadModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--questions", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        text = (ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        rows = []
        for q in range(a.questions):
            i = 1000 + q * 397
            rows.append({"context": text[i : i + 200], "choices": [text[i + 200 + 40 * c : i + 230 + 40 * c] for c in range(4)],
                         "answer": 0})  # fmt: skip
        (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "speed_mc.yaml").write_text(task_yaml("speed_mc", tmp / "mc.jsonl", TASKS["shakespeare_cloze"]))
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=256)).save_pretrained(tmp / "hf0")
        run = import_hf(tmp / "hf0", tmp / "run", tokenizer=str(ROOT / "tests" / "data" / "gpt2"))
        hf = export_hf(run, tmp / "hf")
        model, tok, _ = load_model(run)
        tasks = TaskManager(include_path=str(tmp))
        ours_lm = harness_model(model, tok, a.batch_size)

        def ours() -> dict:
            return lm_eval.simple_evaluate(model=ours_lm, tasks=["speed_mc"], task_manager=tasks, log_samples=True)

        def theirs() -> dict:
            return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32",
                                           batch_size=a.batch_size, tasks=["speed_mc"], task_manager=tasks,
                                           log_samples=True, device="cpu")  # fmt: skip

        times: dict[str, list[float]] = {"gptkit": [], "hf": []}
        results = {}
        for _ in range(a.rounds):
            for label, fn in (("gptkit", ours), ("hf", theirs)):
                t0 = time.perf_counter()
                results[label] = fn()
                times[label].append(time.perf_counter() - t0)
    n = 4 * a.questions

    def per_choice(r: dict) -> list[float]:
        return [float(x[0]) for s in sorted(r["samples"]["speed_mc"], key=lambda s: s["doc_id"]) for x in s["filtered_resps"]]

    diff = max(abs(x - y) for x, y in zip(per_choice(results["gptkit"]), per_choice(results["hf"])))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:8s} {v:7.1f} s for {n} requests: {n / v:7.1f} requests/s")
    print(f"largest per-choice log-likelihood difference: {diff:.2e}")
    out = {"requests": n, "seconds": {k: round(v, 2) for k, v in med.items()}, "ratio": round(med["hf"] / med["gptkit"], 2),
           "max_loglikelihood_diff": float(f"{diff:.2e}")}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
