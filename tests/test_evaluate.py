from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.checkpoint import load_run_config
from gptkit.data import DataSet
from gptkit.errors import GptkitError
from gptkit.evaluate.loss import evaluate, token_losses
from gptkit.loader import load_model

from .conftest import DATA, SHAKESPEARE


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


# --- lm-evaluation-harness: one number two ways (over the API, and on the exported folder) ---

TASKS = {
    "gptkit_mc": """task: gptkit_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
}
ROLLING = """task: gptkit_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/text.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def _per_sample(results: dict, task: str) -> list[float]:
    values = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["filtered_resps"]:
            values.append(float(resp[0] if isinstance(resp, (list, tuple)) else resp))
    return values


@pytest.mark.slow
def test_lm_eval_over_the_api_equals_its_hf_backend_on_the_export(tmp_path: Path, trained_run: Path) -> None:
    """lm-eval's own `local-completions` client against `gptkit serve` (prompt scoring through
    echo + logprobs, token-id requests) and lm-eval's own `hf` backend on `gptkit export`'s
    folder give the same per-example log-likelihoods and accuracy, on a multiple-choice task
    written here (local JSON, nothing downloaded)."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.tasks import TaskManager

    from gptkit.formats.hf import export_hf

    from .test_serve import Server

    text = SHAKESPEARE.read_text(encoding="utf-8")
    rows = [{"question": text[i : i + 12], "choices": [text[i + 12 : i + 20], "zqxjzqxj", text[i + 40 : i + 48]], "answer": 0}
            for i in range(0, 4000, 500)]  # fmt: skip
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [{"text": text[i : i + 90]} for i in range(10_000, 10_400, 100)]  # 90 tokens: 3 windows of 32
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, yaml in {**TASKS, "gptkit_rolling": ROLLING}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.format(data=tmp_path))
    hf = export_hf(trained_run, tmp_path / "hf")
    context = load_run_config(trained_run).model.block_size
    tasks = TaskManager(include_path=str(tmp_path))
    server = Server(trained_run)
    try:
        args = (f"model={server.name},base_url={server.url}/v1/completions,tokenizer={hf},tokenized_requests=True,"
                f"max_length={context},num_concurrent=1,max_retries=1")  # fmt: skip
        api = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=list(TASKS),
                                      task_manager=tasks, log_samples=True)  # fmt: skip
    finally:
        server.stop()
    local = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=list(TASKS),
                                    task_manager=tasks, log_samples=True, device="cpu")  # fmt: skip
    for name in TASKS:
        ours = sorted(api["samples"][name], key=lambda s: s["doc_id"])
        theirs = sorted(local["samples"][name], key=lambda s: s["doc_id"])
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            for x, y in zip(a["filtered_resps"], b["filtered_resps"]):
                x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                assert abs(float(x) - float(y)) < 1e-4, (name, a["doc_id"], x, y)
    assert api["results"]["gptkit_mc"]["acc,none"] == local["results"]["gptkit_mc"]["acc,none"]
    # In process (`gptkit eval --tasks`): the same per-example numbers, and on a rolling
    # (perplexity) task the same windows and totals as the hf backend.
    from gptkit.evaluate.harness import harness_model

    model, tok, _ = load_model(trained_run)
    both = ["gptkit_mc", "gptkit_rolling"]
    ours = lm_eval.simple_evaluate(model=harness_model(model, tok, 4), tasks=both, task_manager=tasks, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=both,
                                     task_manager=tasks, log_samples=True, device="cpu")  # fmt: skip
    for name in both:
        assert _per_sample(ours, name) == pytest.approx(_per_sample(theirs, name), abs=1e-4)
    assert ours["results"]["gptkit_mc"]["acc,none"] == local["results"]["gptkit_mc"]["acc,none"]


@pytest.mark.slow
def test_eval_tasks_command_and_its_errors(tmp_path: Path, trained_run: Path) -> None:
    """`gptkit eval RUN --tasks T --include-path DIR --output FILE`: lm-eval's table, a JSON line and
    lm-eval's results file; an unknown task or a negative --num-fewshot is one line, exit 2."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    rows = [{"question": "ROMEO", "choices": [":", "zq"], "answer": 0}, {"question": "JULIE", "choices": ["T", "q"], "answer": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gptkit_mc.yaml").write_text(TASKS["gptkit_mc"].format(data=tmp_path))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gptkit", "eval", str(trained_run), *args], capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    r = cli("--tasks", "gptkit_mc", "--include-path", str(tmp_path), "--output", str(tmp_path / "out.json"))
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])["gptkit_mc"]["acc,none"]
    written = json.loads((tmp_path / "out.json").read_text())["results"]["gptkit_mc"]["acc,none"]
    assert "gptkit_mc" in r.stdout and printed == written and printed in (0.0, 0.5, 1.0)  # 2 examples
    negative = ["--tasks", "gptkit_mc", "--include-path", str(tmp_path), "--num-fewshot", "-1"]
    for args, message in ((["--tasks", "no_such_task"], "unknown task 'no_such_task'"), (negative, "num_fewshot")):
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


