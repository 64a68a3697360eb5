"""The pieces of one adapter run: set-up, one optimizer step, evaluation, checkpoints, the final adapter.

`LoraRecipe` holds a run's state (tokenizer, data, the frozen base with its adapter, optimizer, scheduler,
step counter, throughput counters) and exposes the run as a few methods that `raylora.training.train` calls in
order: `setup()`, then `step(next_batches())` until `max_steps`, with `train_metrics()`, `evaluate()` and
`save_checkpoint()` at their cadence, and `save_adapter()` at the end. Other drivers (a Tune trial, a
Ray Train worker, an engine that trains several adapters on one base) reuse the same pieces instead of
copying the loop.

What a step computes:
- AdamW over the adapter parameters only (the base is frozen), with linear warmup and cosine, linear or
  constant decay; gradient accumulation over `grad_accum_steps` micro-batches; global-norm clipping.
- The loss is the mean over every trained token of every micro-batch on every rank (`raylora.loss`), so
  N workers at batch B compute the same step as one worker at batch N*B.
- Reproducibility: the data order is a pure function of (seed, step) (`raylora.data.iterate_batches`) and
  every LoRA dropout mask a pure function of (seed, step, micro-batch, global row, layer)
  (`raylora.fastpath.DropoutSeeds`; the global RNG is also reseeded from (seed, step, rank) before every
  step, for layers peft runs itself), so a run resumed from a checkpoint at step k computes the same steps
  k+1.. as the uninterrupted run, without saving RNG state.

Distributed: when a `torch.distributed` process group is up with more than one rank (Ray Train's
`TorchTrainer` starts one), the base loads straight into its FSDP2 shards (`raylora.shards`: no rank holds
the whole base), each decoder layer, the embeddings and the head are FSDP2 units (`raylora.distributed`), and
every rank reads its own slice of each global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylora.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from raylora.config import ConfigError, FinetuneConfig, TrainingConfig, sharded_adapter_problem
from raylora.data import TokenizedData, eval_batches, iterate_batches, load_data
from raylora.distributed import Workers, local_parameter_bytes, return_freed_blocks, shard_with_fsdp2
from raylora.fastpath import (
    DropoutSeeds,
    compile_layers,
    convert_to_float8,
    eager,
    install_lean_lora,
    seed_dropout,
)
from raylora.loss import choose_head_loss, count_targets, forward, token_loss_sum
from raylora.model import (
    ParameterCount,
    apply_lora,
    count_parameters,
    decoder_layers,
    describe_base,
    load_base_model,
    load_tokenizer,
)
from raylora.names import (
    FIRST_STEP_AT,
    GRAD_NORM,
    LEARNING_RATE,
    PARAMETER_MEMORY_GIB,
    PEAK_MEMORY_GIB,
    SETUP_TIME_S,
    STEP,
    TOKENS_PER_SEC,
    TOKENS_SEEN,
    TOTAL_PARAMS,
    TRAIN_LOSS,
    TRAIN_TIME_S,
    TRAINABLE_PARAMS,
    TRAINABLE_PERCENT,
    WALL_TIME_S,
)
from raylora.shards import adapters_on_cpu, base_skeleton, load_shards, pack_for_sharding

__all__ = [
    "LoraRecipe",
    "NonFiniteLossError",
    "activation_checkpointing",
    "clip_and_measure",
    "clip_gradients",
    "evaluate_loss",
    "lr_schedule",
    "peak_memory_gib",
    "reset_peak_memory",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The train loss became NaN or infinite: the run stops at once instead of wasting its budget."""


@dataclass
class _Throughput:
    """Tokens and time of the training steps, without set-up, eval and checkpoints."""

    window_tokens: float = 0.0  # this rank's input tokens since the last log
    window_start: float = field(default_factory=time.perf_counter)
    tokens_seen: float = 0.0  # all ranks' input tokens up to the last log
    train_time: float = 0.0  # seconds inside `step()`

    def restart_window(self) -> None:
        self.window_start = time.perf_counter()


