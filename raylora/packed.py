"""Several adapters trained together on one frozen base: the packed step.

A sweep's trials often share everything but the adapter: the base model, the data, the sequence length.
`PackedTrainer` holds that shared part once (the base in bf16, fp8 or 4-bit, the tokenized data) and trains
up to K adapters at once. Each step takes the next micro-batch of every active adapter, concatenates them
into one batch, runs the base over it once, and each LoRA layer adds each adapter's output to that adapter's
rows only (`raylora.fastpath`, a `PackedRows` layout). Each adapter keeps everything it would have alone:

- its LoRA config (rank, alpha, dropout, rsLoRA, target modules, a trained output head), its optimizer and
  learning-rate schedule, its clipping, label smoothing and gradient accumulation;
- its data order (`raylora.data.iterate_batches` with its own seed and batch size) and its dropout masks
  (`raylora.fastpath.DropoutSeeds`: a pure function of seed, step, micro-batch and layer, so they do not
  depend on which adapters share the batch);
- its loss, summed over its own rows and normalised by its own token count. No row passes through another
  adapter's weights, so the backward pass of the summed losses gives every adapter exactly its own gradients;
- its checkpoints and final adapter, in the format of a solo run (`raylora.checkpoint`): a packed trial can
  resume solo and the other way round, and the adapter loads with plain peft.

So a packed adapter computes what it would compute alone; only the order of floating-point sums inside the
shared matmuls can differ (the batch is larger), which the exactness test bounds.

What cannot be packed is refused by `pack_problems` with the reason, and such a trial runs the ordinary way:
a different base, data, sequence length or numeric set-up (QLoRA, precision, checkpointing); FP8 base
layers (peft cannot add an adapter to a layer already converted); DoRA or other LoRA variants (peft
computes those itself, on every row); modules trained in full other than the output head.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raylora.checkpoint import (
    atomic_directory,
    checkpoint_dir,
    config_differences,
    name_base_as_given,
    prune_checkpoints,
    read_trainer_state,
    write_run_files,
    write_trainer_state,
)
from raylora.config import ConfigError, FinetuneConfig
from raylora.data import IGNORE_INDEX, TokenizedData, iterate_batches, load_data
from raylora.distributed import Workers
from raylora.fastpath import DropoutSeeds, compile_layers, install_lean_lora, seed_dropout
from raylora.loss import (
    ModelOutput,
    choose_head_loss,
    chunkable_head,
    count_targets,
    forward,
    token_loss_sum,
)
from raylora.model import (
    apply_activation_checkpointing,
    count_parameters,
    decoder_layers,
    load_base_model,
    load_tokenizer,
    lora_config,
    unwrap,
)
from raylora.names import (
    GRAD_NORM,
    LEARNING_RATE,
    PEAK_MEMORY_GIB,
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
from raylora.recipe import (
    NonFiniteLossError,
    activation_checkpointing,
    clip_gradients,
    compile_backend,
    evaluate_loss,
    lr_schedule,
    peak_memory_gib,
    reset_peak_memory,
)

__all__ = ["PackedRows", "PackedStep", "PackedTrainer", "pack_key", "pack_problems", "shared_fields"]

# Config fields that every adapter of a pack shares with the pack: they shape the frozen base, the tokenized
# data or the numerics of the shared forward pass.
_SHARED_FIELDS = (
    "model",
    "data",
    "adapter.qlora",
    "training.fp8",
    "training.precision",
    "training.compile",
    "training.activation_checkpointing",
)
# With `data.packing`, the train rows (which documents share a row) follow the run's seed too; the eval split
# follows `data.split_seed` (in `data`), whatever the training seed.
_PACKING_FIELDS = ("training.seed",)


def shared_fields(config: FinetuneConfig) -> tuple[str, ...]:
    """The config fields (sections or dotted fields) that every adapter of a pack on `config`'s base shares."""
    return _SHARED_FIELDS + (_PACKING_FIELDS if config.data.packing else ())


def pack_key(config: FinetuneConfig) -> str:
    """What a pack shares: two configs with the same key can train on one base."""
    data = config.to_dict()
    shared: dict[str, Any] = {}
    for name in shared_fields(config):
        section, _, key = name.partition(".")
        shared[name] = data[section][key] if key else data[section]
    return json.dumps(shared, sort_keys=True, default=str)


