"""Small Llama, Qwen2 and Qwen3 folders made here with `transformers` (random weights, no
downloads): a byte-level BPE trained on tiny Shakespeare with each family's special tokens,
and chat templates written for these tests in the styles of Llama 3, ChatML (Qwen) and SmolLM2."""

from __future__ import annotations

from pathlib import Path

import torch

from .conftest import SHAKESPEARE

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2's style: ChatML with a default system message when the conversation has none, and a
# refusal of conversations that do not alternate.
SMOLLM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'user' and loop.previtem is defined and loop.previtem['role'] == 'user' %}"
    "{{ raise_exception('two user messages in a row') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAMILIES = {
    "llama": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"], "<|begin_of_text|>",
              "<|eot_id|>", LLAMA3_TEMPLATE),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", SMOLLM_TEMPLATE),
}  # fmt: skip
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


# How published tokenizers split text before BPE (tokenizer.json's pre_tokenizer): GPT-2's
# byte-level regex (the default here), Llama 3's and Qwen2's Split regexes, SmolLM2's digits.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")  # fmt: skip
PRE_TOKENIZERS = ("gpt2", "llama3", "qwen2", "smollm")


def pre_tokenizer(kind: str) -> object:
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])  # fmt: skip
    regex = LLAMA3_REGEX if kind == "llama3" else LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip


def hf_tokenizer(folder: Path, family: str, vocab_size: int = 300, pre: str = "gpt2") -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, template = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:50_000]], trainer=trainer)
    if bos:  # Llama's tokenizers put BOS before every encoded text
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=template)
    fast.save_pretrained(folder)
    return fast


def hf_model(
    folder: Path, family: str, dtype: torch.dtype = torch.float32, seed: int = 0, pre: str = "gpt2", **shape: object
) -> Path:
    """A random-weight model of `family` saved in `folder`, with its tokenizer (shape: config
    fields over TINY). Weights are drawn wider than the default init so that logits differ."""
    import transformers

    shape = {**TINY, **shape}
    if family == "llama":
        shape.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})  # fmt: skip
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}  # fmt: skip
    config_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**shape))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    tok = hf_tokenizer(folder, family, min(300, int(shape["vocab_size"])), pre)
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.to(dtype).save_pretrained(folder)
    return folder


def gpt2_model(folder: Path, **shape: int | str) -> tuple[object, Path]:
    """A random GPT2LMHeadModel saved in `folder`, every tensor (biases, gains) perturbed so that
    every tensor's mapping is checked."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model, folder
