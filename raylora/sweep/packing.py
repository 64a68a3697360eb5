"""Packed trials: Tune trials whose adapters train together, one engine process per GPU holding the base once.

Tune stays in charge: every trial is still a trial, with its own config, reports, checkpoints, MLflow run,
ASHA decisions, retries and `--resume`. What changes is where its loop runs. A packed trial is a light
process (a sliver of a CPU) that hands its config to the engine of its node and relays the engine's reports
to Tune (`run_packed_trial`). The engine (`PackEngine`, a Ray actor holding the GPU) trains the adapters of up
to K trials at once with `raylora.packed.PackedTrainer`.

The hand-off at each eval: the engine evaluates the adapter, writes its checkpoint and pauses it; the trial
reports to Tune, which blocks until the scheduler has decided; if the trial goes on, it tells the engine to
resume the adapter; if ASHA stopped it, Tune ends the trial's thread and the trial tells the engine to drop
the adapter. So a stopped adapter trains not one step past its last eval, and its slot goes to a waiting
trial at the next step.

Engines are named Ray actors on the trial's node (`raylora-pack/<sweep>/<node>/<n>`), created by the first
trial that needs one and detached from it, so that they outlive any one trial; the sweep driver removes them
when the sweep ends (`stop_engines`), and an engine with no adapter for `_IDLE_EXIT_S` exits on its own. If an
engine dies, its trials' relays fail, and Tune retries them from their last checkpoints like any failed
trial; a retried trial starts a new engine.

How many adapters share an engine: at most `Sweep.pack` (a number), and on a GPU only as many as fit, from
the memory the steps so far took per adapter (`_Admission`): adapters join one at a time, each after a step
that measured the pack at its size.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from raylora.config import ConfigError, FinetuneConfig
from raylora.names import (
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    FIRST_STEP_AT,
    PACK_ENGINE,
    PACK_SIZE,
    SETUP_TIME_S,
    STEP,
    TRAIN_HISTORY,
    WALL_TIME_S,
)
from raylora.sweep.trial import local_copy, release_memory

__all__ = [
    "AUTO_PACK_MAX_TOKENS",
    "auto_pack_reasons",
    "engine_prefix",
    "pack_problems_of_sweep",
    "run_packed_trial",
    "stop_engines",
]

# An engine with no adapter and no trial waiting for this long shuts itself down (a driver that died
# without removing it leaves no GPU held).
_IDLE_EXIT_S = 120.0
# A trial that has not taken its eval report or said to go on for this long is taken for dead.
_ABANDONED_S = 900.0
# The share of GPU memory an engine fills with adapters at most; the rest is headroom for fragmentation.
_MEMORY_FILL = 0.85
_EVENT_WAIT_S = 5.0
# `Sweep(pack="auto")` packs trials whose micro-batch (`training.batch_size` x `data.max_length`) is at most this
# many tokens. Small trials trained together finished a sweep sooner than one trial at a time; a pack of
# trials that each fill the GPU trained fewer tokens a second than one of them alone, compiled, so beyond a
# short trial it ends later. The figures: BENCHMARKS.md, "Why the defaults".
AUTO_PACK_MAX_TOKENS = 4096


def engine_prefix(sweep_name: str) -> str:
    """The name prefix of a sweep's engines (Ray named actors)."""
    return f"raylora-pack/{sweep_name}/"


# ---- the trial side: a relay between the engine and Tune ------------------------------------------------------


