from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit.checkpoint import load_run_config
from gptkit.errors import GptkitError
from gptkit.finetune.instruct import finetune, finetune_config, resume_finetune
from gptkit.finetune.instructions import InstructionData, encode_example, load_conversations, pad_batch, read_records
from gptkit.finetune.tasks import make_tasks, write_tasks
from gptkit.loader import load_model
from gptkit.model import GPT
from gptkit.template import ChatTemplate, Message
from tests.conftest import DATA, DEVICE

FT_SET = ["train.max_steps=30", "train.batch_size=8", "train.eval_interval=15", "train.log_interval=5",
          "train.dtype=float32", "train.tensorboard=false", "train.warmup_steps=3", f"train.device={DEVICE}"]  # fmt: skip


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks") / "train.jsonl", 200, "train")


def gptkit_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, input=stdin, timeout=300)


# --- reading instruction files ---


def test_real_instruction_files_load() -> None:
    counts = {
        "llms_from_scratch_instruction_data.json": 1100,
        "self_instruct_seed_tasks.alpaca.json": 175,
        "self_instruct_seed_tasks.chat.jsonl": 175,
        "fastchat_dummy_conversation.chat.jsonl": 500,
    }
    for name, n in counts.items():
        convs = load_conversations([str(DATA / name)]).items
        assert len(convs) == n
        assert all(c[-1].role == "assistant" for c in convs)
    # Alpaca with input: the input follows the instruction after a blank line, as in the derived chat file.
    alpaca = load_conversations([str(DATA / "self_instruct_seed_tasks.alpaca.json")]).items
    chat = load_conversations([str(DATA / "self_instruct_seed_tasks.chat.jsonl")]).items
    assert [[(m.role, m.content) for m in c] for c in alpaca] == [[(m.role, m.content) for m in c] for c in chat]
    multi = load_conversations([str(DATA / "fastchat_dummy_conversation.chat.jsonl")]).items
    assert {len(c) for c in multi} == {2, 4, 6}


