"""The decoder as a classifier: labelled text in, a label and its probability out.

A classification run is an instruction fine-tune whose answer is the label word: the text is the
user's turn, the label the assistant's (`gptkit finetune BASE --task classify`), trained by the
one training loop with every method it has (full, LoRA, AdaLoRA, adapters). To classify, the
model scores each label's tokens (and the end of its turn) after the text, in batches that share
one forward pass of the text (evaluate/harness.py's ContinuationScorer); the label
probabilities are the softmax of those log-likelihoods over the run's labels, so they always sum
to one and never name a label the run does not know.

Also here: accuracy, macro-F1 and the confusion matrix (`gptkit eval RUN --classify FILE`), and
a stream of lines labelled one by one with a sliding-window alert (`gptkit classify RUN FILE|-
--alert LABEL --window N --threshold X`).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from gptkit.errors import GptkitError
from gptkit.evaluate.harness import ContinuationScorer
from gptkit.finetune.instructions import Conversations, read_records
from gptkit.model import GPT
from gptkit.template import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

# --- labelled data ---


@dataclass
class Labelled:
    """A labelled file's examples: texts, labels (as strings) and the file lines they came from."""

    texts: list[str]
    labels: list[str]
    lines: list[int]
    path: str
    kind: str = "string"  # or "integer": what the file's labels were

    @property
    def label_set(self) -> list[str]:
        return sorted(set(self.labels))


def read_labelled(path: str | Path, label_field: str = "label") -> Labelled:
    """Records {"text": ..., LABEL_FIELD: ...} from a JSON list or JSONL file. Labels are all
    strings or all integers (read as their decimal text); a file that mixes them, or a record
    without text or label, is refused with the line it is on."""
    out = Labelled([], [], [], str(path))
    first_kind: tuple[int, str] | None = None
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise GptkitError(f"{where}: a record must be an object {{\"text\": ..., "
                              f"\"{label_field}\": ...}}, got {type(rec).__name__}")  # fmt: skip
        text, label = rec.get("text"), rec.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise GptkitError(f"{where}: 'text' must be a non-empty string")
        if label is None:
            keys = ", ".join(sorted(rec)[:6])
            raise GptkitError(
                f"{where}: no '{label_field}' in the record (its keys: {keys}); name the label's "
                "key with --label-field"
            )
        kind = "string" if isinstance(label, str) else "integer"
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise GptkitError(
                f"{where}: a label must be a string or an integer, got {json.dumps(label)[:40]}"
            )
        if first_kind is None:
            first_kind = (line, kind)
        elif kind != first_kind[1]:
            raise GptkitError(
                f"{where}: mixed label types: this label is {kind} {json.dumps(label)}, the one "
                f"on line {first_kind[0]} a {first_kind[1]}; make every label of one type"
            )
        label = str(label).strip()
        if not label:
            raise GptkitError(f"{where}: the label is empty")
        out.texts.append(text)
        out.labels.append(label)
        out.lines.append(line)
    if not out.texts or first_kind is None:
        raise GptkitError(f"{path}: holds no records")
    out.kind = first_kind[1]
    return out


def read_training_files(files: list[str], label_field: str) -> Labelled:
    """Every training file as one set; at least two labels between them."""
    parts = [read_labelled(f, label_field) for f in files]
    if len({p.kind for p in parts}) > 1:
        ints = ", ".join(p.path for p in parts if p.kind == "integer")
        raise GptkitError(
            f"mixed label types across files: {ints} label with integers, the others with "
            "strings; make every label of one type"
        )
    data = Labelled(
        [t for p in parts for t in p.texts],
        [y for p in parts for y in p.labels],
        [n for p in parts for n in p.lines],
        ", ".join(files),
    )
    if len(data.label_set) < 2:
        raise GptkitError(
            f"{data.path}: every record has the label {data.labels[0]!r}; a classifier needs "
            "examples of at least two labels"
        )
    return data


def check_known(data: Labelled, labels: list[str]) -> None:
    """Every label of an evaluation file is one the run was trained on."""
    known = set(labels)
    for text_label, line in zip(data.labels, data.lines):
        if text_label not in known:
            raise GptkitError(
                f"{data.path}:{line}: label {text_label!r} is not one the run was trained on "
                f"({', '.join(labels)}); evaluate on those labels, or fine-tune with examples "
                f"of {text_label!r}"
            )


