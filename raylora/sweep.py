"""Sweeps: a `Sweep` written in plain Python, searched by Ray Tune, each trial one run of `raylora.training.train`.

Flow: `Sweep` (the search space over `FinetuneConfig` fields, by dotted path) -> `run_sweep` builds a Ray
Tune `Tuner` -> one trial per sampled config -> `_run_trial`:

- 1 worker: the training loop runs inside the Tune trial itself (no worker group to spin up, which would
  cost ~25 s per trial on a small machine). Reports go to `ray.tune.report`.
- N workers: the trial builds a Ray Train V2 `TorchTrainer` (passing a trainer to `Tuner` is no longer
  supported in Ray 2.60) that runs the same loop on N workers with FSDP2, and forwards its reports to Tune
  through `TuneReportCallback`. The inner run is named after the trial id, so a retried trial finds its
  own checkpoints.

Tune sees one report per eval (carrying `eval_loss`, the train metrics logged since the previous eval in
`train_history`, and an adapter-only checkpoint), so ASHA can stop losers at every eval and a retried trial
resumes from its last eval instead of step 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora.config import ConfigError, FinetuneConfig
from raylora.names import EVAL_LOSS, NUM_NODES, REPORTED_METRICS, STEP, TRAIN_HISTORY, WORKER_NODES
from raylora.training import NonFiniteLossError, train

__all__ = [
    "ALPHA_RATIO",
    "Resources",
    "Sweep",
    "SweepResult",
    "TrialSummary",
    "experiment_path",
    "load_sweep",
    "run_sweep",
]

# A pseudo-field of the search space: alpha as a multiple of the sampled rank (alpha = ratio * r).
ALPHA_RATIO = "adapter.alpha_ratio"
SEARCH_ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_NONFINITE_MARKER = "NONFINITE_LOSS"
# What an N-worker trial's own process reserves (Ray refuses an empty resource request).
_TRAINER_DRIVER_CPU = 0.01


@dataclass
class Resources:
    """What one trial asks of the cluster: N workers, each with CPUs and (possibly fractional) GPUs."""

    workers: int = field(
        default=1, metadata={"help": "Training workers per trial; >1 runs FSDP2 over a TorchTrainer."}
    )
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved for each worker."})
    gpus_per_worker: float = field(
        default=0.0,
        metadata={
            "help": "GPUs per worker; a fraction (e.g. 0.25) lets several small 1-worker trials share a GPU."
        },
    )
    placement_strategy: str = field(
        default="PACK",
        metadata={
            "help": "How a trial's workers are placed: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one per node)."
        },
    )

    def problems(self) -> list[str]:
        problems: list[str] = []
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            problems.append(f"`resources.workers` must be a positive integer, got {self.workers!r}")
        if not isinstance(self.cpus_per_worker, int | float) or self.cpus_per_worker <= 0:
            problems.append(f"`resources.cpus_per_worker` must be > 0, got {self.cpus_per_worker!r}")
        gpus = self.gpus_per_worker
        if not isinstance(gpus, int | float) or gpus < 0:
            problems.append(f"`resources.gpus_per_worker` must be >= 0, got {gpus!r}")
        elif gpus > 1 and gpus != int(gpus):
            problems.append(
                f"`resources.gpus_per_worker` above 1 must be a whole number, got {gpus!r}; "
                "use more workers for more GPUs"
            )
        elif self.workers != 1 and 0 < gpus < 1:
            problems.append(
                f"`resources.gpus_per_worker` {gpus} is a fraction with {self.workers} workers; FSDP workers need "
                "a whole GPU each (fractions are for 1-worker trials sharing a GPU)"
            )
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            problems.append(
                f"`resources.placement_strategy` must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                f"got {self.placement_strategy!r}"
            )
        return problems


@dataclass
class Sweep:
    """A hyperparameter sweep: a base config, a search space over its fields, and how to search it.

    `search_space` maps dotted config fields (``"adapter.r"``, ``"training.learning_rate"``,
    ``"adapter.target_modules"``, ``"adapter.qlora"``...) to Ray Tune samplers (`tune.choice`,
    `tune.loguniform`, `tune.grid_search`...) or fixed values; `adapter.alpha_ratio` sets alpha as a
    multiple of the sampled rank. Everything else comes from `base`.
    """

    name: str
    base: FinetuneConfig = field(default_factory=FinetuneConfig)
    search_space: dict[str, Any] = field(default_factory=dict)
    metric: str = EVAL_LOSS
    mode: str = "min"
    search_alg: str = "random"
    scheduler: str = "asha"
    grace_period: int = 20
    reduction_factor: int = 2
    num_samples: int = 4
    max_concurrent_trials: int | None = None
    resources: Resources = field(default_factory=Resources)
    storage_path: str = "raylora_results"
    max_failures: int = 2
    keep_checkpoints: int = 2
    seed: int | None = 0

    def problems(self) -> list[str]:
        """Every problem in the sweep definition (without a cluster); `validate` raises them together."""
        from ray.tune.search.sample import Categorical, Domain, Float, Integer

        problems: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            problems.append(f"`sweep.name` must be a non-empty name without '/', got {self.name!r}")
        if self.metric not in REPORTED_METRICS:
            problems.append(
                f"`sweep.metric` {self.metric!r} is never reported by the training loop; "
                f"use one of {', '.join(REPORTED_METRICS)}"
            )
        if self.mode not in ("min", "max"):
            problems.append(f"`sweep.mode` must be 'min' or 'max', got {self.mode!r}")
        if self.search_alg not in SEARCH_ALGORITHMS:
            problems.append(
                f"`sweep.search_alg` must be one of {', '.join(SEARCH_ALGORITHMS)}, got {self.search_alg!r}"
            )
        if self.scheduler not in SCHEDULERS:
            problems.append(
                f"`sweep.scheduler` must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        for name in ("num_samples", "grace_period", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"`sweep.{name}` must be a positive integer, got {value!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            problems.append(
                f"`sweep.reduction_factor` must be an integer >= 2, got {self.reduction_factor!r}"
            )
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            problems.append(f"`sweep.max_failures` must be >= 0, got {self.max_failures!r}")
        if self.max_concurrent_trials is not None and (
            not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1
        ):
            problems.append(
                f"`sweep.max_concurrent_trials` must be a positive integer or None, got {self.max_concurrent_trials!r}"
            )
        problems.extend(self.resources.problems())

        # The search space: each key a real field, each sampler non-empty and in range.
        known = set(FinetuneConfig.field_help()) | {ALPHA_RATIO}
        has_grid = False
        for key, value in self.search_space.items():
            where = f"`search_space[{key!r}]`"
            if key not in known:
                problems.append(
                    f"{where} is not a config field; use a dotted field such as adapter.r, "
                    "training.learning_rate, adapter.target_modules"
                )
                continue
            if isinstance(value, dict) and "grid_search" in value:
                has_grid = True
                values = value["grid_search"]
                if not values:
                    problems.append(f"{where} is an empty grid_search; give at least one value")
                for v in values or []:
                    problems.extend(_fixed_value_problems(self.base, key, v, where))
            elif isinstance(value, Categorical):
                if not value.categories:
                    problems.append(f"{where} is an empty tune.choice; give at least one value")
                for v in value.categories:
                    problems.extend(_fixed_value_problems(self.base, key, v, where))
                if self.search_alg == "grid":
                    problems.append(
                        f"{where} is a tune.choice, which grid search would sample at random; "
                        "use tune.grid_search([...]) with `search_alg='grid'`"
                    )
            elif isinstance(value, Float | Integer):
                lower, upper = value.lower, value.upper
                if lower is None or upper is None or lower >= upper:
                    problems.append(
                        f"{where} has inverted or empty bounds ({lower}, {upper}); the lower bound must be smaller"
                    )
                if key == "training.learning_rate" and lower is not None and lower <= 0:
                    problems.append(
                        f"{where} has a learning rate bound {lower} <= 0; learning rates must be positive (e.g. 1e-4 to 3e-4)"
                    )
                elif lower is not None and key in ("adapter.r", "adapter.alpha", ALPHA_RATIO) and lower <= 0:
                    problems.append(f"{where} has a lower bound {lower} <= 0; it must be positive")
                if self.search_alg == "grid":
                    problems.append(
                        f"{where} is a continuous range, which grid search cannot enumerate; use "
                        "tune.grid_search([...]) or `search_alg='random'`"
                    )
            elif isinstance(value, Domain):
                if self.search_alg == "grid":
                    problems.append(f"{where} is a random sampler; grid search needs tune.grid_search([...])")
            else:
                problems.extend(_fixed_value_problems(self.base, key, value, where))
        if has_grid and self.search_alg == "optuna":
            problems.append(
                "`sweep.search_alg` 'optuna' cannot take tune.grid_search entries; use tune.choice with "
                "optuna, or `search_alg='grid'`"
            )
        if self.search_alg == "grid" and not has_grid:
            problems.append("`sweep.search_alg` is 'grid' but the search space has no tune.grid_search entry")
        try:
            self.base.validate()
        except ConfigError as error:
            problems.extend(f"base config: {p}" for p in error.problems)
        workers = self.resources.workers
        if self.base.training.fp8 is True and isinstance(workers, int) and workers > 1:
            problems.append(
                f"`training.fp8` runs a trial on one worker, but `resources.workers` is {workers}; "
                "set `resources.workers=1` or turn `training.fp8` off"
            )
        if self.scheduler == "asha" and isinstance(self.grace_period, int):
            steps = self.base.training.max_steps
            if isinstance(steps, int) and self.grace_period > steps:
                problems.append(
                    f"`sweep.grace_period` ({self.grace_period} steps) exceeds `training.max_steps` ({steps}); "
                    "ASHA could never stop a trial early"
                )
        return problems

    def validate(self, *, against_model: bool = False) -> Sweep:
        """Raise one `ConfigError` listing every problem; return self when the sweep is sound.

        Args:
            against_model: also check every candidate of the model-dependent fields (target modules,
                QLoRA, dropout, max length, packing) against the base model's config.json, without loading
                weights. Needs
                the checkpoint (or the hub) to be reachable from this process; `run_sweep` does it.
        """
        problems = self.problems()
        if against_model and not problems:
            problems.extend(self._model_problems())
        if problems:
            raise ConfigError(problems)
        return self

    def _model_problems(self) -> list[str]:
        from raylora.model import check_model

        problems: list[str] = []
        seen: set[str] = set()
        model_fields = (
            "adapter.target_modules",
            "adapter.qlora",
            "adapter.dropout",
            "data.max_length",
            "data.packing",
        )
        for sampled in _candidate_configs(self.search_space, model_fields):
            config = self.trial_config(sampled)
            try:
                check_model(
                    config.model,
                    config.adapter,
                    max_length=config.data.max_length,
                    packing=config.data.packing,
                )
            except ConfigError as error:
                where = ", ".join(f"{k}={v!r}" for k, v in sampled.items()) or "the base config"
                for problem in error.problems:
                    line = f"with {where}: {problem}"
                    if line not in seen:
                        seen.add(line)
                        problems.append(line)
        return problems

    def trial_config(self, sampled: dict[str, Any]) -> FinetuneConfig:
        """The `FinetuneConfig` of one trial: the base with the sampled fields applied."""
        overrides = dict(sampled)
        ratio = overrides.pop(ALPHA_RATIO, None)
        config = self.base.with_overrides(overrides)  # a copy even when nothing is overridden
        if ratio is not None:
            config.adapter.alpha = float(ratio) * config.adapter.r
        return config


def _candidate_configs(space: dict[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every combination of the finite candidates of `keys` in the search space (the base when absent)."""
    import itertools

    from ray.tune.search.sample import Categorical

    options: dict[str, list[Any]] = {}
    for key in keys:
        value = space.get(key)
        if isinstance(value, dict) and "grid_search" in value:
            options[key] = list(value["grid_search"])
        elif isinstance(value, Categorical):
            options[key] = list(value.categories)
        elif key in space and not hasattr(value, "sample"):
            options[key] = [value]
    names = list(options)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*options.values())] or [{}]


