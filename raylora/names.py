"""Names shared by the loop, the sweep, tracking and the report: metric keys, result keys and file names.

One definition of each, so that what a sweep optimises (`metric="eval_loss"`) cannot drift from what the loop
reports and what MLflow and the report read. This module imports nothing but the standard library: the CLI, `raylora.tracking` and
`raylora.report` read these strings without importing torch or Ray.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "ADAPTER_RUN_CONFIG",
    "ALPHA_RATIO_PARAM",
    "BEST_PREFIX",
    "CHECKPOINT_STATE_FILE",
    "EVAL_LOSS",
    "EVAL_PERPLEXITY",
    "FAILED",
    "FINISHED",
    "FIRST_STEP_AT",
    "GRAD_NORM",
    "INTERRUPTED",
    "LEARNING_RATE",
    "METRICS_FILE",
    "NUM_NODES",
    "PACK_ENGINE",
    "PACK_SIZE",
    "PARAMETER_MEMORY_GIB",
    "PEAK_MEMORY_GIB",
    "PENDING",
    "REPORTED_METRICS",
    "RUN_CONFIG_MODEL_PLAN",
    "RUN_RECORD",
    "SETUP_TIME_S",
    "STEP",
    "STOPPED_EARLY",
    "TOKENS_PER_SEC",
    "TOKENS_SEEN",
    "TOTAL_PARAMS",
    "TRAINABLE_PARAMS",
    "TRAINABLE_PERCENT",
    "TRAIN_HISTORY",
    "TRAIN_LOSS",
    "TRAIN_TIME_S",
    "TRIAL_CONFIG_ARTIFACT",
    "TRIAL_PARAMS",
    "WALL_TIME_S",
    "WORKERS_PARAM",
    "WORKER_NODES",
    "best_index",
    "display_value",
    "param_name",
    "trial_run_name",
]

# ---- metrics the training loop reports --------------------------------------------------------------------
STEP = "step"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_PERPLEXITY = "eval_perplexity"
LEARNING_RATE = "lr"  # the rate the reported step used
GRAD_NORM = "grad_norm"
TOKENS_PER_SEC = "tokens_per_sec"
TOKENS_SEEN = "tokens_seen"
# This run's own peak since its set-up (`raylora.recipe.reset_peak_memory`): GPU allocated; CPU resident.
PEAK_MEMORY_GIB = "peak_memory_gib"
# The largest rank's parameters in memory (its FSDP2 shards of the base and the adapter), GiB.
PARAMETER_MEMORY_GIB = "parameter_memory_gib"
TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"
TRAINABLE_PERCENT = "trainable_percent"
WALL_TIME_S = "wall_time_s"
SETUP_TIME_S = "setup_time_s"  # train() entry to the first step: loading, tokenizing, wrapping
FIRST_STEP_AT = "first_step_at"  # wall clock (unix seconds) when the first step of this process began
TRAIN_TIME_S = "train_time_s"  # seconds spent in optimizer steps, without set-up, eval and checkpoints

# Metrics present in every Tune result: what a sweep may optimise and ASHA may compare.
REPORTED_METRICS = (EVAL_LOSS, EVAL_PERPLEXITY, TRAIN_LOSS)

# ---- keys a trial adds to its Tune results -----------------------------------------------------------------
# The train-metric reports logged since the previous eval.
TRAIN_HISTORY = "train_history"
# Where a trial's workers ran, in rank order (Ray node ids, comma-separated), and on how many nodes.
WORKER_NODES = "worker_nodes"
NUM_NODES = "num_nodes"
# Packed trials: the engine (one process per GPU holding the base) that trained the trial, and how many
# adapters it trained at that eval.
PACK_ENGINE = "pack_engine"
PACK_SIZE = "pack_size"

# ---- what became of a trial: one word for the trials table, MLflow (tag `raylora.status`) and the report ------
FINISHED = "FINISHED"  # trained to `training.max_steps`
STOPPED_EARLY = "STOPPED (ASHA)"  # stopped before max_steps by the scheduler: a complete, usable trial
FAILED = "FAILED"  # raised, or its process died more often than `Sweep.max_failures` allows
INTERRUPTED = "INTERRUPTED"  # the sweep was interrupted (Ctrl-C, `raylora jobs stop`) while it ran; --resume
PENDING = "PENDING"  # never started


def best_index(values: list[float | None], mode: str) -> int | None:
    """Which of a trial's evals is its best: the one definition of "best" that raylora uses everywhere.

    A trial's best eval is the report with the lowest (`mode="min"`) or highest (`"max"`) value of the
    sweep's metric over all of its evals, the earliest on a tie; missing and non-finite values never count.
    Its value is the trial's score (`best_<metric>`), its checkpoint the trial's adapter; the sweep's best
    trial is the one with the best score among trials that did not fail. The trials table, MLflow, the
    registry and `raylora report` all use this function.

    Returns:
        The index of the best value in `values`, or None when none counts.
    """
    best: int | None = None
    for index, value in enumerate(values):
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if best is None or (value < values[best] if mode == "min" else value > values[best]):
            best = index
    return best


# ---- files ---------------------------------------------------------------------------------------------------
# In a checkpoint directory, beside the adapter: optimizer, scheduler, step and counters.
CHECKPOINT_STATE_FILE = "trainer_state.pt"
# Beside the adapter weights: the run config and the resolved target modules.
ADAPTER_RUN_CONFIG = "raylora_config.json"
# In a run's output directory: which run owns it (config without secrets, worker count), and its metrics.
RUN_RECORD = "raylora_run.json"
METRICS_FILE = "metrics.jsonl"

# ---- what MLflow and the report call a trial's settings and summaries ------------------------------------------
# One short param name per setting a user compares or filters on (dotted config field -> param name). A trial
# run logs these, its other searched fields under their last dotted part, and the full resolved config as the
# artifact `TRIAL_CONFIG_ARTIFACT`; `raylora report` uses the same names for its columns.
TRIAL_PARAMS = {
    "adapter.r": "rank",
    "adapter.alpha": "alpha",
    "training.learning_rate": "lr",
    "adapter.dropout": "dropout",
    "adapter.target_modules": "target_modules",
    "adapter.qlora": "qlora",
    "training.batch_size": "batch_size",
    "data.max_length": "seq_len",
    "training.fp8": "fp8",  # the base the adapter trained against: fp8-rounded or not
}
WORKERS_PARAM = "workers"  # a sweep's `Resources.workers`, not a config field
ALPHA_RATIO_PARAM = "alpha_ratio"  # the search space's `adapter.alpha_ratio` pseudo-field
# A trial's best value of the sweep's metric is logged once as `best_<metric>` (e.g. `best_eval_loss`), beside
# the per-step `<metric>`; the parent run carries the sweep's best under the same name.
BEST_PREFIX = "best_"
# The run's full resolved config, searched values at full precision and resolved module paths (JSON).
TRIAL_CONFIG_ARTIFACT = "trial_config.json"

# Run-name parts of the settings with a compact spelling, in the order a name lists them.
_NAME_PREFIX = {"rank": "r", "alpha": "a", "lr": "lr", "dropout": "d", "batch_size": "b", "seq_len": "s"}
_NAME_ORDER = ("rank", "alpha", "lr", "target_modules", "qlora", "dropout", "batch_size", "seq_len")


def param_name(field: str) -> str:
    """The MLflow param name of a dotted config field: its `TRIAL_PARAMS` name, else its last dotted part."""
    if field == "adapter.alpha_ratio":
        return ALPHA_RATIO_PARAM
    return TRIAL_PARAMS.get(field, field.rsplit(".", 1)[-1])


def display_value(value: Any) -> str:
    """A param value as MLflow shows it: floats to 3 significant digits, lists comma-joined."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _short_float(value: float) -> str:
    """2 significant digits, exponent without padding: 0.000224 -> 2.2e-4, 0.05 -> 0.05."""
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.2g}"


def trial_run_name(values: dict[str, Any]) -> str:
    """A trial's run name from the settings that tell it apart, e.g. `r16-a32-lr2.2e-4-all-linear`.

    Args:
        values: param name (`param_name`) -> value, for the settings the sweep searches.
    """
    parts = []
    for name in sorted(values, key=lambda n: _NAME_ORDER.index(n) if n in _NAME_ORDER else len(_NAME_ORDER)):
        value = values[name]
        if name == "qlora":
            parts.append("qlora" if value else "lora")
        elif name == "target_modules":
            parts.append("+".join(value) if isinstance(value, list | tuple) else str(value))
        elif name in _NAME_PREFIX:
            shown = _short_float(value) if isinstance(value, float) else display_value(value)
            parts.append(f"{_NAME_PREFIX[name]}{shown}")
        else:
            shown = _short_float(value) if isinstance(value, float) else display_value(value)
            parts.append(f"{name}={shown}")
    return "-".join(parts)


# Its key for what the run did with the base model (attention kernel, adapted experts, unquantised weights).
RUN_CONFIG_MODEL_PLAN = "model_plan"
