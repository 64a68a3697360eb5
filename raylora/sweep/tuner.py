"""Running a sweep: the Ray Tune `Tuner` built from a `Sweep`, started fresh or restored.

`run_sweep` is the one entry point: validate the sweep (against the base model too), join or start Ray,
check the cluster (`raylora.sweep.cluster`), then hand Tune a trial function (`raylora.sweep.trial`) with
the plain-data spec each trial needs and the resources it reserves. Where results live is decided here
once (`experiment_path`), so that `raylora run --resume`, the MLflow logger and `raylora report` all find
the same directory. Ray is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raylora.config import ConfigError
from raylora.names import STEP
from raylora.sweep.cluster import check_cluster
from raylora.sweep.packing import auto_pack_reasons, pack_problems_of_sweep, stop_engines
from raylora.sweep.spec import PACK_AUTO, TRAINER_DRIVER_CPU, Resources, Sweep
from raylora.sweep.summary import SweepResult, summarise
from raylora.sweep.trial import _run_trial

__all__ = ["experiment_path", "run_sweep"]

# Adapters per packing process when `Sweep.pack` does not say: on a GPU, as many as fit under this cap
# (measured memory decides below it); on the CPU, a few (its throughput does not grow with the batch).
_DEFAULT_PACK_GPU = 8
_DEFAULT_PACK_CPU = 4
_NAMESPACE = "raylora"


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    resume: bool = False,
    callbacks: Iterable[Any] = (),
    verbose: int = 1,
) -> SweepResult:
    """Run (or with `resume=True` continue) a sweep on a Ray cluster and return its trials.

    SIGINT (Ctrl-C) and SIGTERM (`raylora jobs stop`) stop the sweep so that `resume=True` continues it: the
    result then says `interrupted` and names no best trial.

    Args:
        sweep: the sweep definition; validated, against the cluster too, before any trial starts.
        address: a Ray cluster to join (``auto``, ``ray://`` or ``host:port``); default `RAY_ADDRESS`, else
            a local cluster started in this process.
        resume: continue the experiment under `sweep.storage_path/sweep.name` (`Tuner.restore`): finished
            trials are kept, interrupted ones resume from their last checkpoint, errored ones are retried.
            Without it, a sweep whose results are already there is refused (never mixed with them).
        callbacks: Ray Tune callbacks (the MLflow tracker is one), run on this driver process. They are given
            to Tune anew by every call, resumed ones included, and never written to storage; their `setup`
            gets `resume=`, their `on_experiment_end` `interrupted=` (a signal name or None) and `unfinished=`.
        verbose: Ray Tune's verbosity (0 silent, 1 status table, 2 results).

    Raises:
        ConfigError: the sweep is invalid, asks for resources the cluster can never satisfy, or (without
            `resume`) its storage already holds a run of it.
    """
    import ray
    from ray import tune

    from raylora.sweep.events import RunState, SweepEvents, stop_on_signals

    sweep.validate(against_model=True)
    # Before Ray starts: a pack asked for that cannot apply is refused at once.
    pack, unpacked_because = _pack_cap(sweep)
    storage = _storage_uri(sweep.storage_path)
    experiment_path = _join(storage, sweep.name)
    if not resume:
        _refuse_earlier_run(sweep, experiment_path)
    _init_ray(address)
    check_cluster(sweep, storage)
    namespace = ray.get_runtime_context().namespace
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    pack, unpacked_because = _fit_pack_to_nodes(sweep, pack, unpacked_because, nodes)
    if verbose:
        if pack is not None:
            print(
                f"raylora: packing trials (sweep.pack={sweep.pack!r}): up to {pack} adapters per process, one "
                f"process per {'GPU' if sweep.resources.gpus_per_worker > 0 else 'node'} holding the base once",
                flush=True,
            )
        elif unpacked_because:
            print(
                f"raylora: one trial per process (sweep.pack='auto' packs small whole-GPU trials; not this sweep: "
                f"{'; '.join(unpacked_because)})",
                flush=True,
            )

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, sweep_spec=_sweep_spec(sweep, storage, pack, namespace)),
        _trial_resources(sweep.resources, packed=pack is not None),
    )
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise ConfigError(
                f"`--resume`: no sweep to resume at {experiment_path}; run it without --resume first "
                "(or check `sweep.storage_path` and `sweep.name`)"
            )
        _forget_recorded_failures(experiment_path)
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
            tune_config=_tune_config(sweep, pack),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=sweep.keep_checkpoints,
                    checkpoint_score_attribute=sweep.metric,
                    checkpoint_score_order=sweep.mode,
                ),
                callbacks=[SweepEvents(), _tensorboard_logger()],
                verbose=verbose,
            ),
        )
    run = RunState(callbacks=list(callbacks), resume=resume)
    try:
        with SweepEvents.attach(run), stop_on_signals(run):
            grid = tuner.fit()
    finally:
        if pack is not None:
            stop_engines(sweep.name, namespace)
    return summarise(sweep, grid, experiment_path, interrupted=run.interrupted, unfinished=run.unfinished)


def _forget_recorded_failures(path: str) -> None:
    """`--resume` retries errored trials: one attempt each again, even those whose failure was recorded as
    deterministic (the user may have fixed what failed, a data file say)."""
    import pyarrow.fs

    from raylora.sweep.trial import FAILURE_FILE

    filesystem, root = pyarrow.fs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
    for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        record = f"{entry.path}/{FAILURE_FILE}"
        if entry.type == pyarrow.fs.FileType.Directory and filesystem.get_file_info(record).is_file:
            filesystem.delete_file(record)


def _refuse_earlier_run(sweep: Sweep, path: str) -> None:
    """A sweep started without `--resume` where one already ran would add its trials to that run's results
    (and MLflow run): refuse, saying how to continue that run or start afresh.

    Raises:
        ConfigError: `path` exists and is not empty.
    """
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    if not found:
        return
    raise ConfigError(
        f"{path} already holds a run of sweep {sweep.name!r} ({len(found)} entries); a new run there would mix "
        f"its trials with that one's. Continue that run with `raylora run <sweep file> --resume` "
        "(`run_sweep(..., resume=True)`), or start afresh: delete that directory, or give this run another "
        "`--storage-path` (or `Sweep.name`)"
    )


def experiment_path(sweep: Sweep) -> str:
    """Where Ray Tune keeps this sweep's trials: `<storage_path>/<name>` (a local path made absolute)."""
    return _join(_storage_uri(sweep.storage_path), sweep.name)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import raylora from this environment; quieter logs keep the trial table readable.
    # A namespace of its own: packed sweeps keep their engines as named actors there.
    if address:
        ray.init(address=address, log_to_driver=True, namespace=_NAMESPACE)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, namespace=_NAMESPACE)


