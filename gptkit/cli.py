"""`gptkit` on the command line: a thin layer over the Python API.

Every user error becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptkit.errors import GptkitError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype for decoding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptkit", description="Build, train, sample from and evaluate GPT models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    p.add_argument("inputs", nargs="+", help="text files, folders of .txt/.jsonl, or glob patterns")
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--tokenizer", default="char", help="char | bpe | gpt2:PATH")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size for --tokenizer bpe")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--errors", default="strict", choices=["strict", "replace"], help="on invalid UTF-8")
    p.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train", help="train a model (no arguments: tiny Shakespeare, char-level)")
    p.add_argument("--config", help="YAML or TOML config file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data folder from `gptkit prepare`")
    src.add_argument("--text", help="a text file, prepared into the run folder with data.tokenizer")
    p.add_argument("--out", help="run folder (default: runs/<data name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--init-from", metavar="RUN_DIR", help="start from this run's weights (fine-tuning); its model and tokenizer")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run", help="run folder")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--num-samples", type=int, default=1)
    _add_sampling(p)

    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a run (JSON)")
    p.add_argument("run", help="run folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data folder (default: the run's own)")
    src.add_argument("--text", help="a text file")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")

    p = sub.add_parser("convert", help="import a Hugging Face GPT-2 model folder as a gptkit run")
    p.add_argument("--from-hf", required=True, metavar="HF_DIR", help="folder with config.json + model.safetensors")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--tokenizer", help="GPT-2 tokenizer files, when HF_DIR has none")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("tune", help="hyperparameter search with Optuna (resumable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text file, prepared into STUDY_DIR/data")
    src.add_argument("--data", help="a data folder from `gptkit prepare`")
    p.add_argument("--space", required=True, help="search space YAML")
    p.add_argument("--trials", type=int, required=True)
    p.add_argument("--budget", required=True, help="per trial: 60s, 2m, 2000steps or 5Mtokens")
    p.add_argument("--out", required=True, metavar="STUDY_DIR")
    p.add_argument("--config", help="base config (default: the bundled CPU preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in STUDY_DIR)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    p.add_argument("--objective", default="loss", choices=["loss", "bits_per_byte"])
    p.add_argument("--keep-top", type=int, default=0, help="keep only the best K trial folders (0: all)")

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers folder")
    p.add_argument("run", help="run folder")
    p.add_argument("--to-hf", required=True, metavar="HF_DIR")
    p.add_argument("--overwrite", action="store_true")
    return parser


def cmd_prepare(a: argparse.Namespace) -> None:
    from gptkit.data import prepare

    meta = prepare(a.inputs, a.out, a.tokenizer, a.vocab_size, a.val_fraction, a.errors, a.overwrite, not a.no_progress)
    print(json.dumps({"out": a.out, **meta.__dict__, "sources": len(meta.sources)}))


def cmd_train(a: argparse.Namespace) -> None:
    from gptkit.checkpoint import load_for_finetune, load_model, load_run_config
    from gptkit.config import apply_overrides, load_config
    from gptkit.data import bundled_corpus, default_preset
    from gptkit.generate import SamplingParams, generate
    from gptkit.train import train

    text = a.text
    if a.resume:
        if a.config or a.data or a.text or a.out:
            raise GptkitError("--resume takes the run's own config and data; only --set may change keys (e.g. train.max_steps)")
        run_dir = Path(a.resume)
        cfg = apply_overrides(load_run_config(run_dir), a.set).validate()
    else:
        cfg = load_config(a.config or default_preset(), a.set)
        if not a.data and not a.text and not cfg.data.dir:
            text = str(bundled_corpus())
        if a.data:
            cfg.data.dir = a.data
        name = Path(a.data or text or cfg.data.dir).stem
        name = "shakespeare-char" if text == str(bundled_corpus()) else name
        run_dir = Path(a.out) if a.out else Path("runs") / name
    init = None
    if a.init_from:
        if a.resume:
            raise GptkitError("--init-from starts a new run; it cannot be combined with --resume")
        if not a.config:  # the CPU preset's schedule is for training from scratch
            cfg = load_config(None, a.set)
        # The architecture is the base run's; the config may shorten the context and set dropout.
        init = load_for_finetune(a.init_from, cfg.model.block_size, cfg.model.dropout)
        cfg.model = init.config
        if not a.data:
            cfg.data.tokenizer = f"run:{a.init_from}"
    result = train(
        cfg, run_dir, resume=bool(a.resume), overwrite=a.overwrite, text=text, progress=not a.no_progress, init_from=init
    )
    if result.interrupted:
        sys.exit(130 if result.interrupted == "SIGINT" else 143)
    if cfg.train.sample_tokens > 0:
        model, tok, _ = load_model(run_dir, "cpu")
        params = SamplingParams(max_new_tokens=cfg.train.sample_tokens, temperature=0.8, seed=cfg.train.seed)
        print("--- sample ---")
        print(generate(model, tok, "\n", params) if tok.kind == "char" else generate(model, tok, "", params))
        print(f"--- more: gptkit generate {run_dir} --prompt 'ROMEO:' ---")


def cmd_generate(a: argparse.Namespace) -> None:
    import torch

    from gptkit.checkpoint import load_model
    from gptkit.generate import SamplingParams, TextStream
    from gptkit.train import resolve_device

    if a.num_samples < 1:
        raise GptkitError(f"--num-samples must be >= 1, got {a.num_samples}")
    model, tok, _ = load_model(a.run, resolve_device(a.device))
    if a.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    for i in range(a.num_samples):
        seed = None if a.seed is None else a.seed + i
        params = SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.stop, seed)
        if a.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(a.prompt)
        for piece in TextStream(model, tok, a.prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_eval(a: argparse.Namespace) -> None:
    from gptkit.evaluate import evaluate

    print(json.dumps(evaluate(a.run, a.data, a.text, a.split, a.device, a.batch_size, a.max_batches)))


def cmd_convert(a: argparse.Namespace) -> None:
    from gptkit.convert import import_hf

    out = import_hf(a.from_hf, a.out, a.tokenizer, a.overwrite)
    print(f"gptkit: converted {a.from_hf} -> {out}; try: gptkit generate {out} --prompt 'Hello'")


def cmd_export(a: argparse.Namespace) -> None:
    from gptkit.convert import export_hf

    out = export_hf(a.run, a.to_hf, a.overwrite)
    print(f"gptkit: exported {a.run} -> {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")


def cmd_tune(a: argparse.Namespace) -> None:
    from gptkit.data import default_preset
    from gptkit.tune import tune

    summary = tune(
        a.space, a.trials, a.budget, a.out, a.text, a.data, a.config or str(default_preset()), a.set,
        a.storage, a.workers, a.pruner, a.objective, a.keep_top,
    )  # fmt: skip
    print(json.dumps(summary))


COMMANDS = {
    "tune": cmd_tune,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "convert": cmd_convert,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except GptkitError as e:
        print(f"gptkit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gptkit: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `gptkit generate ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
