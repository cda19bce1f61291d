"""Rebuild train.jsonl and test.jsonl from the VADER ground truth (see README.md here).

pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
python tests/data/sentiment/make.py /tmp/vader/vaderSentiment-3.3.2.tar.gz
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path

SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SOURCES = {"movieReviewSnippets": "movies", "amazonReviewSnippets": "products", "nytEditorialSnippets": "news"}
PER_SOURCE = {"train": 1000, "test": 300}


def sentiment(rating: float) -> str:
    # mean of 20 raters on -4..+4; the middle band is 'neutral'
    return "negative" if rating < -0.5 else "positive" if rating > 0.5 else "neutral"


def main(sdist: str) -> None:
    data = Path(sdist).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256:
        sys.exit(f"{sdist}: not the vaderSentiment 3.3.2 sdist this set was made from")
    outer = tarfile.open(fileobj=io.BytesIO(data))
    inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    inner = tarfile.open(fileobj=io.BytesIO(inner_bytes))
    rng = random.Random(36)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for name, topic in SOURCES.items():
        raw = inner.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read()
        rows = []
        for line in raw.decode("utf-8", "replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[2].strip():
                rows.append({"text": parts[2].strip(), "label": sentiment(float(parts[1])), "topic": topic})
        rng.shuffle(rows)
        splits["train"] += rows[: PER_SOURCE["train"]]
        splits["test"] += rows[PER_SOURCE["train"] : sum(PER_SOURCE.values())]
    here = Path(__file__).parent
    for split, rows in splits.items():
        rng.shuffle(rows)
        with open(here / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(split, len(rows))


if __name__ == "__main__":
    main(sys.argv[1])
