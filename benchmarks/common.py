"""Shared helpers for the benchmarks: medians over repeats, the machine's matmul peaks, and the
random-weight runs at published shapes that the CPU decoding benchmarks compare."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a square n x n matmul on this machine, median of repeats."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, repeats)


def training_step(cfg, vocab: int = 65, device: str = "cpu") -> Callable[[], None]:  # noqa: ANN001
    """One training step of a gptkit config as `gptkit.training.train` runs it (its optimizers, autocast,
    clipping, torch.compile when train.compile), on a fixed random batch: for timing
    configurations against each other. The config is not modified."""
    from gptkit.model import GPT
    from gptkit.runtime import autocast_context, resolve_dtype
    from gptkit.training.optim import build_optimizers

    dev = torch.device(device)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=vocab)).to(dev)
    forward = torch.compile(model) if cfg.train.compile else model
    optimizers = build_optimizers(model, cfg.train, dev)
    amp = autocast_context(dev, resolve_dtype(cfg.train.dtype, dev))
    x = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.block_size), device=dev)
    y = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.block_size), device=dev)

    def step() -> None:
        with amp:
            loss = forward(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    return step


def answer_timings(conn, step: Callable[[], None], cold_step: bool = True) -> None:  # noqa: ANN001
    """A benchmark worker's loop: warm `step` up, say "ready", then each time the parent sends n,
    time n steps and send back their median (0 ends it). cold_step: one untimed step first each
    round, since the other settings ran in between and the caches are cold."""
    step()
    step()
    conn.send("ready")
    while (n := conn.recv()) > 0:
        if cold_step:
            step()
        conn.send(median_time(step, n, warmup=0))


ROOT = Path(__file__).resolve().parents[1]


def run_folder(shape: str, tmp: Path) -> Path:
    """A gptkit run at `shape` with random weights, made through `gptkit convert` from a
    transformers model (GPT-2's tokenizer for GPT-2; a small byte-level BPE for SmolLM2's shape,
    its other rows unused)."""
    from gptkit.formats.hf import import_hf

    torch.manual_seed(0)
    if shape == "gpt2-124M":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp / "hf")
        return import_hf(tmp / "hf", tmp / "run", tokenizer=str(ROOT / "tests" / "data" / "gpt2"))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp / "hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([(ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text()[:200_000]], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp / "hf")
    return import_hf(tmp / "hf", tmp / "run")


def llama(path: Path, n_ctx: int, threads: int = 2) -> object:
    """llama.cpp (llama-cpp-python) on a GGUF file, f32 KV cache, without its repacked weight
    buffers (with them llama.cpp segfaults in decode on q8_0 files on this machine's CPU)."""
    import llama_cpp

    defaults = llama_cpp.llama_model_default_params

    def no_repacking() -> object:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               verbose=False, type_k=0, type_v=0, logits_all=True)  # fmt: skip
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