class LoraRecipe:
    """One adapter run on this process (one worker, or one rank of N): its state and its steps.

    Args:
        config: the run's configuration, already validated (`raylora.training.validate_with_model`).
        workers: this process's place among the workers; detected from `torch.distributed` by default.
    """

    def __init__(self, config: FinetuneConfig, *, workers: Workers | None = None) -> None:
        self.config = config
        self.workers = workers or Workers.detect()
        self.global_step = 0  # optimizer steps done
        self._gradients_checked = False
        self._started = time.perf_counter()
        self._wall_before = 0.0  # wall time of the attempts before a resume, up to their checkpoint
        self._throughput = _Throughput()

    # ---- set-up: everything that can reject the input happens before the first step -------------------

    def setup(self, *, resume_from: str | os.PathLike[str] | None = None) -> None:
        """Tokenizer, data, base and adapter, optimizer and scheduler; then the checkpoint to resume from."""
        cfg = self.config
        if cfg.training.fp8:
            check_fp8(self.workers)  # before the model is loaded: a wrong GPU should not cost the load
        # Also before the load: a head loss that cannot run here is refused first.
        backend = compile_backend(cfg.training.compile, self.workers)
        self.head_loss: Callable | None = choose_head_loss(cfg.training, self.workers.device, backend)
        torch.manual_seed(cfg.training.seed)  # the adapter's initial weights
        self.tokenizer = load_tokenizer(cfg.model)
        self.data: TokenizedData = load_data(cfg.data, self.tokenizer, seed=cfg.training.seed)
        self._setup_model(backend)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=cfg.training.learning_rate,
            weight_decay=cfg.training.weight_decay,
            betas=(0.9, 0.999),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg.training))
        if resume_from is not None:
            self.global_step, counters = load_checkpoint(
                Path(resume_from), self.model, self.optimizer, self.scheduler
            )
            self._throughput.tokens_seen = counters.get(TOKENS_SEEN, 0.0)
            self._throughput.train_time = counters.get(TRAIN_TIME_S, 0.0)
            self._wall_before = counters.get(WALL_TIME_S, 0.0)
        self.autocast = self.workers.autocast(cfg.training.precision)
        self._batches = iterate_batches(
            self.data.train,
            batch_size=cfg.training.batch_size,
            seed=cfg.training.seed,
            pad_id=self.tokenizer.pad_token_id,
            start=self.global_step * cfg.training.grad_accum_steps,
            rank=self.workers.rank,
            world_size=self.workers.world_size,
        )
        reset_peak_memory(self.workers.device)
        self.static_metrics = {
            TRAINABLE_PARAMS: float(self.parameters.trainable),
            TOTAL_PARAMS: float(self.parameters.total),
            TRAINABLE_PERCENT: self.parameters.trainable_percent,
            PARAMETER_MEMORY_GIB: self.workers.max(self.parameter_bytes / 2**30),
            SETUP_TIME_S: time.perf_counter() - self._started,
            FIRST_STEP_AT: time.time(),
        }
        self.model.train()
        self._throughput.restart_window()

    def _setup_model(self, backend: str | None) -> None:
        """The frozen base with its adapter, on this worker's device: sharded, fast-pathed and compiled.

        One worker loads the base with `from_pretrained`; N workers build it on the meta device, shard it
        and load only their own part (`raylora.shards`), so that no rank holds the whole base.
        """
        cfg, workers = self.config, self.workers
        sharded = workers.world_size > 1
        if sharded:
            problem = sharded_adapter_problem(cfg.adapter, workers.world_size)
            if problem:
                raise ConfigError(problem)
            if workers.device.type == "cpu":
                return_freed_blocks()  # gathered layers come and go in host memory (distributed.py says why)
            model = base_skeleton(cfg.model, qlora=cfg.adapter.qlora)
        else:
            model = load_base_model(
                cfg.model, qlora=cfg.adapter.qlora, device=workers.device, adapter=cfg.adapter
            )
        # What this run does with its base (attention kernel, adapted experts, unquantised weights), measured
        # on the loaded model (on a sharded run, its skeleton); it goes beside every saved adapter, and from
        # there to the trial's MLflow params.
        self.model_plan = describe_base(model, cfg.model, cfg.adapter)
        if workers.is_main:
            for note in self.model_plan.notes():
                logger.info("%s", note)
        checkpointing = activation_checkpointing(cfg)
        if checkpointing and not self._checkpointing_works(model):
            # Only the QLoRA default gets here: an explicit setting is refused by validate_with_model.
            logger.warning(
                "%s cannot run with activation checkpointing; training without it", type(model).__name__
            )
            checkpointing = 0.0
        # The adapter's initial weights come from this seed on every rank and in every worker count.
        torch.manual_seed(cfg.training.seed)
        with adapters_on_cpu(model, cfg.adapter) if sharded else contextlib.nullcontext():
            model, self.target_modules = apply_lora(
                model, cfg.adapter, activation_checkpointing=checkpointing
            )
        # The same arithmetic as peft's LoRA layers, keeping each adapted layer's input once instead of a
        # dropped copy per layer, with dropout masks drawn from per-layer seeds (raylora.fastpath says why).
        install_lean_lora(model)
        batch = cfg.training.batch_size
        self.dropout_seeds = DropoutSeeds(
            cfg.training.seed, first_row=workers.rank * batch, rows=workers.world_size * batch
        )
        seed_dropout(model, self.dropout_seeds, cfg.data.max_length)
        if cfg.training.fp8:
            # On a meta base the fp8 layers are placeholders; `load_shards` quantises each weight whole.
            convert_to_float8(decoder_layers(model))
        if sharded:
            pack_for_sharding(model)
            shard_with_fsdp2(model)
            load_shards(model, workers)
        else:
            model.to(
                workers.device
            )  # LoRA weights are created on the CPU; the base already sits on the device
        self.parameters: ParameterCount = count_parameters(model)
        self.parameter_bytes = local_parameter_bytes(model)
        self.model = model
        if backend is not None:
            # A fresh start for dynamo in every run: trials that a reused Ray actor runs one after another
            # would otherwise pile their graphs onto the same layer code until dynamo's recompile limit (8),
            # past which it silently runs the layers eagerly. Inductor's on-disk cache keeps recompiling a
            # graph it has seen cheap.
            torch._dynamo.reset()
            layers = [layer for layer in decoder_layers(model) if not _adapts_parameters(layer)]
            if workers.is_main and len(layers) < len(decoder_layers(model)):
                # peft's LoRA on fused expert weights registers a fresh parametrization on every forward, a
                # new module type each time: dynamo recompiles the layer until its limit and then runs it
                # eagerly anyway (same losses, measured with aot_eager on a tiny Mixtral).
                logger.info("decoder layers with adapted routed experts run eagerly (not compiled)")
            compile_layers(layers, backend)

    def _checkpointing_works(self, model: torch.nn.Module) -> bool:
        """Declared by the architecture and measured on a tiny copy of it (`raylora.architecture`)."""
        from raylora.architecture import check_architecture

        if not getattr(model, "supports_gradient_checkpointing", True):
            return False
        config = model.config
        return (
            check_architecture(config, getattr(config, "_attn_implementation", None)).checkpointing_error
            is None
        )

    # ---- one optimizer step --------------------------------------------------------------------------------

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step, in the run's deterministic order."""
        return [next(self._batches) for _ in range(self.config.training.grad_accum_steps)]

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `micro_batches`; returns its train loss, gradient norm and learning rate.

        Raises:
            NonFiniteLossError: the loss is NaN or infinite.
        """
        cfg, workers = self.config.training, self.workers
        started = time.perf_counter()
        # Reseed per step: dropout masks depend on (seed, step, rank) only, which makes resume exact.
        torch.manual_seed(cfg.seed * 1_000_003 + self.global_step * 1009 + workers.rank)
        # The step's loss is the mean over every trained token of every micro-batch on every rank.
        # FSDP averages gradients over ranks, so each rank scales its token sum by world_size / total.
        step_targets = workers.sum(sum(count_targets(mb) for mb in micro_batches))
        scale = workers.world_size / max(step_targets, 1.0)
        loss_sum = 0.0
        for index, micro_batch in enumerate(micro_batches):
            self.dropout_seeds.set(self.global_step, index)
            # Counted on the CPU: no device sync.
            self._throughput.window_tokens += int(micro_batch["attention_mask"].sum())
            micro_batch = {k: v.to(workers.device, non_blocking=True) for k, v in micro_batch.items()}
            with self.autocast:
                output = forward(self.model, micro_batch)
            token_loss = token_loss_sum(
                output, micro_batch["labels"], cfg.label_smoothing, head_loss=self.head_loss
            )
            (token_loss * scale).backward()
            loss_sum += token_loss.detach()
        if not self._gradients_checked:
            self._check_every_adapter_got_a_gradient()
        grad_norm = clip_and_measure(self.trainable, cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; the scheduler moves on below
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

        # note: float() is a device-host sync point, once per optimizer step; it lets a NaN stop the run at once
        train_loss = workers.sum(float(loss_sum)) / max(step_targets, 1.0)
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"train loss is {train_loss} at step {self.global_step}; lower `training.learning_rate` "
                f"(now {cfg.learning_rate}) or set `training.max_grad_norm`"
            )
        self._throughput.train_time += time.perf_counter() - started
        return {TRAIN_LOSS: train_loss, GRAD_NORM: grad_norm, LEARNING_RATE: lr}

    def _check_every_adapter_got_a_gradient(self) -> None:
        """After the first backward: a trainable tensor without a gradient belongs to a layer that the model
        never runs through its LoRA wrapper (it reads the weight directly, on this device's code path), so
        it would silently never train. Refused at once, naming the layers."""
        self._gradients_checked = True
        missing = sorted(
            name for name, p in self.model.named_parameters() if p.requires_grad and p.grad is None
        )
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ConfigError(
                f"`adapter.target_modules` is {self.config.adapter.target_modules!r}, but {len(missing)} adapter "
                f"tensors got no gradient in the first step ({shown}): the model reads those layers' weights "
                "directly on this device's code path, bypassing LoRA; leave them out of `adapter.target_modules`"
            )

    def train_metrics(self, step_metrics: dict[str, float]) -> dict[str, float]:
        """The train report at a log step: the step's numbers, throughput since the last log, memory, sizes.

        A collective (token and memory totals over ranks): every rank calls it at the same steps.
        """
        meter = self._throughput
        elapsed = time.perf_counter() - meter.window_start
        window_tokens = self.workers.sum(meter.window_tokens)
        meter.tokens_seen += window_tokens
        metrics = {
            STEP: float(self.global_step),
            **step_metrics,
            TOKENS_PER_SEC: window_tokens / max(elapsed, 1e-9),
            TOKENS_SEEN: meter.tokens_seen,
            TRAIN_TIME_S: meter.train_time,
            PEAK_MEMORY_GIB: self.workers.max(peak_memory_gib(self.workers.device)),
            **self.static_metrics,
        }
        meter.window_tokens = 0.0
        meter.restart_window()
        return metrics

    def wall_time(self) -> float:
        """Seconds since this recipe was created (set-up included), plus, after a resume, the wall time of
        the earlier attempts up to the checkpoint it resumed from."""
        return self._wall_before + time.perf_counter() - self._started

    def counters(self) -> dict[str, float]:
        """The run's running totals, for a checkpoint: a resumed run continues them. A collective (a sum over
        ranks): every rank calls it at the same step."""
        meter = self._throughput
        return {
            TOKENS_SEEN: meter.tokens_seen + self.workers.sum(meter.window_tokens),
            TRAIN_TIME_S: meter.train_time,
            WALL_TIME_S: self.wall_time(),
        }

    # ---- evaluation, checkpoints, the adapter ------------------------------------------------------------

    def evaluate(self) -> float:
        """Mean next-token loss over the eval split (capped at `training.eval_batches`); a collective."""
        cfg = self.config.training
        loss = evaluate_loss(
            self.model,
            self.data,
            batch_size=cfg.batch_size,
            max_batches=cfg.eval_batches,
            workers=self.workers,
            autocast=self.autocast,
            pad_id=self.tokenizer.pad_token_id,
        )
        self._throughput.restart_window()  # eval time is not training throughput
        return loss

    def save_checkpoint(self) -> str | None:
        """Write a resumable checkpoint at this step; its directory on rank 0, None on the other ranks."""
        directory = save_checkpoint(
            self.model,
            self.tokenizer,
            self.target_modules,
            self.optimizer,
            self.scheduler,
            self.global_step,
            self.config,
            self.workers,
            counters=self.counters(),
            model_plan=self.model_plan.as_params(),
        )
        self._throughput.restart_window()
        return str(directory) if self.workers.is_main else None

    def save_adapter(self, directory: Path) -> Path:
        """Write the adapter (loadable by plain peft) to `directory`; a collective under FSDP2."""
        save_adapter(
            self.model,
            self.tokenizer,
            self.config,
            self.target_modules,
            directory,
            self.workers,
            model_plan=self.model_plan.as_params(),
        )
        self.workers.barrier()
        return directory


# ---- pieces used by the recipe and by other drivers ------------------------------------------------------


@torch.no_grad()
@eager()  # compiled layers run eagerly here: an eval (no grad, eval mode) would compile graphs of its own
def evaluate_loss(
    model: torch.nn.Module,
    data: TokenizedData,
    *,
    batch_size: int,
    max_batches: int | None,
    workers: Workers,
    autocast,
    pad_id: int,
    head: torch.nn.Module | None = None,
) -> float:
    """Mean next-token loss over the eval split (every rank its shard), without label smoothing.

    `head` replaces the model's output head (`raylora.loss.forward`).
    """
    model.eval()
    loss_sum, targets = 0.0, 0
    batches = eval_batches(
        data.eval, batch_size=batch_size, pad_id=pad_id, rank=workers.rank, world_size=workers.world_size
    )
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(workers.device) for k, v in batch.items()}
        with autocast:
            output = forward(model, batch, head=head)
        loss_sum += float(token_loss_sum(output, batch["labels"], 0.0))
        targets += count_targets(batch)
    model.train()
    return workers.sum(loss_sum) / max(workers.sum(targets), 1.0)


def lr_schedule(cfg: TrainingConfig) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warmup, then cosine, linear or constant decay."""
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.lr_schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def activation_checkpointing(config: FinetuneConfig) -> float:
    """`training.activation_checkpointing` as the fraction of decoder layers to checkpoint.

    None resolves to every layer with QLoRA, none otherwise. QLoRA is chosen to save memory, and the 4-bit
    weights save little of it on their own: on Llama shapes at 2048 tokens a row the activations are most of
    a step's memory. Checkpointing every layer costs a third more compute; half the layers trades some of
    that back for memory (BENCHMARKS.md measures both against the textbook QLoRA recipe); a user who has the
    memory sets the fraction.
    """
    checkpointing = config.training.activation_checkpointing
    if checkpointing is None:
        return 1.0 if config.adapter.qlora else 0.0
    return float(checkpointing)


