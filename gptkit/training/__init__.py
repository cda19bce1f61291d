"""Training: the one loop (`train`), its optimizers and schedule (`optim`), and DDP / FSDP under
torchrun (`distributed`). Pretraining and fine-tuning both run through `train.train`."""
