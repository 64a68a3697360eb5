"""Train one adapter: `train(config)` runs the loop of `raylora.recipe.LoraRecipe` from set-up to the saved adapter.

The same function runs standalone (`raylora train`, reporting to `ConsoleReporter`) and inside a Ray Tune
trial or a Ray Train worker (the reporters in `raylora.sweep.trial`); it reports through one small interface
(`Reporter`). Read `train` top to bottom: the step, the loss, checkpoints and evaluation each live in their
own module (`raylora.recipe`, `raylora.loss`, `raylora.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from raylora.checkpoint import check_output_dir, latest_checkpoint, write_run_record
from raylora.config import ConfigError, FinetuneConfig
from raylora.model import ModelPlan, ParameterCount, plan_model
from raylora.names import (
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    LEARNING_RATE,
    METRICS_FILE,
    STEP,
    TOKENS_PER_SEC,
    TRAIN_LOSS,
    WALL_TIME_S,
)
from raylora.recipe import LoraRecipe, NonFiniteLossError

__all__ = [
    "ConsoleReporter",
    "NonFiniteLossError",
    "Reporter",
    "TrainResult",
    "evaluate_adapter",
    "latest_checkpoint",
    "train",
    "validate_with_model",
]


class Reporter(Protocol):
    """Where the loop sends its numbers: a console, a Ray Tune trial, a Ray Train worker.

    `report` is called on every rank (Ray Train gathers from all workers; the others ignore non-zero
    ranks themselves). Train reports carry `TRAIN_LOSS`; eval reports carry `EVAL_LOSS` and, when a
    checkpoint was written at that step, its directory.
    """

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None: ...


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    step: int
    eval_loss: float
    adapter_dir: str
    target_modules: list[str]
    parameters: ParameterCount
    metrics: dict[str, float]
    start_step: int = 0  # the step this call started at: a resumed checkpoint's, else 0


def train(
    config: FinetuneConfig,
    *,
    reporter: Reporter | None = None,
    resume_from: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train one LoRA/QLoRA adapter as `config` says, and save it under `training.output_dir/adapter`.

    Args:
        config: the run's configuration; validated here before any work.
        reporter: receives train and eval metrics (and checkpoint directories); defaults to the console.
        resume_from: a checkpoint directory written by an earlier run of the same config (see
            `latest_checkpoint`); training continues at its step with the same data order and counters.
            Only `training.max_steps` may differ from the config that wrote it (`raylora.checkpoint`); a
            checkpoint at `max_steps` is evaluated and saved as the adapter, with no step trained.

    `training.output_dir` must be new, empty, or hold this same run when resuming: a directory with another
    run's files, or any run's files without `resume_from`, is refused before set-up (`check_output_dir`).

    Raises:
        ConfigError: a bad field, model, target module, or dataset, or an output directory or checkpoint of
            another run, before any training step.
        NonFiniteLossError: the train loss became NaN or infinite.
        DiskFullError: a checkpoint or the adapter could not be written on a full disk.
    """
    validate_with_model(config)
    recipe = LoraRecipe(config)
    check_output_dir(config, world_size=recipe.workers.world_size, resume_from=resume_from)
    recipe.setup(resume_from=resume_from)
    start_step = recipe.global_step
    if recipe.workers.is_main:
        write_run_record(config, recipe.workers.world_size)
    reporter = reporter or _default_reporter(
        config, recipe.workers.is_main, resumed_at=start_step if resume_from is not None else None
    )
    t = config.training
    logged: dict[str, float] = {}
    # A run resumed at its last step has nothing left to train: evaluate it, so that the result is real.
    eval_loss = recipe.evaluate() if start_step >= t.max_steps else math.nan
    while recipe.global_step < t.max_steps:
        step_metrics = recipe.step(recipe.next_batches())
        step = recipe.global_step
        last_step = step == t.max_steps
        if step % t.log_every == 0 or last_step:
            logged = recipe.train_metrics(step_metrics)
            reporter.report(dict(logged))
        if step % t.eval_every == 0 or last_step:
            eval_loss = recipe.evaluate()
            due = last_step or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0)
            checkpoint = recipe.save_checkpoint() if due else None
            metrics = {
                **logged,
                STEP: float(step),
                EVAL_LOSS: eval_loss,
                EVAL_PERPLEXITY: math.exp(min(eval_loss, 50.0)),
                WALL_TIME_S: recipe.wall_time(),
            }
            reporter.report(metrics, checkpoint_dir=checkpoint)

    adapter_dir = recipe.save_adapter(Path(t.output_dir) / "adapter")
    final = {**logged, STEP: float(recipe.global_step), EVAL_LOSS: eval_loss, WALL_TIME_S: recipe.wall_time()}
    return TrainResult(
        recipe.global_step,
        eval_loss,
        str(adapter_dir),
        recipe.target_modules,
        recipe.parameters,
        final,
        start_step=start_step,
    )