def check_fp8(workers: Workers) -> None:
    """`training.fp8` needs, on a GPU, FP8 tensor cores. The CPU runs it too (slowly: it checks the
    arithmetic, it is not a speed-up there). Under FSDP2 the fp8 weights are sharded and all-gathered as fp8
    (half the bytes of bf16), each with the per-tensor scale of its whole matrix (`raylora.shards`).

    Raises:
        ConfigError: a GPU without FP8 tensor cores.
    """
    if workers.device.type == "cuda":
        capability = torch.cuda.get_device_capability(workers.device)
        if capability < (8, 9):
            raise ConfigError(
                f"`training.fp8` needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: H100, "
                f"H200, L4, B200); {torch.cuda.get_device_name(workers.device)} has "
                f"{capability[0]}.{capability[1]}; turn `training.fp8` off"
            )


def compile_backend(mode: str, workers: Workers) -> str | None:
    """The torch.compile backend for the decoder layers, or None to run them eagerly.

    `auto` compiles on GPUs, one worker or several (each FSDP2 unit's hooks stay outside the compiled layer;
    the 2-worker test checks compiled layers against one worker's loss). On the CPU inductor's compile time
    (tens of seconds per graph) outweighs what it saves on small models.
    """
    if mode == "auto":
        return "inductor" if workers.device.type == "cuda" else None
    return None if mode == "off" else mode


