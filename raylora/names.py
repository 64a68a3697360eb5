"""Names shared by the loop, the sweep, tracking and the report: metric keys, result keys and file names.

One definition of each, so that what a sweep optimises (`metric="eval_loss"`) cannot drift from what the loop
reports and what MLflow and the report read. This module imports nothing: the CLI, `raylora.tracking` and
`raylora.report` read these strings without importing torch or Ray.
"""

from __future__ import annotations

__all__ = [
    "ADAPTER_RUN_CONFIG",
    "CHECKPOINT_STATE_FILE",
    "EVAL_LOSS",
    "EVAL_PERPLEXITY",
    "FIRST_STEP_AT",
    "GRAD_NORM",
    "LEARNING_RATE",
    "NUM_NODES",
    "PEAK_MEMORY_GIB",
    "REPORTED_METRICS",
    "RUN_CONFIG_MODEL_PLAN",
    "SETUP_TIME_S",
    "STEP",
    "TOKENS_PER_SEC",
    "TOKENS_SEEN",
    "TOTAL_PARAMS",
    "TRAINABLE_PARAMS",
    "TRAINABLE_PERCENT",
    "TRAIN_HISTORY",
    "TRAIN_LOSS",
    "TRAIN_TIME_S",
    "WALL_TIME_S",
    "WORKER_NODES",
]

# ---- metrics the training loop reports --------------------------------------------------------------------
STEP = "step"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_PERPLEXITY = "eval_perplexity"
LEARNING_RATE = "lr"
GRAD_NORM = "grad_norm"
TOKENS_PER_SEC = "tokens_per_sec"
TOKENS_SEEN = "tokens_seen"
PEAK_MEMORY_GIB = "peak_memory_gib"
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

# ---- files ---------------------------------------------------------------------------------------------------
# In a checkpoint directory, beside the adapter: optimizer, scheduler, step and counters.
CHECKPOINT_STATE_FILE = "trainer_state.pt"
# Beside the adapter weights: the run config and the resolved target modules.
ADAPTER_RUN_CONFIG = "raylora_config.json"
# Its key for what the run did with the base model (attention kernel, adapted experts, unquantised weights).
RUN_CONFIG_MODEL_PLAN = "model_plan"
