"""`gptkit` on the command line: a thin layer over the Python API.

Every user error becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptkit import __version__
from gptkit.config import Config, DataConfig
from gptkit.errors import GptkitError, quote

STARTED = time.perf_counter()  # the wall-clock time the main job reports covers start-up too
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
DATA_DEFAULTS = DataConfig()  # `gptkit prepare`'s flags default to the data section's keys


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.default is None
            or action.default is False
            or action.default == []
            or action.required
        ):
            return action.help or ""
        return super()._get_help_string(action) or ""


class _MethodsFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """finetune's --help: the methods' keys as a table, lines kept as written."""


# What each method's config key does, for finetune's --help (the defaults come from config.py)
METHOD_KEYS = {
    "lora.rank": "adapter rank r",
    "lora.alpha": "the update is scaled by alpha / rank",
    "lora.dropout": "dropout on the adapter's input",
    "lora.targets": "Linear names or suffixes (attn.c_proj, mlp.c_fc, lm_head if untied)",
    "adalora.init_r": "singular triplets each matrix starts with",
    "adalora.target_r": "the average rank a matrix ends with (budget = target_r x matrices)",
    "adalora.tinit": "warm-up steps before any pruning",
    "adalora.tfinal": "final steps with the rank pattern held",
    "adalora.deltaT": "steps between reallocations",
    "adalora.beta1": "EMA of the sensitivity |w * grad|",
    "adalora.beta2": "EMA of its uncertainty",
    "adalora.orth_reg_weight": "weight of ||P^T P - I|| + ||Q Q^T - I|| in the loss",
    "adalora.total_step": "the schedule's length (0: train.max_steps; needed with early stopping)",
    "adalora.alpha": "the update is scaled by alpha / init_r (PEFT's lora_alpha)",
    "adalora.dropout": "dropout on the adapter's input",
    "adalora.targets": "Linear names or suffixes to adapt",
    "adapter.placement": "houlsby: after attention and MLP; pfeiffer: after the MLP's residual add",
    "adapter.reduction_factor": "bottleneck width = n_embd / reduction_factor",
    "adapter.activation": "swish, relu, gelu or tanh",
    "adapter.train_norms": "train the layer norms too (Houlsby's paper)",
}


def _method_keys_help() -> str:
    defaults = Config().flat()
    shown = {k: ",".join(v) if isinstance(v, list) else v for k, v in defaults.items()}
    rows = [f"  {key:<25} {shown[key]!s:<18} {what}" for key, what in METHOD_KEYS.items()]
    head = "the methods' keys (--set KEY=VALUE; defaults as PEFT's where PEFT has the method):"
    return "\n".join([head, *rows])


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kw: object) -> None:
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)  # type: ignore[arg-type]


def _opt(p: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    """A numeric option, typed as its default is."""
    p.add_argument(flag, type=type(default), default=default, help=help)


def _opt_unset(p: argparse.ArgumentParser, flag: str, kind: type, help: str) -> None:
    """A numeric option whose default (None) is decided where it is used."""
    p.add_argument(flag, type=kind, default=None, help=help)


def _choice(p: argparse.ArgumentParser, flag: str, choices: list[str], help: str) -> None:
    """An option with a fixed set of values; the first is the default."""
    p.add_argument(flag, default=choices[0], choices=choices, help=help)


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """How a training run (train, finetune) is carried out, beyond its config."""
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP instead of DDP",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument(
        "--teacher",
        metavar="RUN_DIR",
        help="distil this run into the one trained (same tokenizer): learn its next-token "
        "distributions too (distill.weight, distill.temperature)",
    )
    _add_tracker(p)


TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "none")


def teacher_override(teacher: str | None) -> list[str]:
    return [f"distill.teacher={teacher}"] if teacher else []


def _add_tracker(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracker",
        action="append",
        choices=TRACKER_NAMES,
        help="log to this tracker (repeat for several; default: tensorboard; none: only "
        "metrics.jsonl); W&B runs offline unless --set track.wandb_mode=online",
    )


def tracker_overrides(names: list[str] | None) -> list[str]:
    """--tracker as config overrides: exactly the trackers named (train.tensorboard and
    track.backends)."""
    if not names:
        return []
    if "none" in names and len(names) > 1:
        raise GptkitError("--tracker none means no tracker; it cannot be combined with others")
    backends = [n for n in names if n in ("wandb", "mlflow")]
    return [
        f"train.tensorboard={'tensorboard' in names}",
        f"track.backends={','.join(dict.fromkeys(backends))}",
    ]


def _add_device(p: argparse.ArgumentParser) -> None:
    """Where and in what precision a trained model runs (generate, chat, serve)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _choice(p, "--dtype", ["float32", "bfloat16"], "weights' dtype for decoding")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="decode through a CUDA graph over a static KV cache (CUDA only; the same tokens)",
    )


def _add_draft(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft",
        metavar="RUN",
        help="decode speculatively: this small run (the model's tokenizer) guesses tokens that "
        "the model checks in one pass; the same greedy text, the same distribution sampled",
    )
    _opt(p, "--draft-tokens", 4, "with --draft: tokens the draft guesses a round, at most")
    p_min = "the draft stops guessing for the round when its best next token is less likely"
    _opt_unset(p, "--draft-p-min", float, f"with --draft: {p_min} than this (default 0)")
    switch = "a sequence keeping a smaller share of its guesses after 8 rounds decodes plainly"
    _opt_unset(p, "--draft-min-acceptance", float, f"with --draft: {switch} (default: 0.35 for "
               "a float model, 0.6 for a quantized one)")  # fmt: skip