GENERATE = """task: gptkit_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
"""


def _responses(results: dict, task: str) -> list[str]:
    return [str(s["resps"][0][0]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_generate_until_and_chat_template_three_ways(tmp_path: Path, trained_run: Path) -> None:
    """A generate_until task gives the same greedy outputs in process, over the API (lm-eval's
    local-completions against `gptkit serve`) and from lm-eval's hf backend on the export; and
    with --apply-chat-template, a fine-tuned run's template renders the same requests in process
    as transformers renders the exported template (the same per-choice log-likelihoods)."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.tasks import TaskManager

    from gptkit.evaluate.harness import harness_model
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.formats.hf import export_hf

    from .test_serve import Server

    text = SHAKESPEARE.read_text(encoding="utf-8")
    gen = [{"question": text[i : i + 14], "answer": text[i + 14 : i + 20]} for i in range(0, 3000, 300)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    rows = [{"question": text[i : i + 10], "choices": [text[i + 10 : i + 14], "zqxj"], "answer": 0} for i in range(0, 2000, 400)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gptkit_gen.yaml").write_text(GENERATE.format(data=tmp_path))
    (tmp_path / "gptkit_mc.yaml").write_text(TASKS["gptkit_mc"].format(data=tmp_path))
    tasks = TaskManager(include_path=str(tmp_path))
    hf = export_hf(trained_run, tmp_path / "hf")
    context = load_run_config(trained_run).model.block_size
    model, tok, _ = load_model(trained_run)
    ours = lm_eval.simple_evaluate(model=harness_model(model, tok, 4), tasks=["gptkit_gen"], task_manager=tasks, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=["gptkit_gen"],
                                     task_manager=tasks, log_samples=True, device="cpu")  # fmt: skip
    server = Server(trained_run)
    try:
        args = (f"model={server.name},base_url={server.url}/v1/completions,tokenizer={hf},tokenized_requests=True,"
                f"max_length={context},num_concurrent=1,max_retries=1")  # fmt: skip
        api = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["gptkit_gen"], task_manager=tasks,
                                      log_samples=True)  # fmt: skip
    finally:
        server.stop()
    mine = _responses(ours, "gptkit_gen")
    assert mine == _responses(theirs, "gptkit_gen") == _responses(api, "gptkit_gen")
    assert len(mine) == 10 and any(mine)

    chat = tmp_path / "chat"
    sets = ["train.max_steps=5", "train.dtype=float32", "train.tensorboard=false", "train.eval_interval=100"]
    finetune(trained_run, [str(DATA / "self_instruct_seed_tasks.chat.jsonl")], chat, finetune_config(None, sets),
             progress=False, quiet=True)  # fmt: skip
    chat_hf = export_hf(chat, tmp_path / "chat-hf")
    model, tok, _ = load_model(chat)
    ours = lm_eval.simple_evaluate(model=harness_model(model, tok, 4), tasks=["gptkit_mc"], task_manager=tasks,
                                   log_samples=True, apply_chat_template=True)  # fmt: skip
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={chat_hf},dtype=float32", tasks=["gptkit_mc"],
                                     task_manager=tasks, log_samples=True, device="cpu", apply_chat_template=True)  # fmt: skip
    prompt = sorted(ours["samples"]["gptkit_mc"], key=lambda s: s["doc_id"])[0]["arguments"][0][0]
    assert prompt.startswith("<|user|>") and prompt.endswith("<|end|><|assistant|>"), prompt
    assert _per_sample(ours, "gptkit_mc") == pytest.approx(_per_sample(theirs, "gptkit_mc"), abs=1e-4)


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, bpe_runs: dict[str, Path]) -> dict[str, Path]:
    """The char-level run, a small BPE run (conftest's), and a GPT-2-shaped random model imported
    from transformers."""
    from gptkit.formats.hf import import_hf

    from .hf_models import gpt2_model

    tmp = tmp_path_factory.mktemp("eval-models")
    _, folder = gpt2_model(tmp / "gpt2-hf", vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    gpt2 = import_hf(folder, tmp / "gpt2", tokenizer=str(DATA / "gpt2"))
    return {"char": trained_run, "bpe": bpe_runs["gpt2"], "gpt2": gpt2}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["char", "bpe", "gpt2"])
def test_rolling_perplexity_three_ways(tmp_path: Path, eval_models: dict, name: str) -> None:
    """A multiple-choice and a rolling (perplexity) task on three kinds of model: the same
    per-example log-likelihoods and accuracy in process, over the API and from the hf backend,
    once all three roll the same windows. lm-eval's API client keeps a
    position for the token it asks the server to generate and one for context, so its windows are
    two shorter than its max_length: given CONTEXT + 1, they are CONTEXT - 1 long, as the other
    two roll them at max_length CONTEXT - 1."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.tasks import TaskManager

    from gptkit.evaluate.harness import harness_model
    from gptkit.formats.hf import export_hf

    from .test_serve import Server

    run = eval_models[name]
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = [{"text": text[i : i + 300]} for i in range(20_000, 21_200, 300)]  # several windows each
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "gptkit_rolling.yaml").write_text(ROLLING.format(data=tmp_path))
    rows = [{"question": text[i : i + 12], "choices": [text[i + 12 : i + 20], "zqxjzqxj", text[i + 40 : i + 48]], "answer": 0}
            for i in range(0, 4000, 500)]  # fmt: skip
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gptkit_mc.yaml").write_text(TASKS["gptkit_mc"].format(data=tmp_path))
    both = ["gptkit_rolling", "gptkit_mc"]
    tasks = TaskManager(include_path=str(tmp_path))
    hf = export_hf(run, tmp_path / "hf")
    context = load_run_config(run).model.block_size
    model, tok, _ = load_model(run)
    ours = lm_eval.simple_evaluate(model=harness_model(model, tok, 4, max_length=context - 1), tasks=both,
                                   task_manager=tasks, log_samples=True)  # fmt: skip
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32,max_length={context - 1}",
                                     tasks=both, task_manager=tasks, log_samples=True, device="cpu")  # fmt: skip
    server = Server(run)
    try:
        args = (f"model={server.name},base_url={server.url}/v1/completions,tokenizer={hf},tokenized_requests=True,"
                f"max_length={context + 1},num_concurrent=1,max_retries=1")  # fmt: skip
        api = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=both,
                                      task_manager=tasks, log_samples=True)  # fmt: skip
    finally:
        server.stop()
    mine = _per_sample(ours, "gptkit_rolling")
    assert len(mine) == 4 and all(v < 0 for v in mine)
    assert mine == pytest.approx(_per_sample(theirs, "gptkit_rolling"), abs=1e-4)
    assert mine == pytest.approx(_per_sample(api, "gptkit_rolling"), abs=1e-4)
    choices = _per_sample(ours, "gptkit_mc")
    assert len(choices) == 24
    assert choices == pytest.approx(_per_sample(theirs, "gptkit_mc"), abs=1e-4)
    assert choices == pytest.approx(_per_sample(api, "gptkit_mc"), abs=1e-4)
    accuracy = {r["results"]["gptkit_mc"]["acc,none"] for r in (ours, theirs, api)}
    assert len(accuracy) == 1
