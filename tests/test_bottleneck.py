"""Bottleneck adapters (gptkit/peft/bottleneck.py): the forward equals the `adapters` library's
(Houlsby: DoubleSeqBnConfig, Pfeiffer: SeqBnConfig) for the same GPT-2 and adapter weights; a
run fine-tuned with them trains only the adapters, loads over its base everywhere, and refuses
what needs whole weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptkit.checkpoint import checkpoint_dir, load_run_config, load_weights
from gptkit.config import AdapterConfig
from gptkit.formats.hf import import_hf
from gptkit.model import GPT
from gptkit.peft.bottleneck import AdaptedLinear, apply_bottleneck

# `adapters` 1.3 pins transformers 4.57, gptkit's interop 5.x: the reference runs in its own
# folder of packages, in a subprocess, beside this environment's torch.
REFERENCE = ["adapters==1.3.0", "transformers==4.57.6", "huggingface_hub==0.36.0", "tokenizers==0.22.1"]

SCRIPT = r"""
import json, sys, torch
import adapters, transformers
from safetensors.torch import save_file
out, placement, act = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=120, n_positions=32,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = transformers.GPT2LMHeadModel(cfg).eval()
model.save_pretrained(out + "/hf")  # the base alone
adapters.init(model)
kind = adapters.DoubleSeqBnConfig if placement == "houlsby" else adapters.SeqBnConfig
model.add_adapter("a", config=kind(reduction_factor=4, non_linearity=act))
model.set_active_adapters("a")
with torch.no_grad():  # every adapter weight nonzero, so that each one is checked
    for n, p in model.named_parameters():
        if ".adapters.a." in n:
            p.normal_(0, 0.3)
weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".adapters.a." in n}
save_file(weights, out + "/adapter.safetensors")
ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(1))
save_file({"ids": ids, "logits": model(ids).logits.detach().contiguous()}, out + "/logits.safetensors")
print(json.dumps(sorted(weights)))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("adapters-lib")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(where), *REFERENCE],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, f"installing the reference `adapters` library failed: {r.stderr[-2000:]}"
    return where


def _weights_only(run: Path) -> GPT:
    """The imported run's model (the reference's folder carries no tokenizer)."""
    model = GPT(load_run_config(run).model)
    load_weights(model, checkpoint_dir(run))
    return model.eval()


def _ours(name: str, placement: str) -> str:
    """transformer.h.1.attention_adapters.adapters.a.adapter_down.0.weight ->
    blocks.1.attn.c_proj.adapter.down.weight (Houlsby), blocks.1.adapter.down.weight (Pfeiffer)"""
    layer = name.split(".")[2]
    place = "attn.c_proj." if ".attention_adapters." in name else "mlp.c_proj."
    part = "down" if ".adapter_down." in name else "up"
    return f"blocks.{layer}.{place if placement == 'houlsby' else ''}adapter.{part}.{name.rsplit('.', 1)[1]}"


@pytest.mark.slow
@pytest.mark.parametrize(("placement", "act"), [("houlsby", "swish"), ("pfeiffer", "relu")])
def test_forward_equals_the_adapters_library(reference: Path, tmp_path: Path, placement: str, act: str) -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), placement, act], capture_output=True, text=True,
                       env={"PYTHONPATH": str(reference), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    names = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(names) == (8 if placement == "houlsby" else 4) * 2  # weight and bias, down and up
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model = _weights_only(run)
    apply_bottleneck(model, AdapterConfig(placement=placement, reduction_factor=4, activation=act))
    params = dict(model.named_parameters())
    theirs = load_file(str(tmp_path / "adapter.safetensors"))
    assert {_ours(n, placement) for n in theirs} == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for n, w in theirs.items():
            params[_ours(n, placement)].copy_(w)
    ref = load_file(str(tmp_path / "logits.safetensors"))
    with torch.no_grad():
        logits, _ = model(ref["ids"], ref["ids"])  # targets given: logits at every position
        plain, _ = _weights_only(run)(ref["ids"], ref["ids"])
    assert torch.allclose(logits, ref["logits"], atol=1e-4), (logits - ref["logits"]).abs().max()
    assert (plain - ref["logits"]).abs().max() > 1e-2  # the adapters change the output: it is checked


def test_starts_at_the_base_and_trains_only_adapters() -> None:
    from gptkit.config import ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    x = torch.randint(0, 50, (2, 16))
    before, _ = model(x, x)
    adapters = apply_bottleneck(model, AdapterConfig(placement="houlsby", reduction_factor=8))
    after, _ = model(x, x)
    assert torch.equal(before, after)  # up starts at zero: exactly the base
    assert len(adapters.saved) == 2 * 2 * 4 and not adapters.mergeable
    assert all(isinstance(model.get_submodule(n), AdaptedLinear) for n in adapters.targets)
    assert model.blocks[0].attn.c_proj.adapter.down.out_features == 4  # 32 / 8
    norms = apply_bottleneck(GPT(model.config), AdapterConfig(placement="pfeiffer", train_norms=True))
    assert any(".ln_1." in n for n in norms.saved) and len(norms.targets) == 2
