"""The fine-tuning methods side by side, and against PEFT on the same model in the same run.

A small GPT-2-architecture character model (pretrained here on the bundled tiny Shakespeare, or
--base) is fine-tuned on the synthetic instruction tasks (gptkit/finetune/tasks.py: 4,000
training examples, 250 held-out ones over unseen words) for the same number of steps with the
same batches in the same order, by:

- gptkit: LoRA, AdaLoRA, Houlsby and Pfeiffer bottleneck adapters, full fine-tuning, and LoRA
  over the base quantized to int8 and to int4 (`gptkit quantize`);
- PEFT: LoRA and AdaLoRA on the same weights exported to transformers' GPT2LMHeadModel, trained
  by PEFT's documented loop (forward with labels, backward, clip, AdamW, update_and_allocate),
  with gptkit's learning-rate schedule; its merged weights are evaluated by the same code.

Each row: held-out exact match of greedy answers and response loss (gptkit's evaluator for
every row), trainable parameters, and the peak memory of the training steps (each method in its
own process; resident memory over the steps alone, less the process's once the data is read and
before the model loads). All in fp32 (--dtype bfloat16: both under autocast). Tokens/s per row
(training time alone, separate processes) is only indicative on a shared machine: the speed
table runs every method's training step in turns in one process, on the same batches, and
quotes medians over rounds.

Then the memory of LoRA fine-tuning steps on a GPT-2 124M-shaped model (random weights) whose
base is fp32, int8 or int4: the peak the process added, each in its own process. Memory is
resident memory (VmHWM), with glibc's mmap threshold fixed so that freed blocks do not stay
counted.

    python benchmarks/peft_methods.py              # about 15 minutes on 2 cores
    python benchmarks/peft_methods.py --steps 300  # shorter

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = [
    "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128", "model.bias=true",
    "model.pos_embedding=learned", "model.norm=layernorm", "model.mlp=gelu", "model.qk_norm=false",
    "model.tie_embeddings=true", "model.dropout=0", "train.optimizer=adamw", "train.lr=2e-3",
    "train.max_steps=100000", "train.warmup_steps=50", "train.batch_size=16", "train.tensorboard=false",
    "train.sample_tokens=0",
]  # fmt: skip
LORA = {"rank": 16, "alpha": 32}
ADALORA = {"init_r": 12, "target_r": 4, "alpha": 24}  # scale alpha / init_r = 2, as LoRA's 32 / 16
METHODS = {  # name: (method, --set)
    "full": ("full", ["train.lr=1e-3"]),
    "lora": ("lora", ["lora.rank=16", "lora.alpha=32"]),
    "adalora": ("adalora", [f"adalora.{k}={v}" for k, v in ADALORA.items()]),
    "houlsby": ("adapter", ["adapter.placement=houlsby", "adapter.reduction_factor=4"]),
    "pfeiffer": ("adapter", ["adapter.placement=pfeiffer", "adapter.reduction_factor=2"]),
    "lora-int8": ("lora", ["lora.rank=16", "lora.alpha=32"]),
    "lora-int4": ("lora", ["lora.rank=16", "lora.alpha=32"]),
}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    return _status_mb("VmRSS")


class StepPeak:
    """The peak resident memory over the training steps alone: the kernel's high-water mark is
    reset before the first step (loading and data preparation do not count; what they left
    resident does) and read after each step (the final evaluation and saving do not count)."""

    def __init__(self) -> None:
        self.peak = 0.0

    def before_first(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def after_step(self) -> None:
        self.peak = max(self.peak, _status_mb("VmHWM"))


DTYPE = "float32"  # --dtype: both sides train in it (PEFT under torch.autocast for bfloat16)
SEED = 1337  # --seeds: the batches' order and every initialisation, on both sides


def common_sets(steps: int) -> list[str]:
    """The same schedule for every row (and for PEFT's loop, through lr_factor)."""
    s = steps
    return [f"train.max_steps={s}", "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=20",
            "train.schedule=cosine", "train.patience=0", f"train.eval_interval={s + 1}",
            f"train.checkpoint_interval={s + 1}", f"train.dtype={DTYPE}", f"train.seed={SEED}", "train.tensorboard=false",
            "train.grad_clip=1.0", "train.weight_decay=0", "train.threads=2", "train.log_interval=50",
            f"adalora.tinit={s // 10}", f"adalora.tfinal={s // 5}", "adalora.deltaT=10"]  # fmt: skip


def prepare(args: argparse.Namespace, out: Path) -> tuple[Path, Path, Path]:
    """The pretrained base; `prep`, the base with the template's tokens added (one full step at a
    negligible learning rate), so that no method grows the vocabulary and PEFT gets the same
    model; the tasks' train and test files."""
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.finetune.tasks import write_tasks
    from gptkit.training.train import new_run_config, train

    train_file = write_tasks(out / "tasks-train.jsonl", 4000, "train")
    test_file = write_tasks(out / "tasks-test.jsonl", 250, "test")
    base = Path(args.base) if args.base else out / "base"
    if not args.base and not (base / "checkpoint").is_dir():
        run = new_run_config(None, BASE + [f"train.max_time_s={args.pretrain_s}"])  # the bundled text
        train(run.config, base, overwrite=True, progress=False, text=run.text)
    prep = out / "prep"
    if not (prep / "checkpoint").is_dir():
        sets = ["train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", "train.patience=0",
                "train.tensorboard=false", "train.dtype=float32"]  # fmt: skip
        finetune(base, [str(train_file)], prep, finetune_config(None, sets), overwrite=True, progress=False, quiet=True)
    return prep, train_file, test_file


def ours(name: str, prep: Path, train_file: Path, test_file: Path, steps: int, out: Path) -> dict:
    """One gptkit row, in this (fresh) process."""
    import torch

    import gptkit.finetune.instruct as instruct
    from gptkit.checkpoint import checkpoint_info
    from gptkit.evaluate.instructions import evaluate_instructions
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.inference.quantize import quantize_run
    from gptkit.loader import load_model
    from gptkit.peft.methods import parameter_counts
    from gptkit.training.train import Trainer

    base = prep
    if name.startswith("lora-int"):
        base = out / f"prep-{name[5:]}"
        if not (base / "checkpoint").is_dir():
            quantize_run(prep, base, name[5:])
    method, sets = METHODS[name]

    # Making an optimizer imports torch._dynamo (69 MB resident here): an import, made before
    # measuring, as the PEFT row's imports of transformers and peft have already made it
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)

    peak, step, start_model = StepPeak(), Trainer._optimizer_step, instruct.finetune_start
    before_model = []

    def measured_start(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        before_model.append(rss_mb())  # the data is read by now: from here on, as PEFT's row counts
        return start_model(*a, **kw)

    def measured_step(self: Trainer) -> None:
        if self.state.step == 0:
            peak.before_first()
        step(self)
        peak.after_step()

    Trainer._optimizer_step, instruct.finetune_start = measured_step, measured_start
    run = out / name
    result = finetune(base, [str(train_file)], run, finetune_config(None, common_sets(steps) + sets), method=method,
                      overwrite=True, progress=False, quiet=True)  # fmt: skip
    added = peak.peak - before_model[0]
    tokens = checkpoint_info(run)["tokens_seen"]
    trainable = parameter_counts(load_model(run)[0])["trainable"]
    report = evaluate_instructions(run, [str(test_file)], "cpu", 24)
    return {"exact_match": report["exact_match"], "response_loss": report["response_loss"],
            "trainable": trainable, "tokens_per_s": tokens / result.train_s, "memory_mb": added}  # fmt: skip


def peft_model(name: str, hf_dir: Path, steps: int) -> tuple[object, list, object]:
    """PEFT's LoRA or AdaLoRA (as LORA / ADALORA, its schedule over `steps`) on the exported prep
    model, its initial adapters drawn with SEED; its trainable parameters and a fused AdamW."""
    import torch
    import transformers
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32)
    common = dict(target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True,
                  task_type="CAUSAL_LM")  # fmt: skip
    if name == "peft-lora":
        pcfg = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], **common)
    else:
        pcfg = AdaLoraConfig(init_r=ADALORA["init_r"], target_r=ADALORA["target_r"], lora_alpha=ADALORA["alpha"],
                             tinit=steps // 10, tfinal=steps // 5, deltaT=10, total_step=steps, **common)  # fmt: skip
    torch.manual_seed(SEED)  # PEFT draws its adapters' initial weights: the same ones every run
    pm = get_peft_model(model, pcfg).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, params, torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)