def _fixed_value_problems(base: FinetuneConfig, key: str, value: Any, where: str) -> list[str]:
    """Check one candidate value of a searched field with the config's own validation."""
    if key == ALPHA_RATIO:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        return [] if ok else [f"{where} value {value!r}: the alpha ratio must be a positive number"]
    try:
        base.with_overrides({key: value}).validate()
    except ConfigError as error:
        return [f"{where} value {value!r}: {p}" for p in error.problems if key in p] or [
            f"{where} value {value!r}: {error.problems[0]}"
        ]
    return []


# ---- running a sweep --------------------------------------------------------------------------------------


@dataclass
class TrialSummary:
    """One row of the trials table."""

    trial_id: str
    config: dict[str, Any]
    status: str
    metric: float | None
    step: int | None
    checkpoint: str | None
    error: str | None


@dataclass
class SweepResult:
    """What a finished sweep reports: every trial, the best one, and where results live."""

    sweep: Sweep
    trials: list[TrialSummary]
    best: TrialSummary | None
    experiment_path: str

    @property
    def all_failed(self) -> bool:
        return all(t.status == "ERROR" for t in self.trials)

    def table(self) -> str:
        """A plain-text table of trials, best first."""
        keys = sorted({k for t in self.trials for k in t.config})
        headers = ["trial", *[k.split(".")[-1] for k in keys], self.sweep.metric, "status", "steps", "error"]
        sign = 1 if self.sweep.mode == "min" else -1
        rows = []
        for t in sorted(self.trials, key=lambda t: (t.metric is None, sign * (t.metric or 0.0))):
            cells = [t.trial_id, *[_short(t.config.get(k)) for k in keys]]
            cells += [
                "-" if t.metric is None else f"{t.metric:.4f}",
                t.status,
                "-" if t.step is None else str(t.step),
            ]
            cells.append((t.error or "")[:60])
            rows.append(cells)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    resume: bool = False,
    callbacks: Iterable[Any] = (),
    verbose: int = 1,
) -> SweepResult:
    """Run (or with `resume=True` continue) a sweep on a Ray cluster and return its trials.

    Args:
        sweep: the sweep definition; validated, against the cluster too, before any trial starts.
        address: a Ray cluster to join (``auto``, ``ray://`` or ``host:port``); default `RAY_ADDRESS`, else
            a local cluster started in this process.
        resume: continue the experiment under `sweep.storage_path/sweep.name` (`Tuner.restore`): finished
            trials are kept, interrupted ones resume from their last checkpoint, errored ones are retried.
        callbacks: extra Ray Tune callbacks (the MLflow logger is one), run on this driver process.
        verbose: Ray Tune's verbosity (0 silent, 1 status table, 2 results).

    Raises:
        ConfigError: the sweep is invalid, or asks for resources the cluster can never satisfy.
    """
    from ray import tune

    sweep.validate(against_model=True)
    storage = _storage_uri(sweep.storage_path)
    _init_ray(address)
    _check_cluster(sweep, storage)

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, sweep_spec=_sweep_spec(sweep, storage)),
        _trial_resources(sweep.resources),
    )
    experiment_path = _join(storage, sweep.name)
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise ConfigError(
                f"`--resume`: no sweep to resume at {experiment_path}; run it without --resume first "
                "(or check `sweep.storage_path` and `sweep.name`)"
            )
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable=trainable,
            param_space=sweep.search_space,
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.search_space,
            tune_config=_tune_config(sweep),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=sweep.keep_checkpoints,
                    checkpoint_score_attribute=sweep.metric,
                    checkpoint_score_order=sweep.mode,
                ),
                callbacks=list(callbacks),
                verbose=verbose,
            ),
        )
    grid = tuner.fit()
    return _summarise(sweep, grid, experiment_path)