def _storage_uri(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _pack_cap(sweep: Sweep) -> tuple[int | None, list[str]]:
    """Adapters per packing process for this sweep (None: every trial the ordinary way), and with
    `pack="auto"` why it does not pack.

    Raises:
        ConfigError: `sweep.pack` (True or a number) asks for packing that this sweep's trials cannot do (the
            reasons listed).
    """
    pack, on_gpu = sweep.pack, sweep.resources.gpus_per_worker > 0
    if pack is False or pack == 0:
        return None, []
    if pack == PACK_AUTO:
        reasons = auto_pack_reasons(sweep)
        return (None, reasons) if reasons else (_DEFAULT_PACK_GPU, [])
    problems = pack_problems_of_sweep(sweep)
    if problems:
        raise ConfigError([f"`sweep.pack` is {pack!r}, but {problem}" for problem in problems])
    if pack is True:
        return (_DEFAULT_PACK_GPU if on_gpu else _DEFAULT_PACK_CPU), []
    return int(pack), []


def _sweep_spec(sweep: Sweep, storage: str, pack: int | None = None, namespace: str = "") -> dict[str, Any]:
    """What a trial needs, as plain data: it crosses into Ray actors (in memory: `tune.with_parameters` keeps
    it in the object store, not in the experiment's files), so it keeps `model.token` for gated models."""
    base = sweep.base.to_dict(secrets=True)
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
        "keep_checkpoints": sweep.keep_checkpoints,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "pack": pack,
        "namespace": namespace,
    }