def _adapts_parameters(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer holds peft's LoRA on a parameter (fused routed experts)."""
    from peft.tuners.lora.layer import ParamWrapper

    return any(isinstance(module, ParamWrapper) for module in layer.modules())


def clip_and_measure(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    return float(clip_gradients(parameters, max_norm))


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` (0: no clipping) and return their norm before clipping, on the device
    (reading it is a device-host sync, which a pack makes once for all its adapters)."""
    # clip_grad_norm_ returns the total norm before clipping; with max_norm=inf it only measures.
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring this run's own peak memory (`peak_memory_gib`) now; False where the CPU peak cannot be
    reset (then it is the process's lifetime peak, with a warning once).

    A Ray actor runs trial after trial in one process: without a reset, a trial's CPU peak would be the
    largest of every trial before it. Linux resets the process's resident-set high-water mark on request
    (writing 5 to /proc/self/clear_refs).
    """
    global _CPU_PEAK_RESETS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _CPU_PEAK_RESETS = True
    except OSError:
        if _CPU_PEAK_RESETS is None:
            logger.warning(
                "cannot reset the process's peak memory here: `peak_memory_gib` is the process's lifetime peak "
                "resident set size, which includes the runs before this one in the same process"
            )
        _CPU_PEAK_RESETS = False
    return bool(_CPU_PEAK_RESETS)


_CPU_PEAK_RESETS: bool | None = None  # whether /proc/self/clear_refs took the last reset (None: not tried)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: allocated device memory on a GPU; the process's peak resident
    set size on the CPU (its lifetime peak where the peak cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if _CPU_PEAK_RESETS:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 2**20  # in KiB
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