def _speculator(a: argparse.Namespace, model: Any, tok: Any) -> Any:
    """--draft's Speculator for model, or None (_check_cuda_graph has checked the flags)."""
    if not a.draft:
        return None
    from gptkit.inference.speculative import load_speculator

    device = next(model.parameters()).device
    return load_speculator(
        a.draft, model, tok, a.draft_tokens, device, a.draft_p_min, a.draft_min_acceptance
    )


def _check_cuda_graph(a: argparse.Namespace) -> None:
    from gptkit.runtime import resolve_device

    device = resolve_device(a.device)
    if a.cuda_graph and a.draft:
        raise GptkitError("--draft and --cuda-graph cannot be combined yet; drop one of them")
    if a.cuda_graph and getattr(a, "scheduler", "") == "static":  # serve's
        raise GptkitError("--cuda-graph is for the continuous scheduler; drop --scheduler static")
    if a.cuda_graph and device.type != "cuda":
        raise GptkitError(
            f"--cuda-graph needs a CUDA GPU, and this runs on {device}; drop --cuda-graph "
            "(or use --device cuda on a machine with one)"
        )


def _add_index(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--index",
        metavar="INDEX",
        help="answer each question from its best passages in this index (gptkit index)",
    )
    _opt(p, "--passages", 3, "with --index: passages put into each question's prompt")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    _opt(p, "--max-new-tokens", 256, "most tokens to generate")
    _opt(p, "--temperature", 0.8, "sampling temperature (0 = greedy)")
    _opt(p, "--top-k", 0, "sample among the K most likely tokens (0 = off)")
    _opt(
        p,
        "--top-p",
        1.0,
        "sample among the most likely tokens that make up this probability (1 = off)",
    )
    _opt(p, "--repetition-penalty", 1.0, "> 1 discourages tokens already in the context (1 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    _add_device(p)
    _add_draft(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptkit",
        description="Build, train, sample from and evaluate GPT models.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"gptkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    p.add_argument("inputs", nargs="*", help="text files, folders of .txt/.jsonl, or glob patterns")
    p.add_argument(
        "--code",
        metavar="DIR",
        help="a tree of Python sources instead (one document a file, split by file; 'stdlib': "
        "Python's own standard library)",
    )
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--tokenizer", default=DATA_DEFAULTS.tokenizer, help="char | bpe | gpt2:PATH")
    _opt(p, "--vocab-size", DATA_DEFAULTS.vocab_size, "vocabulary size for --tokenizer bpe")
    _opt(
        p,
        "--val-fraction",
        DATA_DEFAULTS.val_fraction,
        "share of the corpus held out for validation",
    )
    _choice(p, "--errors", ["strict", "replace"], "on invalid UTF-8")
    p.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")

    p = sub.add_parser("train", help="train a model (no arguments: tiny Shakespeare, char-level)")
    p.add_argument("--config", help="YAML or TOML config file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data folder from `gptkit prepare`")
    src.add_argument("--text", help="a text file, prepared into the run folder with data.tokenizer")
    p.add_argument("--out", help="run folder (default: runs/<data name>)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        help="start from this run's weights (fine-tuning); its model and tokenizer",
    )
    _add_training_flags(p)

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run", help="run folder")
    p.add_argument("--prompt", default="", help="text to continue")
    _opt(p, "--num-samples", 1, "how many samples to draw")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn through the chat template",
    )
    _add_sampling(p)

    p = sub.add_parser(
        "finetune",
        help="instruction fine-tuning from a base run (full, LoRA, AdaLoRA or bottleneck adapters)",
        epilog=_method_keys_help(),
        formatter_class=_MethodsFormatter,
    )
    p.add_argument("base", nargs="?", help="the base run folder")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="JSON / JSONL files, Alpaca or chat format",
    )
    p.add_argument("--out", help="run folder to write")
    p.add_argument(
        "--method",
        choices=["full", "lora", "adalora", "adapter"],
        help="what trains: every weight (full, the preset's default), LoRA adapters, AdaLoRA "
        "(LoRA with ranks pruned to a budget; section adalora), or bottleneck adapters (section "
        "adapter); each method's options are its config section's keys, set with --set",
    )
    p.add_argument("--lora", action="store_true", help="the same as --method lora")
    p.add_argument(
        "--task",
        choices=["instruct", "classify"],
        help="instruct (default): instruction or chat records; classify: JSONL of "
        '{"text": ..., "label": ...} records, the label learnt as the answer',
    )
    p.add_argument(
        "--label-field", help="with --task classify: the record key holding the label (label)"
    )
    p.add_argument("--config", help="YAML or TOML config (default: the bundled finetune preset)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip malformed records (counted) instead of stopping",
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the fine-tuning run in this folder"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace what is already in the output folder"
    )
    _add_training_flags(p)

    p = sub.add_parser("merge", help="fold a LoRA run's adapter into its base weights")
    p.add_argument("run", help="a LoRA run folder")
    p.add_argument("--out", help="merged run folder (default: RUN-merged)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace what is already in the output folder"
    )

    p = sub.add_parser(
        "quantize", help="int8 or int4 weights for fast CPU inference (a new run folder)"
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--out", required=True, help="quantized run folder to write")
    _choice(
        p,
        "--scheme",
        ["int8", "int4"],
        "int8: per-output-channel symmetric int8 weights; int4: groups of 32 with a scale and zero",
    )
    _choice(
        p,
        "--activations",
        ["int8", "bf16"],
        "int8 scheme, batch-1 decoding: int8: each token's activations quantized to int8 too "
        "(an int8 x int8 kernel, about 2x faster); bf16: weight-only products always",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace what is already in the output folder"
    )

    p = sub.add_parser(
        "chat", help="chat with a run in the terminal (or one user turn per line of piped stdin)"
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--system", default="", help="system message")
    _add_index(p)
    _add_sampling(p)

    p = sub.add_parser(
        "serve", help="serve a run over an OpenAI-compatible HTTP API, with a chat page at /"
    )
    p.add_argument("run", help="run folder")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    _opt(p, "--port", 8000, "port to listen on (0: a free one)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (or set GPTKIT_API_KEY)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the model id clients use (default: the run folder's name)",
    )
    _opt(p, "--max-tokens-cap", 1024, "largest max_tokens a request may ask for")
    _opt(p, "--max-batch", 16, "samples decoded together in one batch")
    _choice(
        p,
        "--scheduler",
        ["continuous", "static"],
        "continuous: requests join and leave the batch at every step; static: batches of "
        "requests that arrived together (for comparison)",
    )
    _opt(p, "--queue-limit", 64, "samples queued or running before requests get 429")
    _opt_unset(p, "--prefix-cache-tokens", int, "positions of keys and values kept for prompts "
               "that begin alike (the same system prompt, the next turn of a chat); default: as "
               "many as the KV pool, 0: off")  # fmt: skip
    _opt(
        p,
        "--prefill-chunk",
        256,
        "prompt positions prefilled between two decode steps (a long prompt delays the others "
        "by one chunk at a time)",
    )
    _opt(p, "--max-request-bytes", 1 << 20, "largest request body accepted (413 beyond)")
    _opt(
        p,
        "--max-request-work",
        4096,
        "most samples x max_tokens one request may ask for (400 beyond): its fair share of "
        "the queue",
    )
    p.add_argument(
        "--allowed-hosts",
        nargs="+",
        metavar="NAME",
        help="Host header names to accept besides loopback ones ('*': any); default: loopback "
        "names only, "
        "or any when --host is a public address",
    )
    _opt(p, "--max-connections", 256, "open connections at once (503 beyond)")
    _opt(
        p,
        "--header-timeout",
        10.0,
        "seconds a connection has to send a request's headers before it is closed",
    )
    _add_index(p)
    _opt(p, "--max-classify-inputs", 64, "texts one /v1/classify request may send")
    _add_device(p)
    _add_draft(p)

    p = sub.add_parser(
        "index", help="index a folder of documents for grounded answers (BM25, saved to --out)"
    )
    p.add_argument("docs", help="a folder of text documents (.txt, .md ...; any depth)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument(
        "--run",
        help="measure passages in this run's tokens (the index then serves runs with its "
        "tokenizer only); default: in words",
    )
    _opt(p, "--chunk", 120, "passage length, words (tokens with --run)")
    _opt(p, "--overlap", 30, "words (tokens) each passage shares with the next")
    p.add_argument("--overwrite", action="store_true", help="replace an index already in --out")

    p = sub.add_parser(
        "make-helpdesk",
        help="write the bundled help-desk documents, their index, and grounded question sets",
    )
    p.add_argument(
        "--out", required=True, help="folder to write: docs/, index/, train.jsonl, test.jsonl"
    )
    _opt(p, "--passages", 3, "passages retrieved for each question")
    _opt(
        p,
        "--practice",
        1000,
        "made-up pages (not in docs/) whose questions join train.jsonl: they teach reading the "
        "passages, as their answers cannot be remembered",
    )

    p = sub.add_parser(
        "make-tasks", help="write synthetic instruction tasks (the fine-tuning demo)"
    )
    p.add_argument("--out", required=True, help="JSONL file to write")
    _opt(p, "--n", 4000, "how many examples to write")
    _choice(p, "--split", ["train", "test"], "which split of the task generator")
    _opt(p, "--seed", 0, "random seed of the generator")

    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a run (JSON)")
    p.add_argument("run", help="run folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data folder (default: the run's own)")
    src.add_argument("--text", help="a text file")
    _choice(p, "--split", ["val", "train"], "which split of the data folder")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward pass (default: the run's train.batch_size)",
    )
    p.add_argument(
        "--max-batches", type=int, default=None, help="evaluate only the first N batches"
    )
    _choice(p, "--errors", ["strict", "replace"], "for --text: on invalid UTF-8")
    p.add_argument(
        "--instructions",
        nargs="+",
        metavar="FILE",
        help="instruction files: response loss and answer match",
    )
    _opt(p, "--max-new-tokens", 128, "for --instructions: answer length cap")
    p.add_argument(
        "--tasks",
        help="lm-eval tasks, comma-separated (hellaswag,arc_easy,...): standard benchmarks",
    )
    p.add_argument(
        "--include-path", metavar="DIR", help="for --tasks: a folder of your own task YAMLs"
    )
    p.add_argument(
        "--num-fewshot", type=int, default=None, help="for --tasks: examples in each prompt"
    )
    p.add_argument("--output", metavar="FILE", help="for --tasks: write lm-eval's results as JSON")
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="for --tasks: render each request through the run's chat template (instruct models)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="for --instructions, --tasks and --code-tasks: only the first N",
    )
    p.add_argument(
        "--code-tasks",
        metavar="humaneval|FILE",
        help="pass@k by running the generated code: HumanEval, or a JSONL of your tasks "
        "(task_id, prompt, test, entry_point)",
    )
    p.add_argument(
        "--classify",
        metavar="FILE",
        help="a classification run on labelled JSONL: accuracy, macro-F1, confusion matrix",
    )
    p.add_argument(
        "--grounded",
        metavar="FILE",
        help="questions with known answers and sources (JSONL): recall@k of --index, exact match "
        "with and without retrieval",
    )
    _add_index(p)
    p.add_argument(
        "--confusion-png",
        metavar="PNG",
        help="for --classify: draw the confusion matrix here (default: RUN/confusion.png)",
    )
    _opt(p, "--samples", 1, "for --code-tasks: completions per task (n of pass@k)")
    p.add_argument("--k", default="1", help="for --code-tasks: the k of pass@k, e.g. 1,10")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="for --code-tasks: sampling temperature (default: greedy for one sample, else 0.8)",
    )

    p = sub.add_parser(
        "classify",
        help="label lines of text with a classification run; --alert watches one label's share",
    )
    p.add_argument("run", help="a run from gptkit finetune --task classify")
    p.add_argument("input", nargs="?", default="-", help="text file, one item a line (-: stdin)")
    p.add_argument(
        "--json", action="store_true", help="one JSON object a line, with every label's probability"
    )
    _opt(p, "--batch-size", 16, "lines scored together (stdin from a terminal: 1)")
    p.add_argument("--alert", metavar="LABEL", help="the label to watch")
    _opt(p, "--window", 50, "with --alert: the last N items")
    _opt(p, "--threshold", 0.5, "with --alert: alert when LABEL's share passes this")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)

    p = sub.add_parser(
        "convert",
        help="import a Hugging Face model folder (GPT-2, Llama, Qwen2, Qwen3) as a gptkit run",
    )
    p.add_argument(
        "--from-hf",
        required=True,
        metavar="HF_DIR",
        help="folder with config.json + model.safetensors",
    )
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--tokenizer", help="GPT-2 tokenizer files, when HF_DIR has none")
    p.add_argument(
        "--overwrite", action="store_true", help="replace what is already in the output folder"
    )

    p = sub.add_parser("tune", help="hyperparameter search with Optuna (resumable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text file, prepared into STUDY_DIR/data")
    src.add_argument("--data", help="a data folder from `gptkit prepare`")
    src.add_argument(
        "--finetune",
        metavar="BASE_RUN",
        help="search a fine-tune of this run (with --instructions)",
    )
    p.add_argument(
        "--instructions", nargs="+", metavar="FILE", help="with --finetune: instruction files"
    )
    p.add_argument("--space", required=True, help="search space YAML")
    p.add_argument(
        "--trials", type=int, required=True, help="how many trials to run (in all, across resumes)"
    )
    p.add_argument("--budget", required=True, help="per trial: 60s, 2m, 2000steps or 5Mtokens")
    p.add_argument(
        "--out", required=True, metavar="STUDY_DIR", help="study folder (resumes when it exists)"
    )
    p.add_argument("--config", help="base config (default: the bundled CPU preset)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a base config key"
    )
    _add_tracker(p)
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in STUDY_DIR)")
    _opt(p, "--workers", 1, "trials run in parallel (processes)")
    _choice(p, "--pruner", ["median", "hyperband", "none"], "stop poor trials early")
    _choice(p, "--objective", ["loss", "bits_per_byte"], "what the search minimises")
    _opt(p, "--keep-top", 0, "keep only the best K trial folders (0: all)")

    p = sub.add_parser(
        "export", help="write a run as a transformers folder or a GGUF file (llama.cpp, Ollama)"
    )
    p.add_argument("run", help="run folder")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-hf", metavar="HF_DIR", help="folder to write (transformers format)")
    to.add_argument(
        "--to-gguf", metavar="FILE", help="GGUF file to write (llama.cpp, Ollama, LM Studio)"
    )
    _choice(
        p, "--outtype", ["f16", "f32", "bf16", "q8_0", "q4_0"], "GGUF weight type (1-D stay f32)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace what is already at the output path"
    )
    p = sub.add_parser("runs", help="compare the runs under a folder; --plot overlays losses")
    p.add_argument("folder", nargs="?", default="runs", help="a folder of runs (default: runs)")
    p.add_argument("--plot", nargs="+", metavar="RUN", help="runs whose loss curves to overlay")
    p.add_argument("--out", default="runs.png", help="with --plot: the PNG to write")

    return parser


