"""What a run writes to disk and reads back: adapter directories, resumable checkpoints, the run record.

An adapter directory loads on its own with plain peft: the adapter weights and config, the tokenizer, and
`raylora_config.json` (the run config and the resolved target modules). A checkpoint is an adapter directory
plus `trainer_state.pt`: optimizer, scheduler, step, world size and the run's counters (tokens seen, training
and wall time), enough to continue the run exactly (`raylora.recipe` says why no RNG state is needed).
Frozen base weights are never written, nor the quantisation state (absmax, quant maps) of a QLoRA base: only
the trained parameters.

Every directory is written under a temporary name beside its final one and renamed into place once complete,
so a kill or a full disk mid-save leaves the previous checkpoint as the latest; a full disk is reported as
such (`DiskFullError`). A checkpoint that does not load all the same (a file damaged later) is skipped with
a warning by `latest_checkpoint`.

Secrets never reach these files: configs are written with `FinetuneConfig.to_dict()`, which leaves
`model.token` out (a resumed run takes the token from the config it is given, or the environment).

`output_dir/raylora_run.json` records which run owns an output directory: its config and worker count. Two
runs are the same run when their configs agree in every field except `training.max_steps` (a run may be
continued further), `training.output_dir` (a directory may move) and secrets (never saved), and they use the
same number of workers. `check_output_dir` refuses a directory that holds another run, a fresh start over a
run's files, and a checkpoint of another run, naming the fields that differ.

Under FSDP2 the adapter and optimizer state are gathered to full tensors on rank 0's CPU, so a checkpoint is
the same file whatever the worker count; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
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
from raylora.names import (
    ADAPTER_RUN_CONFIG,
    CHECKPOINT_STATE_FILE,
    METRICS_FILE,
    RUN_CONFIG_MODEL_PLAN,
    RUN_RECORD,
)
from raylora.redaction import is_secret_name

__all__ = [
    "RESUMABLE_CHANGES",
    "DiskFullError",
    "atomic_directory",
    "check_output_dir",
    "checkpoint_dir",
    "config_differences",
    "latest_checkpoint",
    "load_checkpoint",
    "name_base_as_given",
    "prune_checkpoints",
    "read_trainer_state",
    "save_adapter",
    "save_checkpoint",
    "write_run_files",
    "write_run_record",
    "write_trainer_state",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_NAME = re.compile(rf"^{_CHECKPOINT_PREFIX}(\d+)$")
# Checkpoints kept under `output_dir/checkpoints`: the newest and the one before it.
_KEEP = 2
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Config fields in which a continued run may differ from the run that wrote its checkpoint.
RESUMABLE_CHANGES = ("training.max_steps", "training.output_dir")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A checkpoint or adapter could not be written because its disk is full; the previous one is intact."""


# ---- writing ---------------------------------------------------------------------------------------------


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters, gathered (FSDP2) to full tensors on rank 0's CPU; empty on the other ranks.

    Only parameters that train: `ignore_frozen_params` drops frozen parameters but keeps every other state
    dict entry, and a 4-bit base keeps its quantisation state (absmax, quant maps, nested_*) there.
    """
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v for k, v in get_model_state_dict(model, options=_FULL).items() if k in trained}


def _state_bytes(*states: Any) -> int:
    """Bytes of the tensors in (nested) state dicts: what a checkpoint of them needs on disk, roughly."""
    total = 0
    for state in states:
        if isinstance(state, torch.Tensor):
            total += state.numel() * state.element_size()
        elif isinstance(state, dict):
            total += _state_bytes(*state.values())
        elif isinstance(state, list | tuple):
            total += _state_bytes(*state)
    return total


@contextlib.contextmanager
def atomic_directory(directory: Path, *, needs_bytes: int = 0) -> Iterator[Path]:
    """Write `directory` as a whole: yields a temporary sibling that replaces `directory` once the block ends.

    A kill mid-write leaves the temporary directory (a name `latest_checkpoint` never picks), not a half
    written checkpoint. Files are flushed to disk before the rename.

    Args:
        directory: the final path; an existing one is replaced.
        needs_bytes: roughly what the write needs, for the message when the disk is full.

    Raises:
        DiskFullError: the disk filled up during the write (nothing of it is left behind).
    """
    temporary = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                with file.open("rb") as handle:
                    os.fsync(handle.fileno())
    except Exception as error:
        full = _disk_full(directory, error, needs_bytes)  # before the clean-up frees what the write took
        shutil.rmtree(temporary, ignore_errors=True)
        if full:
            raise DiskFullError(errno.ENOSPC, _disk_full_message(directory, needs_bytes)) from error
        raise
    if directory.exists():
        stale = directory.with_name(f".{directory.name}.replaced")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(directory, stale)
        os.replace(temporary, directory)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary, directory)


def _disk_full(directory: Path, error: BaseException, needs_bytes: int) -> bool:
    """Whether a write under `directory` failed because the disk is full.

    torch.save reports a full disk as a bare stream error ("unexpected pos"), so besides the errno the free
    space itself decides: less than the write needs.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(
        getattr(e, "errno", None) in _DISK_FULL_ERRNOS
        or "No space left on device" in str(e)
        or "Disk quota exceeded" in str(e)
        for e in chain
    ):
        return True
    try:
        return shutil.disk_usage(directory.parent).free < max(needs_bytes, 1)
    except OSError:
        return False


