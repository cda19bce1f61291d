"""A small customer-service document store and question-answer sets made from it, for grounded
answers (gptkit/retrieval.py).

The documents are product pages of an imaginary shop (gptkit/data/helpdesk/, made by
`write_documents` with a fixed seed): every page states seven facts (price, warranty, colour,
weight, power, support code, return window) in varied sentences. Because the facts are drawn at
random, no model can know them: a question about a fact it was not trained on is answerable
only from the page. `write_grounded` writes questions about them as (question, passages,
answer) records; the split is by fact, so every held-out question asks a fact that no training
question asked. Its passages are what the index retrieves for the question (the right page
added in place of the last when retrieval missed it, so that training always shows the answer).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

DOCUMENTS = Path(__file__).resolve().parents[1] / "data" / "helpdesk"
SEED = 36
NAMES = ("Aurora Brisk Cobalt Delta Ember Fjord Glade Harbor Iris Juno Kestrel Lumen Maple Nimbus "
         "Orbit Pebble Quill Ridge Sable Tundra").split()  # fmt: skip
KINDS = ("kettle toaster blender grinder heater fan lamp vacuum").split()
COLOURS = "teal graphite ivory coral sage amber navy plum slate rose".split()

FACTS: dict[str, dict[str, list[str]]] = {
    "price": {
        "say": ["The {name} costs {v}.", "It sells for {v} in our shop.", "Its price is {v}."],
        "ask": ["How much does the {name} cost?", "What is the price of the {name}?"],
    },
    "warranty": {
        "say": ["It comes with a warranty of {v}.", "The {name} is covered by a warranty of {v}."],
        "ask": ["How long is the warranty on the {name}?", "What warranty does the {name} have?"],
    },
    "colour": {
        "say": ["It is finished in {v}.", "The {name} comes in {v}."],
        "ask": ["What colour is the {name}?", "Which colour does the {name} come in?"],
    },
    "weight": {
        "say": ["It weighs {v}.", "The {name} has a weight of {v}."],
        "ask": ["How much does the {name} weigh?", "What is the weight of the {name}?"],
    },
    "power": {
        "say": ["It draws {v} at full power.", "Its motor is rated at {v}."],
        "ask": ["How much power does the {name} draw?", "What is the power rating of the {name}?"],
    },
    "code": {
        "say": ["Quote support code {v} when you call us about it.", "Its support code is {v}."],
        "ask": ["What is the support code for the {name}?",
                "Which code do I quote for the {name}?"],
    },
    "returns": {
        "say": ["You may return it within {v} of delivery.", "Returns are accepted for {v}."],
        "ask": ["How long do I have to return the {name}?",
                "What is the return window for the {name}?"],
    },
}  # fmt: skip


def _products(rng: random.Random, n: int, names: list[str] | None = None) -> list[dict[str, Any]]:
    if names is None:
        names = [f"{a} {k}" for a in NAMES for k in KINDS]
        rng.shuffle(names)
    out = []
    for name in names[:n]:
        out.append({
            "name": name,
            "price": f"${rng.randrange(19, 400)}",
            "warranty": f"{rng.randrange(1, 6)} years",
            "colour": rng.choice(COLOURS),
            "weight": f"{rng.randrange(5, 60) / 10:.1f} kg",
            "power": f"{rng.randrange(4, 25) * 100} watts",
            "code": f"{rng.choice('BKMRTX')}{rng.choice('ACLPW')}-{rng.randrange(1000, 10000)}",
            "returns": f"{rng.choice([14, 21, 30, 45, 60, 90])} days",
        })  # fmt: skip
    return out


def _page(rng: random.Random, p: dict[str, Any]) -> str:
    kind = p["name"].split()[-1]
    said = [rng.choice(FACTS[k]["say"]).format(name=p["name"], v=p[k]) for k in FACTS]
    rng.shuffle(said)
    return (f"# {p['name']}\n\nThe {p['name']} is a {kind} from our home range. "
            + " ".join(said) + "\n")  # fmt: skip


def practice_pages(n: int, seed: int = SEED) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """n pages like the bundled ones, of made-up products (names of two made-up syllables) with
    facts of their own: training questions about them teach reading the passages, since none
    of their answers can be remembered from anywhere else."""
    rng = random.Random(seed + 3)
    first = "Ka Lo Mi Ne Po Ru Sa Te Vi Zo Bra Cle Dru Fen Gri".split()
    second = "ra len vo mik sa dor pel tin wex quo".split()
    names = list(dict.fromkeys(f"{a}{b} {k}" for a in first for b in second for k in KINDS))
    rng.shuffle(names)
    if n > len(names):
        raise GptkitError(f"at most {len(names)} practice pages, asked for {n}")
    products = _products(rng, n, names)
    pages = {f"practice/{source_name(p['name'])}": _page(rng, p) for p in products}
    return pages, products


def source_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".md"


def write_documents(out: str | Path = DOCUMENTS, n: int = 120, seed: int = SEED) -> Path:
    """The product pages, one Markdown file each, and facts.json (the facts they state)."""
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = _products(rng, n)
    for p in facts:
        (out / source_name(p["name"])).write_text(_page(rng, p), encoding="utf-8")
    (out.parent / "helpdesk-facts.json").write_text(json.dumps(facts, indent=0) + "\n")
    return out


def facts(docs: str | Path = DOCUMENTS) -> list[dict[str, Any]]:
    path = Path(docs).parent / "helpdesk-facts.json"
    if not path.is_file():
        raise GptkitError(f"{path}: the documents' facts are missing; write_documents makes them")
    return json.loads(path.read_text())


def questions(split: str, seed: int = SEED) -> list[dict[str, str]]:
    """Every (question, answer, source) of a split: per product, five facts train and two are
    held out ('test'); training asks each fact in both phrasings."""
    if split not in ("train", "test"):
        raise GptkitError(f"split must be train or test, got {split!r}")
    split_rng = random.Random(seed + 1)  # which facts are held out: the same for both splits
    ask_rng = random.Random(seed + 2)
    out = []
    for p in facts():
        keys = list(FACTS)
        split_rng.shuffle(keys)
        chosen = keys[:5] if split == "train" else keys[5:]
        for k in chosen:
            asks = FACTS[k]["ask"] if split == "train" else [ask_rng.choice(FACTS[k]["ask"])]
            for ask in asks:
                out.append({"question": ask.format(name=p["name"]), "answer": p[k],
                            "source": source_name(p["name"]), "fact": k})  # fmt: skip
    return out


def cite(answer: str, source: str) -> str:
    """The answer as the model learns to give it: the fact, then its source in brackets."""
    return f"{answer} [{source}]"


def strip_citation(reply: str) -> tuple[str, str]:
    """(answer, cited source) from a reply written as cite() writes it."""
    m = re.match(r"\s*(.*?)\s*\[([^\]]*)\]\s*$", reply, re.S)
    return (m.group(1), m.group(2)) if m else (reply.strip(), "")


def write_grounded(
    out: str | Path, split: str, index: Any, k: int = 3, practice: int = 0, seed: int = SEED
) -> Path:
    """A split as JSONL of {question, passages, answer} records, passages from `index` (a
    retrieval.Index over the documents). Training may add questions about `practice` made-up
    pages (practice_pages; two facts each), their passages from an index of those pages."""
    from gptkit.retrieval import Index

    out = Path(out)
    asked = [(q, index) for q in questions(split)]
    if practice and split == "train":
        pages, products = practice_pages(practice, seed)
        drill = Index.from_documents(pages)
        rng = random.Random(seed + 4)
        for p in products:
            for key in rng.sample(list(FACTS), 2):
                q = rng.choice(FACTS[key]["ask"]).format(name=p["name"])
                src = f"practice/{source_name(p['name'])}"
                asked.append(({"question": q, "answer": p[key], "source": src, "fact": key}, drill))
        rng.shuffle(asked)
    rows = []
    for q, idx in asked:
        found = idx.search(q["question"], k)
        if split == "train" and q["source"] not in {p.source for p in found}:
            page = next(p for p in idx.passages if p.source == q["source"])
            found = [*found[: k - 1], page]
        rows.append({
            "question": q["question"],
            "passages": [{"source": p.source, "text": p.text} for p in found],
            "answer": cite(q["answer"], q["source"]),
            "source": q["source"],
        })  # fmt: skip
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return out
