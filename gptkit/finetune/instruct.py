"""Instruction fine-tuning: start from a base run, render instruction records with the chat
template (gptkit/finetune/instructions.py) and train with the one training loop, fully or with LoRA.

A fine-tuning run's config records its base run (finetune.base) and, as bookkeeping, the base's
vocabulary size and weights' checksum (lineage), so that a LoRA run can always rebuild its base
and never meets the wrong one. `merge` folds an adapter into plain weights.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptkit.checkpoint import (
    RunFolder,
    TrainingState,
    checkpoint_info,
    load_run_config,
    refuse_nonempty,
    save_checkpoint,
    staged_folder,
    weights_sha256,
)
from gptkit.classify import fit_texts, read_training_files, training_conversations
from gptkit.config import Config, apply_overrides, load_config, model_config_from_base
from gptkit.data import preset
from gptkit.errors import GptkitError
from gptkit.finetune.instructions import Conversations, InstructionData, load_conversations
from gptkit.loader import finetune_start, load_model
from gptkit.model import GPT
from gptkit.peft.adalora import rank_table
from gptkit.peft.adalora import ranks as adalora_ranks
from gptkit.peft.methods import describe, parameter_counts
from gptkit.template import ChatTemplate
from gptkit.tokenizer import Tokenizer, load_tokenizer
from gptkit.training.train import TrainOptions, TrainResult, train

ASCII = "".join(map(chr, range(32, 127))) + "\n\t"


def finetune_config(config: str | None = None, overrides: list[str] | None = None) -> Config:
    """The fine-tuning defaults (gptkit/presets/finetune.yaml), then a file, then --set."""
    cfg = load_config(config or preset("finetune"))
    return apply_overrides(cfg, overrides or []).validate()


def finetune_tokenizer(base_tok: Tokenizer, convs: Conversations) -> Tokenizer:
    """The base's tokenizer with the chat template's special tokens. A character vocabulary also
    grows by the data's characters and all of printable ASCII, so that a user's question (or a
    held-out file) in plain English always encodes."""
    text = (
        "".join(m.content for c in convs.items for m in c) + ASCII
        if base_tok.kind == "char"
        else ""
    )
    return ChatTemplate.add_to(base_tok, text)


def config_from_base(
    cfg: Config, base: Path, data: list[str], method: str | None, tok: Tokenizer
) -> Config:
    """A new fine-tuning run's whole config, resolved once: the training settings of `cfg`, the
    base run's architecture (model_config_from_base: context no longer than the base's, this
    config's dropout, the vocabulary grown by the template's tokens), and its lineage."""
    base_cfg = load_run_config(base)
    model = model_config_from_base(
        base_cfg.model, cfg.finetune.block_size, cfg.model.dropout, tok.vocab_size
    )
    # An adapted base has no checksum of its own to record; its own lineage guards its base.
    checksum = "" if base_cfg.adapted else weights_sha256(base)
    changes: dict[str, Any] = {
        "finetune.base": str(base.resolve()),
        "lineage.base_vocab_size": base_cfg.model.vocab_size,
        "lineage.base_sha256": checksum,
        "data.dir": "",
        "data.tokenizer": f"run:{base.resolve()}",
    }
    if data:
        changes["finetune.data"] = [str(Path(d).resolve()) for d in data]
    if method is not None:
        changes["finetune.method"] = method
        changes["lora.enabled"] = method == "lora"
    return cfg.with_model(model).updated(changes)


def with_epochs(cfg: Config, n_train: int) -> Config:
    """finetune.epochs > 0 sets train.max_steps: that many passes over the training examples."""
    if cfg.finetune.epochs <= 0:
        return cfg
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return cfg.updated(
        {"train.max_steps": max(1, math.ceil(cfg.finetune.epochs * n_train / per_step))}
    )


def finetune(
    base: str | Path,
    data: list[str] | None,
    out: str | Path,
    cfg: Config | None = None,
    lora: bool | None = None,
    overwrite: bool = False,
    method: str | None = None,
    progress: bool = True,
    quiet: bool = False,
    stop_at: int | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    task: str | None = None,
) -> TrainResult:
    """Fine-tune the run `base` on instruction files `data` (default: cfg.finetune.data) into the
    run folder `out` with `method` (full, lora, adalora, adapter; None: as cfg.finetune.method
    says; lora=True is method="lora"). task="classify" reads labelled {"text", label} records
    instead and learns to answer with the label (gptkit/classify.py). on_eval(step, val_loss)
    follows each periodic evaluation (hyperparameter search prunes with it)."""
    if base is None:
        raise GptkitError(
            "name the base run to fine-tune: gptkit finetune BASE_RUN --data FILE --out RUN"
        )
    cfg = cfg if cfg is not None else finetune_config()
    if task is not None:
        cfg = cfg.updated({"finetune.task": task})
    convs, cfg = _examples(cfg, [str(d) for d in data] if data else cfg.finetune.data)
    tok = finetune_tokenizer(load_tokenizer(RunFolder(base).tokenizer), convs)
    if lora is not None and method is None:
        method = "lora" if lora else "full"
    cfg = config_from_base(cfg, Path(base), [str(d) for d in data or []], method, tok)
    opts = TrainOptions(
        overwrite=overwrite, progress=progress, quiet=quiet, stop_at=stop_at, on_eval=on_eval
    )
    return _run(cfg, Path(out), tok, convs, opts)


def resume_finetune(
    out: str | Path,
    cfg: Config | None = None,
    progress: bool = True,
    quiet: bool = False,
    stop_at: int | None = None,
) -> TrainResult:
    """Continue the fine-tuning run in `out` from its last checkpoint, as its config.yaml (or the
    given cfg, e.g. from train.resume_config with --set applied) says."""
    out = Path(out)
    saved = load_run_config(out)
    cfg = cfg if cfg is not None else saved
    if cfg.finetune.method != saved.finetune.method:
        raise GptkitError(
            f"{out} was fine-tuned with {saved.finetune.method}; a resumed run continues what it "
            f"saved, not {cfg.finetune.method}: drop the new method, or start another run "
            "with --out"
        )
    if not cfg.finetune.base:
        raise GptkitError(
            f"{out} is not a fine-tuning run; continue it with gptkit train --resume {out}"
        )
    convs, cfg = _examples(cfg, cfg.finetune.data)
    opts = TrainOptions(resume=True, progress=progress, quiet=quiet, stop_at=stop_at)
    return _run(cfg, out, load_tokenizer(RunFolder(out).tokenizer), convs, opts)


def _examples(cfg: Config, files: list[str]) -> tuple[Conversations, Config]:
    """The training conversations: instruction records, or for task classify labelled texts
    (whose label set the config then records)."""
    if cfg.finetune.task != "classify":
        return load_conversations(files, cfg.finetune.skip_invalid), cfg
    if not files:
        raise GptkitError('no labelled data: pass --data FILE (JSONL of {"text", "label"})')
    data = read_training_files(files, cfg.finetune.label_field)
    if cfg.finetune.labels and cfg.finetune.labels != data.label_set:
        raise GptkitError(
            f"the data's labels ({', '.join(data.label_set)}) are not the ones this run was "
            f"trained with ({', '.join(cfg.finetune.labels)})"
        )
    return training_conversations(data), cfg.updated({"finetune.labels": data.label_set})


def _run(
    cfg: Config, out: Path, tok: Tokenizer, convs: Conversations, opts: TrainOptions
) -> TrainResult:
    t = cfg.train
    if cfg.finetune.task == "classify":
        convs = fit_texts(convs, tok, cfg.model.block_size)
    data = InstructionData(
        convs.items, tok, cfg.model.block_size, t.batch_size, t.seed, cfg.finetune.val_fraction
    )
    cfg = with_epochs(cfg, len(data.train))
    if cfg.finetune.method == "adalora" and not cfg.adalora.total_step:
        cfg = cfg.updated({"adalora.total_step": cfg.train.max_steps})  # the schedule, fixed
    # adapters' initialisation: the same run twice is the same run
    torch.manual_seed(cfg.train.seed)
    model = finetune_start(cfg, cfg.train.seed)
    quiet = opts.quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks
    if not quiet:
        print(_start_line(cfg, model, convs, len(data.train)), flush=True)
    result = train(cfg, out, opts, init_from=model, data=data, quiet=quiet)
    if cfg.finetune.method == "adalora" and int(os.environ.get("RANK", "0")) == 0:
        _record_ranks(out, cfg, model, quiet or result.interrupted)
    return result


def _record_ranks(out: Path, cfg: Config, model: GPT, quiet: bool) -> dict[str, int]:
    """AdaLoRA's ranks as the run ends (what its last checkpoint holds: train() saves the
    weights it ends with, the best evaluation's under early stopping): RUN/ranks.json, and a
    table on stdout."""
    ranks = adalora_ranks(model)
    RunFolder(out).ranks.write_text(json.dumps(ranks, indent=1) + "\n")
    if not quiet:
        a = cfg.adalora
        print(
            f"gptkit: AdaLoRA ranks ({sum(ranks.values())} of {a.init_r * len(ranks)} triplets "
            f"kept; target {a.target_r} a matrix on average):\n{rank_table(ranks)}"
        )
    return ranks


def _start_line(cfg: Config, model: GPT, convs: Conversations, n_train: int) -> str:
    counts = parameter_counts(model)
    t = cfg.train
    mode = describe(cfg)
    skipped = f", {convs.skipped} invalid records skipped" if convs.skipped else ""
    epochs = t.max_steps * t.batch_size * t.grad_accum / max(1, n_train)
    early = (
        f", early stopping after {t.patience} evaluations without a better validation loss"
        if t.patience
        else ""
    )
    return (
        f"gptkit: {mode}: {counts['trainable']:,} of {counts['total']:,} parameters train "
        f"({100 * counts['trainable'] / counts['total']:.2f}%){skipped}; at most {t.max_steps} "
        "steps "
        f"({epochs:.1f} epochs){early}"
    )


def merge(run: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fold a LoRA or AdaLoRA run's update into its base weights: a plain run folder that needs
    no base."""
    run = Path(run)
    out = Path(out) if out else run.with_name(run.name + "-merged")
    cfg = load_run_config(run)
    if cfg.finetune.method not in ("lora", "adalora"):
        whole = (
            "its weights are already whole"
            if not cfg.adapted
            else (
                "bottleneck adapters are layers of their own, not an update of a weight; generate, "
                "chat, serve and eval load them over the base as they are"
            )
        )
        raise GptkitError(f"{run} has no LoRA or AdaLoRA update to merge: {whole}")
    if cfg.model.quantization != "none":
        raise GptkitError(
            f"{run} adapts an {cfg.model.quantization}-quantized base: merging would mean "
            "quantizing again and losing the adapter's precision; generate, chat, serve and eval "
            "use it as it is"
        )
    refuse_nonempty(out, overwrite)
    model, tok, cfg = load_model(run, "cpu", merge_adapters=True)
    cfg = cfg.updated({"finetune.method": "full", "lora.enabled": False, "lineage.base_sha256": ""})
    info = checkpoint_info(run)
    with staged_folder(out) as tmp:
        tok.save(RunFolder(tmp).tokenizer)
        cfg.save(RunFolder(tmp).config)
        save_checkpoint(
            tmp, model, [], TrainingState(step=info["step"], tokens_seen=info["tokens_seen"])
        )
    return out
