"""One trial: the Ray Tune trial function that trains one sampled config with `raylora.training.train`.

- 1 worker: the training loop runs inside the Tune trial itself (no worker group to spin up, which would
  cost ~25 s per trial on a small machine). Reports go to `ray.tune.report`.
- N workers: the trial builds a Ray Train V2 `TorchTrainer` (passing a trainer to `Tuner` is no longer
  supported in Ray 2.60) that runs the same loop on N workers with FSDP2, and forwards its reports to Tune
  through `TuneReportCallback`. The inner run is named after the trial id, so a retried trial finds its
  own checkpoints.

Tune sees one report per eval (carrying `eval_loss`, the train metrics logged since the previous eval in
`train_history`, and an adapter-only checkpoint), so ASHA can stop losers at every eval and a retried trial
resumes from its last eval instead of step 0.

The driver only hands `_run_trial` to Tune: torch and the training loop are imported inside the functions
that run in a trial's (or a worker's) process, so the driver never loads them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raylora.config import ConfigError, FinetuneConfig
from raylora.names import EVAL_LOSS, NUM_NODES, TRAIN_HISTORY, WORKER_NODES
from raylora.sweep.spec import Sweep

__all__ = [
    "FAILURE_FILE",
    "RepeatedFailure",
    "_run_trial",
    "deterministic_failure",
    "local_copy",
    "release_memory",
]

# Beside the trial's results in storage: a failure that every attempt of this trial would repeat.
FAILURE_FILE = "raylora_failure.json"


class RepeatedFailure(RuntimeError):
    """A failure an earlier attempt of this trial recorded as deterministic, raised again without training."""


# Named with an underscore although `raylora.sweep.tuner` imports it: Tune identifies a trainable by the
# function's name, and `Tuner.restore` refuses another one, so a new name would break `raylora run --resume`
# of every sweep started before.
def _run_trial(sampled: dict[str, Any], *, sweep_spec: dict[str, Any]) -> None:
    """The Tune trial function: train one sampled config on 1 worker in-process, or N workers via TorchTrainer.

    A deterministic failure (a NaN loss, a config the loop refuses, running out of memory on whole GPUs)
    is recorded in the trial's storage directory before it is raised; Tune's retries then find it and fail
    at once, without loading the model again (Tune itself retries every error alike).
    """
    import ray
    from ray import tune

    from raylora.training import train

    context = tune.get_context()
    trial_id = context.get_trial_id()
    _raise_recorded_failure(sweep_spec, trial_id)
    output_dir = Path(tempfile.gettempdir()) / "raylora-trials" / sweep_spec["name"] / trial_id
    # A scratch directory: Tune's checkpoint is the trial's state; an attempt killed before its clean-up left
    # files here that `train` would refuse as another attempt's run.
    shutil.rmtree(output_dir, ignore_errors=True)
    try:
        base = FinetuneConfig.from_dict(sweep_spec["base"])
        config = Sweep(name=sweep_spec["name"], base=base).trial_config(sampled)
        # Every eval report carries a checkpoint, so ASHA decisions and retries always have one to resume from.
        config.training.checkpoint_every = config.training.eval_every
        config.training.output_dir = str(output_dir)
        workers = sweep_spec["resources"]["workers"]
        if sweep_spec.get("pack"):
            from raylora.sweep.packing import run_packed_trial

            placement = _placement([ray.get_runtime_context().get_node_id()])
            run_packed_trial(config, sweep_spec, trial_id, placement)
        elif workers == 1:
            checkpoint = tune.get_checkpoint()
            resume_dir = local_copy(checkpoint, config) if checkpoint else None
            placement = _placement([ray.get_runtime_context().get_node_id()])
            train(config, reporter=_EvalReporter(tune, placement), resume_from=resume_dir)
        else:
            _fit_torch_trainer(config, sweep_spec, trial_id)
    except Exception as error:
        reason = deterministic_failure(error, sweep_spec)
        if reason is not None:
            _record_failure(sweep_spec, trial_id, error, reason)
        raise
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        release_memory()


def deterministic_failure(error: BaseException, sweep_spec: dict[str, Any]) -> str | None:
    """Why retrying the trial that raised `error` would fail the same way, or None when a retry may succeed.

    Looks through Ray's wrappers (a TorchTrainer's `WorkerGroupError` holds each worker's error).
    """
    from raylora.sweep.summary import root_cause

    causes = [root_cause(error)]
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict):
        causes += [root_cause(e) for e in failures.values() if isinstance(e, BaseException)]
    whole_gpus = sweep_spec["resources"]["gpus_per_worker"] >= 1
    for cause in causes:
        names = {cls.__name__ for cls in type(cause).__mro__}
        if "NonFiniteLossError" in names or isinstance(cause, RepeatedFailure):
            return "the loss diverges again from the same config and checkpoint"
        if isinstance(cause, ConfigError):
            return "the same config is refused again"
        # On a fraction of a GPU, the trials beside this one may have held the memory: a retry may fit.
        if "OutOfMemoryError" in names and whole_gpus:
            return "the same config needs the same memory"
    return None


def _failure_file(sweep_spec: dict[str, Any], trial_id: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of the trial's failure record: in storage, so a retry on any node sees it."""
    import pyarrow.fs

    storage = sweep_spec["storage"]
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else f"file://{storage}")
    return filesystem, f"{root.rstrip('/')}/{sweep_spec['name']}/trial_{trial_id}/{FAILURE_FILE}"


