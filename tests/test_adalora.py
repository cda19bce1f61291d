"""AdaLoRA (gptkit/peft/adalora.py) against PEFT's own AdaLoRA: the same tiny Llama-shaped model,
config, initial adapters and batches give the same loss curve through gptkit's training loop
and the same ranks after reallocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptkit.config import Config, apply_overrides
from gptkit.formats.hf import import_hf
from gptkit.loader import load_model
from gptkit.peft.adalora import apply_adalora, ranks
from gptkit.training.train import train

from .conftest import SHAKESPEARE
from .hf_models import hf_model

STEPS, BATCH, T = 30, 4, 24
# tinit, budget phase, tfinal: masks change in the middle and are held at the end
SCHEDULE = dict(init_r=6, target_r=2, tinit=4, tfinal=8, deltaT=3, total_step=STEPS, beta1=0.85,
                beta2=0.85, orth_reg_weight=0.5)  # fmt: skip
PAIRS = {"attn.c_proj": "self_attn.o_proj", "mlp.c_proj": "mlp.down_proj"}


class Fixed:
    """The same list of batches for the training loop, in order (gptkit's TrainData)."""

    description = "fixed batches"

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], tok: object) -> None:
        self.batches, self.tokenizer, self.i = batches, tok, 0

    def bind(self, ctx: object) -> None:
        pass

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i += 1
        return self.batches[self.i - 1]

    def state(self) -> torch.Tensor:
        return torch.tensor([self.i])

    def load_state(self, state: torch.Tensor) -> None:
        self.i = int(state[0])

    def val_batches(self, batch_size: int, max_batches: int | None = None, gen: object = None) -> list:
        return self.batches[:1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama", seed=3)
    with torch.no_grad():  # hf_model draws wide weights for logit checks; a trainable scale here
        import transformers

        m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(0.1)
        m.save_pretrained(folder)
    run = import_hf(folder, tmp_path_factory.mktemp("runs") / "llama")
    return folder, run


def _peft_model(folder: Path) -> object:
    import transformers
    from peft import AdaLoraConfig, get_peft_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    # task_type: a PeftModelForCausalLM, whose forward adds the orthogonality term (a bare
    # PeftModel calls the transformers model directly and leaves it out)
    cfg = AdaLoraConfig(**SCHEDULE, lora_alpha=8, lora_dropout=0.0, target_modules=list(PAIRS.values()), task_type="CAUSAL_LM")
    return get_peft_model(hf, cfg)


def _peft_train(pm: object, batches: list, lr: float) -> list[float]:
    """PEFT's documented loop: forward with labels (its orthogonality term joins the loss),
    backward, optimizer step, update_and_allocate(step), zero_grad."""
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0, fused=True)  # fmt: skip
    losses = []
    for step in range(1, STEPS + 1):
        x, y = batches[step - 1]
        out = pm(input_ids=x, labels=y, shift_labels=y)
        lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        losses.append(lm.item())
        out.loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
    return losses


def _copy_initial_adapters(pm: object, model: torch.nn.Module) -> None:
    """PEFT draws its own P and Q; ours take the same values (E starts at zero in both)."""
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for i in range(len(model.blocks)):
            for ours, theirs in PAIRS.items():
                m = model.get_submodule(f"blocks.{i}.{ours}")
                for p in ("lora_A", "lora_B", "lora_E"):
                    getattr(m, p).copy_(params[f"base_model.model.model.layers.{i}.{theirs}.{p}.default"])


def test_adalora_matches_peft_loss_curve_and_ranks(llama: tuple[Path, Path], tmp_path: Path) -> None:
    folder, run = llama
    _, tok, base_cfg = load_model(run)
    ids = torch.tensor(tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[:20_000]))
    starts = torch.randint(0, len(ids) - T - 1, (STEPS, BATCH), generator=torch.Generator().manual_seed(1))
    seqs = torch.stack([torch.stack([ids[i : i + T + 1] for i in row]) for row in starts])
    batches = [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs]
    lr = 3e-2
    pm = _peft_model(folder)
    cfg = apply_overrides(Config(), [f"adalora.{k}={v}" for k, v in SCHEDULE.items()] + [
        "adalora.targets=attn.c_proj,mlp.c_proj", "adalora.alpha=8", "train.optimizer=adamw",
        f"train.lr={lr}", "train.weight_decay=0", "train.beta1=0.9", "train.beta2=0.95", "train.grad_clip=0",
        "train.warmup_steps=0", "train.schedule=constant", f"train.max_steps={STEPS}", f"train.batch_size={BATCH}",
        "train.dtype=float32", "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=1",
        "train.tensorboard=false", "train.sample_tokens=0", "train.threads=2", "train.patience=0",
        "finetune.method=adalora"])  # fmt: skip
    cfg = cfg.with_model(base_cfg.model)
    model, _, _ = load_model(run)
    apply_adalora(model, cfg.adalora, STEPS)
    _copy_initial_adapters(pm, model)
    theirs = _peft_train(pm, batches, lr)
    train(cfg, tmp_path / "ours", init_from=model, data=Fixed(batches, tok), progress=False, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in rows if "loss" in r]
    assert len(ours) == STEPS
    assert ours == pytest.approx(theirs, rel=2e-4), list(zip(ours, theirs))
    assert ours[-1] < ours[0] - 0.05  # it learned: the comparison is not of two flat lines
    pattern = pm.peft_config["default"].rank_pattern
    theirs_ranks = {}
    for name, keep in pattern.items():
        i = int(name.split(".layers.")[1].split(".")[0])
        ours_name = next(o for o, t in PAIRS.items() if f".{t}." in name)
        theirs_ranks[f"blocks.{i}.{ours_name}"] = sum(keep)
    assert ranks(model) == theirs_ranks
    assert sum(theirs_ranks.values()) == SCHEDULE["target_r"] * len(theirs_ranks)