def validate_with_model(config: FinetuneConfig) -> ModelPlan | None:
    """Every field check and every model-dependent check (from config.json alone, no weights), in one error.

    The model checks run only when the fields they read are sound, so a bad field is not reported twice.

    Returns:
        The model plan (`raylora.model.plan_model`: attention kernel, targets, unquantised weights).

    Raises:
        ConfigError: every problem found.
    """
    problems: list[str] = []
    plan = None
    try:
        config.validate()
    except ConfigError as error:
        problems.extend(error.problems)
    needed = (
        "`model.",
        "`adapter.target_modules`",
        "`adapter.modules_to_save`",
        "`adapter.dropout`",
        "`adapter.peft_kwargs`",
        "`data.max_length`",
    )
    if not any(problem.startswith(needed) for problem in problems):
        try:
            plan = plan_model(
                config.model, config.adapter, max_length=config.data.max_length, packing=config.data.packing
            )
        except ConfigError as error:
            problems.extend(error.problems)
    checkpointing = config.training.activation_checkpointing
    if (
        plan is not None
        and not plan.supports_activation_checkpointing
        and checkpointing not in (None, False, 0)
    ):
        problems.append(
            f"`training.activation_checkpointing` is {checkpointing!r}, but this {plan.model_type} model cannot "
            "run with activation checkpointing (transformers offers none for it, or a tiny copy fails with it on); "
            "set it to false"
        )
    if problems:
        raise ConfigError(problems)
    return plan


def evaluate_adapter(config: FinetuneConfig, adapter_dir: str | os.PathLike[str]) -> float:
    """Eval loss of a saved adapter on a fresh base, on the eval split `config` describes.

    Loads the base exactly as training did (bf16, NF4, or with `training.fp8` its decoder's linear layers in
    FP8), attaches the adapter with peft, and runs the same eval pass as the loop, so the number is the
    `eval_loss` the run reported: an fp8-trained adapter is evaluated on the fp8 base it was trained against.

    Raises:
        ConfigError: `training.fp8` on a GPU without FP8 tensor cores (`raylora.recipe.check_fp8`).
    """
    import torch
    from peft import PeftModel

    from raylora.data import load_data
    from raylora.distributed import Workers
    from raylora.fastpath import convert_to_float8
    from raylora.model import decoder_layers, load_base_model, load_tokenizer
    from raylora.recipe import check_fp8, evaluate_loss

    workers = Workers.detect()
    if config.training.fp8:
        check_fp8(workers)
    torch.manual_seed(config.training.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(
        config.model, qlora=config.adapter.qlora, device=workers.device, adapter=config.adapter
    )
    data = load_data(config.data, tokenizer, seed=config.training.seed)
    # Loaded as trainable, the adapter's weights are told apart from the frozen base's as they were in the
    # run, where `convert_to_float8` turned only the frozen linear layers into fp8 ones.
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=config.training.fp8)
    model.to(workers.device)
    if config.training.fp8:
        convert_to_float8(decoder_layers(model))
        model.requires_grad_(False)
    return evaluate_loss(
        model,
        data,
        batch_size=config.training.batch_size,
        max_batches=config.training.eval_batches,
        workers=workers,
        autocast=workers.autocast(config.training.precision),
        pad_id=tokenizer.pad_token_id,
    )


# ---- reporters ---------------------------------------------------------------------------------------------


def _default_reporter(config: FinetuneConfig, is_main: bool, *, resumed_at: int | None) -> Reporter:
    return ConsoleReporter(config, resumed_at=resumed_at) if is_main else _SilentReporter()


class _SilentReporter:
    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        pass


class ConsoleReporter:
    """Standalone runs: a progress bar over steps, one line per eval, and `metrics.jsonl` in the output dir.

    Args:
        config: the run's config (`training.max_steps`, `training.output_dir`).
        resumed_at: the step a resumed run continues from: the rows an earlier attempt wrote after it are
            dropped (the resumed run writes them again), so that the file has one row per report. None for a
            fresh run, which appends to the file (`train` refuses a directory that already holds one).
        show_progress: draw the progress bar.
    """

    def __init__(
        self, config: FinetuneConfig, *, resumed_at: int | None = None, show_progress: bool = True
    ) -> None:
        from tqdm.auto import tqdm

        self._total = config.training.max_steps
        self._bar = tqdm(
            total=self._total,
            initial=resumed_at or 0,
            desc="train",
            unit="step",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        self._log = Path(config.training.output_dir) / METRICS_FILE
        self._log.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None and self._log.exists():
            kept = [
                line
                for line in self._log.read_text().splitlines()
                if line.strip() and int(json.loads(line).get(STEP, 0)) <= resumed_at
            ]
            temporary = self._log.with_name(f".{self._log.name}.partial")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self._log)

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        step = int(metrics.get(STEP, 0))
        self._bar.update(max(0, step - self._bar.n))
        if EVAL_LOSS in metrics:
            self._bar.write(
                f"step {step:>5}  eval_loss {metrics[EVAL_LOSS]:.4f}  ppl {metrics[EVAL_PERPLEXITY]:.2f}"
                + (f"  checkpoint {checkpoint_dir}" if checkpoint_dir else "")
            )
        elif TRAIN_LOSS in metrics:
            self._bar.set_postfix(
                loss=f"{metrics[TRAIN_LOSS]:.4f}",
                lr=f"{metrics[LEARNING_RATE]:.2e}",
                tok_s=f"{metrics[TOKENS_PER_SEC]:.0f}",
            )
        with self._log.open("a") as handle:
            handle.write(json.dumps({**metrics, "checkpoint_dir": checkpoint_dir}) + "\n")
        if step >= self._total and EVAL_LOSS in metrics:
            self._bar.close()