def cmd_prepare(a: argparse.Namespace) -> None:
    from gptkit.data import prepare

    if a.code:
        from gptkit.code_data import prepare_code

        if a.inputs:
            raise GptkitError("--code DIR reads a source tree; give no other inputs with it")
        tokenizer = "bpe" if a.tokenizer == DATA_DEFAULTS.tokenizer else a.tokenizer
        summary = prepare_code(a.code, a.out, tokenizer, a.vocab_size, a.val_fraction,
                               a.overwrite, not a.no_progress)  # fmt: skip
        print(json.dumps({"out": a.out, **summary, "sources": len(summary["sources"])}))
        return
    if not a.inputs:
        raise GptkitError("nothing to prepare: give text files, folders or globs, or --code DIR")
    meta = prepare(
        a.inputs,
        a.out,
        a.tokenizer,
        a.vocab_size,
        a.val_fraction,
        a.errors,
        a.overwrite,
        not a.no_progress,
    )
    print(json.dumps({"out": a.out, **meta.__dict__, "sources": len(meta.sources)}))


def _sampler(cfg: Any) -> Callable[[Path], str] | None:
    """train.sample_tokens of text from a run's final checkpoint (printed, and sent to the
    trackers)."""
    if cfg.train.sample_tokens <= 0:
        return None
    from gptkit.inference.generate import SamplingParams, generate
    from gptkit.loader import load_model

    def sample(run_dir: Path) -> str:
        model, tok, _ = load_model(run_dir, "cpu")
        params = SamplingParams(
            max_new_tokens=cfg.train.sample_tokens, temperature=0.8, seed=cfg.train.seed
        )
        prompt = cfg.train.sample_prompt or ("\n" if tok.kind == "char" else "")
        text = generate(model, tok, prompt, params)
        return prompt + text if cfg.train.sample_prompt else text  # a given prompt is shown

    return sample