def experiment_path(sweep: Sweep) -> str:
    """Where Ray Tune keeps this sweep's trials: `<storage_path>/<name>` (a local path made absolute)."""
    return _join(_storage_uri(sweep.storage_path), sweep.name)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import raylora from this environment; quieter logs keep the trial table readable.
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def _storage_uri(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _sweep_spec(sweep: Sweep, storage: str) -> dict[str, Any]:
    """What a trial needs, as plain data: it crosses into Ray actors."""
    base = sweep.base.to_dict()
    # Trials run with the trial directory as their working directory: pin relative local paths here.
    for section, key in (("model", "name_or_path"), ("data", "path"), ("data", "eval_path")):
        value = base[section][key]
        if isinstance(value, str) and value and Path(value).exists():
            base[section][key] = str(Path(value).resolve())
    return {
        "name": sweep.name,
        "base": base,
        "resources": dataclasses.asdict(sweep.resources),
        "storage": storage,
        "max_failures": sweep.max_failures,
        "keep_checkpoints": sweep.keep_checkpoints,
        "metric": sweep.metric,
        "mode": sweep.mode,
    }


def _trial_resources(resources: Resources):
    from ray import tune

    if resources.workers == 1:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    # The trial's own process only drives the TorchTrainer; its workers reserve their own resources.
    return tune.PlacementGroupFactory([{"CPU": _TRAINER_DRIVER_CPU}])


def _tune_config(sweep: Sweep):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr=STEP,
            max_t=sweep.base.training.max_steps,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if sweep.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=sweep.seed)
    elif sweep.search_alg == "random" and sweep.seed is not None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=sweep.seed)
    return tune.TuneConfig(
        metric=sweep.metric,
        mode=sweep.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=sweep.num_samples,
        max_concurrent_trials=sweep.max_concurrent_trials,
        # 1-worker trials run in the trial's own process: reusing it for the next trial skips a process
        # start and the torch/transformers imports (seconds per trial). N-worker trials start their own
        # worker group anyway.
        reuse_actors=sweep.resources.workers == 1,
        trial_name_creator=lambda trial: f"{sweep.name}_{trial.trial_id}",
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
    )