def _trial_resources(resources: Resources, *, packed: bool = False):
    from ray import tune

    if packed:
        # The trial only relays its engine's reports; the engine holds the device (raylora.sweep.packing).
        return {"cpu": TRAINER_DRIVER_CPU, "gpu": 0}
    if resources.workers == 1:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    # The trial's own process only drives the TorchTrainer; its workers reserve their own resources.
    return tune.PlacementGroupFactory([{"CPU": TRAINER_DRIVER_CPU}])


def _tune_config(sweep: Sweep, pack: int | None = None):
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
        max_concurrent_trials=sweep.max_concurrent_trials or _packed_concurrency(sweep, pack),
        # 1-worker trials run in the trial's own process: reusing it for the next trial skips a process
        # start and the torch/transformers imports (seconds per trial). N-worker trials start their own
        # worker group anyway.
        reuse_actors=sweep.resources.workers == 1,
        # Callables that hold the name only: Tune pickles them into its state files, and a lambda over the
        # sweep would take its whole base config there (a `model.token` included).
        trial_name_creator=_TrialName(sweep.name),
        trial_dirname_creator=_TrialName("trial"),
    )


class _TrialName:
    """`<prefix>_<trial id>`: Tune's trial name and trial directory name."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, trial) -> str:
        return f"{self.prefix}_{trial.trial_id}"


def _packed_concurrency(sweep: Sweep, pack: int | None) -> int | None:
    """Trials Tune runs at once in a packed sweep: every slot of every engine the cluster can start."""
    if pack is None:
        return None
    import ray

    if sweep.resources.gpus_per_worker > 0:
        devices = int(ray.cluster_resources().get("GPU", 0))
    else:
        devices = len([node for node in ray.nodes() if node.get("Alive")])
    return max(1, pack * max(devices, 1))


def _fit_pack_to_nodes(
    sweep: Sweep, pack: int | None, unpacked_because: list[str], nodes: list[dict[str, float]]
) -> tuple[int | None, list[str]]:
    """`_pack_cap`'s answer against the cluster's nodes (their resources): some node must hold an engine, a
    trial's CPUs and a GPU, beside the light trials it serves, or the engine would wait for resources its own
    trials hold and the sweep would hang. `pack="auto"` then runs the trials the ordinary way; so it does on a
    cluster with CPU-only nodes that could take a packed trial, whose engine must be on its node.

    Raises:
        ConfigError: `sweep.pack` (True or a number) asks for engines that no node can hold.
    """
    if pack is None:
        return pack, unpacked_because
    need_cpu = sweep.resources.cpus_per_worker + pack * TRAINER_DRIVER_CPU
    need_gpu = 1.0 if sweep.resources.gpus_per_worker > 0 else 0.0
    cpu_only = [
        r for r in nodes if need_gpu and r.get("CPU", 0) >= TRAINER_DRIVER_CPU and not r.get("GPU", 0)
    ]
    if cpu_only and sweep.pack == PACK_AUTO:
        return None, [
            f"{len(cpu_only)} node(s) with CPUs and no GPU could take a packed trial, whose engine needs a GPU on "
            "the trial's node (start a CPU-only head with `ray start --head --num-cpus 0`)"
        ]
    if any(r.get("CPU", 0) >= need_cpu and r.get("GPU", 0) >= need_gpu for r in nodes):
        return pack, unpacked_because
    largest = max((r.get("CPU", 0) for r in nodes if r.get("GPU", 0) >= need_gpu), default=0)
    problem = (
        f"an engine needs `resources.cpus_per_worker` ({sweep.resources.cpus_per_worker:g}) CPUs and {pack} x "
        f"{TRAINER_DRIVER_CPU} for the trials it serves on one node{' with a GPU' if need_gpu else ''}, but the "
        f"largest has {largest:g}"
    )
    if sweep.pack == PACK_AUTO:
        return None, [problem]
    raise ConfigError(
        f"`sweep.pack`: {problem}; lower `resources.cpus_per_worker` or set `Sweep(pack=False)`"
    )


def _tensorboard_logger():
    """Tune's TensorBoard logger without the train history (a list, which it warns about at every eval)."""
    from ray.tune.logger import TBXLoggerCallback

    from raylora.names import TRAIN_HISTORY

    class TensorboardLogger(TBXLoggerCallback):
        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            super().log_trial_result(
                iteration, trial, {k: v for k, v in result.items() if k != TRAIN_HISTORY}
            )

    return TensorboardLogger()