def cmd_train(a: argparse.Namespace) -> None:
    a.set = [*a.set, *tracker_overrides(a.tracker), *teacher_override(a.teacher)]
    from gptkit.training.train import new_run_config, resume_config, train

    if a.resume and a.init_from:
        raise GptkitError("--init-from starts a new run; it cannot be combined with --resume")
    if a.resume:
        if a.config or a.data or a.text or a.out:
            raise GptkitError(
                "--resume takes the run's own config, data and weights; only --set may change keys "
                "(e.g. train.max_steps)"
            )
        run_dir = Path(a.resume)
        cfg = resume_config(run_dir, a.set + (["train.fsdp=true"] if a.fsdp else []))
        if cfg.finetune.base:  # a fine-tuning run resumes through its own entry point
            from gptkit.finetune.instruct import resume_finetune

            _exit_if_interrupted(resume_finetune(run_dir, cfg, progress=not a.no_progress))
            return
        result = train(cfg, run_dir, resume=True, progress=not a.no_progress, sample=_sampler(cfg))
    else:
        run = new_run_config(a.config, a.set, a.data, a.text, a.init_from, a.fsdp)
        run_dir = Path(a.out) if a.out else Path("runs") / run.name
        result = train(
            run.config,
            run_dir,
            overwrite=a.overwrite,
            text=run.text,
            progress=not a.no_progress,
            init_from=run.init_from,
            sample=_sampler(run.config),
        )
        cfg = run.config
    _exit_if_interrupted(result)
    if os.environ.get("RANK", "0") != "0":
        return
    if result.sample:
        print("--- sample ---")
        print(result.sample)
        print(f"--- more: gptkit generate {quote(run_dir)} --prompt 'ROMEO:' ---")
    print(f"gptkit: the whole command took {time.perf_counter() - STARTED:.0f} s (wall clock)")