def run_packed_trial(
    config: FinetuneConfig, spec: dict[str, Any], trial_id: str, placement: dict[str, Any]
) -> None:
    """Train `config` in the engine of this node and relay its reports to Tune, as `train` would report them.

    Raises:
        NonFiniteLossError: the adapter's loss diverged (the engine says at which step).
        RuntimeError: the engine failed on the step that held this adapter (Tune retries the trial).
    """
    import ray
    from ray import tune

    from raylora.recipe import NonFiniteLossError

    name = f"trial_{trial_id}"  # not a prefix of peft's "lora_" names
    checkpoint = tune.get_checkpoint()
    engine = _engine_for(spec, config, name)
    # With secrets: the engine loads the base (a gated model needs `model.token`); the call stays in memory.
    ray.get(engine.join.remote(name, config.to_dict(secrets=True), checkpoint))
    try:
        while True:
            event = ray.get(engine.next_event.remote(name, _EVENT_WAIT_S))
            if event is None:
                continue
            if "error" in event:
                kind = NonFiniteLossError if event.get("nonfinite") else RuntimeError
                raise kind(event["error"])
            result = {**event["metrics"], **placement, TRAIN_HISTORY: event["history"]}
            # Blocks until the scheduler has decided; a stop ends this thread here (SystemExit).
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(event["checkpoint"]))
            if event["final"]:
                return
            ray.get(engine.resume.remote(name))
    finally:
        engine.leave.remote(name)


def _engine_for(spec: dict[str, Any], config: FinetuneConfig, name: str):
    """An engine on this node that trains `config`'s base: the first with a free slot, starting one on the next
    free device when all are full, else the least loaded (where the trial waits for a slot)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    res = spec["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    devices = _node_gpus(node) if use_gpu else 1
    if devices == 0:
        raise ConfigError(
            f"trial {name} runs on node {node[:12]}, which has no GPU for a pack's engine; give every node GPUs "
            "(start a CPU-only head with `--num-cpus 0`) or set `Sweep(pack=False)`"
        )
    prefix = f"{engine_prefix(spec['name'])}{node[:12]}/"
    loads = []
    for index in range(devices):
        engine = PackEngine.options(
            name=f"{prefix}{index}",
            namespace=spec["namespace"],
            get_if_exists=True,
            lifetime="detached",
            num_cpus=res["cpus_per_worker"],
            num_gpus=1.0 if use_gpu else 0.0,
            max_concurrency=64,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(f"{prefix}{index}", spec["pack"])
        load = ray.get(engine.load.remote(name, config.to_dict()))
        if load is not None and load < 1.0:
            return engine
        if load is not None:
            loads.append((load, index, engine))
    if not loads:
        raise ConfigError(
            f"trial {name}: every pack engine on node {node[:12]} trains another base or dataset; the search "
            "space must not vary the model, the data or the numeric set-up of a packed sweep"
        )
    return min(loads, key=lambda item: item[:2])[2]


def _node_gpus(node: str) -> int:
    import ray

    for info in ray.nodes():
        if info.get("NodeID") == node:
            return int(info.get("Resources", {}).get("GPU", 0))
    return 0


def stop_engines(sweep_name: str, namespace: str) -> int:
    """Remove the engines of a sweep (the driver calls it when the sweep ends); returns how many."""
    import ray

    stopped = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == namespace and entry["name"].startswith(engine_prefix(sweep_name)):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=namespace))
                stopped += 1
            except ValueError:  # already gone
                pass
    return stopped


# ---- the engine -------------------------------------------------------------------------------------------------


@dataclass
class _Member:
    """A trial's adapter in the engine, with what its reports carry between evals."""

    config: FinetuneConfig
    events: queue.Queue
    joined: float
    joined_at: float  # the same moment, wall clock (unix seconds)
    history: list[dict[str, float]]
    logged: dict[str, float]
    waiting_since: float | None = None  # paused for the trial's answer to an eval report since
    final: bool = False