def _disk_full_message(directory: Path, needs_bytes: int) -> str:
    try:
        room = f"{_mib(shutil.disk_usage(directory.parent).free)} free"
    except OSError:
        room = "no space left"
    need = f", and it needs about {_mib(needs_bytes)}" if needs_bytes else ""
    return (
        f"the disk holding {directory.parent} is full ({room}{need}): {directory.name} could not be written "
        "and was not left half-written; earlier checkpoints are intact. Free some space or set "
        "`training.output_dir` on a larger disk, then continue with `raylora train --resume`"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def save_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    target_modules: list[str],
    directory: Path,
    workers: Workers,
    *,
    model_plan: dict[str, str] | None = None,
) -> None:
    """An adapter directory that loads on its own: peft weights and config, tokenizer, the resolved run config.

    `raylora_config.json` holds the run config, the resolved target modules and, when given, `model_plan`
    (`raylora.model.ModelPlan.as_params`: attention kernel, adapted experts, weights QLoRA left unquantised).
    A collective under FSDP2: every rank must call it; rank 0 writes, atomically.

    Raises:
        DiskFullError: the disk is full.
    """
    state = _adapter_state(model)
    if workers.is_main:
        with atomic_directory(directory, needs_bytes=_state_bytes(state)) as temporary:
            _write_adapter(model, tokenizer, config, target_modules, temporary, state, model_plan)


def _write_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    target_modules: list[str],
    directory: Path,
    state: dict[str, torch.Tensor],
    model_plan: dict[str, str] | None,
) -> None:
    resolved = name_base_as_given(model, config.model.name_or_path)
    model.save_pretrained(str(directory), state_dict=state)
    write_run_files(directory, tokenizer, config, target_modules, loaded_from=resolved, model_plan=model_plan)


def write_run_files(
    directory: Path,
    tokenizer: Any,
    config: FinetuneConfig,
    target_modules: list[str],
    *,
    loaded_from: str | None = None,
    model_plan: dict[str, str] | None = None,
) -> None:
    """What an adapter directory holds beside peft's files: the tokenizer and the resolved run config (with
    the run's `model_plan`, when given).

    `loaded_from` is where the base was loaded from (`name_base_as_given`): the model card peft writes names
    the base by it too (`base_model:`); it is replaced by the id the user gave. The config is written without
    secrets (`FinetuneConfig.to_dict`).
    """
    name = config.model.name_or_path
    card = directory / "README.md"
    if loaded_from and loaded_from != name and card.exists():
        card.write_text(card.read_text().replace(loaded_from, name))
    tokenizer.save_pretrained(str(directory))
    run_config = {**config.to_dict(), "resolved_target_modules": target_modules}
    if model_plan is not None:
        run_config[RUN_CONFIG_MODEL_PLAN] = model_plan
    _write_json(directory / ADAPTER_RUN_CONFIG, run_config)


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
    *,
    counters: dict[str, float] | None = None,
    model_plan: dict[str, str] | None = None,
) -> Path:
    """Write `output_dir/checkpoints/step-NNNNNN/` atomically and return it; then prune (`prune_checkpoints`).

    A collective under FSDP2: every rank must call it; rank 0 writes.

    Raises:
        DiskFullError: the disk is full; the checkpoints written before are intact.
    """
    directory = checkpoint_dir(config, step)
    adapter_state = _adapter_state(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if workers.is_main:
        needs = 2 * _state_bytes(adapter_state) + _state_bytes(optimizer_state)
        with atomic_directory(directory, needs_bytes=needs) as temporary:
            _write_adapter(model, tokenizer, config, target_modules, temporary, adapter_state, model_plan)
            write_trainer_state(
                temporary,
                step=step,
                adapter=adapter_state,
                optimizer=optimizer_state,
                scheduler=scheduler.state_dict(),
                config=config,
                world_size=workers.world_size,
                counters=counters,
            )
        prune_checkpoints(directory.parent, step)
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
    counters: dict[str, float] | None = None,
) -> None:
    """The resumable part of a checkpoint, into a directory being written (`atomic_directory`).

    `adapter` holds the adapter weights under the model's own parameter names (adapter "default") and
    `optimizer` the full optimizer state dict keyed by the same names (as
    `torch.distributed.checkpoint.state_dict` writes it), so that a resume restores both through
    `set_model_state_dict` / `set_optimizer_state_dict`, which also re-shard them under FSDP2. `counters`
    are the run's running totals (`TOKENS_SEEN`, `TRAIN_TIME_S`, `WALL_TIME_S`) that a resumed run continues.
    """
    state = {
        "step": step,
        "adapter": adapter,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "config": config.to_dict(),
        "world_size": world_size,
        "counters": dict(counters or {}),
    }
    torch.save(state, directory / CHECKPOINT_STATE_FILE)


