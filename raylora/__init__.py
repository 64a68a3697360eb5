"""raylora: hyperparameter sweeps of LoRA and QLoRA adapter fine-tuning for Hugging Face models on Ray."""

from raylora.config import (
    AdapterConfig,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    TrainingConfig,
    demo_config,
)
from raylora.sweep import Resources, Sweep, SweepResult, load_sweep, run_sweep
from raylora.train import TrainResult, train

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "Resources",
    "Sweep",
    "SweepResult",
    "TrainResult",
    "TrainingConfig",
    "demo_config",
    "load_sweep",
    "run_sweep",
    "train",
]

__version__ = "0.1.0"
