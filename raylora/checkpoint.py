"""Adapter directories and resumable checkpoints: what a run writes to disk and reads back.

An adapter directory loads on its own with plain peft: the adapter weights and config, the tokenizer, and
`raylora_config.json` (the run config and the resolved target modules). A checkpoint is an adapter directory
plus `trainer_state.pt`: optimizer, scheduler and step, enough to continue the run exactly
(`raylora.recipe` says why no RNG state is needed). Frozen base weights are never written.

Under FSDP2 the adapter and optimizer state are gathered to full tensors on rank 0's CPU, so a checkpoint is
the same file whatever the worker count; only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from raylora.config import ConfigError, FinetuneConfig
from raylora.distributed import Workers
from raylora.names import ADAPTER_RUN_CONFIG, CHECKPOINT_STATE_FILE

__all__ = [
    "checkpoint_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "name_base_as_given",
    "read_trainer_state",
    "save_adapter",
    "save_checkpoint",
    "write_run_files",
    "write_trainer_state",
]

_CHECKPOINT_PREFIX = "step-"
# Checkpoints kept under `output_dir/checkpoints`: the newest and the one before it.
_KEEP = 2
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Gathers sharded (FSDP2) adapter weights into full tensors on rank 0's CPU; frozen base weights never leave.
    return get_model_state_dict(model, options=_FULL)


def save_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    target_modules: list[str],
    directory: Path,
    workers: Workers,
) -> dict[str, torch.Tensor]:
    """An adapter directory that loads on its own: peft weights and config, tokenizer, the resolved run config.

    A collective under FSDP2: every rank must call it. Returns the adapter weights under this model's own
    parameter names (rank 0), for the trainer state.
    """
    state = _adapter_state(model)
    if workers.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        resolved = name_base_as_given(model, config.model.name_or_path)
        model.save_pretrained(str(directory), state_dict=state)
        write_run_files(directory, tokenizer, config, target_modules, loaded_from=resolved)
    return state


def write_run_files(
    directory: Path,
    tokenizer: Any,
    config: FinetuneConfig,
    target_modules: list[str],
    *,
    loaded_from: str | None = None,
) -> None:
    """What an adapter directory holds beside peft's files: the tokenizer and the resolved run config.

    `loaded_from` is where the base was loaded from (`name_base_as_given`): the model card peft writes names
    the base by it too (`base_model:`); it is replaced by the id the user gave.
    """
    name = config.model.name_or_path
    card = directory / "README.md"
    if loaded_from and loaded_from != name and card.exists():
        card.write_text(card.read_text().replace(loaded_from, name))
    tokenizer.save_pretrained(str(directory))
    _write_json(
        directory / ADAPTER_RUN_CONFIG, {**config.to_dict(), "resolved_target_modules": target_modules}
    )


def name_base_as_given(model: torch.nn.Module, name: str) -> str | None:
    """Point the adapter configs' `base_model_name_or_path` at the model id the user gave.

    peft records where the base was loaded from, which for a preset is raylora's local cache: a path that
    means nothing on another machine or in the model registry. Returns the path the base was loaded from.
    """
    for peft_config in getattr(model, "peft_config", {}).values():
        peft_config.base_model_name_or_path = name
    base_config = (
        getattr(model.get_base_model(), "config", None) if hasattr(model, "get_base_model") else None
    )
    return getattr(base_config, "_name_or_path", None)


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    target_modules: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: FinetuneConfig,
    workers: Workers,
) -> Path:
    """Write `output_dir/checkpoints/step-NNNNNN/` and return it; older checkpoints beyond the last two go."""
    directory = checkpoint_dir(config, step)
    adapter_state = save_adapter(model, tokenizer, config, target_modules, directory, workers)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if workers.is_main:
        write_trainer_state(
            directory,
            step=step,
            adapter=adapter_state,
            optimizer=optimizer_state,
            scheduler=scheduler.state_dict(),
            config=config,
            world_size=workers.world_size,
        )
    workers.barrier()
    return directory


def checkpoint_dir(config: FinetuneConfig, step: int) -> Path:
    """Where the checkpoint of `step` goes: `output_dir/checkpoints/step-NNNNNN`."""
    return Path(config.training.output_dir) / "checkpoints" / f"{_CHECKPOINT_PREFIX}{step:06d}"


def write_trainer_state(
    directory: Path,
    *,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    config: FinetuneConfig,
    world_size: int,
) -> None:
    """The resumable part of a checkpoint, then the pruning of older checkpoints beside it.

    `adapter` holds the adapter weights under the model's own parameter names (adapter "default") and
    `optimizer` the full optimizer state dict keyed by the same names (as
    `torch.distributed.checkpoint.state_dict` writes it), so that a resume restores both through
    `set_model_state_dict` / `set_optimizer_state_dict`, which also re-shard them under FSDP2.
    """
    state = {
        "step": step,
        "adapter": adapter,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "config": config.to_dict(),
        "world_size": world_size,
    }
    torch.save(state, directory / CHECKPOINT_STATE_FILE)
    for old in sorted(directory.parent.glob(f"{_CHECKPOINT_PREFIX}*"))[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory.

    Raises:
        ConfigError: the directory is not a raylora checkpoint.
    """
    state_file = directory / CHECKPOINT_STATE_FILE
    if not state_file.exists():
        raise ConfigError(
            f"`resume_from` {str(directory)!r} is not a raylora checkpoint (it has no {CHECKPOINT_STATE_FILE}); "
            "pass a `checkpoints/step-*` directory of an earlier run"
        )
    return torch.load(state_file, map_location="cpu", weights_only=False)


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restore adapter weights, optimizer and scheduler from a checkpoint directory; return its step.

    Raises:
        ConfigError: the directory is not a raylora checkpoint, or holds another adapter shape.
    """
    state = read_trainer_state(directory)
    # Key names from the sharded state dict: the full one (_FULL) is empty on every rank but 0.
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    if set(state["adapter"]) != expected:
        missing = sorted(expected - set(state["adapter"]))[:3]
        raise ConfigError(
            f"checkpoint {str(directory)!r} was written for another adapter shape (no weights for e.g. {missing}); "
            "resume with the `adapter` config that wrote it"
        )
    set_model_state_dict(
        model, state["adapter"], options=StateDictOptions(full_state_dict=True, strict=False)
    )
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete checkpoint under `output_dir/checkpoints`, or None."""
    root = Path(output_dir) / "checkpoints"
    complete = [
        d for d in sorted(root.glob(f"{_CHECKPOINT_PREFIX}*")) if (d / CHECKPOINT_STATE_FILE).exists()
    ]
    return str(complete[-1]) if complete else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