def peft_step(pm: object, params: list, opt: object, x: object, y: object, step: int, grad_clip: float) -> None:
    """One step of PEFT's documented loop: forward with labels (AdaLoRA's orthogonality term
    joins the loss there), backward, clip, AdamW, update_and_allocate(step) for AdaLoRA."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DTYPE == "bfloat16"):
        loss = pm(input_ids=x, labels=y, shift_labels=y).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if hasattr(pm.base_model, "update_and_allocate"):
        pm.base_model.update_and_allocate(step)
    opt.zero_grad(set_to_none=True)


def peft_row(name: str, prep: Path, train_file: Path, test_file: Path, steps: int, out: Path) -> dict:
    """PEFT's LoRA or AdaLoRA on the prep model exported to transformers, in this process."""
    import torch

    from gptkit.checkpoint import RunFolder
    from gptkit.evaluate.instructions import evaluate_answers
    from gptkit.finetune.instruct import finetune_config, finetune_tokenizer
    from gptkit.finetune.instructions import InstructionData, load_conversations
    from gptkit.formats.hf import _gpt2_weights, export_hf
    from gptkit.loader import load_model
    from gptkit.tokenizer import load_tokenizer
    from gptkit.training.optim import lr_factor

    hf_dir = out / "prep-hf"
    if not hf_dir.is_dir():  # the weights alone: the character tokenizer stays gptkit's
        bare = out / "prep-bare"
        shutil.rmtree(bare, ignore_errors=True)
        shutil.copytree(prep, bare, ignore=shutil.ignore_patterns("tokenizer"))
        export_hf(bare, hf_dir)
    torch.set_num_threads(2)
    cfg = finetune_config(None, common_sets(steps))
    tc = cfg.train
    convs = load_conversations([str(train_file)])
    tok = finetune_tokenizer(load_tokenizer(RunFolder(prep).tokenizer), convs)
    prep_model, prep_tok, prep_cfg = load_model(prep)
    assert tok.vocab_size == prep_tok.vocab_size, "prep should hold every token already"
    data = InstructionData(convs.items, tok, prep_cfg.model.block_size, tc.batch_size, tc.seed,
                           cfg.finetune.val_fraction)  # fmt: skip
    batches = [data.next() for _ in range(steps)]  # the order gptkit's loop draws them in
    start = rss_mb()  # the batches are made: from here on, as gptkit's row counts
    pm, params, opt = peft_model(name, hf_dir, steps)
    assert (tc.beta1, tc.beta2) == opt.defaults["betas"], "PEFT's AdamW as gptkit's"
    t0, tokens, peak = time.perf_counter(), 0, StepPeak()
    peak.before_first()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(step, tc)
        x, y = batches[step]
        tokens += x.numel()
        peft_step(pm, params, opt, x, y, step + 1, tc.grad_clip)
        peak.after_step()
    seconds = time.perf_counter() - t0
    added = peak.peak - start
    trainable = sum(p.numel() for p in params)
    merged = pm.merge_and_unload().state_dict()
    sd = {n: t.contiguous() for n, _, t in _gpt2_weights(iter(merged.items()), prep_cfg)}
    prep_model.load_saved_state(sd)
    report = evaluate_answers(prep_model.eval(), prep_tok, load_conversations([str(test_file)]).items, 24)
    return {"exact_match": report["exact_match"], "response_loss": report["response_loss"],
            "trainable": trainable, "tokens_per_s": tokens / seconds, "memory_mb": added}  # fmt: skip


