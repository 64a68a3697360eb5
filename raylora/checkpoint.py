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
from raylora.names import ADAPTER_RUN_CONFIG, CHECKPOINT_STATE_FILE, RUN_CONFIG_MODEL_PLAN

__all__ = ["latest_checkpoint", "load_checkpoint", "save_adapter", "save_checkpoint"]

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
    *,
    model_plan: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """An adapter directory that loads on its own: peft weights and config, tokenizer, the resolved run config.

    `raylora_config.json` holds the run config, the resolved target modules and, when given, `model_plan`
    (`raylora.model.ModelPlan.as_params`: attention kernel, adapted experts, weights QLoRA left unquantised).
    A collective under FSDP2: every rank must call it. Returns the adapter weights under this model's own
    parameter names (rank 0), for the trainer state.
    """
    state = _adapter_state(model)
    if workers.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory), state_dict=state)
        tokenizer.save_pretrained(str(directory))
        run_config = {**config.to_dict(), "resolved_target_modules": target_modules}
        if model_plan is not None:
            run_config[RUN_CONFIG_MODEL_PLAN] = model_plan
        _write_json(directory / ADAPTER_RUN_CONFIG, run_config)
    return state


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    target_modules: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: FinetuneConfig,
    workers: Workers,
    *,
    model_plan: dict[str, str] | None = None,
) -> Path:
    """Write `output_dir/checkpoints/step-NNNNNN/` and return it; older checkpoints beyond the last two go."""
    root = Path(config.training.output_dir) / "checkpoints"
    directory = root / f"{_CHECKPOINT_PREFIX}{step:06d}"
    adapter_state = save_adapter(
        model, tokenizer, config, target_modules, directory, workers, model_plan=model_plan
    )
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if workers.is_main:
        state = {
            "step": step,
            # The same weights under this model's own parameter names, so resume restores them through
            # set_model_state_dict, which also re-shards them under FSDP2.
            "adapter": adapter_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "config": config.to_dict(),
            "world_size": workers.world_size,
        }
        torch.save(state, directory / CHECKPOINT_STATE_FILE)
        for old in sorted(root.glob(f"{_CHECKPOINT_PREFIX}*"))[:-_KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    workers.barrier()
    return directory


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
    state_file = directory / CHECKPOINT_STATE_FILE
    if not state_file.exists():
        raise ConfigError(
            f"`resume_from` {str(directory)!r} is not a raylora checkpoint (it has no {CHECKPOINT_STATE_FILE}); "
            "pass a `checkpoints/step-*` directory of an earlier run"
        )
    state = torch.load(state_file, map_location="cpu", weights_only=False)
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
