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

import shutil
import tempfile
from pathlib import Path
from typing import Any

from raylora.config import FinetuneConfig
from raylora.names import EVAL_LOSS, NUM_NODES, TRAIN_HISTORY, WORKER_NODES
from raylora.sweep.spec import Sweep

__all__ = ["_run_trial"]

_NONFINITE_MARKER = "NONFINITE_LOSS"


# Named with an underscore although `raylora.sweep.tuner` imports it: Tune identifies a trainable by the
# function's name, and `Tuner.restore` refuses another one, so a new name would break `raylora run --resume`
# of every sweep started before.
def _run_trial(sampled: dict[str, Any], *, sweep_spec: dict[str, Any]) -> None:
    """The Tune trial function: train one sampled config on 1 worker in-process, or N workers via TorchTrainer."""
    import ray
    from ray import tune

    from raylora.training import NonFiniteLossError, train

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
    # A scratch directory: Tune's checkpoint is the trial's state; an attempt killed before its clean-up left
    # files here that `train` would refuse as another attempt's run.
    shutil.rmtree(config.training.output_dir, ignore_errors=True)
    workers = sweep_spec["resources"]["workers"]
    try:
        if sweep_spec.get("pack"):
            from raylora.sweep.packing import run_packed_trial

            placement = _placement([ray.get_runtime_context().get_node_id()])
            run_packed_trial(config, sweep_spec, context.get_trial_id(), placement)
        elif workers == 1:
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
