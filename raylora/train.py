"""The training loop of one adapter run, on one process or one of N FSDP2 workers. Read it top to bottom.

`train(config)` does everything a trial does: load the frozen base (bf16, or NF4 for QLoRA), inject LoRA,
tokenize the data, then run AdamW over the adapter parameters only, with warmup and decay, gradient
accumulation, clipping, periodic eval, adapter-only checkpoints and resume. It reports through one small
interface (`Reporter`), so the same function runs standalone (`raylora train`, `ConsoleReporter`) and inside
a Ray Tune trial or Ray Train worker (the reporters in `raylora.sweep`).

Distributed: when a `torch.distributed` process group is up with more than one rank (Ray Train's
`TorchTrainer` starts one), each decoder layer is wrapped with FSDP2 `fully_shard` (frozen base and
trainable LoRA in the same unit), every rank reads its own slice of each global batch, and the loss is
normalised by the global token count so that N workers at batch B compute the same step as 1 worker at
batch N*B.

Reproducibility: the data order is a pure function of (seed, step) (`raylora.data.iterate_batches`) and the
dropout RNG is reseeded from (seed, step, rank) at every step, so a run resumed from a checkpoint at step k
computes the same steps k+1.. as the uninterrupted run, without saving RNG state.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from raylora.config import ConfigError, FinetuneConfig
from raylora.data import TokenizedData, eval_batches, iterate_batches, load_data
from raylora.fastpath import (
    compile_layers,
    compiled_head_loss,
    convert_to_float8,
    eager,
    install_lean_lora,
)
from raylora.model import (
    ParameterCount,
    apply_lora,
    check_model,
    count_parameters,
    load_base_model,
    load_tokenizer,
)
from raylora.names import (
    ADAPTER_RUN_CONFIG,
    CHECKPOINT_STATE_FILE,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    FIRST_STEP_AT,
    GRAD_NORM,
    LEARNING_RATE,
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

__all__ = [
    "ConsoleReporter",
    "NonFiniteLossError",
    "Reporter",
    "TrainResult",
    "evaluate_adapter",
    "latest_checkpoint",
    "train",
]

_CHECKPOINT_PREFIX = "step-"
_IGNORE = -100


class Reporter(Protocol):
    """Where the loop sends its numbers: a console, a Ray Tune trial, a Ray Train worker.

    `report` is called on every rank (Ray Train gathers from all workers; the others ignore non-zero
    ranks themselves). Train reports carry `TRAIN_LOSS`; eval reports carry `EVAL_LOSS` and, when a
    checkpoint was written at that step, its directory.
    """

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """The train loss became NaN or infinite: the run stops at once instead of wasting its budget."""


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    step: int
    eval_loss: float
    adapter_dir: str
    target_modules: list[str]
    parameters: ParameterCount
    metrics: dict[str, float]


@dataclass
class _Workers:
    """This process's place among the training workers (one worker when no process group is up)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def detect() -> _Workers:
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        if torch.cuda.is_available():
            # Ray Train sets each worker's current device; a lone process uses the first visible GPU.
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return _Workers(rank, world_size, device)

    def sum(self, value: float | int) -> float:
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def autocast(self, precision: str) -> torch.autocast:
        """bf16 autocast when asked, or by default (`auto`) on a GPU; a disabled context otherwise."""
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def _all_reduce(self, value: float | int, op) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


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
            `latest_checkpoint`); training continues at its step with the same data order.

    Raises:
        ConfigError: a bad field, model, target module, or dataset, before any training step.
        NonFiniteLossError: the train loss became NaN or infinite.
    """
    _validate_with_model(config)
    workers = _Workers.detect()
    if config.training.fp8:
        _check_fp8(workers)  # before the model is loaded: a wrong GPU should not cost the load
    if reporter is None:
        reporter = (
            ConsoleReporter(config, append=resume_from is not None) if workers.is_main else _SilentReporter()
        )
    cfg_model, cfg_data, cfg_adapter, cfg_train = config.model, config.data, config.adapter, config.training
    started = time.perf_counter()
    torch.manual_seed(cfg_train.seed)

    # ---- set-up: everything that can reject the input happens before the first step ------------------
    tokenizer = load_tokenizer(cfg_model)
    data: TokenizedData = load_data(cfg_data, tokenizer, seed=cfg_train.seed)
    model = load_base_model(cfg_model, qlora=cfg_adapter.qlora, device=workers.device)
    model, target_modules = apply_lora(
        model, cfg_adapter, activation_checkpointing=_activation_checkpointing(config)
    )
    # The same arithmetic as peft's LoRA layers, keeping each adapted layer's input once instead of a
    # dropped copy per layer (raylora.fastpath says how much that saves).
    install_lean_lora(model)
    if cfg_train.fp8:
        convert_to_float8(_decoder_layers(model))
    parameters = count_parameters(model)
    model.to(workers.device)  # LoRA weights are created on the CPU; the base already sits on the device
    if workers.world_size > 1:
        _shard_with_fsdp2(model, qlora=cfg_adapter.qlora)
    backend = _compile_backend(cfg_train.compile, workers)
    head_loss = None  # the chunked loss's eager path
    if backend is not None:
        # A fresh start for dynamo in every run: trials that a reused Ray actor runs one after another would
        # otherwise pile their graphs onto the same layer code until dynamo's recompile limit (8), past
        # which it silently runs the layers eagerly. Inductor's on-disk cache keeps recompiling a graph it
        # has seen cheap.
        torch._dynamo.reset()
        compile_layers(_decoder_layers(model), backend)
        head_loss = compiled_head_loss(backend)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg_train.learning_rate, weight_decay=cfg_train.weight_decay, betas=(0.9, 0.999)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    step = 0
    if resume_from is not None:
        step = _load_checkpoint(Path(resume_from), model, optimizer, scheduler, config)

    autocast = workers.autocast(cfg_train.precision)
    pad_id = tokenizer.pad_token_id
    accum = cfg_train.grad_accum_steps
    batches = iterate_batches(
        data.train,
        batch_size=cfg_train.batch_size,
        seed=cfg_train.seed,
        pad_id=pad_id,
        start=step * accum,
        rank=workers.rank,
        world_size=workers.world_size,
    )
    static = {
        TRAINABLE_PARAMS: float(parameters.trainable),
        TOTAL_PARAMS: float(parameters.total),
        TRAINABLE_PERCENT: parameters.trainable_percent,
    }
    if workers.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(workers.device)

    # ---- the loop: micro-steps -> clip -> step -> log -> eval/checkpoint ------------------------------
    model.train()
    eval_loss = math.nan
    last: dict[str, float] = {}
    tokens_seen = 0.0
    static[SETUP_TIME_S] = time.perf_counter() - started
    static[FIRST_STEP_AT] = time.time()
    train_time = 0.0
    window_tokens, window_start = 0.0, time.perf_counter()
    while step < cfg_train.max_steps:
        step_started = time.perf_counter()
        # Reseed per step: dropout masks depend on (seed, step, rank) only, which makes resume exact.
        torch.manual_seed(cfg_train.seed * 1_000_003 + step * 1009 + workers.rank)
        micro_batches = [next(batches) for _ in range(accum)]
        # The step's loss is the mean over every trained token of every micro-batch on every rank.
        # FSDP averages gradients over ranks, so each rank scales its token sum by world_size / total.
        step_targets = workers.sum(sum(_count_targets(mb) for mb in micro_batches))
        scale = workers.world_size / max(step_targets, 1.0)
        loss_sum = 0.0
        for micro_batch in micro_batches:
            window_tokens += int(micro_batch["attention_mask"].sum())  # counted on the CPU: no device sync
            micro_batch = {k: v.to(workers.device, non_blocking=True) for k, v in micro_batch.items()}
            with autocast:
                output = _forward(model, micro_batch)
            token_loss = _token_loss_sum(
                output, micro_batch["labels"], cfg_train.label_smoothing, head_loss=head_loss
            )
            (token_loss * scale).backward()
            loss_sum += token_loss.detach()
        grad_norm = _clip_and_measure(trainable, cfg_train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # note: .item() is a device-host sync point, once per optimizer step; it lets a NaN stop the run at once
        train_loss = workers.sum(float(loss_sum)) / max(step_targets, 1.0)
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"train loss is {train_loss} at step {step}; lower `training.learning_rate` "
                f"(now {cfg_train.learning_rate}) or set `training.max_grad_norm`"
            )
        train_time += time.perf_counter() - step_started

        last_step = step == cfg_train.max_steps
        if step % cfg_train.log_every == 0 or last_step:
            elapsed = time.perf_counter() - window_start
            window_tokens = workers.sum(window_tokens)
            tokens_seen += window_tokens
            last = {
                STEP: float(step),
                TRAIN_LOSS: train_loss,
                LEARNING_RATE: scheduler.get_last_lr()[0],
                GRAD_NORM: grad_norm,
                TOKENS_PER_SEC: window_tokens / max(elapsed, 1e-9),
                TOKENS_SEEN: tokens_seen,
                TRAIN_TIME_S: train_time,
                PEAK_MEMORY_GIB: workers.max(_peak_memory_gib(workers.device)),
                **static,
            }
            reporter.report(dict(last))
            window_tokens, window_start = 0.0, time.perf_counter()

        if step % cfg_train.eval_every == 0 or last_step:
            eval_loss = _evaluate(model, data, config, workers, autocast, pad_id)
            due = last_step or (cfg_train.checkpoint_every > 0 and step % cfg_train.checkpoint_every == 0)
            checkpoint = None
            if due:
                checkpoint = _save_checkpoint(
                    model, tokenizer, target_modules, optimizer, scheduler, step, config, workers
                )
            metrics = {
                **last,
                STEP: float(step),
                EVAL_LOSS: eval_loss,
                EVAL_PERPLEXITY: math.exp(min(eval_loss, 50.0)),
                WALL_TIME_S: time.perf_counter() - started,
            }
            # Only rank 0 writes checkpoint files; the other ranks report the same metrics without one.
            reporter.report(
                metrics, checkpoint_dir=str(checkpoint) if checkpoint and workers.is_main else None
            )
            window_start = time.perf_counter()  # eval time is not training throughput

    # ---- the final adapter: weights, adapter config, tokenizer and the resolved run config -----------
    adapter_dir = Path(cfg_train.output_dir) / "adapter"
    _save_adapter(model, tokenizer, config, target_modules, adapter_dir, workers)
    workers.barrier()
    final = {**last, STEP: float(step), EVAL_LOSS: eval_loss, WALL_TIME_S: time.perf_counter() - started}
    return TrainResult(step, eval_loss, str(adapter_dir), target_modules, parameters, final)


def _activation_checkpointing(config: FinetuneConfig) -> float:
    """`training.activation_checkpointing` as the fraction of decoder layers to checkpoint.

    None resolves to every layer with QLoRA, none otherwise. QLoRA is chosen to save memory, and the 4-bit
    weights save little of it on their own: on Llama shapes at 2048 tokens a row the activations are most of
    a step's memory. Checkpointing every layer costs a third more compute; on an H200 QLoRA so runs at
    0.67-0.70x of bf16 LoRA's tokens/s in 0.21-0.23x of its memory. Half the layers gives 0.79-0.83x at
    0.50-0.61x, more memory than the textbook QLoRA recipe on the 8B shape (BENCHMARKS.md has both); a user
    who has the memory sets the fraction.
    """
    checkpointing = config.training.activation_checkpointing
    if checkpointing is None:
        return 1.0 if config.adapter.qlora else 0.0
    return float(checkpointing)


def _check_fp8(workers: _Workers) -> None:
    """`training.fp8` needs one worker (sharding the fp8 weights with FSDP2 is neither built nor tested) and,
    on a GPU, FP8 tensor cores. The CPU runs it too (slowly: it checks the arithmetic, it is not a speed-up
    there)."""
    if workers.world_size > 1:
        raise ConfigError(
            f"`training.fp8` runs on one worker, but this trial has {workers.world_size}; "
            "set `resources.workers=1` or turn `training.fp8` off"
        )
    if workers.device.type == "cuda":
        capability = torch.cuda.get_device_capability(workers.device)
        if capability < (8, 9):
            raise ConfigError(
                f"`training.fp8` needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: H100, "
                f"H200, L4, B200); {torch.cuda.get_device_name(workers.device)} has "
                f"{capability[0]}.{capability[1]}; turn `training.fp8` off"
            )


def _compile_backend(mode: str, workers: _Workers) -> str | None:
    """The torch.compile backend for the decoder layers, or None to run them eagerly.

    `auto` compiles on a single GPU only: on the CPU inductor's compile time (tens of seconds per graph)
    outweighs what it saves on small models, and compiled layers under FSDP2 have not been checked for
    loss parity with one worker.
    """
    if mode == "auto":
        return "inductor" if workers.device.type == "cuda" and workers.world_size == 1 else None
    return None if mode == "off" else mode


def _validate_with_model(config: FinetuneConfig) -> None:
    """Every field check and every model-dependent check (from config.json alone, no weights), in one error.

    The model checks run only when the fields they read are sound, so a bad field is not reported twice.
    """
    problems: list[str] = []
    try:
        config.validate()
    except ConfigError as error:
        problems.extend(error.problems)
    needed = ("`model.", "`adapter.target_modules`", "`adapter.modules_to_save`", "`data.max_length`")
    if not any(problem.startswith(needed) for problem in problems):
        try:
            check_model(config.model, config.adapter, max_length=config.data.max_length)
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)


def evaluate_adapter(config: FinetuneConfig, adapter_dir: str | os.PathLike[str]) -> float:
    """Eval loss of a saved adapter on a fresh base, on the eval split `config` describes.

    Loads the base exactly as training did (bf16 or NF4), attaches the adapter with peft, and runs the
    same eval pass as the loop, so the number is comparable with the `eval_loss` the run reported.
    """
    from peft import PeftModel

    workers = _Workers.detect()
    torch.manual_seed(config.training.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, qlora=config.adapter.qlora, device=workers.device)
    data = load_data(config.data, tokenizer, seed=config.training.seed)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(workers.device)
    autocast = workers.autocast(config.training.precision)
    return _evaluate(model, data, config, workers, autocast, tokenizer.pad_token_id)


# ---- the pieces of one step ------------------------------------------------------------------------------


# Architectures whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`, with no logit
# soft-capping or scaling in between: for these the loss runs the head itself, a chunk of tokens at a time.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Tokens per loss chunk: the fp32 logits of one chunk are 2048 x vocab x 4 bytes (1 GiB at a 128k vocabulary)
# instead of tokens x vocab x 4 for the whole micro-batch (8 GiB at 8 x 2048 tokens).
_LOSS_CHUNK_TOKENS = 2048


@dataclass
class _ModelOutput:
    """What `_forward` hands to `_token_loss_sum`: the final hidden states and the output head to apply to
    them chunk by chunk, or (`head` None) the model's full logits."""

    hidden: torch.Tensor  # [batch, seq, d_model]; [batch, seq, vocab] logits when `head` is None
    head: torch.nn.Module | None
    autocast_dtype: torch.dtype | None  # the autocast the forward ran under, for the head; None: off


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> _ModelOutput:
    # Packed rows carry per-document position_ids and no padding: leaving attention_mask out lets
    # transformers build a block-diagonal causal mask from the position ids.
    mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    head = _chunkable_head(model)
    if head is None:
        return _ModelOutput(model(**inputs).logits, None, None)
    # The decoder alone (LoRA layers sit inside it): the [tokens, vocab] logits are never built here.
    hidden = _unwrap(model).get_decoder()(**inputs).last_hidden_state
    device_type = hidden.device.type
    autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return _ModelOutput(hidden, head, autocast_dtype)