def prune_checkpoints(root: Path, step: int) -> None:
    """Keep the newest checkpoints up to `step` (the one just written and the one before it).

    Checkpoints beyond `step` are removed: they were written by an earlier attempt of this run that went
    further before it stopped, and this attempt recomputes those steps. So a fresh checkpoint is never
    pruned in favour of an older one with a larger step number. Leftovers of interrupted writes go too.
    """
    steps = _checkpoint_steps(root)
    doomed = [d for s, d in steps if s > step] + [d for s, d in steps if s <= step][:-_KEEP]
    doomed += [d for d in root.glob(f".{_CHECKPOINT_PREFIX}*") if d.is_dir()]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory under `root`, oldest first."""
    found = []
    for directory in root.glob(f"{_CHECKPOINT_PREFIX}*"):
        match = _CHECKPOINT_NAME.match(directory.name)
        if match and directory.is_dir():
            found.append((int(match.group(1)), directory))
    return sorted(found)


# ---- reading ---------------------------------------------------------------------------------------------


def read_trainer_state(directory: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint directory (`mmap`: tensors read lazily, for a quick look).

    Raises:
        ConfigError: the directory is not a raylora checkpoint, or its state does not load.
    """
    state_file = directory / CHECKPOINT_STATE_FILE
    if not state_file.exists():
        raise ConfigError(
            f"`resume_from` {str(directory)!r} is not a raylora checkpoint (it has no {CHECKPOINT_STATE_FILE}); "
            "pass a `checkpoints/step-*` directory of an earlier run"
        )
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise ConfigError(
            f"checkpoint {str(directory)!r} does not load ({type(error).__name__}: {error}); resume from "
            "the checkpoint before it"
        ) from error


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, float]]:
    """Restore adapter weights, optimizer and scheduler from a checkpoint directory.

    Returns its step and the run's counters at that step (empty for checkpoints written before counters were
    saved).

    Raises:
        ConfigError: the directory is not a raylora checkpoint, or holds another adapter shape.
    """
    state = read_trainer_state(directory)
    # Key names from the sharded state dict: the full one (_FULL) is empty on every rank but 0.
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))) & trained
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
    return int(state["step"]), dict(state.get("counters") or {})


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint under `output_dir/checkpoints` that loads, or None.

    A checkpoint whose trainer state or adapter weights do not load (a file damaged after it was written) is
    skipped with a warning, and the one before it is tried.
    """
    for _, directory in reversed(_checkpoint_steps(Path(output_dir) / "checkpoints")):
        problem = _unloadable(directory)
        if problem is None:
            return str(directory)
        logger.warning("skipping checkpoint %s: %s; trying the one before it", directory, problem)
    return None


def _unloadable(directory: Path) -> str | None:
    """Why a checkpoint directory does not load, or None when it does."""
    from safetensors import safe_open

    if not (directory / CHECKPOINT_STATE_FILE).exists():
        return f"it has no {CHECKPOINT_STATE_FILE}"
    try:
        state = read_trainer_state(directory, mmap=True)
        for key in ("step", "adapter", "optimizer", "scheduler"):
            if key not in state:
                return f"its {CHECKPOINT_STATE_FILE} has no {key!r}"
        for weights in directory.glob("adapter_model*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    handle.get_tensor(key)
    except Exception as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


# ---- which run owns an output directory ------------------------------------------------------------------


def write_run_record(config: FinetuneConfig, world_size: int) -> None:
    """Record in `output_dir/raylora_run.json` that this run owns the directory (config without secrets)."""
    record = {
        "config": config.to_dict(),
        "world_size": world_size,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = Path(config.training.output_dir) / RUN_RECORD
    temporary = path.with_name(f".{path.name}.partial")
    _write_json(temporary, record)
    os.replace(temporary, path)


def config_differences(saved: dict[str, Any], config: FinetuneConfig) -> list[str]:
    """The fields in which `config` differs from a saved config (`to_dict()` form), as `field: saved -> now`.

    Fields in `RESUMABLE_CHANGES` and secrets (never saved) are not compared.
    """
    now = config.to_dict()
    defaults = FinetuneConfig().to_dict()
    differences = []
    for section, fields in now.items():
        for name, value in fields.items():
            dotted = f"{section}.{name}"
            if dotted in RESUMABLE_CHANGES or is_secret_name(name):  # older checkpoints may hold a token
                continue
            # A field added after the config was saved counts as its default there.
            before = (saved.get(section) or {}).get(name, defaults[section][name])
            if _comparable(before) != _comparable(value):
                differences.append(f"{dotted}: {before!r} -> {value!r}")
    return differences


def _comparable(value: Any) -> Any:
    # JSON turns tuples into lists and may write 2 as 2.0 in float fields.
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _owner(output_dir: Path) -> tuple[str, dict[str, Any] | None, int | None] | None:
    """The run whose files `output_dir` holds: (what it is, its config, its worker count), or None."""
    record = output_dir / RUN_RECORD
    if record.exists():
        try:
            data = json.loads(record.read_text())
            return (
                f"the run started {data.get('started_at', '?')}",
                data.get("config"),
                data.get("world_size"),
            )
        except (OSError, ValueError):
            return f"a run whose {RUN_RECORD} does not parse", None, None
    checkpoints = _checkpoint_steps(output_dir / "checkpoints")
    for _, directory in reversed(checkpoints):
        with contextlib.suppress(ConfigError):
            state = read_trainer_state(directory, mmap=True)
            return f"the run of checkpoint {directory.name}", state.get("config"), state.get("world_size")
    adapter_config = output_dir / "adapter" / ADAPTER_RUN_CONFIG
    if adapter_config.exists():
        with contextlib.suppress(OSError, ValueError):
            return "the run of adapter/", json.loads(adapter_config.read_text()), None
    files = [name for name in (METRICS_FILE, "checkpoints", "adapter") if (output_dir / name).exists()]
    if files:
        return f"an earlier run ({', '.join(files)})", None, None
    return None


def check_output_dir(
    config: FinetuneConfig, *, world_size: int, resume_from: str | os.PathLike[str] | None
) -> int | None:
    """Refuse to mix runs: check `training.output_dir` and the checkpoint to resume from, before any work.

    Returns the step of `resume_from` (None when not resuming).

    Raises:
        ConfigError: the output directory holds another run (or, without `resume_from`, any run's files); the
            checkpoint belongs to another run (fields or worker count differ) or lies beyond
            `training.max_steps`; or it does not load.
    """
    output_dir = Path(config.training.output_dir)
    owner = _owner(output_dir) if output_dir.is_dir() else None
    if owner is not None:
        what, saved, saved_world = owner
        differences = _run_differences(saved, saved_world, config, world_size)
        if saved is None or differences:
            why = f"differs in {'; '.join(differences)}" if differences else "has an unknown config"
            raise ConfigError(
                f"`training.output_dir` {str(output_dir)!r} holds {what}, which {why}: a run never mixes its "
                "files with another's. Pick another `training.output_dir` (--output-dir), or delete the "
                "directory to start afresh"
            )
        if resume_from is None:
            latest = latest_checkpoint(output_dir)
            how = (
                f"continue it from {Path(latest).name} with `raylora train --resume` (in Python: "
                "`train(config, resume_from=latest_checkpoint(output_dir))`)"
                if latest
                else "it has no checkpoint to continue from"
            )
            raise ConfigError(
                f"`training.output_dir` {str(output_dir)!r} already holds {what} of this config: {how}; or "
                "start afresh in another `training.output_dir` (--output-dir), or delete the directory"
            )
    if resume_from is None:
        return None
    state = read_trainer_state(Path(resume_from), mmap=True)
    differences = _run_differences(state.get("config"), state.get("world_size"), config, world_size)
    if differences:
        raise ConfigError(
            f"checkpoint {str(resume_from)!r} belongs to another run: it differs in {'; '.join(differences)}. "
            "Resume with the config that wrote it (only `training.max_steps` may change), or start afresh in "
            "another `training.output_dir`"
        )
    step = int(state["step"])
    if step > config.training.max_steps:
        raise ConfigError(
            f"checkpoint {str(resume_from)!r} is at step {step}, beyond `training.max_steps` = "
            f"{config.training.max_steps}; set `training.max_steps` to {step} or more to continue it"
        )
    return step


def _run_differences(
    saved: dict[str, Any] | None, saved_world: int | None, config: FinetuneConfig, world_size: int
) -> list[str]:
    differences = config_differences(saved, config) if saved is not None else []
    if saved_world is not None and saved_world != world_size:
        differences.append(
            f"workers: {saved_world} -> {world_size} (the global batch is workers x `training.batch_size`)"
        )
    return differences


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