def training_conversations(data: Labelled) -> Conversations:
    """The examples as chat turns: the text from the user, the label from the assistant."""
    return Conversations(
        [[Message("user", t), Message("assistant", y)] for t, y in zip(data.texts, data.labels)]
    )


def fit_texts(convs: Conversations, tok: Tokenizer, block: int) -> Conversations:
    """Each example's text cut (its end) so that the label still fits the context: a long text
    must not lose the answer it is trained to give."""
    template = ChatTemplate(tok)
    items = []
    for user, answer in convs.items:
        room = block + 1 - len(template.encode([Message("user", ""), answer])[0])
        items.append([Message("user", fit_text(tok, user.content, room, template)), answer])
    return Conversations(items, convs.skipped)


def fit_text(tok: Tokenizer, text: str, room: int, template: ChatTemplate) -> str:
    """`text`, its end cut until its user turn's prompt takes at most `room` tokens."""
    if room < 1:
        raise GptkitError(
            "the model's context leaves no room for a text before the label; raise "
            "model.block_size (finetune.block_size) or use shorter labels"
        )
    overhead = None
    while len(template.prompt_ids([Message("user", text)])) > room and text:
        if overhead is None:  # most texts fit: the template's own tokens are counted only here
            overhead = len(template.prompt_ids([Message("user", "")]))
        ids = tok.encode_plain(text)
        keep = max(0, min(len(ids) - 1, room - overhead))
        text = tok.decode(ids[:keep])
    return text


# --- classifying ---


class Classifier:
    """A classification run's model: label probabilities for texts."""

    def __init__(self, model: GPT, tok: Tokenizer, labels: list[str], batch_size: int = 16):
        if not labels:
            raise GptkitError(
                "this run was not fine-tuned to classify (its config has no finetune.labels); "
                "make one with gptkit finetune BASE --task classify --data FILE --out RUN"
            )
        self.model, self.tok, self.labels = model, tok, list(labels)
        self.template = ChatTemplate(tok)
        self.block = model.config.block_size
        self.scorer = ContinuationScorer(model, tok.eot_id, batch_size)
        empty = self.template.prompt_ids([Message("user", "")])
        self.continuations = []
        for label in self.labels:
            whole = self.template.encode([Message("user", ""), Message("assistant", label)])[0]
            if whole[: len(empty)] != empty:  # a chat template that rewrites earlier turns
                raise GptkitError(
                    "this run's chat template does not render a reply after its prompt, so its "
                    f"labels cannot be scored (label {label!r})"
                )
            self.continuations.append(whole[len(empty) :])
        self.room = self.block + 1 - max(len(c) for c in self.continuations)

    def prompt(self, text: str) -> list[int]:
        text = fit_text(self.tok, text, self.room, self.template)
        return self.template.prompt_ids([Message("user", text)])

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), len(labels)): each text's label distribution."""
        pairs = [(self.prompt(t), c) for t in texts for c in self.continuations]
        scores = [s for s, _ in self.scorer.score(pairs)]
        return torch.tensor(scores, dtype=torch.float64).view(len(texts), -1).softmax(-1)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.probabilities(texts).argmax(-1).tolist()]


def load_classifier(
    run: str | Path, device: str = "auto", batch_size: int = 16
) -> tuple[Classifier, Any]:
    """A run folder as a Classifier (adapters merged), and its config."""
    from gptkit.loader import load_model
    from gptkit.runtime import resolve_device

    model, tok, cfg = load_model(run, resolve_device(device), merge_adapters=True)
    if cfg.finetune.task != "classify":
        raise GptkitError(
            f"{run} was not fine-tuned to classify; make a classifier with gptkit finetune "
            f"{run} --task classify --data FILE --out RUN"
        )
    return Classifier(model, tok, cfg.finetune.labels, batch_size), cfg


# --- measuring ---


