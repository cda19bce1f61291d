"""gptkit: build, train, sample from and evaluate GPT-style decoder-only language models."""

from gptkit.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from gptkit.errors import GptkitError

__version__ = "0.1.0"
__all__ = [
    "Config",
    "DataConfig",
    "GptkitError",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "__version__",
]