def _chunkable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output head, when the loss may apply it itself; None to take the model's own logits.

    Not under FSDP2 (the root unit's embeddings and head are gathered by the root's own forward only), and
    not for architectures that transform the logits after the head (Gemma 2's soft-capping, Cohere's scale).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None
    base = _unwrap(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    return base.get_output_embeddings()


def _count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != _IGNORE).sum())


def _token_loss_sum(
    output: _ModelOutput, labels: torch.Tensor, label_smoothing: float, *, head_loss=None
) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over trained positions, in fp32 for a stable softmax.

    With a head to apply (`_forward` returned hidden states), the logits exist one chunk of
    `_LOSS_CHUNK_TOKENS` tokens at a time, each upcast to fp32 for its own cross-entropy: the same numbers
    as the full-logits path, summed in a different order.
    """
    targets = labels[:, 1:].reshape(-1)
    if output.head is None:
        logits = output.hidden
        shifted = logits[:, :-1].float().reshape(-1, logits.size(-1))
        return F.cross_entropy(
            shifted, targets, ignore_index=_IGNORE, reduction="sum", label_smoothing=label_smoothing
        )
    hidden = output.hidden[:, :-1].reshape(-1, output.hidden.size(-1))
    head, dtype = output.head, output.autocast_dtype
    head_trains = any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and hidden.requires_grad and not head_trains:
        fused = head_loss if _plain_linear(head) else None
        return _FrozenHeadCrossEntropy.apply(hidden, targets, head, label_smoothing, dtype, fused)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), _LOSS_CHUNK_TOKENS):
        chunk = (
            head,
            hidden[start : start + _LOSS_CHUNK_TOKENS],
            targets[start : start + _LOSS_CHUNK_TOKENS],
        )
        if torch.is_grad_enabled():
            # A trained head (`modules_to_save`, or LoRA on it) needs its own gradients: keep no chunk's
            # logits for backward, recompute them there instead.
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_cross_entropy, *chunk, label_smoothing, dtype, use_reentrant=False
            )
        else:
            total = total + _chunk_cross_entropy(*chunk, label_smoothing, dtype)
    return total


def _chunk_cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    # The head runs under the autocast the decoder ran under, as it would inside the model's forward.
    enabled = autocast_dtype is not None
    with torch.autocast(hidden.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        logits = head(hidden)
    return F.cross_entropy(
        logits.float(), targets, ignore_index=_IGNORE, reduction="sum", label_smoothing=label_smoothing
    )


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Chunked head + cross-entropy for a frozen head: each chunk's gradient w.r.t. the hidden states is
    taken in the forward pass, right after its loss, so backward only scales it; nothing is recomputed
    and no chunk's logits outlive its own iteration."""

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, autocast_dtype, head_loss):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.size(0), _LOSS_CHUNK_TOKENS):
            end = start + _LOSS_CHUNK_TOKENS
            if head_loss is not None:
                # The same arithmetic written out for the compiler (raylora.fastpath.head_loss_and_grad).
                dtype = autocast_dtype or head.weight.dtype
                loss, grad[start:end] = head_loss(
                    hidden[start:end].detach().to(dtype),
                    head.weight.detach().to(dtype),
                    targets[start:end],
                    label_smoothing,
                    _IGNORE,
                )
                total += loss
                continue
            chunk = hidden[start:end].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = _chunk_cross_entropy(head, chunk, targets[start:end], label_smoothing, autocast_dtype)
                (grad[start:end],) = torch.autograd.grad(loss, chunk)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # Scale in fp32: the loop scales the loss by 1/tokens, which bf16 would round by up to 0.4%.
        return (grad.float() * grad_output).to(grad.dtype), None, None, None, None, None


