"""Fine-tuning throughput at SmolLM2-135M's shape: gptkit (full and LoRA) against transformers
(full) and transformers + PEFT (LoRA), the same batch and sequence length, fp32, fused AdamW on
both sides, random weights (one LlamaForCausalLM, imported into gptkit through `gptkit convert`).

LoRA is rank 8 on every projection: PEFT's on q, k, v, o, gate, up and down; gptkit's on c_attn
(q, k and v fused), c_proj (o and down) and c_fc (gate and up fused). Each setting runs in a
process of its own, as each library's users run it (gptkit keeps freed memory, as its training
loop does; transformers + PEFT is also timed with that setting). Rounds are interleaved; medians
and ratios are reported.

Two kinds of labels, each timed in its own set of processes: every token has a target (as in
pretraining), and only the second half of each row does (instruction tuning, where the prompt's
tokens are -100 and carry no loss; both libraries get the same labels).

    python benchmarks/finetune_speed.py [--rounds 3] [--steps 2] [--batch 4] [--seq 256] [--labels both]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import answer_timings

from gptkit.config import LoraConfig, TrainConfig
from gptkit.formats.hf import import_hf
from gptkit.loader import load_model
from gptkit.peft.lora import apply_lora
from gptkit.runtime import keep_freed_memory
from gptkit.training.optim import build_optimizers

SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def hf_folder(tmp: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(tmp / "hf")
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp / "hf" / "tokenizer.json"))
    (tmp / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tmp / "hf"


def gptkit_step(run: Path, lora: bool, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = load_model(run)[0].train()
    adapters = apply_lora(model, LoraConfig(enabled=True, rank=8, targets=["c_attn", "c_proj", "c_fc"])) if lora else None
    (opt,) = build_optimizers(model, TrainConfig(lr=1e-4, weight_decay=0.0), torch.device("cpu"), adapters)

    def step() -> None:
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def transformers_step(folder: Path, lora: bool, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").train()
    if lora:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, PeftLora(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0, fused=True)

    def step() -> None:
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def labels(x: torch.Tensor, kind: str) -> torch.Tensor:
    """All tokens as targets, or only each row's second half (the first is the prompt)."""
    y = x.clone()
    if kind == "response":
        y[:, : x.size(1) // 2] = -100
    return y


def worker(conn, who: str, folder: str, run: str, batch: int, seq: int, kind: str) -> None:  # noqa: ANN001
    """Builds one setting in a process of its own, warms it up, then times n steps each time it
    is asked. gptkit runs as `gptkit finetune` does on a CPU (glibc keeps freed memory);
    transformers as its users run it, unless its name says it shares that setting."""
    if who.startswith("gptkit") or who.endswith("same_allocator"):
        keep_freed_memory()
    x = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    lora = "lora" in who
    y = labels(x, kind)
    make = gptkit_step if who.startswith("gptkit") else transformers_step
    step = make(Path(run) if who.startswith("gptkit") else Path(folder), lora, x, y)
    answer_timings(conn, step, cold_step=False)


def measure(settings: list[str], folder: Path, run: Path, a: argparse.Namespace, kind: str) -> dict[str, float]:
    """tokens/s (of all tokens in the batch) for each setting, in processes of their own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conns = {}
    for who in settings:  # one at a time, so that building does not overlap the timing
        parent, child = ctx.Pipe()
        ctx.Process(target=worker, args=(child, who, str(folder), str(run), a.batch, a.seq, kind), daemon=True).start()
        assert parent.recv() == "ready"
        conns[who] = parent
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(a.rounds):
        for who, conn in conns.items():
            conn.send(a.steps)
            times[who].append(conn.recv())
    for conn in conns.values():
        conn.send(0)
    return {k: a.batch * a.seq / statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--labels", choices=["all", "response", "both"], default="both")
    a = ap.parse_args()
    kinds = ["all", "response"] if a.labels == "both" else [a.labels]
    settings = ["gptkit_full", "transformers_full", "gptkit_lora", "transformers_peft_lora"]
    summary: dict[str, object] = {"shape": "smollm2-135M", "batch": a.batch, "seq": a.seq}
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder(Path(tmp))
        run = import_hf(folder, Path(tmp) / "run")
        for kind in kinds:
            extra = ["transformers_peft_lora_same_allocator"] if kind == "all" else []
            tps = measure(settings + extra, folder, run, a, kind)
            print(f"labels: {kind}")
            for name, value in tps.items():
                print(f"  {name:40s} {value:8.0f} tokens/s")
            suffix = "" if kind == "all" else "_response_labels"
            summary[f"tokens_per_s{suffix}"] = {k: round(v) for k, v in tps.items()}
            summary[f"ratio_full{suffix}"] = round(tps["gptkit_full"] / tps["transformers_full"], 2)
            summary[f"ratio_lora{suffix}"] = round(tps["gptkit_lora"] / tps["transformers_peft_lora"], 2)
            if extra:
                summary["ratio_lora_same_allocator"] = round(tps["gptkit_lora"] / tps[extra[0]], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