class _Admission:
    """How many adapters fit: a count cap, and on a GPU what the steps so far took per adapter.

    Adapters join one at a time, each after a step at the pack's current size: a step's peak is only known
    once it ran, and a pack's memory need not grow in proportion to its adapters (a pack of 8 x 2048-token
    1B adapters planned from one adapter's first step ran out of memory). A join is planned from the peak
    of the pack's current size plus the larger of two estimates of one adapter: the average of the largest
    size that stepped, and what the last adapter to join added to the peak. A size that has stepped before
    is taken again (a slot that an adapter left is refilled).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.per_adapter_bytes: float | None = None
        self.base_bytes = 0.0
        # adapters in a step -> the peak over the base when a step of that size ran (the device's peak since
        # the pack began: a size that stepped after a larger one is over-estimated, which errs safe)
        self._peaks: dict[int, float] = {}

    def capacity(self, active: int, device) -> int:
        """Adapters this engine can hold now: the cap, and on a GPU one more than `active` if it fits."""
        if device is None or device.type != "cuda":
            return self.cap
        import torch

        return self.fits(active, torch.cuda.get_device_properties(device).total_memory)

    def fits(self, active: int, total_bytes: float) -> int:
        """Adapters a device of `total_bytes` can hold when `active` are in its pack: `active` + 1 when one more
        fits under the fill, else `active` (the first one always)."""
        if active >= self.cap:
            return self.cap
        if active == 0:
            return 1
        if active + 1 in self._peaks:
            return active + 1  # it stepped before at that size
        if active not in self._peaks or self.per_adapter_bytes is None:
            return active  # this size has not stepped yet
        need = self.base_bytes + self._peaks[active] + self.per_adapter_bytes
        return active + 1 if need <= _MEMORY_FILL * total_bytes else active

    def room(self, active: int, device) -> bool:
        return active < self.capacity(active, device)

    def measured(self, active: int, base_bytes: float, device) -> None:
        """Learn the memory one adapter (weights, optimizer, activations of its rows) takes from a step's peak."""
        if device.type == "cuda" and active:
            import torch

            self.learn(active, torch.cuda.max_memory_allocated(device), base_bytes)

    def learn(self, active: int, peak_bytes: float, base_bytes: float) -> None:
        """Record a step of `active` adapters that peaked at `peak_bytes` over a base of `base_bytes`."""
        self.base_bytes = base_bytes
        self._peaks[active] = max(self._peaks.get(active, 0.0), peak_bytes - base_bytes)
        largest = max(self._peaks)
        estimate = self._peaks[largest] / largest
        below = [k for k in self._peaks if k < largest]
        if below:
            k = max(below)
            estimate = max(estimate, (self._peaks[largest] - self._peaks[k]) / (largest - k))
        self.per_adapter_bytes = max(self.per_adapter_bytes or 0.0, estimate)

    def failed(self, active: int) -> None:
        """A step of `active` adapters ran out of memory: never that many again."""
        self.cap = max(1, active - 1)
        self._peaks = {k: v for k, v in self._peaks.items() if k < active}


