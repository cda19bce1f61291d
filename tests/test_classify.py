"""The decoder as a classifier (gptkit/classify.py): a run fine-tuned with --task classify labels
text it has not seen, its scores agree with scikit-learn's, its stream raises alerts where a
plain count says it should, the server answers /v1/classify with the same probabilities, and
bad labelled files are one line, exit 2, nothing written."""

from __future__ import annotations

import io
import json
import random
from collections import deque
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.classify import Alert, classify_stream, fit_texts, load_classifier, read_labelled, scores, training_conversations
from gptkit.finetune.instruct import finetune, finetune_config
from gptkit.finetune.instructions import encode_example
from gptkit.template import ChatTemplate
from tests.conftest import DEVICE, cli

Capsys = pytest.CaptureFixture
SENTIMENT = Path(__file__).parent / "data" / "sentiment"
WORDS = {"pos": "good great lovely fine nice superb".split(), "neg": "bad awful poor sad ugly grim".split()}  # fmt: skip
SETS = ["train.max_steps=150", "train.lr=1e-2", "train.batch_size=16", "train.eval_interval=50",
        "train.dtype=float32", "train.tensorboard=false", f"train.device={DEVICE}"]  # fmt: skip


def word_texts(n: int, seed: int) -> list[dict[str, str]]:
    """Three words of one kind, the label says which: a task a tiny model learns in seconds."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        y = r.choice(["pos", "neg"])
        out.append({"text": " ".join(r.choice(WORDS[y]) for _ in range(3)), "label": y})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("clf")
    return {"train": write_jsonl(tmp / "train.jsonl", word_texts(300, 0)),
            "test": write_jsonl(tmp / "test.jsonl", word_texts(60, 1))}  # fmt: skip


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, files: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("clf") / "run"
    finetune(trained_run, [str(files["train"])], out, finetune_config(None, SETS), task="classify",
             progress=False, quiet=True)  # fmt: skip
    return out


def test_a_classification_run_labels_held_out_text(clf_run: Path, files: dict[str, Path], capsys: Capsys) -> None:  # fmt: skip
    code, out, err = cli(capsys, "eval", str(clf_run), "--classify", str(files["test"]), "--device", str(DEVICE))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["labels"] == ["neg", "pos"] and summary["examples"] == 60
    assert summary["accuracy"] >= 0.95  # the held-out texts are new word triples
    png = Path(summary["confusion_png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_probabilities_are_a_distribution_over_the_runs_labels(clf_run: Path) -> None:
    clf, cfg = load_classifier(clf_run, str(DEVICE))
    assert cfg.finetune.labels == ["neg", "pos"] and cfg.finetune.task == "classify"
    texts = ["good fine nice", "sad ugly bad", "x" * 500]  # the last is cut to fit the context
    probs = clf.probabilities(texts)
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3, dtype=probs.dtype))
    assert clf.predict(texts[:2]) == ["pos", "neg"]
    # one text alone scores what it scores in a batch
    assert torch.allclose(clf.probabilities(texts[1:2])[0], probs[1], atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc")), min_size=1, max_size=60))
def test_scores_agree_with_scikit_learn(pairs: list[tuple[str, str]]) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    gold, pred = [g for g, _ in pairs], [p for _, p in pairs]
    labels = ["a", "b", "c"]
    s = scores(gold, pred, labels)
    assert s["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    want = f1_score(gold, pred, labels=labels, average="macro", zero_division=0)
    assert s["macro_f1"] == pytest.approx(want)
    assert s["confusion"] == confusion_matrix(gold, pred, labels=labels).tolist()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.booleans(), max_size=80), st.integers(1, 8), st.sampled_from([0.0, 0.25, 0.5, 0.7]))
def test_alerts_fire_when_the_share_crosses_the_threshold(items: list[bool], window: int, threshold: float) -> None:
    alert = Alert("neg", window, threshold)
    fired = [i for i, neg in enumerate(items) if alert.update("neg" if neg else "pos") is not None]
    # a plain count: the share over each full window, and the items where it rises above X
    recent: deque[bool] = deque(maxlen=window)
    above, want = False, []
    for i, neg in enumerate(items):
        recent.append(neg)
        now = len(recent) == window and sum(recent) / window > threshold
        if now and not above:
            want.append(i)
        above = now
    assert fired == want


def test_the_stream_prints_labels_and_alerts(clf_run: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    lines = ["good fine nice", "sad bad poor", "ugly grim sad", "awful sad bad", "nice good great"]
    src = tmp_path / "stream.txt"
    src.write_text("\n".join(lines) + "\n\n")
    code, out, err = cli(capsys, "classify", str(clf_run), str(src), "--alert", "neg", "--window", "3",
                         "--threshold", "0.6", "--batch-size", "2", "--device", str(DEVICE))  # fmt: skip
    assert code == 0, err
    rows = out.splitlines()
    assert [r.split("\t")[0] for r in rows if not r.startswith("ALERT")] == ["pos", "neg", "neg", "neg", "pos"]
    # the share of 'neg' in the last 3 passes 60% at the third item (2 of 3 is 67%)
    assert [r for r in rows if r.startswith("ALERT")] == ["ALERT: 'neg' is 67% of the last 3 items (threshold 60%), at item 3"]
    clf, _ = load_classifier(clf_run, str(DEVICE))
    buf = io.StringIO()
    assert classify_stream(clf, lines, buf, as_json=True) == 0
    items = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["item"] for x in items] == [1, 2, 3, 4, 5] and sum(items[0]["probabilities"].values()) == pytest.approx(1)


def test_the_real_labelled_set_reads_and_trains(trained_run: Path, tmp_path: Path) -> None:
    """tests/data/sentiment: 3,000 + 900 rated snippets, labels and topics; a run fine-tuned on a
    slice of it learns its label set, and texts longer than the context are cut, not dropped."""
    train, test = read_labelled(SENTIMENT / "train.jsonl"), read_labelled(SENTIMENT / "test.jsonl", "topic")
    assert len(train.texts) == 3000 and len(test.texts) == 900
    assert train.label_set == ["negative", "neutral", "positive"] and test.label_set == ["movies", "news", "products"]
    assert not set(train.texts) & set(read_labelled(SENTIMENT / "test.jsonl").texts)
    part = write_jsonl(tmp_path / "part.jsonl", [{"text": t, "label": y} for t, y in zip(train.texts[:200], train.labels)])
    result = finetune(trained_run, [str(part)], tmp_path / "run", finetune_config(None, [*SETS, "train.max_steps=10"]),
                      task="classify", progress=False, quiet=True)  # fmt: skip
    assert result.step == 10
    clf, cfg = load_classifier(tmp_path / "run", str(DEVICE))
    assert clf.labels == ["negative", "neutral", "positive"]
    # the snippets are longer than the 32-character context: each is cut so that its label fits
    tok, block = clf.tok, cfg.model.block_size
    convs = fit_texts(training_conversations(read_labelled(part)), tok, block)
    assert all(encode_example(ChatTemplate(tok), c, block) is not None for c in convs.items)
    cut = [c[0].content for c in convs.items]
    assert all(t.startswith(c) for t, c in zip(train.texts, cut)) and sum(map(len, cut)) < sum(map(len, train.texts[:200]))


# --- bad input: one line, exit 2, nothing written ---


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}],
         "mixed label types: this label is integer 1, the one on line 1 a string"),
        ([{"text": "a", "label": "x"}, {"text": "b"}], "no 'label' in the record"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "a classifier needs examples of at least two labels"),
        ([{"text": "", "label": "x"}], "'text' must be a non-empty string"),
        ([{"text": "a", "label": True}], "a label must be a string or an integer"),
    ],
)  # fmt: skip
def test_bad_training_files(rows: list, message: str, trained_run: Path, tmp_path: Path, capsys: Capsys) -> None:  # fmt: skip
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = cli(capsys, "finetune", str(trained_run), "--task", "classify", "--data", str(data),
                       "--out", str(tmp_path / "out"), "--no-progress")  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_label_the_run_never_saw(clf_run: Path, tmp_path: Path, capsys: Capsys) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    code, _, err = cli(capsys, "eval", str(clf_run), "--classify", str(data), "--device", str(DEVICE))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{data}:2: label 'mixed' is not one the run was trained on (neg, pos)" in err


def test_alert_settings_and_runs_that_do_not_classify(clf_run: Path, trained_run: Path, tmp_path: Path, capsys: Capsys) -> None:
    src = tmp_path / "x.txt"
    src.write_text("good\n")
    code, _, err = cli(capsys, "classify", str(clf_run), str(src), "--alert", "angry")
    assert code == 2 and "--alert 'angry' is not one of the run's labels (neg, pos)" in err
    code, _, err = cli(capsys, "classify", str(clf_run), str(src), "--alert", "neg", "--threshold", "1.5")
    assert code == 2 and "--threshold is a share in [0, 1)" in err
    code, _, err = cli(capsys, "classify", str(trained_run), str(src))
    assert code == 2 and "was not fine-tuned to classify" in err


def test_the_server_classifies(clf_run: Path) -> None:
    from tests.test_serve import Server

    clf, _ = load_classifier(clf_run, str(DEVICE))
    texts = ["good fine nice", "sad ugly bad"]
    s = Server(clf_run, "--max-classify-inputs", "4")
    try:
        status, body = s.request("POST", "/v1/classify", {"model": s.name, "input": texts}, key=None)
        assert status == 200, body
        assert [d["label"] for d in body["data"]] == ["pos", "neg"] and body["labels"] == ["neg", "pos"]
        want = clf.probabilities(texts)
        for d, p in zip(body["data"], want.tolist()):
            assert [d["probabilities"][y] for y in ("neg", "pos")] == pytest.approx(p, abs=1e-6)
        status, body = s.request("POST", "/v1/classify", {"input": "good"}, key=None)
        assert status == 200 and body["data"][0]["label"] == "pos"
        status, body = s.request("POST", "/v1/classify", {"input": ["good"] * 5}, key=None)
        assert status == 400 and "send 1 to 4 texts, got 5" in body["error"]["message"]
        status, body = s.request("POST", "/v1/classify", {"input": "good", "model": "other"}, key=None)
        assert status == 404
        status, schema = s.request("GET", "/openapi.json", key=None)
        assert "/v1/classify" in schema["paths"]
        assert schema["components"]["schemas"]["ClassifyRequest"]["properties"]["input"]["anyOf"][1]["maxItems"] == 4
    finally:
        s.stop()
