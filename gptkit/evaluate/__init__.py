"""Evaluation: loss and bits per byte on token streams (`loss`), response loss and answer match on
instruction files (`instructions`), lm-eval's benchmarks through a gptkit run (`harness`)."""