def _check_cluster(sweep: Sweep, storage: str) -> None:
    """Refuse, before any trial starts, what this cluster can never run (on an autoscaling one: warn)."""
    import ray

    problems: list[str] = []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    res = sweep.resources
    need_cpu, need_gpu = res.cpus_per_worker, res.gpus_per_worker
    fitting = [r for r in per_node if r.get("CPU", 0) >= need_cpu and r.get("GPU", 0) >= need_gpu]
    total_cpu = sum(r.get("CPU", 0) for r in per_node)
    total_gpu = sum(r.get("GPU", 0) for r in per_node)
    if not fitting:
        largest = max(per_node, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        problems.append(
            f"`resources` asks {need_cpu:g} CPU and {need_gpu:g} GPU per worker, but no node has that much "
            f"(largest: {largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU); lower the per-worker request"
        )
    elif res.workers * need_cpu + (_TRAINER_DRIVER_CPU if res.workers > 1 else 0) > total_cpu or (
        res.workers * need_gpu > total_gpu
    ):
        problems.append(
            f"`resources` asks {res.workers} workers x ({need_cpu:g} CPU, {need_gpu:g} GPU) per trial, but the "
            f"cluster has {total_cpu:g} CPU and {total_gpu:g} GPU in all; use fewer workers or a bigger cluster"
        )
    elif res.placement_strategy == "STRICT_SPREAD" and len(fitting) < res.workers:
        problems.append(
            f"`resources.placement_strategy` STRICT_SPREAD needs {res.workers} nodes that each fit a worker, "
            f"the cluster has {len(fitting)}; use SPREAD or fewer workers"
        )
    if problems and _autoscaling():
        # Nodes that would fit may be added on demand: say what is missing now, and let the autoscaler try.
        for problem in problems:
            print(
                f"raylora: warning: {problem} (the cluster autoscales, so the sweep goes ahead)",
                file=sys.stderr,
            )
        problems = []
    if len(nodes) > 1 and "://" not in storage:
        blind = _nodes_not_seeing(storage, [n["NodeID"] for n in nodes])
        if blind:
            problems.append(
                f"`sweep.storage_path` {storage!r} is a local directory that {len(blind)} of the cluster's "
                f"{len(nodes)} nodes do not see (a file written there from this driver was not found on node "
                f"{', '.join(b[:12] for b in blind)}): checkpoints written on one node would be invisible to "
                "the others. Use a cloud URI (s3://, gs://) or a path on a filesystem every node mounts (NFS)"
            )
    if problems:
        raise ConfigError(problems)


def _autoscaling() -> bool:
    """Whether the cluster has an autoscaler (KubeRay, `ray up`) that can add nodes while the sweep waits."""
    try:
        from ray._private.state import state

        return state.get_cluster_config() is not None
    except Exception:  # an internal API: if it moved, keep refusing what the nodes up now cannot run
        return False


def _nodes_not_seeing(storage: str, node_ids: list[str], timeout_s: float = 60.0) -> list[str]:
    """The nodes on which a file just written under `storage` by this driver does not exist.

    Asking every node is the only test that holds for any set-up: an NFS mount, a path that happens to
    exist everywhere but is not shared, several nodes on one machine (which do share it).
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(storage)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".raylora-shared-check-{uuid.uuid4().hex}"
    probe.write_text("written by the sweep driver to check that every node sees this directory\n")
    check = ray.remote(num_cpus=0)(_path_exists)
    try:
        refs = {
            node: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(probe)
            )
            for node in node_ids
        }
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        blind = []
        for node, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=0)
            except Exception:  # no answer in time, or the node went away: not confirmed shared
                seen = False
            if not seen:
                blind.append(node)
        return blind
    finally:
        probe.unlink(missing_ok=True)


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


# ---- one trial ------------------------------------------------------------------------------------------


def _run_trial(sampled: dict[str, Any], *, sweep_spec: dict[str, Any]) -> None:
    """The Tune trial function: train one sampled config on 1 worker in-process, or N workers via TorchTrainer."""
    import ray
    from ray import tune

    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    marker = trial_dir / _NONFINITE_MARKER
    if marker.exists():
        # A NaN loss is deterministic for this config: don't spend retries re-running it.
        raise NonFiniteLossError(marker.read_text())
    base = FinetuneConfig.from_dict(sweep_spec["base"])
    config = Sweep(name=sweep_spec["name"], base=base).trial_config(sampled)
    # Every eval report carries a checkpoint, so ASHA decisions and retries always have one to resume from.
    config.training.checkpoint_every = config.training.eval_every
    config.training.output_dir = str(
        Path(tempfile.gettempdir()) / "raylora-trials" / sweep_spec["name"] / context.get_trial_id()
    )
    workers = sweep_spec["resources"]["workers"]
    try:
        if workers == 1:
            checkpoint = tune.get_checkpoint()
            resume_dir = _local_copy(checkpoint, config) if checkpoint else None
            placement = _placement([ray.get_runtime_context().get_node_id()])
            train(config, reporter=_EvalReporter(tune, placement), resume_from=resume_dir)
        else:
            _fit_torch_trainer(config, sweep_spec, context.get_trial_id())
    except NonFiniteLossError as error:
        marker.write_text(str(error))
        raise
    finally:
        shutil.rmtree(config.training.output_dir, ignore_errors=True)
        _release_memory()


def _release_memory() -> None:
    """Free what the finished trial held, so the next trial in this (reused) process starts with a clean device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _local_copy(checkpoint, config: FinetuneConfig) -> str:
    target = Path(config.training.output_dir) / "resume"
    shutil.rmtree(target, ignore_errors=True)
    return checkpoint.to_directory(str(target))


class _EvalReporter:
    """Buffers train reports; each eval report goes out with the train history since the previous one.

    `via` is `ray.tune` for 1-worker trials (the loop runs in the trial) or `ray.train` on TorchTrainer
    workers (every rank reports each eval, since Ray Train's report is a barrier; rank 0 the checkpoint).
    Both modules have the same `report(metrics, checkpoint=...)` and `Checkpoint.from_directory`.
    `placement` (where the workers run) goes out with every eval report: a retry on other nodes shows.
    """

    def __init__(self, via, placement: dict[str, Any]) -> None:
        self._via = via
        self._placement = placement
        self._history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        if EVAL_LOSS not in metrics:
            self._history.append(dict(metrics))
            return
        result = {**metrics, **self._placement, TRAIN_HISTORY: self._history}
        self._history = []
        checkpoint = self._via.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._via.report(result, checkpoint=checkpoint)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each TorchTrainer worker: the same loop, resumed from the inner run's latest checkpoint."""
    import ray
    import ray.train
    import torch.distributed as dist

    config = FinetuneConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    nodes: list[str] = [""] * context.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    config.training.output_dir = f"{config.training.output_dir}/rank{rank}"
    checkpoint = ray.train.get_checkpoint()
    resume_dir = _local_copy(checkpoint, config) if checkpoint else None
    train(config, reporter=_EvalReporter(ray.train, _placement(nodes)), resume_from=resume_dir)


def _placement(node_ids: list[str]) -> dict[str, Any]:
    return {WORKER_NODES: ",".join(node_ids), NUM_NODES: len(set(node_ids))}


def _fit_torch_trainer(config: FinetuneConfig, spec: dict[str, Any], trial_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    resources = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers"],
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=res["placement_strategy"],
        ),
        run_config=ray.train.RunConfig(
            # Named after the trial (no timestamp): a retried trial's new TorchTrainer finds this run's
            # checkpoints in storage and resumes from the latest.
            name=f"{spec['name']}-train-{trial_id}",
            storage_path=spec["storage"],
            failure_config=ray.train.FailureConfig(max_failures=spec["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec["keep_checkpoints"],
                checkpoint_score_attribute=spec["metric"],
                checkpoint_score_order=spec["mode"],
            ),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# ---- the summary --------------------------------------------------------------------------------------------


def _summarise(sweep: Sweep, grid, experiment_path: str) -> SweepResult:
    trials: list[TrialSummary] = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        metric = metrics.get(sweep.metric)
        checkpoint = _best_checkpoint_path(result, sweep)
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                config=dict(config),
                status="ERROR" if result.error else ("TERMINATED" if metrics else "PENDING"),
                metric=None
                if metric is None or (isinstance(metric, float) and math.isnan(metric))
                else float(metric),
                step=int(metrics[STEP]) if STEP in metrics else None,
                checkpoint=checkpoint,
                error=_error_line(result.error) if result.error else None,
            )
        )
    scored = [t for t in trials if t.metric is not None and t.status != "ERROR"]
    best = None
    if scored:
        best = (min if sweep.mode == "min" else max)(scored, key=lambda t: t.metric)
    return SweepResult(sweep=sweep, trials=trials, best=best, experiment_path=experiment_path)


def _trial_id_from_path(path: str | None) -> str:
    return Path(path).name.removeprefix("trial_") if path else "?"


def _best_checkpoint_path(result, sweep: Sweep) -> str | None:
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if sweep.metric in m]
    if candidates:
        sign = 1 if sweep.mode == "min" else -1
        checkpoint, metrics = min(candidates, key=lambda cm: sign * cm[1][sweep.metric])
        return checkpoint.path
    if result.checkpoint is not None:
        return result.checkpoint.path
    path = (result.metrics or {}).get("checkpoint_path")  # N-worker trials: the TorchTrainer's own storage
    return path