def _plain_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None


def _clip_and_measure(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    # clip_grad_norm_ returns the total norm before clipping; with max_norm=inf it only measures.
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _lr_lambda(config: FinetuneConfig):
    cfg = config.training
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


@torch.no_grad()
@eager()  # compiled layers run eagerly here: an eval (no grad, eval mode) would compile graphs of its own
def _evaluate(
    model: torch.nn.Module,
    data: TokenizedData,
    config: FinetuneConfig,
    workers: _Workers,
    autocast,
    pad_id: int,
) -> float:
    """Mean next-token loss over the eval split (every rank its shard), without label smoothing."""
    model.eval()
    loss_sum, targets = 0.0, 0
    batches: Iterator[dict[str, torch.Tensor]] = eval_batches(
        data.eval,
        batch_size=config.training.batch_size,
        pad_id=pad_id,
        rank=workers.rank,
        world_size=workers.world_size,
    )
    for index, batch in enumerate(batches):
        if config.training.eval_batches is not None and index >= config.training.eval_batches:
            break
        batch = {k: v.to(workers.device) for k, v in batch.items()}
        with autocast:
            output = _forward(model, batch)
        loss_sum += float(_token_loss_sum(output, batch["labels"], 0.0))
        targets += _count_targets(batch)
    model.train()
    return workers.sum(loss_sum) / max(workers.sum(targets), 1.0)


def _peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory on a GPU; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _shard_with_fsdp2(model: torch.nn.Module, *, qlora: bool) -> None:
    """FSDP2: one `fully_shard` unit per decoder layer (its frozen base and LoRA weights together), then the root.

    QLoRA layers stay gathered from forward to backward (`reshard_after_forward=False`): bitsandbytes' 4-bit
    matmul saves the packed weight for its backward, and FSDP2 freeing and re-gathering that storage in
    between left the input gradients wrong (2 CPU ranks, tiny Llama: eval loss 4.50 against 3.93 for one
    worker after 10 steps; with the layers kept gathered, 3.929465 against 3.929490). The packed weights are
    a quarter of bf16's, so holding a step's worth of them costs what sharding a bf16 base would save.
    """
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=not qlora)
    fully_shard(model)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    no_split = set(getattr(_unwrap(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in no_split]
    if not layers:
        raise RuntimeError(
            f"cannot find the decoder layers of {type(_unwrap(model)).__name__} to shard with FSDP2 "
            "(its `_no_split_modules` is empty); run it on one worker"
        )
    return layers


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ---- checkpoints: adapter weights + adapter config + optimizer, scheduler and step -------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Gathers sharded (FSDP2) adapter weights into full tensors on rank 0's CPU; frozen base weights never leave.
    return get_model_state_dict(model, options=_FULL)


def _save_adapter(
    model, tokenizer, config: FinetuneConfig, target_modules: list[str], directory: Path, workers
):
    """An adapter directory that loads on its own: peft weights and config, tokenizer, the resolved run config.

    Returns the adapter weights under this model's own parameter names (rank 0), for the trainer state.
    """
    state = _adapter_state(model)  # a collective under FSDP2: every rank must call it
    if workers.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory), state_dict=state)
        tokenizer.save_pretrained(str(directory))
        _write_json(
            directory / ADAPTER_RUN_CONFIG, {**config.to_dict(), "resolved_target_modules": target_modules}
        )
    return state


