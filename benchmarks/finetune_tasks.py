"""Instruction fine-tuning, shown to work: synthetic tasks and real instruction files.

1. Synthetic tasks (gptkit/finetune/tasks.py): 4,000 training examples of five tasks, 250 held-out ones
   over words the fine-tune never saw. Exact match of greedy answers for the base (with the
   template's tokens added, untrained), after full fine-tuning and after LoRA.
2. Real files from ../shared/data: held-out response loss before and after fine-tuning on
   the book's instruction set (its 935 / 110 split) and on FastChat's multi-turn sample.

    python benchmarks/finetune_tasks.py --base runs/shakespeare-char   # the main job's run

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptkit.evaluate.instructions import evaluate_answers, evaluate_instructions  # noqa: E402
from gptkit.evaluate.loss import sum_losses  # noqa: E402
from gptkit.finetune.instruct import finetune, finetune_config  # noqa: E402
from gptkit.finetune.instructions import InstructionData, load_conversations  # noqa: E402
from gptkit.finetune.tasks import write_tasks  # noqa: E402
from gptkit.loader import finetune_start, load_model  # noqa: E402
from gptkit.peft.methods import parameter_counts  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def held_out_loss(run: Path, test_file: Path, before: bool) -> float:
    """Response loss on test_file: of the fine-tuned run, or (before) of its starting point."""
    model, tok, cfg = load_model(run)
    if before:
        model = finetune_start(cfg).eval()
    convs = load_conversations([str(test_file)]).items
    data = InstructionData(convs, tok, cfg.model.block_size, 16, 0, 0.0)
    total, count, _ = sum_losses(model, data.val_batches(16), "cpu")
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/shakespeare-char", help="a pretrained run (the main job's)")
    ap.add_argument("--out", default="benchmarks/results/finetune")
    ap.add_argument(
        "--runs",
        default="default,lora",
        help="default: the command with no settings (early stopping); "
        "lora: --lora at lr 1e-2, rank 16, early stopping; fixed: the old recipe, 1,500 steps, batch 32, lr 2e-3",
    )
    ap.add_argument("--real-steps", type=int, default=600)
    ap.add_argument("--parts", default="tasks,real", help="which parts to run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {}

    parts = args.parts.split(",")
    train_file = write_tasks(out / "tasks-train.jsonl", 4000, "train")
    test_file = write_tasks(out / "tasks-test.jsonl", 250, "test")
    common = ["train.tensorboard=false"]
    runs = {
        "default": (False, []),
        "lora": (True, ["train.lr=1e-2", "lora.rank=16", "lora.alpha=32"]),
        "fixed": (False, ["train.max_steps=1500", "train.batch_size=32", "train.lr=2e-3", "train.patience=0"]),
    }
    runs = {k: v for k, v in runs.items() if k in args.runs.split(",")}
    for name, (lora, sets) in runs.items() if "tasks" in parts else []:
        run = out / f"tasks-{name}"
        t0 = time.perf_counter()
        result = finetune(args.base, [str(train_file)], run, finetune_config(None, common + sets), lora=lora,
                          overwrite=True, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        report[f"tasks_{name}_steps"], report[f"tasks_{name}_best_step"] = result.step, result.best_step
        after = evaluate_instructions(run, [str(test_file)], "cpu", 24)
        model, tok, cfg = load_model(run)
        counts = parameter_counts(model)
        if "tasks_exact_match_before" not in report:
            before = evaluate_answers(finetune_start(cfg).eval(), tok, load_conversations([str(test_file)]).items, 24)
            report["tasks_exact_match_before"] = before["exact_match"]
        report[f"tasks_{name}_exact_match"] = after["exact_match"]
        report[f"tasks_{name}_response_loss"] = after["response_loss"]
        report[f"tasks_{name}_seconds"] = round(seconds, 1)
        report[f"tasks_{name}_trainable_params"] = counts["trainable"]
        report["total_params"] = counts["total"]
        print(
            f"{name}: exact match {after['exact_match']:.3f} after {result.step} steps (best {result.best_step}), "
            f"{counts['trainable']:,} trainable, {seconds:.0f}s",
            flush=True,
        )
        for s in after["samples"][:5]:
            print("   ", json.dumps(s))

    # Real instruction files: the book's split in file order, and FastChat's conversations.
    rows = json.loads((SHARED / "llms_from_scratch_instruction_data.json").read_text())
    book_train, book_test = out / "book-train.json", out / "book-test.json"
    book_train.write_text(json.dumps(rows[:935]))
    book_test.write_text(json.dumps(rows[935:1045]))
    chats = (SHARED / "fastchat_dummy_conversation.chat.jsonl").read_text().splitlines()
    chat_train, chat_test = out / "chat-train.jsonl", out / "chat-test.jsonl"
    chat_train.write_text("\n".join(chats[:450]) + "\n")
    chat_test.write_text("\n".join(chats[450:]) + "\n")
    for name, tr, te in [("book", book_train, book_test), ("fastchat", chat_train, chat_test)] if "real" in parts else []:
        run = out / f"real-{name}"
        sets = common + [f"train.max_steps={args.real_steps}", "train.lr=1e-3", "finetune.val_fraction=0", "train.patience=0"]
        finetune(args.base, [str(tr)], run, finetune_config(None, sets), overwrite=True, progress=False, quiet=True)
        before, after = held_out_loss(run, te, before=True), held_out_loss(run, te, before=False)
        report[f"{name}_response_loss_before"] = round(before, 4)
        report[f"{name}_response_loss_after"] = round(after, 4)
        print(f"{name}: held-out response loss {before:.3f} -> {after:.3f}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
