"""CPU decoding, tokens/s: gptkit fp32, gptkit int8 and int4 (`gptkit quantize [--scheme int4]`),
transformers fp32, and llama.cpp (llama-cpp-python) on the f32, q8_0 and q4_0 GGUF files
`gptkit export --to-gguf` writes from the same weights. GPT-2 124M shape and SmolLM2-135M's,
random weights, a 16-token prompt then 128 greedy tokens (prefill included), batch 1 and 8
(llama.cpp's Python API decodes one sequence: batch 1 only), 2 threads everywhere. Rounds are interleaved; medians.
gptkit int8 at batch 1 quantizes each token's activations to int8 too (the default); int8_bf16act
is the same weights with weight-only products (`gptkit quantize --activations bf16`). Batch-1 steps
run natively (gptkit/inference/native.py, the default); the _eager rows are the same models with
GPTKIT_NATIVE=0, and the native step's compile (once per machine) and load times are reported.

Then the quality of int8 and int4: a byte-level BPE model trained here for a minute, its
perplexity quantized against fp32 on tiny Shakespeare's validation split and on a held-out text (the responses of
tests/data/llms_from_scratch_instruction_data.json) -- once over whole windows (batched products) and once token by
token through the KV cache at batch 1, the path decoding takes (int8: activations quantized too) -- and the share of 20
prompts whose first 32 greedy tokens equal fp32's.

Then speculative decoding (`--draft`): at each shape a target and a draft about a tenth its size are trained here on
tiny Shakespeare (GPT-2's tokenizer), and batch-1 tokens/s with and without the draft (fp32, int8, int8 weight-only,
int4 targets; the draft int8), greedy and sampled, are measured beside llama.cpp on the target's own GGUF files, with
the acceptance rates, each round's cost in plain decoding steps and the acceptance it would need to pay off. Every draft
run uses the default --draft-min-acceptance (a sequence keeping too few guesses after 8 rounds goes plain); int8 and
fp32 are measured without that switch too (_noswitch). With --distill-draft each draft is distilled from its target
(`gptkit train --teacher TARGET`, distill.weight=1) rather than trained on the text's tokens alone.

    python benchmarks/cpu_decode.py [--rounds 3] [--new-tokens 128] [--shape gpt2-124M smollm2-135M]
        [--parts speed quality speculative] [--spec-train-minutes 8] [--draft-tokens 4]
        [--draft-p-min 0 0.5 0.8] [--keep DIR] [--distill-draft]

Ends with one JSON line including ratio_int8_vs_llamacpp_q8_b1 (GPT-2 124M shape),
ratio_int8_vs_fp32_b8, int8_ppl_change (relative), and the same for int4 against llama.cpp's
q4_0 and q8_0.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, llama, run_folder

from gptkit.config import load_config
from gptkit.data import prepare
from gptkit.formats.gguf import export_gguf
from gptkit.inference.generate import SamplingParams, generate_ids, seeded_generator
from gptkit.inference.quantize import quantize_run
from gptkit.loader import load_model
from gptkit.model import KVCache
from gptkit.training.train import train

PROMPT = 16
THREADS = 2


def speed(shape: str, rounds: int, n: int) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        run = run_folder(shape, tmp)
        fp32, _, cfg = load_model(run)
        int8, _, _ = load_model(quantize_run(run, tmp / "int8"))
        int8w, _, _ = load_model(quantize_run(run, tmp / "int8w", activations="bf16"))
        int4, _, _ = load_model(quantize_run(run, tmp / "int4", "int4"))
        theirs = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
        llms = {t: llama(export_gguf(run, tmp / f"{t}.gguf", t), PROMPT + n + 16, THREADS) for t in ("f32", "q8_0", "q4_0")}
        vocab = min(cfg.model.vocab_size, 1000)
        prompts = {b: torch.randint(0, vocab, (b, PROMPT), generator=torch.Generator().manual_seed(b)) for b in (1, 8)}

        def ours(model: torch.nn.Module, b: int, fast: bool = True) -> float:
            os.environ["GPTKIT_NATIVE"] = "1" if fast else "0"  # eager: every step through PyTorch's ops
            t0 = time.perf_counter()
            count = sum(1 for _ in generate_ids(model, prompts[b], SamplingParams(max_new_tokens=n, temperature=0)))
            assert count == n
            os.environ["GPTKIT_NATIVE"] = "1"
            return b * n / (time.perf_counter() - t0)

        def hf(b: int) -> float:
            p = prompts[b]
            t0 = time.perf_counter()
            with torch.no_grad():
                out = theirs.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)  # fmt: skip
            assert out.shape[1] == PROMPT + n
            return b * n / (time.perf_counter() - t0)

        def cpp(llm: object) -> float:
            llm.reset()
            t0 = time.perf_counter()
            got = list(itertools.islice(llm.generate(prompts[1][0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0), n))
            assert len(got) == n
            return n / (time.perf_counter() - t0)

        runs = {
            ("gptkit_fp32", 1): lambda: ours(fp32, 1),
            ("gptkit_int8", 1): lambda: ours(int8, 1),
            ("gptkit_int8_bf16act", 1): lambda: ours(int8w, 1),
            ("gptkit_int4", 1): lambda: ours(int4, 1),
            ("gptkit_fp32_eager", 1): lambda: ours(fp32, 1, False),
            ("gptkit_int8_eager", 1): lambda: ours(int8, 1, False),
            ("gptkit_int4_eager", 1): lambda: ours(int4, 1, False),
            ("transformers_fp32", 1): lambda: hf(1),
            ("llama.cpp_f32", 1): lambda: cpp(llms["f32"]),
            ("llama.cpp_q8_0", 1): lambda: cpp(llms["q8_0"]),
            ("llama.cpp_q4_0", 1): lambda: cpp(llms["q4_0"]),
            ("gptkit_fp32", 8): lambda: ours(fp32, 8),
            ("gptkit_int8", 8): lambda: ours(int8, 8),
            ("gptkit_int4", 8): lambda: ours(int4, 8),
            ("gptkit_fp32_eager", 8): lambda: ours(fp32, 8, False),
            ("gptkit_int8_eager", 8): lambda: ours(int8, 8, False),
            ("gptkit_int4_eager", 8): lambda: ours(int4, 8, False),
            ("transformers_fp32", 8): lambda: hf(8),
        }
        torch.set_num_threads(THREADS)
        for fn in runs.values():  # warm-up
            fn()
        results: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                results[key].append(fn())
        for llm in llms.values():
            llm.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{shape}: decode tokens/s, {n} new tokens, {THREADS} threads, median of {rounds}")
    for (name, b), v in med.items():
        print(f"  {name:18s} batch {b}: {v:8.1f} tok/s   {v / med[('gptkit_fp32', b)]:.2f}x gptkit fp32")
    out = {f"{name}_b{b}": round(v, 1) for (name, b), v in med.items()}
    for s in ("fp32", "int8", "int4"):
        for b in (1, 8):
            out[f"native_vs_eager_{s}_b{b}"] = round(med[(f"gptkit_{s}", b)] / med[(f"gptkit_{s}_eager", b)], 2)
    return out


def native_start() -> dict:
    """The native decode step's start-up: compiled from scratch (once per machine; in a fresh
    process and build folder) and loaded from the compiled cache (every later process)."""
    from gptkit.inference import native

    code = (f"import sys; from torch.utils.cpp_extension import load; sys.path.insert(0, {str(ROOT)!r}); "
            "from gptkit.inference.native import SOURCE, FLAGS; "
            "load('gptkit_decode_cold', [str(SOURCE)], extra_cflags=FLAGS, build_directory=sys.argv[1])")  # fmt: skip
    with tempfile.TemporaryDirectory() as build:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, build], check=True)
        cold = time.perf_counter() - t0
    native.extension()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from gptkit.inference import native; assert native.extension()"], check=True)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gptkit.inference.native"], check=True)
    base = time.perf_counter() - t0
    out = {"native_build_s": round(cold, 1), "native_load_s": round(warm - base, 2)}
    print(f"\nnative decode step: compiled in {cold:.1f} s (once per machine), loaded in {warm - base:.2f} s")
    return out


def held_out_text() -> str:
    records = json.loads((ROOT / "tests" / "data" / "llms_from_scratch_instruction_data.json").read_text())
    return "\n\n".join(r["output"] for r in records)


def quality(minutes: float) -> dict:
    """Perplexity of int8 and int4 against fp32, and greedy agreement, on a model trained here."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        text = (ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        (tmp / "corpus.txt").write_text(text)
        prepare([str(tmp / "corpus.txt")], tmp / "data", "bpe", vocab_size=2048, progress=False)
        sets = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128", "train.batch_size=16",
                f"train.max_time_s={minutes * 60}", "train.max_steps=100000", "train.eval_interval=100000",
                "train.dtype=float32", "train.tensorboard=false", "train.sample_tokens=0"]  # fmt: skip
        cfg = load_config(None, sets)
        cfg.data.dir = str(tmp / "data")
        train(cfg, tmp / "run", progress=False, quiet=True)
        fp32, tok, cfg = load_model(tmp / "run")
        kinds = {"int8": ("int8", "int8"), "int8_bf16act": ("int8", "bf16"), "int4": ("int4", "int8")}
        quantized = {k: load_model(quantize_run(tmp / "run", tmp / k, s, activations=a))[0] for k, (s, a) in kinds.items()}
        block = cfg.model.block_size

        def ppl(model: torch.nn.Module, ids: list[int]) -> float:
            x = torch.tensor([ids[i : i + block] for i in range(0, len(ids) - block, block)][:64])
            with torch.no_grad():
                logits = model(x[:, :-1])[0]
            return math.exp(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:]).item())

        def decode_ppl(model: torch.nn.Module, ids: list[int], windows: int = 16) -> float:
            nll, count = 0.0, 0
            with torch.no_grad():
                for i in range(0, block * windows, block):
                    row = torch.tensor(ids[i : i + block])
                    cache = KVCache.empty(model.config, 1, block, torch.device("cpu"), torch.float32)
                    for t in range(block - 1):
                        logits = model(row[None, t : t + 1], cache=cache)[0][0, -1]
                        nll -= logits.log_softmax(-1)[row[t + 1]].item()
                        count += 1
            return math.exp(nll / count)

        texts = {"shakespeare_val": tok.encode(text[int(len(text) * 0.9) :]), "held_out": tok.encode(held_out_text())}
        out = {}
        for name, ids in texts.items():
            a = ppl(fp32, ids)
            out[name] = {"fp32": round(a, 3)}
            for s, model in quantized.items():
                b = ppl(model, ids)
                out[name] |= {s: round(b, 3), f"{s}_change": round(b / a - 1, 5)}
            a = decode_ppl(fp32, ids)
            out[name] |= {"decode_fp32": round(a, 3)}
            for s, model in quantized.items():
                b = decode_ppl(model, ids)
                out[name] |= {f"decode_{s}": round(b, 3), f"decode_{s}_change": round(b / a - 1, 5)}
        ids = texts["shakespeare_val"]
        params = SamplingParams(max_new_tokens=32, temperature=0)
        prompts = [torch.tensor([ids[i * 97 : i * 97 + 16]]) for i in range(20)]

        def greedy(model: torch.nn.Module, p: torch.Tensor) -> list[int]:
            return [int(t) for t in generate_ids(model, p, params)]

        reference = [greedy(fp32, p) for p in prompts]  # fp32's once, for every scheme
        for s, model in quantized.items():
            same = sum(greedy(model, p) == want for p, want in zip(prompts, reference))
            out[f"{s}_greedy_32_same_share"] = same / 20
    print(f"\nint8/int4 quality (BPE model trained {minutes} min): {json.dumps(out)}")
    return out


