"""raylora: hyperparameter sweeps of LoRA and QLoRA adapter fine-tuning for Hugging Face models on Ray.

The public names are imported on first use: `import raylora` (and the `raylora` command's `--help`) does
not wait for torch, transformers or Ray; `raylora.train` or `raylora.run_sweep` brings in what they need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "AdapterConfig": "raylora.config",
    "ConfigError": "raylora.config",
    "DataConfig": "raylora.config",
    "FinetuneConfig": "raylora.config",
    "ModelConfig": "raylora.config",
    "Resources": "raylora.sweep",
    "Sweep": "raylora.sweep",
    "SweepResult": "raylora.sweep",
    "TrainResult": "raylora.training",
    "TrainingConfig": "raylora.config",
    "demo_config": "raylora.config",
    "load_sweep": "raylora.sweep",
    "run_sweep": "raylora.sweep",
    "train": "raylora.training",
}

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

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
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
    from raylora.training import TrainResult, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raylora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
