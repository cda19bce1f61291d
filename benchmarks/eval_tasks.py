"""Standard-task evaluation of a run through lm-eval, on three tasks written here from the part
of tiny Shakespeare a `gptkit train` run never trains on (its last 10 %; nothing downloaded):

- shakespeare_cloze (multiple_choice): 200 passages of 120 characters; the true next 20
  characters against three continuations taken from elsewhere in the text (chance: 25 %);
- shakespeare_ppl (loglikelihood_rolling): 50 passages of 500 characters (word and byte
  perplexity, bits per byte);
- shakespeare_next_line (generate_until): complete a speaker's line from its first words; exact
  match of the line's next 5 characters after its first 24, greedy.

    python benchmarks/eval_tasks.py RUN [--limit N]

Prints lm-eval's results table and one JSON line of the metrics.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from common import ROOT

from gptkit.evaluate.harness import evaluate_tasks

TASKS = {
    "shakespeare_cloze": """output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "shakespeare_ppl": """output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "shakespeare_next_line": """output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def task_yaml(name: str, data: Path, body: str) -> str:
    """An lm-eval task reading a local JSON-lines file (nothing downloaded)."""
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    return head + "test_split: test\n" + body.format()


def write_tasks(folder: Path) -> list[str]:
    text = (ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    held = text[int(len(text) * 0.9) :]
    rng = random.Random(0)
    cloze = []
    for i in range(200):
        at = 500 + i * 500
        others = [rng.randrange(0, len(held) - 20) for _ in range(3)]
        choices = [held[at + 120 : at + 140]] + [held[o : o + 20] for o in others]
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"context": held[at : at + 120], "choices": [choices[k] for k in order], "answer": order.index(0)})
    ppl = [{"text": held[i * 2000 : i * 2000 + 500]} for i in range(50)]
    lines = [ln for ln in held.split("\n") if len(ln) > 30][:100]
    nxt = [{"context": ln[:24], "answer": ln[24:29]} for ln in lines]
    for name, rows in (("shakespeare_cloze", cloze), ("shakespeare_ppl", ppl), ("shakespeare_next_line", nxt)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(task_yaml(name, folder / f"{name}.jsonl", TASKS[name]))
    return list(TASKS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    from lm_eval.utils import make_table

    with tempfile.TemporaryDirectory() as name:
        names = write_tasks(Path(name))
        summary = evaluate_tasks(a.run, names, include_path=name, limit=a.limit, device="cpu")
    print(make_table(summary))
    metrics = {t: {k: v for k, v in r.items() if "," in k and "stderr" not in k} for t, r in summary["results"].items()}
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