# Speculative decoding: the target at the shape and a draft about a tenth its size, both trained
# here on tiny Shakespeare with GPT-2's tokenizer (SmolLM2's shape then has 50,257 rows, not
# 49,152), the draft for half the target's minutes, so that it agrees with the target as a draft
# trained on the target's data would.
TARGETS = {
    "gpt2-124M": ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"],
    "smollm2-135M": ["model.n_layer=30", "model.n_head=9", "model.n_kv_head=3", "model.n_embd=576",
                     "model.mlp_size=1536", "model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
                     "model.bias=false", "model.rope_base=100000"],
}  # fmt: skip
DRAFTS = {  # ~11M parameters, most of them the embedding
    "gpt2-124M": ["model.n_layer=4", "model.n_head=3", "model.n_embd=192"],
    "smollm2-135M": ["model.n_layer=4", "model.n_head=3", "model.n_kv_head=1", "model.n_embd=192", "model.mlp_size=512",
                     "model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"],
}  # fmt: skip


DISTILL = ["distill.weight=1.0"]  # a draft distilled from its target: its distributions alone


def trained(shape_sets: list[str], data: Path, out: Path, minutes: float) -> tuple[Path, dict]:
    """A run trained for `minutes`, and its steps and final validation loss."""
    sets = [*shape_sets, "model.block_size=256", "train.batch_size=4", f"train.max_time_s={minutes * 60}",
            "train.max_steps=100000", "train.warmup_steps=20", "train.eval_interval=100000", "train.dtype=bfloat16",
            "train.tensorboard=false", "train.sample_tokens=0"]  # fmt: skip
    cfg = load_config(None, sets)
    cfg.data.dir = str(data)
    result = train(cfg, out, progress=False, quiet=True)
    return out, {"steps": result.step, "val_loss": round(result.val.get("loss", float("nan")), 3)}


