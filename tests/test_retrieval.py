"""Grounded answers (gptkit/retrieval.py, finetune/grounded.py, evaluate/grounded.py): passages
cover their documents with the overlap asked for, an index saved and reloaded answers as it did,
retrieval finds the page that holds each held-out answer, chat and the server put the passages
(with their sources) into the prompt, and bad document folders or a mismatched index are one
line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.finetune.grounded import DOCUMENTS, FACTS, cite, facts, questions, strip_citation
from gptkit.retrieval import Index, Passage, grounded_prompt, split_passages
from tests.conftest import DEVICE, cli, tiny_overrides

Capsys = pytest.CaptureFixture


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text("abcdef", min_size=1, max_size=6), min_size=1, max_size=120),
       st.integers(8, 30), st.integers(0, 7))  # fmt: skip
def test_passages_cover_the_text_with_the_overlap_asked(words: list[str], size: int, overlap: int) -> None:
    text = " ".join(words)
    parts = [p.split() for p in split_passages(text, size, overlap)]
    assert all(len(p) <= size for p in parts)
    step = size - overlap
    # every word is in the passage that starts at its window, and neighbours share `overlap` words
    for i, p in enumerate(parts):
        assert p == words[i * step : i * step + size]
    assert parts[-1][-1] == words[-1]


@pytest.fixture(scope="module")
def helpdesk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hd") / "hd"
    from gptkit.cli import main

    main(["make-helpdesk", "--out", str(out)])
    return out


def test_the_index_reloads_and_finds_the_page_of_every_held_out_answer(helpdesk: Path) -> None:
    idx = Index.load(helpdesk / "index")
    built = Index.build(helpdesk / "docs")
    assert idx.meta["documents"] == 120 and len(idx.passages) == len(built.passages)
    assert not list((helpdesk / "index").rglob("*.pkl"))  # JSON and numpy arrays only
    test = [json.loads(x) for x in (helpdesk / "test.jsonl").open()]
    hits = 0
    for q in test:
        found = idx.search(q["question"], 3)
        assert [(p.source, p.score) for p in found] == [(p.source, p.score) for p in built.search(q["question"], 3)]
        hits += q["source"] in {p.source for p in found}
        page = (DOCUMENTS / q["source"]).read_text()
        assert strip_citation(q["answer"])[0] in page  # the answer is on its page
    assert hits / len(test) >= 0.95  # recall@3 (the benchmark quotes the figure)


def test_held_out_questions_ask_facts_no_training_question_asked() -> None:
    train = {(q["source"], q["fact"]) for q in questions("train")}
    test = {(q["source"], q["fact"]) for q in questions("test")}
    assert not train & test and len(train) == 5 * len(facts()) and len(test) == 2 * len(facts())
    assert {f for _, f in train | test} == set(FACTS)


def test_practice_questions_can_only_be_read(helpdesk: Path) -> None:
    """make-helpdesk's training set adds questions about 1,000 made-up pages: none of their
    products is a bundled one, and each record's passages hold its answer."""
    rows = [json.loads(x) for x in (helpdesk / "train.jsonl").open()]
    drill = [r for r in rows if r["source"].startswith("practice/")]
    assert len(drill) == 2000 and len(rows) == 2000 + len(questions("train"))
    bundled = {p["name"] for p in facts()}
    assert not {r["source"][len("practice/") :] for r in drill} & {p.name for p in DOCUMENTS.iterdir()}
    assert not any(name in r["question"] for r in drill for name in bundled)
    for r in drill:
        answer, cited = strip_citation(r["answer"])
        assert cited == r["source"] and any(answer in p["text"] for p in r["passages"] if p["source"] == cited)


@given(st.text(min_size=1).filter(lambda s: "[" not in s and "]" not in s and s.strip() == s),
       st.from_regex(r"[a-z0-9-]{1,20}\.md", fullmatch=True))  # fmt: skip
def test_a_cited_answer_reads_back(answer: str, source: str) -> None:
    assert strip_citation(cite(answer, source)) == (answer, source)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory, small_data: Path, helpdesk: Path) -> Path:
    """A tiny character model with a 768-character context, fine-tuned for a few steps on
    grounded training records (so that it has the chat template and has seen the format)."""
    from gptkit.config import load_config
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.training.train import train

    tmp = tmp_path_factory.mktemp("long")
    cfg = load_config(None, tiny_overrides(**{"model.block_size": 768, "train.max_steps": 4, "train.batch_size": 2}))
    cfg.data.dir = str(small_data)
    train(cfg, tmp / "base", progress=False, quiet=True)
    sets = ["train.max_steps=3", "train.batch_size=2", "train.dtype=float32", "train.tensorboard=false",
            "train.eval_interval=100", f"train.device={DEVICE}"]  # fmt: skip
    one = tmp / "train-1.jsonl"  # a character model's context holds one passage
    rows = [json.loads(x) for x in (helpdesk / "train.jsonl").open()][:40]
    one.write_text("".join(json.dumps({**r, "passages": r["passages"][:1]}) + "\n" for r in rows))
    finetune(tmp / "base", [str(one)], tmp / "run", finetune_config(None, sets), progress=False, quiet=True)
    return tmp / "run"