def _save_checkpoint(
    model,
    tokenizer,
    target_modules,
    optimizer,
    scheduler,
    step: int,
    config: FinetuneConfig,
    workers: _Workers,
) -> Path:
    """Write `output_dir/checkpoints/step-NNNNNN/` and return it; older checkpoints beyond the last two go."""
    root = Path(config.training.output_dir) / "checkpoints"
    directory = root / f"{_CHECKPOINT_PREFIX}{step:06d}"
    adapter_state = _save_adapter(model, tokenizer, config, target_modules, directory, workers)
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
        for old in sorted(root.glob(f"{_CHECKPOINT_PREFIX}*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    workers.barrier()
    return directory


def _load_checkpoint(directory: Path, model, optimizer, scheduler, config: FinetuneConfig) -> int:
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


# ---- reporters ---------------------------------------------------------------------------------------------


class _SilentReporter:
    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        pass


class ConsoleReporter:
    """Standalone runs: a progress bar over steps, one line per eval, and `metrics.jsonl` in the output dir."""

    def __init__(self, config: FinetuneConfig, *, append: bool = False, show_progress: bool = True):
        from tqdm.auto import tqdm

        self._total = config.training.max_steps
        self._bar = tqdm(
            total=self._total, desc="train", unit="step", disable=not show_progress, dynamic_ncols=True
        )
        self._log = Path(config.training.output_dir) / "metrics.jsonl"
        self._log.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self._log.write_text("")

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
