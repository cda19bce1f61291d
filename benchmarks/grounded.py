"""Grounded answers measured: retrieval recall@k and answer exact match with retrieval against
without it, on held-out questions about the bundled help-desk pages (gptkit/finetune/grounded.py).

Each held-out question asks a fact that no training question asked. The facts are random, so no
model knows them beforehand; the decoder (no pretrained model is on this machine, so a 4-layer
GPT from nothing, BPE of 2,048 tokens) is first pretrained briefly on the pages themselves (it
may remember them: the closed-book row measures that), then fine-tuned on `gptkit make-helpdesk`'s
train.jsonl with its retrieved passages: questions about the bundled pages, and about 1,000
made-up pages whose answers can only be read, never remembered. Rows:

- with retrieval: `gptkit eval RUN --grounded test.jsonl --index INDEX` (BM25, k passages);
- without retrieval: the same run, the question alone;
- closed-book fine-tune: a run fine-tuned on the same questions without passages, then asked
  the held-out questions alone (what the pages' facts in the weights give).

    python benchmarks/grounded.py        # about 35 minutes on 2 cores

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRETRAIN = [
    "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=320", "model.dropout=0.0",
    "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=30", "train.eval_interval=100",
    "train.eval_batches=4", "train.log_interval=50", "train.tensorboard=false", "train.sample_tokens=0",
    "train.dtype=float32", "train.patience=0",
]  # fmt: skip
FINETUNE = ["train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=30", "train.eval_interval=100",
            "train.log_interval=50", "train.tensorboard=false", "train.dtype=float32", "train.patience=0",
            "finetune.val_fraction=0.05"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "grounded"))
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--practice", type=int, default=1000)
    a = ap.parse_args()
    from gptkit.cli import main as gptkit
    from gptkit.config import load_config
    from gptkit.data import prepare
    from gptkit.evaluate.grounded import evaluate_grounded
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.training.train import train as pretrain

    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    gptkit(["make-helpdesk", "--out", str(work / "hd"), "--passages", str(a.k), "--practice",
            str(a.practice)])  # fmt: skip
    hd = work / "hd"
    pages = sorted((hd / "docs").glob("*.md"))
    corpus = work / "pages.txt"
    from gptkit.finetune.grounded import practice_pages

    made_up = list(practice_pages(a.practice)[0].values())
    corpus.write_text("\n\n".join([p.read_text() for p in pages] + made_up))
    t0 = time.perf_counter()
    prepare([str(corpus)], work / "data", "bpe", vocab_size=2048, progress=False, val_fraction=0.05)
    cfg = load_config(None, [*PRETRAIN, f"train.max_steps={a.pretrain_steps}"])
    cfg.data.dir = str(work / "data")
    pretrain(cfg, work / "base", progress=False, quiet=True)
    times = {"pretrain_s": time.perf_counter() - t0}
    # the closed-book set: the same training questions, no passages
    closed = work / "closed-train.jsonl"
    with open(closed, "w") as f:
        for line in open(hd / "train.jsonl"):
            r = json.loads(line)
            f.write(json.dumps({"question": r["question"], "passages": [], "answer": r["answer"]}) + "\n")
    results = {}
    for name, data in (("grounded", hd / "train.jsonl"), ("closed", closed)):
        t0 = time.perf_counter()
        finetune(work / "base", [str(data)], work / name,
                 finetune_config(None, [*FINETUNE, f"train.max_steps={a.steps}"]), progress=False,
                 quiet=True)  # fmt: skip
        times[f"finetune_{name}_s"] = time.perf_counter() - t0
        results[name] = evaluate_grounded(work / name, hd / "test.jsonl", hd / "index", a.k, "cpu", 32)
    g, c = results["grounded"], results["closed"]
    n = g["examples"]
    print(f"\n{n} held-out questions, each about a fact no training question asked; k = {a.k}")
    print(f"retrieval recall@{a.k} (BM25, the right page among the passages): {g[f'recall_at_{a.k}']:.3f}")
    print(f"{'':44} {'exact match':>11} {'cites right page':>17}")
    print(f"{'fine-tuned with passages, with retrieval':44} {g['exact_match_with_retrieval']:11.3f} "
          f"{g['cites_the_right_source']:17.3f}")  # fmt: skip
    print(f"{'fine-tuned with passages, question alone':44} {g['exact_match_without_retrieval']:11.3f}")
    print(f"{'fine-tuned closed-book, question alone':44} {c['exact_match_without_retrieval']:11.3f}")
    print("samples:", json.dumps(g["samples"][:3], indent=1))
    print(json.dumps({"recall": g[f"recall_at_{a.k}"], "em_with": g["exact_match_with_retrieval"],
                      "em_without": g["exact_match_without_retrieval"],
                      "em_closed_book": c["exact_match_without_retrieval"],
                      "cites": g["cites_the_right_source"], "examples": n,
                      **{k: round(v) for k, v in times.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
