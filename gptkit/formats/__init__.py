"""Formats in and out: `transformers` folders (`hf`) and GGUF for llama.cpp (`gguf`)."""