def _record_failure(sweep_spec: dict[str, Any], trial_id: str, error: BaseException, reason: str) -> None:
    from raylora.sweep.summary import error_line, root_cause

    cause = root_cause(error)
    record = {"type": type(cause).__name__, "error": error_line(error), "reason": reason}
    filesystem, path = _failure_file(sweep_spec, trial_id)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(record).encode())


def _raise_recorded_failure(sweep_spec: dict[str, Any], trial_id: str) -> None:
    """Raise again what an earlier attempt recorded as deterministic: the same type where raylora defines it."""
    import pyarrow.fs

    from raylora.recipe import NonFiniteLossError

    filesystem, path = _failure_file(sweep_spec, trial_id)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return
    with filesystem.open_input_stream(path) as stream:
        record = json.loads(stream.read())
    # The table and MLflow show this, the last attempt's error: it says that no retry trained again.
    message = (
        f"{record.get('error', 'failed')} (not retried: {record.get('reason', 'a deterministic failure')})"
    )
    kind = record.get("type")
    # The message already starts with the original type's name; keep the rest for a type raylora raises.
    text = message.split(": ", 1)[1] if message.startswith(f"{kind}: ") else message
    if kind == NonFiniteLossError.__name__:
        raise NonFiniteLossError(text)
    if kind == ConfigError.__name__:
        raise ConfigError(text)
    raise RepeatedFailure(message)


def release_memory() -> None:
    """Free what the finished trial held, so the next trial in this (reused) process starts with a clean device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def local_copy(checkpoint, config: FinetuneConfig) -> str:
    """A Tune checkpoint copied into the run's output directory (`resume/`), to resume the loop from."""
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

    from raylora.training import train

    config = FinetuneConfig.from_dict(loop_config["config"])
    if loop_config.get("token") is not None:
        config.model.token = ray.get(loop_config["token"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    nodes: list[str] = [""] * context.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    config.training.output_dir = f"{config.training.output_dir}/rank{rank}"
    shutil.rmtree(config.training.output_dir, ignore_errors=True)  # a scratch directory, as in `_run_trial`
    checkpoint = ray.train.get_checkpoint()
    resume_dir = local_copy(checkpoint, config) if checkpoint else None
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
    # Ray Train keeps `train_loop_config` in its run state (the dashboard shows it): the config goes without
    # secrets, and `model.token` by reference to the object store.
    token = ray.put(config.model.token) if config.model.token else None
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.to_dict(), "token": token},
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
            # Tune owns the retries: a failed attempt ends here, and Tune's retry builds a new TorchTrainer
            # that resumes from this run's latest checkpoint, unless the failure was deterministic. Retrying
            # here too would multiply the attempts (and re-run a NaN loss max_failures^2 times).
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec["keep_checkpoints"],
                checkpoint_score_attribute=spec["metric"],
                checkpoint_score_order=spec["mode"],
            ),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