def _exit_if_interrupted(result: object) -> None:
    interrupted = getattr(result, "interrupted", "")
    if interrupted:
        sys.exit(130 if interrupted == "SIGINT" else 143)


def _sampling(a: argparse.Namespace, seed_offset: int = 0) -> object:
    from gptkit.inference.generate import SamplingParams

    seed = None if a.seed is None else a.seed + seed_offset
    return SamplingParams(
        a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.stop, seed
    ).validate()


def _load_for_sampling(a: argparse.Namespace) -> tuple:
    import torch

    from gptkit.loader import load_model
    from gptkit.runtime import resolve_device

    _check_cuda_graph(a)
    model, tok, cfg = load_model(a.run, resolve_device(a.device), merge_adapters=True)
    if a.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model, tok, cfg


def cmd_finetune(a: argparse.Namespace) -> None:
    a.set = [*a.set, *tracker_overrides(a.tracker), *teacher_override(a.teacher)]
    from gptkit.finetune.instruct import finetune, finetune_config, resume_finetune
    from gptkit.training.train import resume_config

    if a.resume:
        if a.base or a.data or a.out or a.config:
            raise GptkitError(
                "--resume takes the run's own config and data; only --set may change keys"
            )
        method = ["finetune.method=" + a.method] if a.method else []
        cfg = resume_config(a.resume, a.set + method + (["train.fsdp=true"] if a.fsdp else []))
        _exit_if_interrupted(resume_finetune(a.resume, cfg, progress=not a.no_progress))
        return
    if not a.base:
        raise GptkitError("name the base run: gptkit finetune BASE_RUN --data FILE --out RUN")
    if a.lora and a.method not in (None, "lora"):
        raise GptkitError(f"--lora and --method {a.method} disagree; pass one of them")
    if not a.data:
        raise GptkitError(
            "no instruction data: pass --data FILE (JSON or JSONL, Alpaca or chat format)"
        )
    if not a.out:
        raise GptkitError("pass --out RUN, the folder for the fine-tuned run")
    flags = (["finetune.skip_invalid=true"] if a.skip_invalid else []) + (
        ["train.fsdp=true"] if a.fsdp else []
    )
    if a.label_field:
        flags.append(f"finetune.label_field={a.label_field}")
    cfg = finetune_config(a.config, flags + a.set)
    result = finetune(
        a.base,
        a.data,
        a.out,
        cfg,
        overwrite=a.overwrite,
        method="lora" if a.lora else a.method,
        progress=not a.no_progress,
        task=a.task,
    )
    _exit_if_interrupted(result)
    if (a.task or cfg.finetune.task) == "classify":
        print(
            f"gptkit: try it: gptkit classify {quote(a.out)} FILE   or   gptkit eval "
            f"{quote(a.out)} --classify FILE"
        )
        return
    print(
        f"gptkit: try it: gptkit chat {quote(a.out)}   or   gptkit eval {quote(a.out)} "
        "--instructions FILE"
    )


