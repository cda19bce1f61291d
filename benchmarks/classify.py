"""The decoder as a classifier against a bag-of-words logistic regression, on the same split.

Data: tests/data/sentiment (3,000 training and 900 held-out snippets of movie reviews, product
reviews and newspaper editorials, rated by people; see its README). Two tasks on the same texts:
sentiment (negative / neutral / positive) and topic (movies / products / news).

No pretrained model is on this machine, so gptkit's decoder starts from nothing: a 4-layer GPT
(BPE of 2,048 tokens) is pretrained on the training texts alone, no labels, then fine-tuned with
`gptkit finetune --task classify` (the label word as the answer) for each task. The rows:

- scikit-learn: TF-IDF of words and word pairs, logistic regression (C picked on a held-out
  tenth of the training set), the usual strong baseline for short texts;
- gptkit label word: the fine-tuned run through `gptkit eval --classify`;
- head on the last token: a logistic regression on the pretrained decoder's final hidden state
  at the text's last token (the base frozen): what a classification head learns without
  fine-tuning the decoder.

    python benchmarks/classify.py          # about 10 minutes on 2 cores

Accuracy and macro-F1 on the 900 held-out texts; ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "sentiment"

PRETRAIN = [
    "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=128", "model.dropout=0.1",
    "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=50", "train.eval_interval=200",
    "train.eval_batches=10", "train.log_interval=50", "train.tensorboard=false", "train.sample_tokens=0",
    "train.dtype=float32", "train.patience=0",
]  # fmt: skip
FINETUNE = ["train.batch_size=32", "train.lr=5e-4", "train.warmup_steps=20", "train.eval_interval=100",
            "train.log_interval=50", "train.tensorboard=false", "train.dtype=float32", "train.patience=0",
            "finetune.val_fraction=0.05", "model.dropout=0.1"]  # fmt: skip


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").open(encoding="utf-8")]


def bag_of_words(train: list[dict], test: list[dict], key: str) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts = [r["text"] for r in train]
    y = [r[key] for r in train]
    cut = len(texts) * 9 // 10
    best = (-1.0, 1.0)
    for c in (0.3, 1.0, 3.0, 10.0, 30.0):
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        m = LogisticRegression(C=c, max_iter=3000).fit(vec.fit_transform(texts[:cut]), y[:cut])
        acc = float(np.mean(m.predict(vec.transform(texts[cut:])) == np.array(y[cut:])))
        best = max(best, (acc, c))
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LogisticRegression(C=best[1], max_iter=3000).fit(vec.fit_transform(texts), y)
    return list(model.predict(vec.transform([r["text"] for r in test])))


def last_token_features(run: Path, texts: list[str]) -> np.ndarray:
    """The frozen base's final-norm output at each text's last token."""
    import torch

    from gptkit.loader import load_model

    model, tok, _ = load_model(run, torch.device("cpu"))
    model.eval()
    seen: list[torch.Tensor] = []
    hook = model.ln_f.register_forward_hook(lambda m, i, o: seen.append(o))
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t)[-model.config.block_size :]
            model(torch.tensor([ids]))
            out.append(seen.pop()[0, -1].numpy())
    hook.remove()
    return np.stack(out)


def head_on_last_token(base: Path, train: list[dict], test: list[dict], key: str) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = last_token_features(base, [r["text"] for r in train])
    xs = StandardScaler().fit(features)
    x_train = xs.transform(features)
    x_test = xs.transform(last_token_features(base, [r["text"] for r in test]))
    m = LogisticRegression(C=1.0, max_iter=3000).fit(x_train, [r[key] for r in train])
    return list(m.predict(x_test))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "classify"))
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=4.0)
    a = ap.parse_args()
    from gptkit.classify import evaluate_classifier, scores
    from gptkit.config import load_config
    from gptkit.data import prepare
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.training.train import train as pretrain

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train, test = rows("train"), rows("test")
    corpus = work / "train-texts.txt"
    corpus.write_text("\n".join(r["text"] for r in train) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    prepare([str(corpus)], work / "data", "bpe", vocab_size=2048, overwrite=True, progress=False)
    cfg = load_config(None, [*PRETRAIN, f"train.max_steps={a.pretrain_steps}"])
    cfg.data.dir = str(work / "data")
    base = work / "base"
    pretrain(cfg, base, progress=False, quiet=True, overwrite=True)
    pretrain_s = time.perf_counter() - t0
    results: dict[str, dict] = {"pretrain_s": {"s": round(pretrain_s)}}
    for key in ("label", "topic"):
        labels = sorted({r[key] for r in train})
        gold = [r[key] for r in test]
        t0 = time.perf_counter()
        bow = scores(gold, bag_of_words(train, test, key), labels)
        bow_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        head = scores(gold, head_on_last_token(base, train, test, key), labels)
        head_s = time.perf_counter() - t0
        ft_cfg = finetune_config(None, [*FINETUNE, f"finetune.epochs={a.epochs}",
                                        f"finetune.label_field={key}"])  # fmt: skip
        out = work / f"clf-{key}"
        t0 = time.perf_counter()
        finetune(base, [str(DATA / "train.jsonl")], out, ft_cfg, overwrite=True, task="classify",
                 progress=False, quiet=True)  # fmt: skip
        ft_s = time.perf_counter() - t0
        word = evaluate_classifier(out, DATA / "test.jsonl", "cpu", 32, out / "confusion.png")
        task = "sentiment" if key == "label" else "topic"
        majority = max(gold.count(y) for y in labels) / len(gold)
        print(f"\n{task} ({len(labels)} labels; majority class {majority:.1%} of the held-out set)")
        print(f"{'':34} {'accuracy':>9} {'macro-F1':>9} {'fit s':>7}")
        for name, s, secs in (("scikit-learn TF-IDF + logistic reg.", bow, bow_s),
                              ("gptkit label word (fine-tuned)", word, ft_s),
                              ("head on last token (frozen base)", head, head_s)):  # fmt: skip
            print(f"{name:34} {s['accuracy']:9.3f} {s['macro_f1']:9.3f} {secs:7.0f}")
        results[task] = {
            "majority": majority,
            "bag_of_words": {k: bow[k] for k in ("accuracy", "macro_f1")},
            "label_word": {k: word[k] for k in ("accuracy", "macro_f1")},
            "head_frozen": {k: head[k] for k in ("accuracy", "macro_f1")},
            "label_word_confusion": word["confusion"],
        }
    print(f"\n(pretraining the decoder on the training texts: {pretrain_s:.0f} s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