def test_json_list_records_know_their_lines(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"}\n]\n')
    assert [line for line, _ in read_records(f)] == [2, 4]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the file is empty"),
        ("   \n", "the file is empty"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', ":2: record 2: Alpaca record has no 'output'"),
        ('[{"instruction": "a", "output": "b"}, {"prompt": "x"}]', "neither 'messages' (chat format), 'instruction'"),
        ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 0 has no 'role'"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "message 0 has no 'content'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "content must be a string"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        ('{"conversations": [{"from": "human", "value": "hi"}]}', "ShareGPT"),
        ('{"instruction": "a", "output": "b"}\n{not json}\n', ":2: invalid JSON"),
        ('[{"instruction": "a", "output": 3}]', "'output' must be a string"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_records_name_file_line_and_problem(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(GptkitError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_conversations([str(f)])
    assert str(f) in str(e.value)


def test_skip_invalid_counts(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    rows = ['{"instruction": "a", "output": "b"}', '{"instruction": "c"}', '{"messages": []}']
    rows.append('{"instruction": "e", "output": "f"}')
    f.write_text("\n".join(rows) + "\n")
    convs = load_conversations([str(f)], skip_invalid=True)
    assert len(convs.items) == 2 and convs.skipped == 2


# --- examples, truncation, padding ---


def test_truncation_rule_and_dropped_examples() -> None:
    tok = ChatTemplate.add_to(load_tokenizer_tiny())
    t = ChatTemplate(tok)
    msgs = [Message("user", "abc"), Message("assistant", "defgh")]
    ids, mask = t.encode(msgs)  # 1 + 3 + 1 + 1 + 5 + 1 = 12 tokens
    x, y = encode_example(t, msgs, block_size=8)
    assert x == ids[:8] and len(y) == 8
    assert y == [i if m else -100 for i, m in zip(ids[1:9], mask[1:9])]
    # A context that ends before the answer starts leaves nothing to learn: dropped.
    assert encode_example(t, msgs, block_size=5) is None


def load_tokenizer_tiny():  # noqa: ANN201
    from gptkit.tokenizer import CharTokenizer

    return CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .?\n"])


def test_padding_never_leaks_between_examples() -> None:
    """Each example's logits in a padded batch equal its logits alone: nothing crosses rows,
    and padding (after the example, under a causal mask) changes nothing."""
    from gptkit.config import ModelConfig

    torch.manual_seed(0)
    tok = ChatTemplate.add_to(load_tokenizer_tiny())
    t = ChatTemplate(tok)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    pairs = [("hi", "yo"), ("what is it", "a long reply here")]
    examples = [encode_example(t, [Message("user", u), Message("assistant", a)], 64) for u, a in pairs]
    x, y = pad_batch(examples, tok.eot_id)
    assert (y[0, len(examples[0][1]) :] == -100).all()
    with torch.no_grad():
        batched, _ = model(x)
        for i, (xi, _) in enumerate(examples):
            alone, _ = model(torch.tensor([xi]))
            torch.testing.assert_close(batched[i, : len(xi)], alone[0], atol=1e-5, rtol=0)


def test_instruction_data_resumes_its_sampler(tasks_file: Path) -> None:
    tok = ChatTemplate.add_to(load_tokenizer_tiny(), "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+")
    convs = load_conversations([str(tasks_file)]).items
    a = InstructionData(convs, tok, 64, 4, seed=3, val_fraction=0.1)
    assert len(a.val) == 20 and len(a.train) == 180
    a.next()
    state = a.state()
    x1, _ = a.next()
    a.load_state(state)
    x2, _ = a.next()
    assert torch.equal(x1, x2)


# --- fine-tuning runs ---


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, tasks_file: Path) -> Path:
    out = tmp_path_factory.mktemp("ft") / "full"
    finetune(trained_run, [str(tasks_file)], out, finetune_config(None, FT_SET), progress=False, quiet=True)
    return out


def test_epochs_set_the_number_of_steps(
    trained_run: Path, tasks_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """finetune.epochs=1.5: one and a half passes over the training examples, in batches of 8."""
    import math

    cfg = finetune_config(None, FT_SET + ["finetune.epochs=1.5", "train.max_steps=1000", "train.patience=0"])
    result = finetune(trained_run, [str(tasks_file)], tmp_path / "e", cfg, progress=False)
    n_train = int(re.search(r"([\d,]+) train / \d+ held-out examples", capsys.readouterr().out)[1].replace(",", ""))
    assert 100 < n_train <= 180  # 200 less 10% held out, less those that do not fit the tiny context
    assert result.step == math.ceil(1.5 * n_train / 8)
    assert load_run_config(tmp_path / "e").train.max_steps == result.step  # saved, so a resume keeps it


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, tasks_file: Path) -> Path:
    out = tmp_path_factory.mktemp("ft") / "lora"
    cfg = finetune_config(None, FT_SET + ["train.lr=1e-2", "lora.rank=4", "lora.dropout=0.1"])
    finetune(trained_run, [str(tasks_file)], out, cfg, lora=True, progress=False, quiet=True)
    return out


@pytest.mark.cuda
def test_full_finetune_grows_vocab_and_learns(full_run: Path, trained_run: Path) -> None:
    model, tok, cfg = load_model(full_run)
    base, base_tok, _ = load_model(trained_run)
    assert tok.chat_template and tok.vocab_size == model.config.vocab_size > base_tok.vocab_size
    assert cfg.lineage.base_vocab_size == base_tok.vocab_size
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r] + [r["final_val_loss"] for r in rows if "final_val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert (full_run / "checkpoint" / "model.safetensors").is_file()


@pytest.mark.cuda
def test_lora_trains_only_adapters_and_new_rows(lora_run: Path, trained_run: Path) -> None:
    from safetensors.torch import load_file

    from gptkit.peft.methods import has_adapters as has_lora
    from gptkit.peft.methods import parameter_counts

    model, tok, cfg = load_model(lora_run)
    base, _, base_cfg = load_model(trained_run)
    assert has_lora(model)
    counts = parameter_counts(model)
    d, L, r = base_cfg.model.n_embd, base_cfg.model.n_layer, 4
    new_rows = cfg.model.vocab_size - base_cfg.model.vocab_size
    # c_attn (d -> 3d), attn c_proj (d -> d), c_fc (d -> 4d), mlp c_proj (4d -> d), each r * (in + out).
    adapters = L * r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert counts["trainable"] == adapters + new_rows * d  # tied head: one set of rows
    saved = load_file(str(lora_run / "checkpoint" / "adapter.safetensors"))
    assert sum(v.numel() for v in saved.values()) == counts["trainable"]
    assert not (lora_run / "checkpoint" / "model.safetensors").exists()
    # The base's own weights did not move: every old embedding row and every frozen matrix.
    base_sd = base.state_dict()
    for name, p in model.named_parameters():
        plain = name.replace(".base.", ".")
        if plain in base_sd:
            old = base_sd[plain]
            assert torch.equal(p[: old.size(0)] if p.dim() and name.startswith("wte") else p, old), name
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


@pytest.mark.cuda
def test_merge_gives_equal_logits(lora_run: Path, tmp_path: Path) -> None:
    from gptkit.finetune.instruct import merge

    model, tok, _ = load_model(lora_run, DEVICE)
    merged_dir = merge(lora_run, tmp_path / "merged")
    merged, tok2, cfg2 = load_model(merged_dir, DEVICE)
    assert not cfg2.lora.enabled and (merged_dir / "checkpoint" / "model.safetensors").is_file()
    x = torch.randint(0, tok.vocab_size, (3, 24), device=DEVICE)
    with torch.no_grad():
        a, _ = model(x)
        b, _ = merged(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_lora_resume_equals_straight_run(trained_run: Path, tasks_file: Path, tmp_path: Path) -> None:
    from gptkit.peft.methods import adapter_state

    sets = FT_SET + ["train.max_steps=12", "train.checkpoint_interval=100", "lora.dropout=0.1", "train.lr=5e-3"]
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    finetune(trained_run, [str(tasks_file)], straight, finetune_config(None, sets), lora=True, progress=False, quiet=True)
    r = finetune(trained_run, [str(tasks_file)], paused, finetune_config(None, sets), lora=True, progress=False, quiet=True,
                 stop_at=6)  # fmt: skip
    assert r.interrupted and r.step == 6
    resume_finetune(paused, progress=False, quiet=True)
    a, b = adapter_state(load_model(straight)[0]), adapter_state(load_model(paused)[0])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.cuda
def test_cli_finetune_lora_merge_chat_eval(trained_run: Path, tasks_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-lora"
    r = gptkit_cli("finetune", str(trained_run), "--data", str(tasks_file), "--out", str(out), "--lora", "--no-progress",
                   *sum((["--set", s] for s in FT_SET + ["train.max_steps=10"]), []))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "parameters train" in r.stdout
    # merge twice: the second refuses to overwrite
    r = gptkit_cli("merge", str(out), "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    r = gptkit_cli("merge", str(out), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "exists" in r.stderr
    r = gptkit_cli("merge", str(trained_run))
    assert r.returncode == 2 and "no LoRA or AdaLoRA update" in r.stderr
    # chat from a pipe: one reply line per user line; commands produce no output
    script = "hello\n/system be kind\n/reset\nabc\n/exit\nnever\n"
    r = gptkit_cli("chat", str(out), "--max-new-tokens", "8", "--seed", "1", stdin=script)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2
    test_file = write_tasks(tmp_path / "test.jsonl", 10, "test")
    r = gptkit_cli("eval", str(out), "--instructions", str(test_file), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["examples"] == 10 and 0 <= report["exact_match"] <= report["contains_match"] <= 1
    assert report["response_loss"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora", "--set", "lora.targets=c_attn,q_proj"], "'q_proj' names no Linear layer"),
        (["--set", "lora.rank=0"], "lora.rank must be positive"),
        (["--set", "finetune.val_fraction=1.5"], "finetune.val_fraction"),
    ],
)
def test_cli_bad_lora_settings(trained_run: Path, tasks_file: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "bad"
    r = gptkit_cli("finetune", str(trained_run), "--data", str(tasks_file), "--out", str(out), "--no-progress", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_data_keeps_existing_run(full_run: Path, trained_run: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in full_run.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    r = gptkit_cli("finetune", str(trained_run), "--data", str(bad), "--out", str(full_run), "--overwrite", "--no-progress")
    assert r.returncode == 2 and f"{bad}:1: record 1" in r.stderr and "no assistant turn" in r.stderr
    assert {p: p.read_bytes() for p in full_run.rglob("*") if p.is_file()} == before
    r = gptkit_cli("finetune", str(trained_run), "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no such instruction file" in r.stderr


def test_generate_chat_uses_the_template(full_run: Path) -> None:
    r = gptkit_cli("generate", str(full_run), "--chat", "--prompt", "Reverse the word.\n\nking", "--max-new-tokens", "10",
                   "--temperature", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "<|end|>" not in r.stdout and "<|assistant|>" not in r.stdout


def test_chat_history_is_trimmed_from_the_oldest(full_run: Path) -> None:
    from gptkit.inference.chat import ChatSession
    from gptkit.inference.generate import SamplingParams

    model, tok, cfg = load_model(full_run)
    session = ChatSession(model, tok, SamplingParams(max_new_tokens=8, temperature=0), system="hi")
    for i in range(12):
        session.history += [Message("user", f"q{i}"), Message("assistant", f"a{i}")]
    ids = session.prompt_ids("last")
    assert len(ids) <= cfg.model.block_size - 8
    assert session.trimmed > 0 and session.history and session.history[0].role == "user"
    assert session.history[-1].content == "a11"  # the newest exchange is kept
    assert ids[0] == tok.special_tokens["<|system|>"]  # the system message survives trimming
    assert tok.decode(ids).endswith("<|user|>last<|end|><|assistant|>")


def test_synthetic_tasks_split_their_words() -> None:
    train = {r["input"] for r in make_tasks(500, "train") if r["instruction"].startswith("Reverse")}
    test = {r["input"] for r in make_tasks(500, "test") if r["instruction"].startswith("Reverse")}
    assert train and test and not train & test
    for r in make_tasks(50, "test"):
        if r["instruction"].startswith("Add"):
            a, b = map(int, r["input"].split(" + "))
            assert int(r["output"]) == a + b


LETTER_TASKS = {
    "copy": ("Repeat the letters.", lambda w: w),
    "upper": ("Write the letters in capitals.", lambda w: w.upper()),
    "first": ("Give the first letter.", lambda w: w[0]),
    "last": ("Give the last letter.", lambda w: w[-1]),
}


def letter_tasks(n: int, seed: int) -> list[dict[str, str]]:
    """A task set made for this test, not the README's: four kinds over random letter strings,
    which no Shakespeare pretraining has seen; held-out strings are new strings."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction, answer = list(LETTER_TASKS.values())[i % len(LETTER_TASKS)]
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        rows.append({"instruction": instruction, "input": word, "output": answer(word)})
    return rows


@pytest.mark.slow
def test_default_finetune_command_learns_held_out_tasks(tmp_path: Path, small_data: Path) -> None:
    """`gptkit finetune BASE --data FILE --out RUN` with nothing else: early stopping on the whole
    held-out loss decides how long, the best weights are kept, and greedy answers to held-out
    prompts are right at least 90% of the time (from at most 5% before)."""
    from gptkit.config import load_config
    from gptkit.evaluate.instructions import evaluate_answers
    from gptkit.loader import finetune_start
    from gptkit.training.train import train
    from tests.conftest import tiny_overrides

    base = tmp_path / "base"
    cfg = load_config(None, tiny_overrides(**{
        "model.n_layer": 3, "model.n_head": 4, "model.n_embd": 96, "model.block_size": 64, "model.pos_embedding": "rope",
        "train.max_steps": 300, "train.lr": 3e-3, "train.log_interval": 50, "train.eval_interval": 100}))  # fmt: skip
    cfg.data.dir = str(small_data)
    train(cfg, base, progress=False, quiet=True)
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in letter_tasks(1600, seed=0)))
    test_file.write_text("".join(json.dumps(r) + "\n" for r in letter_tasks(80, seed=1)))
    out = tmp_path / "ft"
    r = gptkit_cli("finetune", str(base), "--data", str(train_file), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    stopped = re.search(r"stopped at step (\d+): validation loss flat for 5 evaluations; the run keeps the weights of step (\d+)",
                        r.stdout)  # fmt: skip
    assert stopped, r.stdout[-2000:]
    last, best = int(stopped[1]), int(stopped[2])
    # The weights kept are the best step's (flat = five evaluations without a 1% gain), unless the
    # last evaluation, a little lower still, is better: then those are kept.
    assert last < 5000 and (last - best == 500 or best == last)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}
    # The kept step is the best by the early-stopping rule: anything lower came by less than 1%.
    assert val[best] - min(val.values()) <= 0.01 * max(val[best], 0.1)
    assert rows[-1]["final_val_loss"] == pytest.approx(val[best], rel=1e-4)  # the final weights are the best ones
    _, tok, ft_cfg = load_model(out)
    before = evaluate_answers(finetune_start(ft_cfg).eval(), tok, load_conversations([str(test_file)]).items, 12)
    r = gptkit_cli("eval", str(out), "--instructions", str(test_file), "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    after = json.loads(r.stdout)
    assert before["exact_match"] <= 0.05
    assert after["exact_match"] >= 0.9, after["samples"]


def test_gpt2_lora_finetune_merges_and_exports_to_transformers(tmp_path: Path) -> None:
    """A GPT-2 (tiny, random) imported from transformers, LoRA-tuned on a real instruction file,
    merged and exported back: transformers gives the same logits and knows the template's tokens."""
    transformers = pytest.importorskip("transformers")
    from gptkit.finetune.instruct import merge
    from gptkit.formats.hf import export_hf, import_hf

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    base = import_hf(tmp_path / "hf", tmp_path / "base", tokenizer=str(DATA / "gpt2"))
    rows = json.loads((DATA / "llms_from_scratch_instruction_data.json").read_text())[:40]
    data = tmp_path / "book.json"
    data.write_text(json.dumps(rows))
    finetune(base, [str(data)], tmp_path / "lora", finetune_config(None, FT_SET[:1] + FT_SET[4:]), lora=True,
             progress=False, quiet=True)  # fmt: skip
    merged = merge(tmp_path / "lora", tmp_path / "merged")
    out = export_hf(merged, tmp_path / "back")
    ours, tok, _ = load_model(merged)
    assert tok.vocab_size == 50257 + 4
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("Hello world") + [tok.special_tokens["<|assistant|>"]]])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)[0]).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids("<|assistant|>") == tok.special_tokens["<|assistant|>"]