def cmd_merge(a: argparse.Namespace) -> None:
    from gptkit.finetune.instruct import merge

    out = merge(a.run, a.out, a.overwrite)
    print(f"gptkit: merged {a.run} -> {out}")


def cmd_quantize(a: argparse.Namespace) -> None:
    from gptkit.inference.quantize import quantize_run

    out = quantize_run(a.run, a.out, a.scheme, a.overwrite, a.activations)
    print(f"gptkit: quantized {a.run} -> {out} ({a.scheme}); try: gptkit generate {quote(out)}")


def cmd_chat(a: argparse.Namespace) -> None:
    from gptkit.inference.chat import ChatSession, run_chat

    model, tok, _ = _load_for_sampling(a)
    index = _load_index(a, tok)
    session = ChatSession(model, tok, _sampling(a), a.system, index, a.passages)
    session.static = a.cuda_graph
    session.speculator = _speculator(a, model, tok)
    run_chat(
        session,
        sys.stdin,
        sys.stdout,
        interactive=sys.stdin.isatty(),
    )


def _load_index(a: argparse.Namespace, tok: Any) -> Any:
    if a.passages < 1:
        raise GptkitError(f"--passages must be >= 1, got {a.passages}")
    if not a.index:
        return None
    from gptkit.retrieval import Index

    index = Index.load(a.index)
    index.check_tokenizer(tok, a.run)
    return index


def cmd_serve(a: argparse.Namespace) -> None:
    try:
        from gptkit.serve.guard import ServeConfig
        from gptkit.serve.server import serve
    except ImportError as e:
        raise GptkitError(
            f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install 'gptkit[serve]'"
        ) from None
    for name in (
        "max_tokens_cap",
        "max_batch",
        "queue_limit",
        "max_request_bytes",
        "max_request_work",
        "max_connections",
        "passages",
        "max_classify_inputs",
        "prefill_chunk",
    ):
        if getattr(a, name) < 1:
            raise GptkitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 < a.header_timeout <= 3600:
        raise GptkitError(f"--header-timeout must be in (0, 3600] seconds, got {a.header_timeout}")
    if not 0 <= a.port < 65536:
        raise GptkitError(f"--port must be in 0..65535, got {a.port}")
    from gptkit.checkpoint import load_run_config

    load_run_config(Path(a.run))  # a clear error for a wrong folder before anything starts
    _check_cuda_graph(a)
    if a.prefix_cache_tokens is not None and a.prefix_cache_tokens < 0:
        raise GptkitError(f"--prefix-cache-tokens must be >= 0, got {a.prefix_cache_tokens}")
    sc = ServeConfig(
        model_name=a.model_name or Path(a.run).resolve().name,
        api_key=a.api_key or os.environ.get("GPTKIT_API_KEY") or None,
        max_tokens_cap=a.max_tokens_cap,
        max_request_bytes=a.max_request_bytes,
        max_batch=a.max_batch,
        queue_limit=a.queue_limit,
        max_request_work=a.max_request_work,
        allowed_hosts=a.allowed_hosts,
        max_connections=a.max_connections,
        timeout_headers=a.header_timeout,
        scheduler=a.scheduler,
        cuda_graph=a.cuda_graph,
        prefix_cache_tokens=a.prefix_cache_tokens,
        prefill_chunk=a.prefill_chunk,
        index=a.index or "",
        passages=a.passages,
        max_classify_inputs=a.max_classify_inputs,
        draft=a.draft or "",
        draft_tokens=a.draft_tokens,
        draft_p_min=a.draft_p_min,
        draft_min_acceptance=a.draft_min_acceptance,
    )
    if a.index:
        from gptkit.retrieval import Index

        Index.load(a.index)  # a clear error for a wrong folder before anything starts
    serve(a.run, a.host, a.port, sc, a.device, a.dtype)


def cmd_make_tasks(a: argparse.Namespace) -> None:
    from gptkit.finetune.tasks import write_tasks

    if a.n < 1:
        raise GptkitError(f"--n must be >= 1, got {a.n}")
    print(f"gptkit: wrote {a.n} {a.split} examples to {write_tasks(a.out, a.n, a.split, a.seed)}")


def cmd_generate(a: argparse.Namespace) -> None:

    from gptkit.inference.generate import TextStream
    from gptkit.template import ChatTemplate, Message

    if a.num_samples < 1:
        raise GptkitError(f"--num-samples must be >= 1, got {a.num_samples}")
    model, tok, _ = _load_for_sampling(a)
    spec = _speculator(a, model, tok)
    template = ChatTemplate(tok)
    if a.num_samples > 1 and not a.cuda_graph:
        _generate_batched(a, model, tok, template, spec)
        _report_speculation(spec)
        return
    for i in range(a.num_samples):
        params = _sampling(a, i)
        if a.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        if a.chat:
            ids = template.prompt_ids([Message("user", a.prompt)])
            stream = template.reply(model, ids, params, a.cuda_graph, spec)
        else:
            sys.stdout.write(a.prompt)
            stream = TextStream(model, tok, a.prompt, params, static=a.cuda_graph, speculator=spec)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    _report_speculation(spec)


