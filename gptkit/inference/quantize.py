"""`gptkit quantize RUN --out RUN_Q`: a run folder whose config says `model.quantization: int8`
(or int4) and whose checkpoint holds the quantized weights and their scales (the layers are in
`qlinear`), loadable without the fp32 ones; every command that samples (generate, chat, serve,
eval) loads it as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

from gptkit.checkpoint import (
    RunFolder,
    load_run_config,
    refuse_nonempty,
    staged_folder,
    write_weights_only,
)
from gptkit.errors import GptkitError
from gptkit.inference.qlinear import ACTIVATIONS, SCHEMES, swap_linears
from gptkit.loader import load_model
from gptkit.peft.methods import refuse_adapted


def quantize_run(
    run_dir: str | Path,
    out: str | Path,
    scheme: str = "int8",
    overwrite: bool = False,
    activations: str = "int8",
) -> Path:
    """A run -> a new run folder with int8 (or int4) weights (config, tokenizer, weights-only
    checkpoint). activations (int8 only): "int8" quantizes a single row's activations too (fast
    batch-1 decoding), "bf16" keeps every product weight-only."""
    run_dir, out = Path(run_dir), Path(out)
    if scheme not in SCHEMES:
        raise GptkitError(f"unknown --scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if activations not in ACTIVATIONS:
        raise GptkitError(
            f"unknown --activations {activations!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    cfg = load_run_config(run_dir)
    if cfg.model.quantization != "none":
        raise GptkitError(
            f"{run_dir} is already quantized ({cfg.model.quantization}); quantize the run it "
            "was quantized from"
        )
    refuse_adapted(cfg, run_dir, "quantize")
    refuse_nonempty(out, overwrite)
    model, _, _ = load_model(run_dir)
    swap_linears(model, quantize=True, scheme=scheme)
    qcfg = cfg.updated({"model.quantization": scheme, "model.int8_activations": activations})
    with staged_folder(out) as tmp:
        qcfg.save(RunFolder(tmp).config)
        shutil.copytree(RunFolder(run_dir).tokenizer, RunFolder(tmp).tokenizer)
        write_weights_only(tmp, model.state_dict_for_save())
    return out