def pack_problems(config: FinetuneConfig) -> list[str]:
    """Why `config` cannot train in a pack, from the config alone (empty: it can)."""
    problems = []
    adapter = config.adapter
    if adapter.use_dora:
        problems.append("`adapter.use_dora` is true, and peft computes DoRA itself, on every row of a batch")
    extra = sorted(set(adapter.peft_kwargs) - {"init_lora_weights"})
    if extra:
        problems.append(f"`adapter.peft_kwargs` sets {extra}, which packed LoRA layers do not compute")
    if config.training.fp8:
        problems.append(
            "`training.fp8` is true: a pack holds a bf16 or 4-bit base (peft cannot add an adapter to a layer "
            "already in FP8)"
        )
    return problems


@dataclass
class PackedStep:
    """What one packed step did: the adapters that completed an optimizer step, and those that diverged."""

    stepped: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, NonFiniteLossError] = field(default_factory=dict)


class PackedRows:
    """Which rows of the current batch belong to which adapter; every routed LoRA layer reads it.

    `rows` holds (adapter name, first row, end row, dropout seed tensor or None) per adapter in the batch.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, torch.Tensor | None]] = []


@dataclass
class _Adapter:
    """One adapter of the pack and everything it would own in a solo run."""

    name: str
    config: FinetuneConfig
    targets: list[str]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    seeds: DropoutSeeds
    parameters: dict[str, float]
    global_step: int = 0
    pending: list[dict[str, torch.Tensor]] = field(default_factory=list)  # this step's micro-batches left
    # all of this optimizer step's micro-batches (those not in `pending` have been taken)
    step_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    micro: int = 0  # micro-batches of the current optimizer step done
    step_targets: float = 0.0
    loss_sum: float = 0.0
    window_tokens: float = 0.0
    window_start: float = field(default_factory=time.perf_counter)
    tokens_seen: float = 0.0
    train_time: float = 0.0
    first_step_at: float | None = None  # wall clock (unix seconds) when its first step began
    paused: bool = False
    joined: float = field(default_factory=time.monotonic)  # when it joined the pack
    wall_before: float = 0.0  # wall time of the attempts before a resume, up to their checkpoint

    def __post_init__(self) -> None:
        self.batches = None  # set by PackedTrainer: the adapter's own deterministic batch stream


class PackedTrainer:
    """One frozen base and the adapters trained on it together (one process, one device).

    Args:
        base: a config of the pack: every adapter must share its `pack_key` (base, data, numerics); its
            adapter and optimiser fields are not used.
        workers: this process's device; a pack never spans ranks.
    """

    def __init__(self, base: FinetuneConfig, *, workers: Workers | None = None) -> None:
        self.key = pack_key(base)
        self.workers = workers or Workers.detect()
        if self.workers.world_size > 1:
            raise ConfigError("a pack trains on one worker; run several-worker trials the ordinary way")
        # `compile="auto"` runs a pack eagerly: its LoRA linear layers are never traced
        # (`raylora.fastpath._packed_forward`), so a compiled decoder layer fuses only the short stretches
        # between them, which measured no faster than eager and cost a cold compile on the engine's first
        # step (BENCHMARKS.md, "Sweep throughput: packed trials"). A backend named in `training.compile` is
        # used: each decoder layer then compiles into the parts between its linear layers, once for every
        # adapter the engine will train (adapters joining and leaving change no graph; a new set of target
        # modules does, when its layers are first wrapped).
        backend = (
            None if base.training.compile == "auto" else compile_backend(base.training.compile, self.workers)
        )
        # Before the load: a head loss that cannot run here is refused first.
        self.head_loss = choose_head_loss(base.training, self.workers.device, backend)
        self.tokenizer = load_tokenizer(base.model)
        self.data: TokenizedData = load_data(base.data, self.tokenizer, seed=base.training.seed)
        self.base = load_base_model(base.model, qlora=base.adapter.qlora, device=self.workers.device)
        self._base_params = count_parameters(self.base).total
        fraction = activation_checkpointing(base)
        if fraction:
            apply_activation_checkpointing(self.base, fraction)
        if backend is not None:
            torch._dynamo.reset()
            compile_layers(decoder_layers(self.base), backend)
        self.model: Any = None  # a peft model around `base` once the first adapter joins
        self.autocast = self.workers.autocast(base.training.precision)
        self.layout = PackedRows()
        self.adapters: dict[str, _Adapter] = {}
        self._mask_length = base.data.max_length
        # The pack's peak memory from here on: the base and every adapter it trains share this process.
        reset_peak_memory(self.workers.device)

    # ---- adapters joining and leaving ------------------------------------------------------------------------

    def add(self, name: str, config: FinetuneConfig, *, resume_from: str | Path | None = None) -> None:
        """Add adapter `name` trained as `config` says, initialised as a solo run of it would be.

        Args:
            name: the adapter's name in the pack (a Tune trial id, say).
            config: its run config; it must share the pack's `pack_key`.
            resume_from: a checkpoint of this config (written by a solo or a packed run) to continue from.

        Raises:
            ConfigError: `config` does not share the pack's base, data and numerics, or cannot be packed.
        """
        problems = pack_problems(config)
        if pack_key(config) != self.key:
            problems.append("its base model, data, seed or numeric set-up differ from the pack's")
        if name in self.adapters:
            problems.append(f"an adapter named {name!r} is already in the pack")
        if config.adapter.modules_to_save:
            problems.extend(self._modules_to_save_problems(config))
        if problems:
            raise ConfigError([f"adapter {name!r} cannot join the pack: {p}" for p in problems])
        from peft import get_peft_model

        peft_config, resolved = lora_config(unwrap(self._current()), config.adapter)
        if resolved.parameters:
            # The pack's LoRA rows are routed per linear layer; a routed expert's weight is adapted by peft's
            # parameter wrapper, which would apply every adapter to every row.
            raise ConfigError(
                f"adapter {name!r} cannot join the pack: `adapter.target_modules` "
                f"{config.adapter.target_modules!r} adapts routed experts, which packed trials do not support; "
                "set `Sweep(pack=False)`, or target 'attention' to leave the experts out"
            )
        targets = resolved.paths
        torch.manual_seed(config.training.seed)  # the adapter's initial weights, as in the solo run
        if self.model is None:
            self.model = get_peft_model(self.base, peft_config, adapter_name=name)
        else:
            self.model.add_adapter(name, peft_config)
        self.model.to(self.workers.device)  # new adapter weights are created on the CPU
        install_lean_lora(self.model, routed=True)
        seed_dropout(self.model, None, self._mask_length)  # layer keys; each adapter's seeds ride in the rows
        for module in self.model.modules():
            if getattr(module, "_raylora_branch", None) is not None:
                module._raylora_rows = self.layout
        named = [(n, p) for n, p in self.model.named_parameters() if _owned_by(n, name)]
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(
            params,
            lr=config.training.learning_rate,
            weight_decay=config.training.weight_decay,
            betas=(0.9, 0.999),
        )
        trainable = sum(p.numel() for p in params)
        total = self._base_params + trainable
        adapter = _Adapter(
            name=name,
            config=config,
            targets=targets,
            params=params,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.training)),
            seeds=DropoutSeeds(config.training.seed, rows=config.training.batch_size),
            parameters={
                TRAINABLE_PARAMS: float(trainable),
                TOTAL_PARAMS: float(total),
                TRAINABLE_PERCENT: 100.0 * trainable / total if total else 0.0,
            },
        )
        if resume_from is not None:
            adapter.global_step = self._load(adapter, named, Path(resume_from))
        adapter.batches = self._batches(config, start=adapter.global_step * config.training.grad_accum_steps)
        self.adapters[name] = adapter
        self._train_every_adapter()
        self.model.train()

    def _train_every_adapter(self) -> None:
        """Every adapter of the pack trainable, and nothing else.

        peft trains its *active* adapter only: adding an adapter, or deleting the active one, sets
        `requires_grad` on the layers for peft's notion of the active adapter and clears it for the others.
        """
        for adapter in self.adapters.values():
            for param in adapter.params:
                param.requires_grad_(True)

    def remove(self, name: str) -> None:
        """Take adapter `name` out of the pack and free its weights and optimizer state."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            return
        adapter.optimizer.state.clear()
        adapter.params.clear()
        if self.adapters:
            self.model.delete_adapter(name)
            self._train_every_adapter()
        else:
            # peft keeps no model without an adapter: back to the bare base, which the next adapter wraps anew.
            # `unload()` keeps the active adapter's trained copy of a module trained in full: put the frozen
            # original back.
            from peft.utils.other import ModulesToSaveWrapper

            originals = [
                (path, module.original_module)
                for path, module in unwrap(self.model).named_modules()
                if isinstance(module, ModulesToSaveWrapper)
            ]
            self.base = self.model.unload()
            for path, original in originals:
                self.base.set_submodule(path, original)
            self.model = None

    # ---- one packed step ----------------------------------------------------------------------------------------

    def step(self) -> PackedStep:
        """One micro-batch of every active (not paused) adapter through the base together.

        Returns the step metrics (train loss, gradient norm) of each adapter that completed an optimizer step
        now, its gradient accumulation done, and the adapters whose loss became NaN or infinite: those have
        not stepped; the caller takes them out of the pack. The other adapters are untouched by them.

        A step that raises (out of memory, say) leaves every adapter at the start of its optimizer step
        (`_restart_steps`): the caller may drop one and step the others again.
        """
        result = PackedStep()
        active = [a for a in self.adapters.values() if not a.paused]
        if not active:
            return result
        started = time.perf_counter()
        for adapter in active:
            if adapter.first_step_at is None:
                adapter.first_step_at = time.time()
        micro_batches = [self._next_micro_batch(adapter) for adapter in active]
        try:
            self._forward_backward(active, micro_batches)
        except BaseException:
            self._restart_steps(active)
            raise
        share = (time.perf_counter() - started) / len(active)
        ready = []
        for adapter in active:
            adapter.micro += 1
            adapter.train_time += share
            if adapter.micro >= adapter.config.training.grad_accum_steps:
                ready.append(adapter)
        if ready:
            result.stepped, result.failed = self._optimizer_steps(ready)
        return result

    def _forward_backward(self, active: list[_Adapter], micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """The base once over every adapter's micro-batch, each adapter's loss on its own rows, one backward."""
        batch = _concatenate(micro_batches, self.tokenizer.pad_token_id)
        rows, first = [], 0
        for adapter, micro_batch in zip(active, micro_batches, strict=True):
            end = first + micro_batch["input_ids"].size(0)
            adapter.seeds.set(adapter.global_step, adapter.micro)
            rows.append((adapter.name, first, end, adapter.seeds.tensor))
            adapter.window_tokens += _tokens(micro_batch)
            first = end
        self.layout.rows = rows
        batch = {k: v.to(self.workers.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast:
            output = forward(self.model, batch)
        total = None
        for adapter, micro_batch, (_, start, end, _) in zip(active, micro_batches, rows, strict=True):
            width = micro_batch["labels"].size(1)  # the adapter's own row width, without the pack's padding
            head = self._head(adapter.name, output)
            own = ModelOutput(output.hidden[start:end, :width], head, output.autocast_dtype)
            labels = batch["labels"][start:end, :width]
            loss = token_loss_sum(
                own, labels, adapter.config.training.label_smoothing, head_loss=self.head_loss
            )
            adapter.loss_sum += loss.detach()
            scaled = loss / max(adapter.step_targets, 1.0)
            total = scaled if total is None else total + scaled
        total.backward()

    def _restart_steps(self, active: list[_Adapter]) -> None:
        """After a failed forward or backward (out of memory, say): every adapter of it back to the start of
        its optimizer step, with that step's micro-batches and no gradient, as if the step had not begun.

        Its dropout masks come from (step, micro-batch) seeds, so running the step again computes what it
        would have computed: a pack that drops one adapter after running out of memory trains the others on
        unchanged.
        """
        for adapter in active:
            taken = adapter.step_batches[: len(adapter.step_batches) - len(adapter.pending)]
            adapter.window_tokens -= sum(_tokens(micro_batch) for micro_batch in taken)
            adapter.pending = list(adapter.step_batches)
            adapter.micro = 0
            adapter.loss_sum = 0.0
            adapter.optimizer.zero_grad(set_to_none=True)

    def _next_micro_batch(self, adapter: _Adapter) -> dict[str, torch.Tensor]:
        if adapter.micro == 0 and not adapter.pending:
            # All micro-batches of the step at its start, as a solo step takes them: the step's loss is the
            # mean over every trained token of all of them. (After `_restart_steps` they are pending still.)
            accum = adapter.config.training.grad_accum_steps
            adapter.step_batches = [next(adapter.batches) for _ in range(accum)]
            adapter.pending = list(adapter.step_batches)
            adapter.step_targets = float(sum(count_targets(mb) for mb in adapter.pending))
            adapter.loss_sum = 0.0
        return adapter.pending.pop(0)

    def _optimizer_steps(
        self, ready: list[_Adapter]
    ) -> tuple[dict[str, dict[str, float]], dict[str, NonFiniteLossError]]:
        """The optimizer step of every adapter in `ready` (their accumulation done): their metrics, and those
        whose loss is not finite (not stepped, gradients dropped).

        The losses and gradient norms of all of them reach the host in one device-host sync, not two per
        adapter: a sync empties the device's queue, and a pack would otherwise wait on it once per adapter.
        """
        norms = [clip_gradients(a.params, a.config.training.max_grad_norm) for a in ready]
        sums = [torch.as_tensor(a.loss_sum, dtype=torch.float32, device=norms[0].device) for a in ready]
        values = torch.stack([*sums, *(n.float() for n in norms)]).tolist()  # the one sync
        stepped, failed = {}, {}
        for adapter, loss_sum, grad_norm in zip(
            ready, values[: len(ready)], values[len(ready) :], strict=True
        ):
            cfg = adapter.config.training
            adapter.micro = 0
            train_loss = loss_sum / max(adapter.step_targets, 1.0)
            if not math.isfinite(train_loss):
                adapter.optimizer.zero_grad(set_to_none=True)
                failed[adapter.name] = NonFiniteLossError(
                    f"adapter {adapter.name!r}: train loss is {train_loss} at step {adapter.global_step + 1}; "
                    f"lower `training.learning_rate` (now {cfg.learning_rate}) or set `training.max_grad_norm`"
                )
                continue
            lr = adapter.scheduler.get_last_lr()[0]  # the rate this step uses; the scheduler moves on below
            adapter.optimizer.step()
            adapter.scheduler.step()
            adapter.optimizer.zero_grad(set_to_none=True)
            adapter.global_step += 1
            stepped[adapter.name] = {TRAIN_LOSS: train_loss, GRAD_NORM: grad_norm, LEARNING_RATE: lr}
        return stepped, failed

    # ---- per adapter: metrics, eval, checkpoints ------------------------------------------------------------

    def train_metrics(self, name: str, step_metrics: dict[str, float]) -> dict[str, float]:
        """Adapter `name`'s train report at a log step, with the keys `LoraRecipe.train_metrics` writes."""
        adapter = self.adapters[name]
        elapsed = time.perf_counter() - adapter.window_start
        adapter.tokens_seen += adapter.window_tokens
        metrics = {
            STEP: float(adapter.global_step),
            **step_metrics,
            TOKENS_PER_SEC: adapter.window_tokens / max(elapsed, 1e-9),
            TOKENS_SEEN: adapter.tokens_seen,
            TRAIN_TIME_S: adapter.train_time,
            PEAK_MEMORY_GIB: peak_memory_gib(self.workers.device),
            **adapter.parameters,
        }
        adapter.window_tokens = 0.0
        adapter.window_start = time.perf_counter()
        return metrics

    def wall_time(self, name: str) -> float:
        """Seconds since adapter `name` joined the pack, plus, after a resume, the wall time of its earlier
        attempts up to the checkpoint it resumed from."""
        adapter = self.adapters[name]
        return adapter.wall_before + time.monotonic() - adapter.joined

    def evaluate(self, name: str) -> float:
        """Adapter `name`'s mean eval loss over the eval split, its rows alone, as its solo run evaluates."""
        adapter = self.adapters[name]
        cfg = adapter.config.training
        saved, self.layout.rows = self.layout.rows, [(name, 0, cfg.batch_size, None)]
        try:
            return evaluate_loss(
                self.model,
                self.data,
                batch_size=cfg.batch_size,
                max_batches=cfg.eval_batches,
                workers=self.workers,
                autocast=self.autocast,
                pad_id=self.tokenizer.pad_token_id,
                head=self._head(name, None),
            )
        finally:
            self.layout.rows = saved
            adapter.window_start = time.perf_counter()  # eval time is not training throughput

    def save_adapter(self, name: str, directory: Path) -> Path:
        """Adapter `name` as a solo run writes it: loadable by plain peft, with the tokenizer and run config;
        written atomically (`raylora.checkpoint.atomic_directory`)."""
        adapter = self.adapters[name]
        needs = sum(p.numel() * p.element_size() for p in adapter.params)
        with atomic_directory(directory, needs_bytes=needs) as temporary:
            self._write_adapter(adapter, temporary)
        return directory

    def _write_adapter(self, adapter: _Adapter, directory: Path) -> None:
        loaded_from = name_base_as_given(self.model, adapter.config.model.name_or_path)
        with tempfile.TemporaryDirectory(prefix="raylora-pack-") as tmp:
            # peft writes an adapter other than "default" into a folder named after it.
            self.model.save_pretrained(tmp, selected_adapters=[adapter.name])
            for file in (Path(tmp) / adapter.name).iterdir():
                shutil.move(str(file), directory / file.name)
        write_run_files(directory, self.tokenizer, adapter.config, adapter.targets, loaded_from=loaded_from)

    def save_checkpoint(self, name: str) -> Path:
        """A resumable checkpoint of adapter `name` under its `output_dir`, in the format a solo run uses,
        written atomically; older checkpoints are pruned as a solo run prunes them."""
        adapter = self.adapters[name]
        directory = checkpoint_dir(adapter.config, adapter.global_step)
        # The weights twice (safetensors, trainer state) and AdamW's two moments.
        needs = 4 * sum(p.numel() * p.element_size() for p in adapter.params)
        with atomic_directory(directory, needs_bytes=needs) as temporary:
            self._write_adapter(adapter, temporary)
            self._write_trainer_state(adapter, temporary)
        prune_checkpoints(directory.parent, adapter.global_step)
        return directory

    def _write_trainer_state(self, adapter: _Adapter, directory: Path) -> None:
        name = adapter.name
        names = {id(p): _solo_name(n, name) for n, p in self.model.named_parameters() if _owned_by(n, name)}
        ordered = [names[id(p)] for p in adapter.params]
        optimizer = adapter.optimizer.state_dict()
        write_trainer_state(
            directory,
            step=adapter.global_step,
            adapter={names[id(p)]: p.detach().to("cpu", copy=True) for p in adapter.params},
            optimizer={
                "state": {ordered[i]: _to_cpu(v) for i, v in optimizer["state"].items()},
                "param_groups": [
                    {
                        **{k: v for k, v in g.items() if k != "params"},
                        "params": [ordered[i] for i in g["params"]],
                    }
                    for g in optimizer["param_groups"]
                ],
            },
            scheduler=adapter.scheduler.state_dict(),
            config=adapter.config,
            world_size=1,
            counters={
                TOKENS_SEEN: adapter.tokens_seen + adapter.window_tokens,
                TRAIN_TIME_S: adapter.train_time,
                WALL_TIME_S: self.wall_time(name),
            },
        )

    # ---- helpers --------------------------------------------------------------------------------------------

    def _load(self, adapter: _Adapter, named: list[tuple[str, torch.nn.Parameter]], directory: Path) -> int:
        """Restore a checkpoint written for this config (solo or packed) into `adapter`, with its counters;
        return its step.

        Raises:
            ConfigError: the checkpoint belongs to another run (`raylora.checkpoint.config_differences`), was
                written by several workers, or holds another adapter shape.
        """
        state = read_trainer_state(directory)
        differences = config_differences(state.get("config") or {}, adapter.config)
        if state.get("world_size", 1) != 1:
            differences.append(f"workers: {state['world_size']} -> 1 (a pack trains on one worker)")
        if differences:
            raise ConfigError(
                f"checkpoint {str(directory)!r} belongs to another run: it differs in {'; '.join(differences)}"
            )
        counters = state.get("counters") or {}
        adapter.tokens_seen = counters.get(TOKENS_SEEN, 0.0)
        adapter.train_time = counters.get(TRAIN_TIME_S, 0.0)
        adapter.wall_before = counters.get(WALL_TIME_S, 0.0)
        by_solo_name = {_solo_name(n, adapter.name): p for n, p in named}
        if set(state["adapter"]) != set(by_solo_name):
            missing = sorted(set(by_solo_name) - set(state["adapter"]))[:3]
            raise ConfigError(
                f"checkpoint {str(directory)!r} was written for another adapter shape (no weights for e.g. "
                f"{missing}); resume with the `adapter` config that wrote it"
            )
        with torch.no_grad():
            for solo, param in by_solo_name.items():
                param.copy_(state["adapter"][solo])
        saved = state["optimizer"]
        index = {solo: i for i, solo in enumerate(_solo_name(n, adapter.name) for n, _ in named)}
        adapter.optimizer.load_state_dict(
            {
                "state": {index[k]: v for k, v in saved["state"].items()},
                "param_groups": [
                    {
                        **{k: v for k, v in g.items() if k != "params"},
                        "params": [index[p] for p in g["params"]],
                    }
                    for g in saved["param_groups"]
                ],
            }
        )
        adapter.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    def _batches(self, config: FinetuneConfig, *, start: int):
        return iterate_batches(
            self.data.train,
            batch_size=config.training.batch_size,
            seed=config.training.seed,
            pad_id=self.tokenizer.pad_token_id,
            start=start,
        )

    def _current(self) -> torch.nn.Module:
        """The model as it stands: the peft model while adapters are in the pack, else the bare base."""
        return self.model if self.model is not None else self.base

    def _head(self, name: str, output: ModelOutput | None) -> torch.nn.Module | None:
        """The output head adapter `name` trains against: its own copy if it trains the head, else the frozen one."""
        if output is not None and output.head is None:
            return None  # the model's own logits (a head the loss does not apply itself)
        head = chunkable_head(self.model)
        copies = getattr(head, "modules_to_save", None)
        if copies is None:
            return head
        if name in copies:  # a ModuleDict: no .get()
            return copies[name]
        return head.original_module

    def _modules_to_save_problems(self, config: FinetuneConfig) -> list[str]:
        # Only the output head can be trained in full by one adapter of a pack: the loss applies each
        # adapter's own copy of it to that adapter's rows. Any other module would run on every row.
        model = unwrap(self._current())
        head = model.get_output_embeddings()
        head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
        others = [m for m in config.adapter.modules_to_save if m not in head_names and m != "lm_head"]
        problems = []
        if others:
            problems.append(
                f"`adapter.modules_to_save` names {others}; in a pack only the output head can be"
            )
        if chunkable_head(self._current()) is None:
            problems.append(
                f"`adapter.modules_to_save` trains the output head of a {model.config.model_type} model, whose "
                "logits the loss does not compute itself"
            )
        return problems


def _owned_by(parameter: str, adapter: str) -> bool:
    return f".{adapter}." in parameter


def _solo_name(parameter: str, adapter: str) -> str:
    return parameter.replace(f".{adapter}.", ".default.")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _tokens(micro_batch: dict[str, torch.Tensor]) -> int:
    """The tokens a micro-batch trains on (its mask is still on the CPU: no device sync)."""
    return int(micro_batch["attention_mask"].sum())


def _concatenate(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of every adapter's micro-batch, rows in order, padded on the right to the longest row.

    Padding continues each row as `raylora.data` pads it: `pad_id`, ignored labels, a zero attention mask,
    position ids counting on.
    """
    width = max(part["input_ids"].size(1) for part in parts)
    padded = []
    for part in parts:
        extra = width - part["input_ids"].size(1)
        if extra:
            more = part["position_ids"][:, -1:] + torch.arange(1, extra + 1)
            part = {
                "input_ids": torch.nn.functional.pad(part["input_ids"], (0, extra), value=pad_id),
                "labels": torch.nn.functional.pad(part["labels"], (0, extra), value=IGNORE_INDEX),
                "attention_mask": torch.nn.functional.pad(part["attention_mask"], (0, extra), value=0),
                "position_ids": torch.cat([part["position_ids"], more], dim=1),
            }
        padded.append(part)
    return {key: torch.cat([part[key] for part in padded]) for key in padded[0]}