def _engine_class():
    import ray

    @ray.remote
    class PackEngine:
        """One process, one device, one base: the adapters of up to `cap` trials trained together."""

        def __init__(self, name: str, cap: int) -> None:
            self.name = name
            self._admission = _Admission(cap)
            self._cond = threading.Condition()
            self._waiting: list[tuple[str, FinetuneConfig, Any, float]] = []
            self._members: dict[str, _Member] = {}
            self._leaving: set[str] = set()
            self._trainer = None
            self._key: str | None = None
            self._base_bytes = 0.0
            self._idle_since = time.monotonic()
            self._queues: dict[str, queue.Queue] = {}
            self._thread = threading.Thread(target=self._run, name="pack-engine", daemon=True)
            self._thread.start()

        # -- called by trials --

        def load(self, name: str, config: dict[str, Any]) -> float | None:
            """How full this engine is for `config` (adapters and waiting trials over the slots it can fill), or
            None when it trains another base or dataset."""
            from raylora.packed import pack_key

            with self._cond:
                key = pack_key(FinetuneConfig.from_dict(config))
                if self._key is not None and key != self._key:
                    return None
                if name in self._members or any(w[0] == name for w in self._waiting):
                    return 0.0  # a retry of a trial it holds
                device = self._trainer.workers.device if self._trainer is not None else None
                slots = self._admission.capacity(len(self._members), device)
                return (len(self._members) + len(self._waiting)) / max(slots, 1)

        def join(self, name: str, config: dict[str, Any], checkpoint: Any) -> None:
            from raylora.packed import pack_key

            parsed = FinetuneConfig.from_dict(config)
            with self._cond:
                if self._key is None:
                    self._key = pack_key(parsed)
                if name in self._members:  # a retried trial: drop the adapter of its failed attempt
                    self._leaving.add(name)
                self._waiting.append((name, parsed, checkpoint, time.time()))
                self._queues[name] = queue.Queue()  # nothing an earlier attempt left behind
                self._cond.notify_all()

        def next_event(self, name: str, timeout_s: float) -> dict[str, Any] | None:
            try:
                return self._events(name).get(timeout=timeout_s)
            except queue.Empty:
                return None

        def resume(self, name: str) -> None:
            with self._cond:
                member = self._members.get(name)
                if member is not None:
                    member.waiting_since = None
                    if member.final:
                        self._leaving.add(name)
                    elif self._trainer is not None and name in self._trainer.adapters:
                        self._trainer.adapters[name].paused = False
                self._cond.notify_all()

        def leave(self, name: str) -> None:
            with self._cond:
                self._waiting = [w for w in self._waiting if w[0] != name]
                self._leaving.add(name)
                self._cond.notify_all()

        def stats(self) -> dict[str, Any]:
            """What the engine holds now (for tests and benchmarks)."""
            import torch

            from raylora.distributed import Workers

            device = Workers.detect().device
            with self._cond:
                return {
                    "name": self.name,
                    "adapters": sorted(self._members),
                    "waiting": [w[0] for w in self._waiting],
                    "cap": self._admission.cap,
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                    if device.type == "cuda"
                    else 0,
                }

        # -- the training thread --

        def _events(self, name: str) -> queue.Queue:
            return self._queues.setdefault(name, queue.Queue())

        def _run(self) -> None:
            while True:
                with self._cond:
                    self._apply_leaves()
                    self._admit()
                    runnable = self._trainer is not None and any(
                        not a.paused for a in self._trainer.adapters.values()
                    )
                    if not runnable:
                        if not self._members and not self._waiting:
                            if time.monotonic() - self._idle_since > _IDLE_EXIT_S:
                                break
                        else:
                            self._idle_since = time.monotonic()
                        self._drop_abandoned()
                        self._cond.wait(timeout=1.0)
                        continue
                    self._idle_since = time.monotonic()
                try:
                    step = self._trainer.step()
                except Exception as error:  # the trainer put every adapter back to the start of its step
                    traceback.print_exc()
                    self._step_failed(error)
                    continue
                active = len(self._trainer.adapters)
                self._admission.measured(active, self._base_bytes, self._trainer.workers.device)
                for name, failure in step.failed.items():
                    self._send(name, {"error": str(failure), "nonfinite": True})
                    with self._cond:
                        self._leaving.add(name)
                for name, metrics in step.stepped.items():
                    self._after_step(name, metrics)
            os._exit(0)  # idle: give the device back (the actor is not restarted)

        def _admit(self) -> None:
            """Bring waiting trials in while there is room (called with the lock held)."""
            from raylora.packed import PackedTrainer

            while self._waiting:
                device = self._trainer.workers.device if self._trainer is not None else None
                active = len(self._trainer.adapters) if self._trainer is not None else 0
                if device is not None and not self._admission.room(active, device):
                    return
                name, config, checkpoint, joined_at = self._waiting.pop(0)
                events = self._events(name)
                try:
                    if self._trainer is None:
                        self._trainer = PackedTrainer(config)
                        self._base_bytes = _allocated(self._trainer.workers.device)
                    resume_dir = local_copy(checkpoint, config) if checkpoint is not None else None
                    self._trainer.add(name, config, resume_from=resume_dir)
                except Exception as error:
                    traceback.print_exc()  # the engine's log (the Ray dashboard's actor logs) keeps the trace
                    events.put({"error": f"{type(error).__name__}: {error}", "nonfinite": False})
                    continue
                self._members[name] = _Member(config, events, time.monotonic(), joined_at, [], {})

        def _apply_leaves(self) -> None:
            for name in list(self._leaving):
                self._leaving.discard(name)
                member = self._members.pop(name, None)
                if member is None:
                    continue
                if self._trainer is not None:
                    self._trainer.remove(name)
                shutil.rmtree(member.config.training.output_dir, ignore_errors=True)
                release_memory()

        def _drop_abandoned(self) -> None:
            now = time.monotonic()
            for name, member in self._members.items():
                if member.waiting_since is not None and now - member.waiting_since > _ABANDONED_S:
                    self._leaving.add(name)

        def _after_step(self, name: str, metrics: dict[str, float]) -> None:
            trainer, member = self._trainer, self._members[name]
            adapter = trainer.adapters[name]
            step, cfg = adapter.global_step, member.config.training
            last_step = step >= cfg.max_steps
            if step % cfg.log_every == 0 or last_step:
                member.logged = trainer.train_metrics(name, metrics)
                # The trial's fixed cost: from joining (waiting for a slot and the base's load included) to
                # its first step.
                member.logged[FIRST_STEP_AT] = adapter.first_step_at
                member.logged[SETUP_TIME_S] = adapter.first_step_at - member.joined_at
                member.history.append(dict(member.logged))
            if step % cfg.eval_every != 0 and not last_step:
                return
            eval_loss = trainer.evaluate(name)
            checkpoint = trainer.save_checkpoint(name)
            import math

            report = {
                **member.logged,
                STEP: float(step),
                EVAL_LOSS: eval_loss,
                EVAL_PERPLEXITY: math.exp(min(eval_loss, 50.0)),
                WALL_TIME_S: trainer.wall_time(name),  # continues a resumed trial's
                PACK_ENGINE: self.name,
                PACK_SIZE: float(len(trainer.adapters)),
            }
            with self._cond:
                adapter.paused = True  # until the trial says Tune let it go on
                member.waiting_since = time.monotonic()
                member.final = last_step
            history, member.history = member.history, []
            self._send(
                name,
                {"metrics": report, "history": history, "checkpoint": str(checkpoint), "final": last_step},
            )

        def _send(self, name: str, event: dict[str, Any]) -> None:
            self._events(name).put(event)

        def _step_failed(self, error: Exception) -> None:
            """A pack's step raised. Out of memory with several adapters: the last one to join leaves (its trial
            is retried from its last checkpoint) and the pack never grows to this size again; the others step
            again from the start of their step, unchanged. Anything else: every trial of the step is retried."""
            message = f"the pack's step failed ({type(error).__name__}: {error}); the trial is retried"
            with self._cond:
                members = list(self._members)  # in the order they joined
                out_of_memory = "out of memory" in str(error).lower()
                if out_of_memory:
                    self._admission.failed(len(members))
                for name in _failed_by(members, out_of_memory):
                    self._send(name, {"error": message, "nonfinite": False})
                    self._leaving.add(name)

    return PackEngine


