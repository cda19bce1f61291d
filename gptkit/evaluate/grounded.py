"""Grounded answers measured: how often retrieval finds the page that holds the answer
(recall@k), and how often the model's greedy answer is exactly right with the retrieved passages
in its prompt against the question alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError, check_number
from gptkit.finetune.grounded import strip_citation
from gptkit.finetune.instructions import read_records
from gptkit.inference.engine import generate_many
from gptkit.inference.generate import SamplingParams
from gptkit.loader import load_model
from gptkit.model import GPT
from gptkit.retrieval import Index, fit_passages
from gptkit.runtime import resolve_device
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer


def read_questions(path: str | Path) -> list[dict[str, str]]:
    """{question, answer, source} records (passages, if any, are ignored: retrieval is live). The
    source may instead be the answer's citation ("... [page.md]")."""
    out = []
    for line, rec in read_records(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise GptkitError(f"{path}:{line}: expected an object with a string 'question'")
        if not isinstance(rec.get("answer"), str):
            raise GptkitError(f"{path}:{line}: expected a string 'answer'")
        answer, cited = strip_citation(rec["answer"])
        source = rec.get("source") or cited
        if not isinstance(source, str) or not source:
            raise GptkitError(
                f"{path}:{line}: no 'source' (the document that holds the answer) and no citation "
                "in the answer; recall@k needs one"
            )
        out.append({"question": rec["question"], "answer": answer, "source": source})
    if not out:
        raise GptkitError(f"{path}: holds no questions")
    return out


def evaluate_grounded(
    run: str | Path,
    file: str | Path,
    index: str | Path,
    k: int = 3,
    device: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    limit: int | None = None,
) -> dict[str, Any]:
    check_number("k", k, 1, integer=True)
    model, tok, _ = load_model(run, resolve_device(device), merge_adapters=True)
    idx = Index.load(index)
    idx.check_tokenizer(tok, str(run))
    return grounded_scores(model, tok, read_questions(file)[:limit], idx, k, batch_size,
                           max_new_tokens)  # fmt: skip


def grounded_scores(
    model: GPT,
    tok: Tokenizer,
    qs: list[dict[str, str]],
    index: Index,
    k: int,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    template = ChatTemplate(tok)
    budget = model.config.block_size - max_new_tokens
    found = [index.search(q["question"], k) for q in qs]
    grounded = [fit_passages(template, [], q["question"], f, budget)[0] for q, f in zip(qs, found)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def answers(users: list[str]) -> list[str]:
        prompts = [template.prompt_ids([Message("user", u)])[-budget:] for u in users]
        return generate_many(model, tok, prompts, [params] * len(prompts), batch_size,
                             template.stop_ids, template.stop_strings)  # fmt: skip

    with_r = answers(grounded)
    without = answers([q["question"] for q in qs])
    n = len(qs)
    recall = sum(q["source"] in {p.source for p in f} for q, f in zip(qs, found)) / n
    exact = [strip_citation(a)[0] == q["answer"] for q, a in zip(qs, with_r)]
    cited = [strip_citation(a)[1] == q["source"] for q, a in zip(qs, with_r)]
    exact_without = [strip_citation(a)[0] == q["answer"] for q, a in zip(qs, without)]
    samples = [
        {"question": q["question"], "expected": q["answer"], "with_retrieval": a, "without": b}
        for q, a, b in list(zip(qs, with_r, without))[:8]
    ]
    return {
        "examples": n,
        "k": k,
        f"recall_at_{k}": recall,
        "exact_match_with_retrieval": sum(exact) / n,
        "exact_match_without_retrieval": sum(exact_without) / n,
        "cites_the_right_source": sum(cited) / n,
        "samples": samples,
    }