def test_chat_puts_the_best_passages_into_the_prompt(long_run: Path, helpdesk: Path) -> None:
    from gptkit.inference.chat import ChatSession
    from gptkit.inference.generate import SamplingParams
    from gptkit.loader import load_model

    model, tok, _ = load_model(long_run, DEVICE)
    session = ChatSession(model, tok, SamplingParams(max_new_tokens=8, temperature=0), "", Index.load(helpdesk / "index"), 3)
    q = "What colour is the Aurora blender?"
    prompt = tok.decode(session.prompt_ids(q))
    assert session.sources[0] == "aurora-blender.md" and f"[1] ({session.sources[0]})" in prompt
    assert prompt.count("Question: " + q) == 1 and "Answer the question from the passages" in prompt
    # as many passages as fit the context less the reply's room, the best first
    assert len(session.prompt_ids(q)) + 8 <= model.config.block_size
    "".join(session.reply(q))
    assert session.history[0].content == q  # the history keeps the question, not its passages


def test_the_server_answers_from_the_index(long_run: Path, helpdesk: Path) -> None:
    from tests.test_serve import Server

    s = Server(long_run, "--index", str(helpdesk / "index"), "--passages", "2")
    try:
        q = "What is the support code for the Glade lamp?"
        r = s.client().chat.completions.create(model=s.name, messages=[{"role": "user", "content": q}],
                                               max_tokens=4, temperature=0)  # fmt: skip
        sources = r.model_extra["sources"]
        assert sources[0]["source"] == "glade-lamp.md" and len(sources) <= 2
        assert r.usage.prompt_tokens > len(q) + 100  # the passages went into the prompt
        # a question no passage matches goes alone, and says so
        r = s.client().chat.completions.create(model=s.name, messages=[{"role": "user", "content": "zzz qqq"}],
                                               max_tokens=2, temperature=0)  # fmt: skip
        assert r.model_extra["sources"] == []
    finally:
        s.stop()


def test_eval_grounded_reports_recall_and_both_exact_matches(long_run: Path, helpdesk: Path, capsys: Capsys) -> None:  # fmt: skip
    code, out, err = cli(capsys, "eval", str(long_run), "--grounded", str(helpdesk / "test.jsonl"), "--index",
                         str(helpdesk / "index"), "--limit", "6", "--max-new-tokens", "4", "--device", str(DEVICE))  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["examples"] == 6 and summary["recall_at_3"] == 1.0
    for key in ("exact_match_with_retrieval", "exact_match_without_retrieval", "cites_the_right_source"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["samples"][0]["expected"] == strip_citation(json.loads(open(helpdesk / "test.jsonl").readline())["answer"])[0]


def test_grounded_records_train_through_the_chat_template() -> None:
    from gptkit.finetune.instructions import to_messages

    rec = {"question": "Q?", "passages": [{"source": "a.md", "text": "A fact."}], "answer": "x [a.md]"}
    user, answer = to_messages(rec)
    assert user.content == grounded_prompt("Q?", [Passage("a.md", "A fact.")])
    assert answer.content == "x [a.md]"
    with pytest.raises(ValueError, match="passage 0 must be an object with a string 'text'"):
        to_messages({"question": "Q?", "passages": ["A fact."], "answer": "x"})


# --- bad input ---


def test_empty_and_binary_folders(tmp_path: Path, capsys: Capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "index", str(tmp_path / "empty"), "--out", str(tmp_path / "i1"))
    assert code == 2 and "no text documents to index: it holds no files" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "bin" / "b.txt").write_bytes(b"\xff\xfe\x00text")
    code, _, err = cli(capsys, "index", str(tmp_path / "bin"), "--out", str(tmp_path / "i2"))
    assert code == 2 and "its 2 files are binary or empty (a.png, b.txt)" in err
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i2").exists()
    code, _, err = cli(capsys, "index", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i3"))
    assert code == 2 and "no such folder" in err


def test_an_index_built_with_another_tokenizer(long_run: Path, bpe_runs: dict, helpdesk: Path, tmp_path: Path,
                                               capsys: Capsys) -> None:  # fmt: skip
    code, out, err = cli(capsys, "index", str(helpdesk / "docs"), "--out", str(tmp_path / "idx"), "--run",
                         str(bpe_runs["gpt2"]), "--chunk", "64", "--overlap", "16")  # fmt: skip
    assert code == 0 and "passages of up to 64 tokens" in out, err
    code, _, err = cli(capsys, "chat", str(long_run), "--index", str(tmp_path / "idx"), "--device", str(DEVICE))
    assert code == 2 and "the index was built with another tokenizer" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "chat", str(long_run), "--index", str(tmp_path), "--device", str(DEVICE))
    assert code == 2 and "is not an index (no index.json)" in err