def _report_speculation(spec: Any) -> None:
    if spec is not None and spec.rounds:
        stats = spec.stats()
        print(
            f"gptkit: draft guesses kept {stats['acceptance_rate']:.0%}, "
            f"{stats['tokens_per_round']} tokens a pass of the model",
            file=sys.stderr,
        )


def _generate_batched(
    a: argparse.Namespace, model: Any, tok: Any, template: Any, spec: Any
) -> None:
    """--num-samples N: the samples decode together through the engine (continuous batching),
    each the text it would be alone (sample i has seed --seed + i), printed as they come in
    order."""
    from gptkit.inference.engine import generate_many
    from gptkit.template import Message

    if a.chat:
        ids = template.prompt_ids([Message("user", a.prompt)])
        stop_ids, stops = template.stop_ids, template.stop_strings
    else:
        ids, stop_ids, stops = tok.encode_prompt(a.prompt), (), ()
    params = [_sampling(a, i) for i in range(a.num_samples)]
    texts = generate_many(model, tok, [ids] * a.num_samples, params, min(a.num_samples, 16),
                          stop_ids, stops, spec)  # fmt: skip
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---")
        print(("" if a.chat else a.prompt) + text)


def cmd_eval(a: argparse.Namespace) -> None:
    from gptkit.evaluate.loss import evaluate

    modes = [
        m for m in ("tasks", "instructions", "code_tasks", "classify", "grounded") if getattr(a, m)
    ]
    flags = [f"--{m.replace('_', '-')}" for m in modes] + ["--data/--text"] * bool(a.data or a.text)
    if len(modes) > 1 or (modes and len(flags) > 1):
        raise GptkitError(f"{' and '.join(flags)} are different evaluations; choose one")
    if modes:
        {
            "tasks": _eval_tasks,
            "instructions": _eval_instructions,
            "code_tasks": _eval_code,
            "classify": _eval_classify,
            "grounded": _eval_grounded,
        }[modes[0]](a)
        return
    print(
        json.dumps(
            evaluate(
                a.run, a.data, a.text, a.split, a.device, a.batch_size, a.max_batches, a.errors
            )
        )
    )


def _eval_tasks(a: argparse.Namespace) -> None:
    from gptkit.evaluate.harness import evaluate_tasks

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    batch_size = 16 if a.batch_size is None else a.batch_size
    summary = evaluate_tasks(
        a.run,
        tasks,
        a.include_path,
        a.num_fewshot,
        a.limit,
        batch_size,
        a.device,
        a.output,
        a.apply_chat_template,
    )
    from lm_eval.utils import make_table

    print(make_table(summary))
    numbers = {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float))}
        for task, values in summary["results"].items()
    }
    print(json.dumps(numbers))


def _eval_instructions(a: argparse.Namespace) -> None:
    from gptkit.evaluate.instructions import evaluate_instructions

    batch_size = 16 if a.batch_size is None else a.batch_size
    summary = evaluate_instructions(
        a.run, a.instructions, a.device, a.max_new_tokens, batch_size, a.limit
    )
    print(json.dumps(summary))


def _eval_classify(a: argparse.Namespace) -> None:
    from gptkit.classify import evaluate_classifier

    batch_size = 16 if a.batch_size is None else a.batch_size
    png = a.confusion_png or str(Path(a.run) / "confusion.png")
    print(json.dumps(evaluate_classifier(a.run, a.classify, a.device, batch_size, png)))


def _eval_grounded(a: argparse.Namespace) -> None:
    from gptkit.evaluate.grounded import evaluate_grounded

    if not a.index:
        raise GptkitError("--grounded needs --index INDEX, the index to retrieve from")
    batch_size = 16 if a.batch_size is None else a.batch_size
    summary = evaluate_grounded(
        a.run, a.grounded, a.index, a.passages, a.device, batch_size, a.max_new_tokens, a.limit
    )
    print(json.dumps(summary))


def cmd_index(a: argparse.Namespace) -> None:
    from gptkit.retrieval import Index

    tok = None
    if a.run:
        from gptkit.checkpoint import RunFolder, load_run_config
        from gptkit.tokenizer import load_tokenizer

        load_run_config(Path(a.run))  # a clear error for a wrong folder
        tok = load_tokenizer(RunFolder(a.run).tokenizer)
    index = Index.build(
        a.docs, a.chunk, a.overlap, tok, str(Path(a.run).resolve()) if a.run else ""
    )
    out = index.save(a.out, a.overwrite)
    m = index.meta
    skipped = f"; {len(m['skipped'])} files skipped as not text" if m["skipped"] else ""
    print(
        f"gptkit: indexed {m['documents']} documents as {m['passages']} passages of up to "
        f"{m['chunk']} {m['unit']} -> {out}{skipped}; try: gptkit chat RUN --index "
        f"{quote(str(out))}"
    )


def cmd_make_helpdesk(a: argparse.Namespace) -> None:
    from gptkit.finetune.grounded import DOCUMENTS, write_grounded
    from gptkit.retrieval import Index

    out = Path(a.out)
    if a.passages < 1 or a.practice < 0:
        raise GptkitError("--passages must be >= 1 and --practice >= 0")
    if (out / "docs").exists():
        raise GptkitError(f"{out}/docs already exists; choose another --out")
    shutil.copytree(DOCUMENTS, out / "docs")
    index = Index.build(out / "docs")
    index.save(out / "index")
    for split in ("train", "test"):
        write_grounded(out / f"{split}.jsonl", split, index, a.passages, a.practice)
    print(
        f"gptkit: wrote {out}/docs ({index.meta['documents']} pages), {out}/index, "
        f"{out}/train.jsonl and {out}/test.jsonl"
    )


