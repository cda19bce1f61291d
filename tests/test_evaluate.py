from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.checkpoint import load_model
from gptkit.data import DataSet
from gptkit.errors import GptkitError
from gptkit.evaluate import evaluate, token_losses


def test_whole_split_every_token_once(trained_run: Path, small_data: Path) -> None:
    result = evaluate(trained_run)
    val = DataSet(small_data).split("val")
    assert result["tokens"] == len(val) - 1
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # Char model over ASCII: a byte per token, so bits/byte = loss / ln 2.
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-6)


def test_windows_equal_a_direct_computation(trained_run: Path) -> None:
    model, _, _ = load_model(trained_run)
    tokens = np.arange(100, dtype=np.int64) % 60
    total, count, predicted = token_losses(model, tokens, batch_size=2, device="cpu")
    T = model.config.block_size
    ref, n = 0.0, 0
    for s in range(0, 99, T):
        x = torch.tensor(tokens[s : min(s + T, 99)])[None]
        y = torch.tensor(tokens[s + 1 : min(s + T, 99) + 1])
        logits, _ = model(x)
        ref += torch.nn.functional.cross_entropy(logits[0], y, reduction="sum").item()
        n += y.numel()
    assert count == n == 99 and predicted.tolist() == tokens[1:].tolist()
    assert total == pytest.approx(ref, rel=1e-5)


def test_text_file_and_errors(trained_run: Path, tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("What's in a name? That which we call a rose\n" * 5)
    r = evaluate(trained_run, text=f)
    assert r["tokens"] == len(f.read_text()) - 1 and r["loss"] > 0
    with pytest.raises(GptkitError, match="no such file"):
        evaluate(trained_run, text=tmp_path / "nope.txt")
    (tmp_path / "u.txt").write_text("naïve ☃")
    with pytest.raises(GptkitError, match="not in this character tokenizer"):
        evaluate(trained_run, text=tmp_path / "u.txt")