def scores(gold: list[str], pred: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (each label's F1, averaged with equal weight: a rare label counts as
    much as a common one), per-label precision/recall/F1/support and the confusion matrix (rows:
    true label, columns: predicted)."""
    index = {y: i for i, y in enumerate(labels)}
    conf = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        conf[index[g]][index[p]] += 1
    per: dict[str, dict[str, float]] = {}
    for i, y in enumerate(labels):
        tp = conf[i][i]
        predicted = sum(row[i] for row in conf)
        support = sum(conf[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[y] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "examples": len(gold),
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold)),
        "macro_f1": sum(v["f1"] for v in per.values()) / len(labels),
        "labels": labels,
        "per_label": per,
        "confusion": conf,
    }


def plot_confusion(conf: list[list[int]], labels: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = 1.2 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    ax.imshow(conf, cmap="Blues")
    top = max(max(r) for r in conf) or 1
    for i, row in enumerate(conf):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center",
                    color="white" if n > top / 2 else "black")  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_classifier(
    run: str | Path,
    file: str | Path,
    device: str = "auto",
    batch_size: int = 16,
    plot: str | Path | None = None,
    label_field: str | None = None,
) -> dict[str, Any]:
    """A classification run on a labelled file: scores() and, with plot, the confusion matrix as
    a PNG."""
    clf, cfg = load_classifier(run, device, batch_size)
    data = read_labelled(file, label_field or cfg.finetune.label_field)
    check_known(data, clf.labels)
    pred = clf.predict(data.texts)
    out = scores(data.labels, pred, clf.labels)
    if plot:
        title = f"{Path(run).name} on {Path(file).name}: accuracy {out['accuracy']:.3f}"
        out["confusion_png"] = str(plot_confusion(out["confusion"], clf.labels, Path(plot), title))
    return out


# --- a stream of texts, and alerts ---


class Alert:
    """Watches the share of one label among the last `window` items; fires when that share rises
    above `threshold` (and again only after it has fallen back to or below it)."""

    def __init__(self, label: str, window: int, threshold: float) -> None:
        self.label, self.window, self.threshold = label, window, threshold
        self.recent: deque[bool] = deque(maxlen=window)
        self.raised = False

    def update(self, label: str) -> float | None:
        """Add one item's label; the share when the alert fires, else None."""
        self.recent.append(label == self.label)
        share = sum(self.recent) / len(self.recent)
        above = len(self.recent) == self.window and share > self.threshold
        fired = above and not self.raised
        self.raised = above
        return share if fired else None


def check_alert(labels: list[str], label: str, window: int, threshold: float) -> Alert:
    if label not in labels:
        raise GptkitError(f"--alert {label!r} is not one of the run's labels ({', '.join(labels)})")
    if window < 1:
        raise GptkitError(f"--window must be >= 1, got {window}")
    if not 0 <= threshold < 1:
        raise GptkitError(f"--threshold is a share in [0, 1), got {threshold}")
    return Alert(label, window, threshold)


def batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Non-empty lines in groups of `size` (the last group may be smaller)."""
    group: list[str] = []
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip():
            group.append(text)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def classify_stream(
    clf: Classifier,
    lines: Iterable[str],
    out: TextIO,
    batch_size: int = 16,
    alert: Alert | None = None,
    as_json: bool = False,
) -> int:
    """Label each non-empty line; print one line per item (label, its probability, the text; or
    a JSON object) and an alert line when the watched label's share passes its threshold. Returns
    the number of alerts."""
    n = alerts = 0
    for group in batches(lines, batch_size):
        probs = clf.probabilities(group)
        for text, p in zip(group, probs.tolist()):
            n += 1
            best = max(range(len(p)), key=p.__getitem__)
            label = clf.labels[best]
            if as_json:
                item = {"item": n, "label": label, "probabilities": dict(zip(clf.labels, p))}
                out.write(json.dumps({**item, "text": text}) + "\n")
            else:
                out.write(f"{label}\t{p[best]:.3f}\t{text}\n")
            share = alert.update(label) if alert else None
            if alert and share is not None:
                alerts += 1
                msg = (f"ALERT: {alert.label!r} is {share:.0%} of the last {alert.window} items "
                       f"(threshold {alert.threshold:.0%}), at item {n}")  # fmt: skip
                out.write(json.dumps({"alert": alert.label, "share": share, "window":
                          alert.window, "item": n}) + "\n" if as_json else msg + "\n")  # fmt: skip
        out.flush()
    return alerts
