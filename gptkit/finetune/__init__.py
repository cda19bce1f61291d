"""Instruction fine-tuning: records -> conversations -> padded batches (`instructions`), starting,
resuming and merging a fine-tune of a base run (`instruct`), the synthetic demo tasks (`tasks`).
The methods that adapt the weights live in `gptkit.peft`."""