def speed_rows(prep: Path, train_file: Path, names: list[str], rounds: int, steps: int = 8) -> dict:
    """Tokens/s of each method's training step, all in one process on the same batches, taken
    in turns (round after round, each method `steps` steps a round): the medians compare
    methods under the same machine load, which separate processes one after another do not."""
    import statistics

    import torch

    from gptkit.checkpoint import RunFolder
    from gptkit.finetune.instruct import config_from_base, finetune_config, finetune_tokenizer
    from gptkit.finetune.instructions import InstructionData, load_conversations
    from gptkit.loader import finetune_start
    from gptkit.runtime import autocast_context, resolve_dtype
    from gptkit.tokenizer import load_tokenizer
    from gptkit.training.optim import build_optimizers

    torch.set_num_threads(2)
    convs = load_conversations([str(train_file)])
    tok = finetune_tokenizer(load_tokenizer(RunFolder(prep).tokenizer), convs)
    steppers = {}
    for name in names:
        method, sets = METHODS.get(name, ("lora", []))
        cfg = config_from_base(finetune_config(None, common_sets(1000) + sets), prep, [], method, tok)
        if name.startswith("peft-"):
            pm, params, opt = peft_model(name, prep.parent / "prep-hf", 1000)

            def step(x, y, n, pm=pm, params=params, opt=opt):  # noqa: ANN001, ANN202
                peft_step(pm, params, opt, x, y, n, 1.0)
        else:  # the steps of gptkit's loop (Trainer._optimizer_step) with its optimizers and autocast
            model = finetune_start(cfg).train()
            opts = build_optimizers(model, cfg.train, torch.device("cpu"), model.adapters)
            amp = autocast_context(torch.device("cpu"), resolve_dtype(cfg.train.dtype, torch.device("cpu")))
            hooks = model.adapters.step_hooks if model.adapters is not None else None

            def step(x, y, n, model=model, opts=opts, amp=amp, hooks=hooks):  # noqa: ANN001, ANN202
                with amp:
                    _, loss = model(x, y)
                (loss if hooks is None else loss + hooks.regularizer()).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                for opt in opts:
                    opt.step()
                if hooks is not None:  # AdaLoRA's scores, as PEFT's update_and_allocate
                    hooks.after_step(n)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)

        steppers[name] = step
    data = InstructionData(convs.items, tok, 128, 16, 1337, 0.1)
    batches = [data.next() for _ in range(steps)]
    tokens = sum(x.numel() for x, _ in batches)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        for name, step in steppers.items():
            t = time.perf_counter()
            for i, (x, y) in enumerate(batches):
                step(x, y, r * steps + i + 1)  # inside AdaLoRA's warm-up (tinit 100): scores, no pruning
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {n: tokens / statistics.median(ts) for n, ts in times.items()}


