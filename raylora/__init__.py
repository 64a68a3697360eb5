"""raylora: hyperparameter sweeps of LoRA and QLoRA adapter fine-tuning for Hugging Face models on Ray."""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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

# The training loop imports torch and transformers (seconds): its names load on first use, so that the CLI,
# a job submission or a sweep driver that never trains here does not pay for them.
_FROM_TRAIN = ("TrainResult", "train")


def __getattr__(name: str) -> Any:
    if name in _FROM_TRAIN:
        return getattr(importlib.import_module("raylora.train"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `raylora.train` the function, as `from raylora import train` has always given.

    Importing the submodule `raylora.train` binds it on this package under the same name, which would
    replace the function by the module (eager imports used to rebind it right after).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