def cmd_classify(a: argparse.Namespace) -> None:
    from gptkit.classify import check_alert, classify_stream, load_classifier

    if a.batch_size < 1:
        raise GptkitError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.input != "-" and not Path(a.input).is_file():
        raise GptkitError(f"{a.input}: no such file (give a text file, or - for stdin)")
    clf, _ = load_classifier(a.run, a.device, a.batch_size)
    alert = check_alert(clf.labels, a.alert, a.window, a.threshold) if a.alert else None
    if a.input == "-":
        batch = 1 if sys.stdin.isatty() else a.batch_size
        classify_stream(clf, sys.stdin, sys.stdout, batch, alert, a.json)
        return
    with open(a.input, encoding="utf-8", errors="replace") as f:
        classify_stream(clf, f, sys.stdout, a.batch_size, alert, a.json)


def _eval_code(a: argparse.Namespace) -> None:
    from gptkit.evaluate.code import evaluate_code

    try:
        ks = tuple(int(k) for k in a.k.split(",") if k.strip())
    except ValueError:
        raise GptkitError(f"--k takes whole numbers separated by commas, got {a.k!r}") from None
    summary = evaluate_code(
        a.run,
        a.code_tasks,
        a.samples,
        ks,
        a.temperature,
        256 if a.max_new_tokens == 128 else a.max_new_tokens,  # a function body needs room
        a.limit,
        a.device,
        16 if a.batch_size is None else a.batch_size,
    )
    print(json.dumps(summary))


def cmd_convert(a: argparse.Namespace) -> None:
    from gptkit.formats.hf import import_hf

    out = import_hf(a.from_hf, a.out, a.tokenizer, a.overwrite)
    print(
        f"gptkit: converted {a.from_hf} -> {out}; try: gptkit generate {quote(out)} --prompt "
        "'Hello'"
    )


def cmd_export(a: argparse.Namespace) -> None:
    from gptkit.formats.hf import export_hf

    if a.to_gguf:
        from gptkit.formats.gguf import export_gguf

        out = export_gguf(a.run, a.to_gguf, a.outtype, a.overwrite)
        size = out.stat().st_size / 2**20
        print(
            f"gptkit: exported {a.run} -> {out} ({a.outtype}, {size:,.1f} MiB); try: "
            f"llama-cli -m {quote(str(out))}"
        )
        return
    out = export_hf(a.run, a.to_hf, a.overwrite)
    print(
        f"gptkit: exported {a.run} -> {out} "
        f"(transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))"
    )


def cmd_tune(a: argparse.Namespace) -> None:
    a.set = [*a.set, *tracker_overrides(a.tracker)]
    from gptkit.data import default_preset
    from gptkit.tune import tune

    if a.instructions and not a.finetune:
        raise GptkitError("--instructions goes with --finetune BASE_RUN (a search over fine-tunes)")
    # The base config: the file, else the CPU preset for pretraining (tune itself takes the
    # fine-tuning preset for --finetune).
    config = a.config or (None if a.finetune else str(default_preset()))
    summary = tune(
        a.space,
        a.trials,
        a.budget,
        a.out,
        a.text,
        a.data,
        config,
        a.set,
        a.storage,
        a.workers,
        a.pruner,
        a.objective,
        a.keep_top,
        finetune_base=a.finetune,
        instructions=a.instructions,
    )
    print(json.dumps(summary))


def cmd_runs(a: argparse.Namespace) -> None:
    from gptkit.runs import plot_runs, print_table, runs_table

    if a.plot:
        print(f"gptkit: wrote {plot_runs(a.plot, a.out)}")
        return
    print_table(runs_table(a.folder))


COMMANDS = {
    "tune": cmd_tune,
    "runs": cmd_runs,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "convert": cmd_convert,
    "export": cmd_export,
    "finetune": cmd_finetune,
    "merge": cmd_merge,
    "quantize": cmd_quantize,
    "chat": cmd_chat,
    "make-tasks": cmd_make_tasks,
    "classify": cmd_classify,
    "index": cmd_index,
    "make-helpdesk": cmd_make_helpdesk,
    "serve": cmd_serve,
}


def os_error_message(e: OSError) -> str:
    """A file-system failure in one line: what, where, and what to do about it."""
    path = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = shutil.disk_usage(where).free
            room = f" ({free / 1e6:.1f} MB free there)"
        except OSError:
            room = ""
        return (
            f"no space left on the device writing {path}{room}; free some space and run the "
            "command again"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write {path}: {e.strerror.lower()}; choose a folder you can write to (or fix "
            "its permissions)"
        )
    return f"{path}: {e.strerror or e}"


def _wait_for_rank_zero(seconds: float = 5.0) -> None:
    """Under torchrun, let rank 0 report an error that every rank meets.

    torchrun stops the other workers as soon as one exits, so a rank that exits first can cut
    rank 0 off before it prints. The other ranks wait instead: when rank 0 met the same error it
    prints, exits, and torchrun stops them here; when it did not, they print their own after the
    wait, so an error one rank alone meets is not lost.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a training run's handler would keep us alive
    time.sleep(seconds)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BrokenPipeError:  # `gptkit generate ... | head`
        sys.exit(0)
    except (GptkitError, OSError) as e:
        msg = os_error_message(e) if isinstance(e, OSError) else str(e)
        _wait_for_rank_zero()
        print(f"gptkit: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gptkit: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
