"""Models from run folders, built in one place: `build_model` makes the module a run's config
describes (plain, LoRA adapters over its base, or int8/int4 Linear layers) and `load_model`
fills it from the checkpoint. Writing and reading the files themselves is `checkpoint`'s."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gptkit.checkpoint import (
    RunFolder,
    checkpoint_dir,
    load_run_config,
    load_weights,
    read_info,
    weights_sha256,
)
from gptkit.config import Config, model_config_from_base
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.peft.methods import TITLES, apply_method
from gptkit.peft.methods import merge_adapters as merge_adapters_into
from gptkit.tokenizer import Tokenizer, load_tokenizer


def build_model(cfg: Config, device: str | torch.device = "cpu") -> GPT:
    """The module a run's config describes, before its weights are read: int8/int4 layers for a
    quantized run, the base's weights with adapters for a LoRA run, else a fresh GPT."""
    if cfg.adapted:
        return finetune_start(cfg)
    if cfg.model.quantization != "none":
        # the int8/int4 layers are loaded only for a quantized run: training never needs them
        from gptkit.inference.qlinear import check_device, empty_quantized

        check_device(device)
        return empty_quantized(cfg.model, cfg.model.int8_activations)
    return GPT(cfg.model)


def finetune_start(cfg: Config, seed: int = 0) -> GPT:
    """The model a fine-tuning run starts from: its base run's weights (context cut to
    cfg.model.block_size), the embedding grown to cfg.model.vocab_size, and LoRA adapters when
    the run's method (finetune.method) adapts it. Loading an adapted run rebuilds this, then
    reads the adapter over it."""
    base, lineage = cfg.finetune.base, cfg.lineage
    if lineage.base_sha256 and weights_sha256(base) != lineage.base_sha256:
        raise GptkitError(
            f"the base run {base} has changed since this fine-tune started (its weights' checksum "
            "differs); "
            "the adapter belongs to the old weights"
        )
    model = load_for_finetune(base, cfg.model.block_size, cfg.model.dropout, cfg.adapted)
    model.grow_vocab(cfg.model.vocab_size, seed)
    apply_method(model, cfg, lineage.base_vocab_size or None)
    return model


def load_model(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    verify: bool = True,
    merge_adapters: bool = False,
) -> tuple[GPT, Tokenizer, Config]:
    """The trained model (in eval mode), its tokenizer and its config, from a run folder.
    merge_adapters folds a LoRA or AdaLoRA run's adapters into plain weights: the same logits,
    and faster to sample from (generate, chat, serve, instruction eval). Bottleneck adapters
    cannot be folded: the model keeps them over its base, and a line on stderr says so."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = checkpoint_dir(run_dir)
    read_info(ckpt, verify)
    tok = load_tokenizer(RunFolder(run_dir).tokenizer)
    model = build_model(cfg, device)
    load_weights(model, ckpt)
    # over a quantized base (QLoRA) the adapter stays apart: folding it in would re-quantize
    if merge_adapters and model.adapters is not None and cfg.model.quantization == "none":
        if model.adapters.mergeable:
            merge_adapters_into(model)
        else:
            print(
                f"gptkit: {run_dir} holds {TITLES[cfg.finetune.method]}, which cannot be merged "
                f"into weights: running its base {cfg.finetune.base} with the adapters over it",
                file=sys.stderr,
            )
    return model.to(device).eval(), tok, cfg


def load_for_finetune(
    run_dir: str | Path, block_size: int | None = None, dropout: float = 0.0, adapting: bool = False
) -> GPT:
    """A run's weights in a fresh model for further training, optionally with a shorter context
    (the first block_size position embeddings are kept) and a different dropout. A quantized
    run is a base only for adapting (LoRA over int8/int4 weights: QLoRA's idea): its Linears stay
    quantized and frozen, its head returns to full precision (new tokens' rows train there)."""
    run_cfg = load_run_config(Path(run_dir))
    if run_cfg.model.quantization != "none" and run_cfg.adapted:
        raise GptkitError(
            f"{run_dir} adapts an {run_cfg.model.quantization}-quantized base; its adapter cannot "
            "be folded into those weights to start another fine-tune from; fine-tune its base "
            f"{run_cfg.finetune.base} instead"
        )
    if run_cfg.model.quantization != "none" and not adapting:
        raise GptkitError(
            f"{run_dir} is quantized ({run_cfg.model.quantization}): its weights cannot train; "
            "adapt it instead (gptkit finetune --method lora, adalora or adapter: adapters over "
            "its frozen quantized weights), or start from the run it was quantized from"
        )
    if run_cfg.finetune.method == "adapter":
        raise GptkitError(
            f"{run_dir} holds bottleneck adapters, which cannot be merged into weights to "
            f"fine-tune further; start from its base {run_cfg.finetune.base}"
        )
    if run_cfg.model.quantization != "none":  # its int8/int4 layers, read once
        from gptkit.inference.qlinear import empty_quantized, unquantize_head

        model = empty_quantized(model_config_from_base(run_cfg.model, block_size or 0, dropout))
        read_info(checkpoint_dir(Path(run_dir)), verify=True)
        load_weights(model, checkpoint_dir(Path(run_dir)), block_size=model.config.block_size)
        unquantize_head(model)
        return model.train()
    # a LoRA or AdaLoRA run as a base: its update folded in
    base, _, cfg = load_model(run_dir, "cpu", merge_adapters=True)
    mcfg = model_config_from_base(cfg.model, block_size or 0, dropout)
    model = GPT(mcfg)
    sd = base.state_dict_for_save()
    if "wpe.weight" in sd:
        sd["wpe.weight"] = sd["wpe.weight"][: mcfg.block_size]
    model.load_saved_state(sd)
    return model.train()


def refuse_quantized(cfg: Config, run_dir: Path, doing: str = "train or fine-tune") -> None:
    """Quantized runs are for inference and adapting: one line naming what to use instead. (A
    run that adapts a quantized base trains its own full-precision adapter: not refused.)"""
    if cfg.model.quantization != "none" and not cfg.adapted:
        raise GptkitError(
            f"{run_dir} is quantized ({cfg.model.quantization}) for inference; to {doing}, use "
            "the run it was quantized from"
        )
