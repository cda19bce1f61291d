"""Parameter-efficient fine-tuning methods, each a transform of a `GPT` that imports only the
model and its config: LoRA (`lora`)."""