def _failed_by(members: list[str], out_of_memory: bool) -> list[str]:
    """The trials a failed step of a pack of `members` (in the order they joined) fails: on running out of
    memory with more than one, only the last to join (the pack fitted without it); otherwise all of them."""
    return members[-1:] if out_of_memory and len(members) > 1 else list(members)


def _allocated(device) -> float:
    if device.type != "cuda":
        return 0.0
    import torch

    return float(torch.cuda.memory_allocated(device))


class _LazyEngine:
    """`PackEngine` built on first use, so that importing this module does not import Ray."""

    _cls = None

    def __getattr__(self, name: str) -> Any:
        if _LazyEngine._cls is None:
            _LazyEngine._cls = _engine_class()
        return getattr(_LazyEngine._cls, name)


PackEngine = _LazyEngine()


def pack_problems_of_sweep(sweep) -> list[str]:
    """Why a sweep's trials cannot share engines (empty: they can), from the sweep definition and the model's
    config.json (no weights)."""
    from raylora.packed import pack_problems, shared_fields
    from raylora.sweep.spec import _candidate_configs

    problems: list[str] = []
    if sweep.resources.workers != 1:
        problems.append(f"its trials run on {sweep.resources.workers} workers; a pack trains on one")
    shared = shared_fields(sweep.base)
    searched = sorted(
        key for key in sweep.search_space if any(key == f or key.startswith(f + ".") for f in shared)
    )
    if searched:
        problems.append(
            f"the search space varies {', '.join(searched)}, which the adapters of a pack share (one base, one "
            "dataset)"
        )
    keys = ("adapter.use_dora", "adapter.peft_kwargs", "adapter.modules_to_save", "training.compile")
    for sampled in _candidate_configs(sweep.search_space, keys):
        for problem in pack_problems(sweep.trial_config(sampled)):
            if problem not in problems:
                problems.append(problem)
    if not problems:
        problems.extend(_expert_problems(sweep))
    return problems


