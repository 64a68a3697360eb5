"""The sweep definition: `Sweep` and `Resources`, every check that needs no cluster, and loading sweep files.

A `Sweep` is plain data written in a sweep file (a base `FinetuneConfig`, a search space of Ray Tune
samplers keyed by dotted config field, how to search it, what each trial asks of the cluster).
`Sweep.problems()` lists every mistake at once before anything starts (both ends of every searched range
too); `validate(against_model=True)` also checks each candidate of the model-dependent fields against its
model's config.json and reads each candidate dataset. Running a
sweep lives in `raylora.sweep.tuner`: this module imports no Ray at import time (only the sampler types,
inside the checks), so reading and validating a sweep stays cheap.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora.config import ConfigError, FinetuneConfig, sharded_adapter_problem
from raylora.names import EVAL_LOSS, REPORTED_METRICS

__all__ = [
    "ALPHA_RATIO",
    "PLACEMENT_STRATEGIES",
    "SCHEDULERS",
    "SEARCH_ALGORITHMS",
    "TRAINER_DRIVER_CPU",
    "Resources",
    "Sweep",
    "load_sweep",
]

# A pseudo-field of the search space: alpha as a multiple of the sampled rank (alpha = ratio * r).
ALPHA_RATIO = "adapter.alpha_ratio"
SEARCH_ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# What an N-worker trial's own process reserves (Ray refuses an empty resource request).
TRAINER_DRIVER_CPU = 0.01
# `Sweep.pack`'s default: pack where packing measured faster (`raylora.sweep.packing.auto_pack_reasons`).
PACK_AUTO = "auto"


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

    `pack` trains the adapters of several 1-worker trials together in one process per GPU that holds the
    base once (`raylora.sweep.packing`). "auto" (the default) packs a sweep of two or more whole-GPU 1-worker
    trials whose micro-batches are small (at most `AUTO_PACK_MAX_TOKENS` tokens: `training.batch_size` x
    `data.max_length`) and whose adapters can share a pack; any other sweep runs one trial per process, and
    the sweep says why when it starts. True packs whatever can be packed (on a GPU as many as fit, up to 8;
    on the CPU up to 4), a number caps the adapters per process, False or 0 runs every trial in its own
    process; True or a number on a sweep that cannot be packed is refused with the reason. Why the bound:
    small trials trained together finish a sweep sooner than one at a time, while a trial whose own batch
    fills the GPU trains faster alone, its layers compiled (BENCHMARKS.md, "Why the defaults").
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
    pack: bool | int | str = "auto"

    def problems(self) -> list[str]:
        """Every problem in the sweep definition (without a cluster); `validate` raises them together."""
        problems = self._field_problems()
        problems.extend(self.resources.problems())
        problems.extend(self._search_space_problems())
        problems.extend(self._base_problems())
        problems.extend(self._cross_field_problems())
        return problems

    def _field_problems(self) -> list[str]:
        """The sweep's own fields, each on its own."""
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
        if not (
            self.pack == PACK_AUTO
            or isinstance(self.pack, bool)
            or (isinstance(self.pack, int) and self.pack >= 0)
        ):
            problems.append(
                f"`sweep.pack` must be 'auto', true, false or a number of adapters per process (0: off), "
                f"got {self.pack!r}"
            )
        if self.max_concurrent_trials is not None and (
            not isinstance(self.max_concurrent_trials, int) or self.max_concurrent_trials < 1
        ):
            problems.append(
                f"`sweep.max_concurrent_trials` must be a positive integer or None, got {self.max_concurrent_trials!r}"
            )
        return problems

    def _search_space_problems(self) -> list[str]:
        """The search space: each key a real field, each sampler non-empty and in range, and every entry
        one that the search algorithm can use."""
        known = set(FinetuneConfig.field_help()) | {ALPHA_RATIO}
        problems: list[str] = []
        for key, value in self.search_space.items():
            where = f"`search_space[{key!r}]`"
            if key not in known:
                problems.append(
                    f"{where} is not a config field; use a dotted field such as adapter.r, "
                    "training.learning_rate, adapter.target_modules"
                )
                continue
            if key in _FIXED_PER_SWEEP:
                problems.append(f"{where}: {_FIXED_PER_SWEEP[key]}")
                continue
            if key.startswith(_CHECKED_BEFORE_TRIALS) and not _enumerable(value):
                problems.append(
                    f"{where} is a random sampler over a field that is checked before any trial starts (the model "
                    "and the data must exist); list its values with tune.choice([...]) or tune.grid_search([...])"
                )
                continue
            problems.extend(self._entry_problems(key, value, where))
        has_grid = any(_is_grid(value) for key, value in self.search_space.items() if key in known)
        if has_grid and self.search_alg == "optuna":
            problems.append(
                "`sweep.search_alg` 'optuna' cannot take tune.grid_search entries; use tune.choice with "
                "optuna, or `search_alg='grid'`"
            )
        if self.search_alg == "grid" and not has_grid:
            problems.append("`sweep.search_alg` is 'grid' but the search space has no tune.grid_search entry")
        return problems

    def _entry_problems(self, key: str, value: Any, where: str) -> list[str]:
        """One search-space entry, by the kind of sampler (or fixed value) it is."""
        from ray.tune.search.sample import Categorical, Domain, Float, Integer

        if _is_grid(value):
            return self._grid_problems(key, value["grid_search"], where)
        if isinstance(value, Categorical):
            return self._choice_problems(key, value, where)
        if isinstance(value, Float | Integer):
            return self._range_problems(key, value, where)
        if isinstance(value, Domain):
            if self.search_alg == "grid":
                return [f"{where} is a random sampler; grid search needs tune.grid_search([...])"]
            return []
        return _fixed_value_problems(self.base, key, value, where)

    def _grid_problems(self, key: str, values: Any, where: str) -> list[str]:
        problems: list[str] = []
        if not values:
            problems.append(f"{where} is an empty grid_search; give at least one value")
        for v in values or []:
            problems.extend(_fixed_value_problems(self.base, key, v, where))
        return problems

    def _choice_problems(self, key: str, value: Any, where: str) -> list[str]:
        problems: list[str] = []
        if not value.categories:
            problems.append(f"{where} is an empty tune.choice; give at least one value")
        for v in value.categories:
            problems.extend(_fixed_value_problems(self.base, key, v, where))
        if self.search_alg == "grid":
            problems.append(
                f"{where} is a tune.choice, which grid search would sample at random; "
                "use tune.grid_search([...]) with `search_alg='grid'`"
            )
        return problems

    def _range_problems(self, key: str, value: Any, where: str) -> list[str]:
        """A continuous or integer range: ordered bounds, and both ends valid values of the field."""
        from ray.tune.search.sample import Integer

        problems: list[str] = []
        lower, upper = value.lower, value.upper
        if lower is None or upper is None or lower >= upper:
            return [
                f"{where} has inverted or empty bounds ({lower}, {upper}); the lower bound must be smaller"
            ]
        if key == "training.learning_rate" and lower <= 0:
            problems.append(
                f"{where} has a learning rate bound {lower} <= 0; learning rates must be positive (e.g. 1e-4 to 3e-4)"
            )
        else:
            # Tune samples [lower, upper): the largest value an integer range gives is upper - 1, a float
            # range comes as close to upper as a float can.
            top = upper - 1 if isinstance(value, Integer) else math.nextafter(upper, lower)
            for bound, shown in dict.fromkeys(((lower, lower), (top, upper))):
                problems.extend(
                    p.replace(f"value {bound!r}:", f"bound {shown!r}:").replace(repr(bound), repr(shown))
                    for p in _fixed_value_problems(self.base, key, bound, where)
                )
        if self.search_alg == "grid":
            problems.append(
                f"{where} is a continuous range, which grid search cannot enumerate; use "
                "tune.grid_search([...]) or `search_alg='random'`"
            )
        return problems

    def _base_problems(self) -> list[str]:
        try:
            self.base.validate()
        except ConfigError as error:
            return [f"base config: {p}" for p in error.problems]
        return []

    def _cross_field_problems(self) -> list[str]:
        """Rules between the sweep, its resources and its base config."""
        problems: list[str] = []
        workers = self.resources.workers
        if isinstance(workers, int):
            problem = sharded_adapter_problem(self.base.adapter, workers)
            if problem:
                problems.append(problem)
        gpus = self.resources.gpus_per_worker
        if self.base.training.head_loss == "liger" and isinstance(gpus, int | float) and gpus == 0:
            problems.append(
                "`training.head_loss` is 'liger', but the trials run on CPUs (`resources.gpus_per_worker` is 0): "
                "Liger's kernels run on GPUs; give the trials GPUs, or use 'auto' or 'chunked'"
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
                QLoRA, dropout, max length, packing) against each candidate model's config.json, without
                loading weights, and read every candidate dataset (a missing path or a corrupt file is refused here, not in each
                trial). Needs the checkpoint, the data (or the hub) to be reachable from this process;
                `run_sweep` does it.
        """
        problems = self.problems()
        if against_model and not problems:
            problems.extend(self._model_problems())
        if problems:
            raise ConfigError(problems)
        return self

    def _model_problems(self) -> list[str]:
        """Every candidate model (the base's, or each one the search lists) against the adapter fields that
        depend on it, from its config.json; and every candidate dataset, read once as the trials will."""
        from raylora.model import check_model

        model_keys = (
            "adapter.target_modules",
            "adapter.qlora",
            "adapter.dropout",
            "data.max_length",
            "data.packing",
        )
        model_keys += tuple(k for k in self.search_space if k.startswith("model."))
        problems: list[str] = []
        seen: set[str] = set()

        def add(sampled: dict[str, Any], found: list[str]) -> None:
            where = ", ".join(f"{k}={v!r}" for k, v in sampled.items()) or "the base config"
            for problem in found:
                line = f"with {where}: {problem}"
                if line not in seen:
                    seen.add(line)
                    problems.append(line)

        for sampled in _candidate_configs(self.search_space, model_keys):
            config = self.trial_config(sampled)
            try:
                check_model(
                    config.model,
                    config.adapter,
                    max_length=config.data.max_length,
                    packing=config.data.packing,
                )
            except ConfigError as error:
                add(sampled, error.problems)
        data_keys = tuple(k for k in self.search_space if k.startswith("data."))
        for sampled in _candidate_configs(self.search_space, data_keys):
            add(sampled, _data_problems(self.trial_config(sampled)))
        return problems

    def trial_config(self, sampled: dict[str, Any]) -> FinetuneConfig:
        """The `FinetuneConfig` of one trial: the base with the sampled fields applied."""
        overrides = dict(sampled)
        ratio = overrides.pop(ALPHA_RATIO, None)
        config = self.base.with_overrides(overrides)  # a copy even when nothing is overridden
        if ratio is not None:
            config.adapter.alpha = float(ratio) * config.adapter.r
        return config


# Fields a search must not vary, and why.
_FIXED_PER_SWEEP = {
    "data.split_seed": "the eval split must be the same for every trial, or their eval losses are not "
    "comparable; set `data.split_seed` in the base config",
}
# Fields whose every candidate is checked before the first trial (the model's config.json, the data files).
_CHECKED_BEFORE_TRIALS = ("model.", "data.path", "data.eval_path", "data.format", "data.subset", "data.split")


def _enumerable(value: Any) -> bool:
    """A fixed value, a tune.choice or a grid: every candidate is known before the sweep starts."""
    from ray.tune.search.sample import Categorical, Domain

    return _is_grid(value) or isinstance(value, Categorical) or not isinstance(value, Domain)


def _data_problems(config: FinetuneConfig) -> list[str]:
    """Whether the data a trial would train on can be read: a missing path or an unparsable file is refused
    here rather than in every trial. The read is the one the MLflow tracker fingerprints (cached)."""
    from raylora.data import data_fingerprint

    try:
        data_fingerprint(config.data)
    except ConfigError as error:
        return list(error.problems)
    return []


def _is_grid(value: Any) -> bool:
    """`tune.grid_search([...])` is a plain dict, not a sampler object."""
    return isinstance(value, dict) and "grid_search" in value


def _candidate_configs(space: dict[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every combination of the finite candidates of `keys` in the search space (the base when absent)."""
    import itertools

    from ray.tune.search.sample import Categorical

    options: dict[str, list[Any]] = {}
    for key in keys:
        value = space.get(key)
        if _is_grid(value):
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