def speculative(shape: str, rounds: int, n: int, minutes: float, k: int, p_mins: list[float], keep: Path | None,
                distill: bool = False) -> dict:  # fmt: skip
    """Batch-1 greedy tokens/s with and without a draft (fp32 / int8 / int4 targets, the draft
    int8), beside llama.cpp on the same trained target's GGUF files, and the acceptance rates,
    greedy and sampled; the first of p_mins for every target, the others for fp32 and int8. Every
    greedy speculative sample is checked to equal the target's own. keep: a folder where the
    trained target and draft stay, and are reused by the next run. distill: the draft learns the
    target's distributions (distill.weight=1) instead of the data's tokens."""
    from gptkit.inference.speculative import default_min_acceptance, load_speculator

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        kept = (keep / shape) if keep else tmp
        text = (ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        t0 = time.perf_counter()
        if not (kept / "draft" / "checkpoint").is_dir():  # a kept target stays: a new draft learns from it
            (tmp / "corpus.txt").write_text(text)
            prepare([str(tmp / "corpus.txt")], tmp / "data", f"gpt2:{ROOT / 'tests' / 'data' / 'gpt2'}", progress=False)
            record = kept / "training.json"
            training = json.loads(record.read_text()) if record.is_file() else {}
            if not (kept / "target" / "checkpoint").is_dir():
                training["target_training"] = trained(TARGETS[shape], tmp / "data", kept / "target", minutes)[1]
            teacher = [*DISTILL, f"distill.teacher={kept / 'target'}"] if distill else []
            training["draft_training"] = trained(DRAFTS[shape] + teacher, tmp / "data", kept / "draft", minutes / 2)[1]
            record.write_text(json.dumps(training | {"draft_distilled": distill}))
        training = json.loads((kept / "training.json").read_text())
        target_run, draft_run = kept / "target", kept / "draft"
        trained_s = time.perf_counter() - t0
        fp32, tok, _ = load_model(target_run)
        # int8_bf16act: weight-only products, whose numbers do not depend on the row count, so a
        # verification costs less than int8's row-by-row products
        targets = {"fp32": fp32, "int8": load_model(quantize_run(target_run, tmp / "int8"))[0],
                   "int8_bf16act": load_model(quantize_run(target_run, tmp / "int8w", activations="bf16"))[0],
                   "int4": load_model(quantize_run(target_run, tmp / "int4", "int4"))[0]}  # fmt: skip
        draft_int8 = quantize_run(draft_run, tmp / "draft-int8")
        t0 = time.perf_counter()
        specs = {pm: load_speculator(draft_int8, fp32, tok, k, p_min=pm) for pm in p_mins}
        draft_load_s = (time.perf_counter() - t0) / len(p_mins)
        sizes = {"target_params": fp32.num_params(False), "draft_params": specs[p_mins[0]].draft.num_params(False), **training}
        ids = tok.encode(text[int(len(text) * 0.9) :])
        prompts = [torch.tensor([ids[i * 499 : i * 499 + PROMPT]]) for i in range(3)]  # held-out text
        llms = {t: llama(export_gguf(target_run, tmp / f"{t}.gguf", t), PROMPT + n + 16, THREADS) for t in ("f32", "q8_0")}
        greedy = SamplingParams(max_new_tokens=n, temperature=0)
        reference: dict[str, list[list[int]]] = {}

        def ours(kind: str, p_min: float | None, params: SamplingParams = greedy, switch: bool = True) -> float:
            model, used = targets[kind], specs.get(p_min)
            if used is not None:  # a sequence keeping too few guesses goes plain (--draft-min-acceptance)
                used.min_acceptance = default_min_acceptance(model) if switch else 0.0
            t0 = time.perf_counter()
            outs = [[int(t) for t in generate_ids(model, p, params, seeded_generator(i), speculator=used)]
                    for i, p in enumerate(prompts)]  # fmt: skip
            took = time.perf_counter() - t0
            if params.temperature == 0:  # speculation's greedy tokens are the target's own
                assert reference.setdefault(kind, outs) == outs, f"{kind}: speculative greedy tokens differ"
            return len(prompts) * n / took

        def cpp(llm: object) -> float:
            t0 = time.perf_counter()
            for p in prompts:
                llm.reset()
                got = list(itertools.islice(llm.generate(p[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0), n))
                assert len(got) == n
            return len(prompts) * n / (time.perf_counter() - t0)

        def label(kind: str, p_min: float | None, sampled: str = "") -> str:
            draft = "" if p_min is None else "_draft" if p_min == p_mins[0] else f"_draft_pmin{p_min}"
            return f"gptkit_{kind}{draft}{sampled}"

        sampled = SamplingParams(max_new_tokens=n, temperature=0.8)
        runs, which = {}, {}
        for kind in targets:
            for pm in [None, *(p_mins if kind in ("fp32", "int8") else p_mins[:1])]:
                runs[label(kind, pm)] = functools.partial(ours, kind, pm)
                which[label(kind, pm)] = pm
        for pm in [None, *p_mins]:
            runs[label("int8", pm, "_sampled")] = functools.partial(ours, "int8", pm, sampled)
            which[label("int8", pm, "_sampled")] = pm
        for kind, params, sampled_label in (("int8", greedy, ""), ("fp32", greedy, ""), ("int8", sampled, "_sampled")):
            key = label(kind, p_mins[0], "_noswitch" + sampled_label)  # every sequence speculates to its end
            runs[key] = functools.partial(ours, kind, p_mins[0], params, False)
            which[key] = p_mins[0]
        runs |= {f"llama.cpp_{t}": functools.partial(cpp, llm) for t, llm in llms.items()}
        torch.set_num_threads(THREADS)
        for fn in runs.values():  # warm-up (and the greedy references)
            fn()
        results: dict[str, list[float]] = {key: [] for key in runs}
        counts: dict[str, list[int]] = {key: [0, 0, 0] for key in runs if which.get(key) is not None}  # proposed, kept, rounds
        switched = dict.fromkeys(counts, 0)  # sequences switched to plain decoding
        for _ in range(rounds):
            for key, fn in runs.items():
                spec = specs.get(which.get(key))
                before = (spec.proposed, spec.accepted, spec.rounds, spec.switched_off) if spec else ()
                results[key].append(fn())
                for i, now in enumerate((spec.proposed, spec.accepted, spec.rounds) if spec else ()):
                    counts[key][i] += now - before[i]
                if spec:
                    switched[key] += spec.switched_off - before[3]
        for llm in llms.values():
            llm.close()
    med = {key: statistics.median(v) for key, v in results.items()}
    out = {f"{key}_b1": round(v, 1) for key, v in med.items()}
    for key, (proposed, kept_guesses, n_rounds) in counts.items():
        out[f"acceptance_{key}"] = round(kept_guesses / max(proposed, 1), 3)
        out[f"guesses_per_pass_{key}"] = round(proposed / n_rounds, 2)
        per_pass = (kept_guesses + n_rounds) / n_rounds
        out[f"tokens_per_pass_{key}"] = round(per_pass, 2)
        plain = med[label(key.split("_draft")[0].removeprefix("gptkit_"), None, "_sampled" if key.endswith("_sampled") else "")]
        out[f"switched_off_{key}"] = switched[key]
        out[f"speedup_{key}"] = round(med[key] / plain, 2)
        if which[key] == 0.0 and not switched[key]:  # a round's cost in plain steps, and the acceptance that pays for it
            cost = per_pass * plain / med[key]
            out[f"round_cost_steps_{key}"] = round(cost, 2)
            out[f"break_even_acceptance_{key}"] = acceptance_for(cost, k)
    out |= sizes | {"draft_tokens": k, "draft_p_mins": p_mins, "train_minutes_target": minutes,
                    "train_s": round(trained_s), "draft_load_s": round(draft_load_s, 2)}  # fmt: skip
    best = max((key for key in med if key.startswith("gptkit_int8_draft") and "sampled" not in key), key=med.get)
    out["ratio_int8_vs_llamacpp_q8"] = round(med["gptkit_int8"] / med["llama.cpp_q8_0"], 2)
    out["ratio_int8_draft_vs_llamacpp_q8"] = round(med[best] / med["llama.cpp_q8_0"], 2)
    print(f"\n{shape}, trained target and draft: decode tokens/s at batch 1 (greedy unless sampled), median of {rounds}")
    for key, v in med.items():
        print(f"  {key:34s} {v:8.1f} tok/s   {v / med['llama.cpp_q8_0']:.2f}x llama.cpp q8_0")
    print(f"  {json.dumps(out)}")
    return out


def acceptance_for(tokens: float, k: int) -> float | None:
    """The acceptance rate a at which a round yields `tokens` on average, (1 - a^(k+1)) / (1 - a)
    with guesses kept independently; None past k + 1 (no acceptance reaches it)."""
    if tokens >= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid**i for i in range(k + 1)) < tokens else (lo, mid)
    return round(lo, 3)


def largest_change(q: dict, scheme: str) -> float:
    """The perplexity change of largest size, over both texts, whole windows and decoding."""
    keys = (f"{scheme}_change", f"decode_{scheme}_change")
    return max((v[k] for v in q.values() if isinstance(v, dict) for k in keys), key=abs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shape", nargs="+", default=["gpt2-124M", "smollm2-135M"], choices=["gpt2-124M", "smollm2-135M"])
    ap.add_argument("--train-minutes", type=float, default=1.0)
    parts = ["speed", "quality", "speculative"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--spec-train-minutes", type=float, default=8.0, help="minutes of training for each target (drafts: half)")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--draft-p-min", type=float, nargs="+", default=[0.0, 0.5, 0.8],
                    help="the first for every target, the others for fp32 and int8")  # fmt: skip
    ap.add_argument("--keep", type=Path, help="keep the trained targets and drafts here, and reuse them")
    ap.add_argument("--distill-draft", action="store_true", help="train each draft on its target's distributions (--teacher)")
    a = ap.parse_args()
    result: dict = {"new_tokens": a.new_tokens}
    if "speculative" in a.parts:
        for shape in a.shape:
            result[f"{shape}_speculative"] = speculative(shape, a.rounds, a.new_tokens, a.spec_train_minutes, a.draft_tokens,
                                                         a.draft_p_min, a.keep, a.distill_draft)  # fmt: skip
    if "speed" in a.parts:
        result |= native_start()
        for shape in a.shape:
            result[shape] = speed(shape, a.rounds, a.new_tokens)
    if "quality" in a.parts:
        result["quality"] = quality(a.train_minutes)
    if "speed" not in a.parts or "quality" not in a.parts:
        print(json.dumps(result))
        return
    q = result["quality"]
    first = result[a.shape[0]]
    result["ratio_int8_vs_llamacpp_q8_b1"] = round(first["gptkit_int8_b1"] / first["llama.cpp_q8_0_b1"], 2)
    result["ratio_int8_vs_fp32_b8"] = round(first["gptkit_int8_b8"] / first["gptkit_fp32_b8"], 2)
    result["int8_ppl_change"] = largest_change(q, "int8")
    result["ratio_int4_vs_llamacpp_q4_b1"] = round(first["gptkit_int4_b1"] / first["llama.cpp_q4_0_b1"], 2)
    result["ratio_int4_vs_llamacpp_q8_b1"] = round(first["gptkit_int4_b1"] / first["llama.cpp_q8_0_b1"], 2)
    result["int4_ppl_change"] = largest_change(q, "int4")
    result["ratio_int8_bf16act_vs_llamacpp_q8_b1"] = round(first["gptkit_int8_bf16act_b1"] / first["llama.cpp_q8_0_b1"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