def _expert_problems(sweep) -> list[str]:
    """Candidate target modules that adapt routed experts, which a pack cannot route per adapter: found from
    the model's skeleton here, rather than by every trial when it joins its engine."""
    from raylora.model import plan_model
    from raylora.sweep.spec import _candidate_configs

    problems: list[str] = []
    for sampled in _candidate_configs(sweep.search_space, ("adapter.target_modules",)):
        config = sweep.trial_config(sampled)
        try:
            plan = plan_model(
                config.model, config.adapter, max_length=config.data.max_length, packing=config.data.packing
            )
        except ConfigError:
            continue  # the sweep's validation reports it
        if plan.targets.parameters:
            problems.append(
                f"`adapter.target_modules` {config.adapter.target_modules!r} adapts routed experts "
                f"({len(plan.targets.parameters)} fused expert weights), which packed trials do not train; "
                "target 'attention' to leave the experts out"
            )
    return problems


def auto_pack_reasons(sweep) -> list[str]:
    """Why `Sweep(pack="auto")` runs this sweep's trials one per process (empty: it packs them).

    It packs where packing measured faster: two or more whole-GPU 1-worker trials whose micro-batches are at
    most `AUTO_PACK_MAX_TOKENS` tokens, and which can share a pack (`pack_problems_of_sweep`).
    """
    reasons: list[str] = []
    gpus = sweep.resources.gpus_per_worker
    if gpus == 0:
        reasons.append("its trials train on CPUs (`Sweep(pack=True)` packs them there too)")
    elif gpus != 1:
        reasons.append(
            f"its trials take {gpus:g} GPU each (a fraction shares a GPU the ordinary way; a pack holds a whole one)"
        )
    if _trial_count(sweep) < 2:
        reasons.append("it has one trial")
    tokens = _largest_micro_batch(sweep) * sweep.base.data.max_length
    if tokens > AUTO_PACK_MAX_TOKENS:
        reasons.append(
            f"a trial's micro-batch is up to {tokens} tokens (`training.batch_size` x `data.max_length`), over "
            f"{AUTO_PACK_MAX_TOKENS}: a trial that size trains faster alone"
        )
    if reasons:
        return reasons  # the model's skeleton is not built for a sweep that will not pack anyway
    return pack_problems_of_sweep(sweep)


def _trial_count(sweep) -> int:
    """Trials Tune will run: `num_samples` of every grid point."""
    from raylora.sweep.spec import _is_grid

    count = sweep.num_samples
    for value in sweep.search_space.values():
        if _is_grid(value):
            count *= len(value["grid_search"])
    return count


def _largest_micro_batch(sweep) -> int:
    """The largest `training.batch_size` a trial can sample (a range's upper bound)."""
    from raylora.sweep.spec import _candidate_configs

    value = sweep.search_space.get("training.batch_size")
    upper = getattr(value, "upper", None)
    if isinstance(upper, int | float):
        return int(upper)  # tune.randint's bound is exclusive, qrandint's inclusive: either errs large
    candidates = _candidate_configs(sweep.search_space, ("training.batch_size",))
    return max(sweep.trial_config(sampled).training.batch_size for sampled in candidates)