def memory_row(scheme: str, steps: int = 4) -> dict:
    """LoRA steps on a GPT-2 124M-shaped model (random weights), its base fp32, int8 or int4."""
    import torch

    from gptkit.config import LoraConfig, ModelConfig
    from gptkit.model import GPT
    from gptkit.peft.lora import apply_lora

    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = rss_mb()
    shape = dict(n_layer=12, n_head=12, n_embd=768, block_size=256, vocab_size=50304, bias=True, tie_embeddings=True)
    if scheme == "fp32":
        model = GPT(ModelConfig(**shape))
    else:  # as a quantized run loads: no fp32 Linear weights ever allocated
        from gptkit.inference.qlinear import empty_quantized, unquantize_head

        model = empty_quantized(ModelConfig(**shape, quantization=scheme))
        with torch.no_grad():  # random values in place of a checkpoint's
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if t.dtype in (torch.int8, torch.uint8):
                    t.copy_(torch.randint(-127 if t.dtype == torch.int8 else 0, 127, t.shape, dtype=t.dtype))
                elif name.endswith("scale"):
                    t.fill_(2e-4)
                elif t.is_floating_point() and not name.startswith("rope"):
                    t.normal_(0, 0.02) if t.dim() > 1 else t.fill_(1.0 if "ln" in name else 0.0)
        unquantize_head(model)
    apply_lora(model, LoraConfig(rank=16, alpha=32, targets=["c_attn", "c_proj", "c_fc"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    x = torch.randint(0, 50304, (4, 256))
    losses, t0, peak = [], time.perf_counter(), StepPeak()
    peak.before_first()
    for _ in range(steps):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        peak.after_step()
    return {"memory_mb": peak.peak - start, "step_s": (time.perf_counter() - t0) / steps, "first_loss": losses[0]}


def in_subprocess(kind: str, name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--name", name, "--steps", str(args.steps), "--out", args.out,
           "--dtype", args.dtype, "--rounds", str(args.rounds), "--seeds", str(SEED)]  # fmt: skip
    if args.base:
        cmd += ["--base", args.base]
    # A fixed mmap threshold: glibc then gives large freed blocks back at once, so resident
    # memory follows what is live (its default raises the threshold after the first large free
    # and keeps freed blocks resident: a transient 9 MB dequantized weight stays counted)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} {name} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--base", help="a pretrained GPT-2-architecture run (default: pretrain one here)")
    ap.add_argument("--pretrain-s", type=int, default=150)
    ap.add_argument("--out", default="benchmarks/results/peft_methods")
    ap.add_argument("--rows", default=",".join([*METHODS, "peft-lora", "peft-adalora"]))
    ap.add_argument("--memory", default="fp32,int8,int4", help="schemes for the 124M-shape memory rows ('' to skip)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seeds", default="1337", help="seeds of the quality rows; several: their mean, and each")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the in-turn speed comparison")
    ap.add_argument(
        "--speed",
        default="lora,peft-lora,adalora,peft-adalora,houlsby,pfeiffer,full",
        help="methods in the in-turn speed comparison ('' to skip)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DTYPE, SEED
    DTYPE, seeds = args.dtype, [int(s) for s in args.seeds.split(",")]
    SEED = seeds[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        if args.worker == "memory":
            row = memory_row(args.name)
        elif args.worker == "speed":
            row = speed_rows(out / "prep", out / "tasks-train.jsonl", args.name.split(","), args.rounds)
        else:
            prep, train_file, test_file = out / "prep", out / "tasks-train.jsonl", out / "tasks-test.jsonl"
            fn = peft_row if args.worker == "peft" else ours
            row = fn(args.name, prep, train_file, test_file, args.steps, out)
        print(json.dumps(row))
        return
    prepare(args, out)
    rows = {}
    print(f"{args.steps} steps of batch 16, lr 1e-2 (full: 1e-3), cosine, {args.dtype}; 250 held-out tasks\n")
    print(f"{'method':<14}{'exact match':>12}{'resp. loss':>11}{'trainable':>11}{'tokens/s':>10}{'memory MB':>11}")
    for name in [r for r in args.rows.split(",") if r]:
        per_seed = []
        for SEED in seeds:  # noqa: B007  (in_subprocess passes it on)
            per_seed.append(in_subprocess("peft" if name.startswith("peft-") else "ours", name, args))
        row = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0]}
        row["trainable"] = per_seed[0]["trainable"]
        row["exact_match_each"] = [r["exact_match"] for r in per_seed]
        rows[name] = row
        print(f"{name:<14}{row['exact_match']:>12.3f}{row['response_loss']:>11.3f}{row['trainable']:>11,}"
              f"{row['tokens_per_s']:>10,.0f}{row['memory_mb']:>11.0f}", flush=True)  # fmt: skip
    for ours_name, theirs in (("lora", "peft-lora"), ("adalora", "peft-adalora")):
        if ours_name in rows and theirs in rows:
            a, b = rows[ours_name], rows[theirs]
            print(
                f"{ours_name} vs PEFT: exact match {100 * (a['exact_match'] - b['exact_match']):+.1f} points, "
                f"response loss {a['response_loss'] - b['response_loss']:+.3f}, memory x{a['memory_mb'] / b['memory_mb']:.2f}"
            )
    if len(seeds) > 1:
        print(
            f"(means over seeds {args.seeds}; exact match each: "
            + "; ".join(f"{n} {', '.join(f'{e:.3f}' for e in r['exact_match_each'])}" for n, r in rows.items())
            + ")"
        )
    SEED = seeds[0]
    speed = in_subprocess("speed", args.speed, args) if args.speed else {}
    if speed:
        print(f"\ntraining tokens/s, the methods in turns in one process ({args.rounds} rounds, medians):")
        for name, tps in speed.items():
            print(f"  {name:<14}{tps:>8,.0f}")
        for a, b in (("lora", "peft-lora"), ("adalora", "peft-adalora")):
            if a in speed and b in speed:
                print(f"  {a} / PEFT {a}: x{speed[a] / speed[b]:.2f}")
        if "lora" in speed:
            for a in ("houlsby", "pfeiffer"):
                if a in speed:
                    print(f"  {a} / lora: x{speed[a] / speed['lora']:.2f}")
    memory = {}
    for scheme in [s for s in args.memory.split(",") if s]:
        memory[scheme] = in_subprocess("memory", scheme, args)
    if memory:
        print("\nLoRA (rank 16) steps on a GPT-2 124M-shaped model, batch 4 x 256 tokens: peak memory added")
        for scheme, row in memory.items():
            ratio = row["memory_mb"] / memory["fp32"]["memory_mb"] if "fp32" in memory else float("nan")
            print(f"  {scheme} base: {row['memory_mb']:,.0f} MB (x{ratio:.2f} of fp32), {row['step_s']:.2f} s a step")
    print(json.dumps({"steps": args.steps, "rows": rows, "speed": speed, "memory_124m": memory}))


if __name__ == "__main__":
    main()