def _error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    # Ray wraps the trial's exception; the last line names the original error and its message.
    for line in reversed(text):
        if line.strip():
            return line.strip()
    return type(error).__name__


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Import a sweep file and return the `Sweep` it defines (a module-level `sweep`, or the only `Sweep`).

    Raises:
        ConfigError: the file is missing, fails to import, or defines no (or several) sweeps.
    """
    import importlib.util

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; pass a path like sweeps/quickstart.py")
    spec = importlib.util.spec_from_file_location(f"raylora_sweep_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"sweep file {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as error:  # the user's file: report what broke and where
        raise ConfigError(
            f"sweep file {str(path)!r} failed to import: {type(error).__name__}: {error}"
        ) from error
    candidate = getattr(module, "sweep", None)
    if isinstance(candidate, Sweep):
        return candidate
    sweeps = [v for v in vars(module).values() if isinstance(v, Sweep)]
    if len(sweeps) == 1:
        return sweeps[0]
    if not sweeps:
        raise ConfigError(
            f"sweep file {str(path)!r} defines no sweep; assign one at module level, e.g. `sweep = Sweep(...)`"
        )
    raise ConfigError(f"sweep file {str(path)!r} defines {len(sweeps)} sweeps; name the one to run `sweep`")


def write_summary(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Write the trials and the best trial as JSON (what `raylora report` reads)."""
    payload = {
        "sweep": result.sweep.name,
        "metric": result.sweep.metric,
        "mode": result.sweep.mode,
        "experiment_path": result.experiment_path,
        "best": dataclasses.asdict(result.best) if result.best else None,
        "trials": [dataclasses.asdict(t) for t in result.trials],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
