"""Everything MLflow: a parent run per sweep, a child run per trial, artifacts, the registry.

All logging happens in one process, the sweep's driver, through a Ray Tune callback (`MlflowTracker`):
trials never open the tracking store themselves, so N concurrent trials don't fight over one sqlite file
and a retried trial continues its own run. Calls go through `MlflowClient`; a tracking server that stops
answering mid-sweep does not stop training: the failed calls are kept, retried on the next event and at
the end, and whatever is still lost is counted in a tag on the parent run.

Secrets never reach MLflow: values of config fields or environment variables whose names contain token,
key, secret or password are replaced by `***` in params, tags and every logged config file (the rule
lives in `raylora.redaction`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from ray import tune

from raylora.config import FinetuneConfig
from raylora.names import (
    ADAPTER_RUN_CONFIG,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    GRAD_NORM,
    LEARNING_RATE,
    NUM_NODES,
    PEAK_MEMORY_GIB,
    RUN_CONFIG_MODEL_PLAN,
    STEP,
    TOKENS_PER_SEC,
    TOKENS_SEEN,
    TOTAL_PARAMS,
    TRAIN_HISTORY,
    TRAIN_LOSS,
    TRAINABLE_PARAMS,
    TRAINABLE_PERCENT,
    WALL_TIME_S,
    WORKER_NODES,
)
from raylora.redaction import REDACTED, redact, secret_values
from raylora.sweep import Sweep

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MlflowTracker",
    "REDACTED",
    "load_adapter",
    "redact",
    "resolve_tracking_uri",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Per-step metrics (logged at their step) and per-trial summaries (logged once, at the end).
_STEP_METRICS = (
    TRAIN_LOSS,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    LEARNING_RATE,
    GRAD_NORM,
    TOKENS_PER_SEC,
    PEAK_MEMORY_GIB,
)
_SUMMARY_METRICS = (
    TRAINABLE_PARAMS,
    TOTAL_PARAMS,
    TRAINABLE_PERCENT,
    PEAK_MEMORY_GIB,
    WALL_TIME_S,
    TOKENS_SEEN,
    NUM_NODES,
)
_TAG_TRIAL = "raylora.trial_id"
_TAG_SWEEP = "raylora.sweep"
_TAG_EXPERIMENT = "raylora.experiment_path"
_PACKAGES = ("raylora", "torch", "transformers", "peft", "ray", "bitsandbytes", "datasets", "mlflow")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else `MLFLOW_TRACKING_URI`, else a sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
        out[prefix] = text[:6000]  # MLflow's param value limit


# ---- the driver-side logger ---------------------------------------------------------------------------------


class MlflowTracker(tune.Callback):
    """A Ray Tune callback that mirrors a sweep into MLflow, from the driver process only.

    Args:
        sweep: the sweep being run (its definition goes onto the parent run).
        tracking_uri: MLflow tracking URI; default `resolve_tracking_uri()`.
        experiment_path: where Ray Tune stores the sweep; tags the parent so `--resume` finds it again.
    """

    def __init__(self, sweep: Sweep, *, tracking_uri: str | None = None, experiment_path: str = "") -> None:
        from mlflow.tracking import MlflowClient

        self.sweep = sweep
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_path = experiment_path
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._best_checkpoint: dict[str, tuple[float, str]] = {}
        self._pending: list[tuple[str, Callable[[], Any]]] = []
        self._lost = 0
        self._warned = False
        self._secrets = secret_values()
        self._resolved_logged: set[str] = set()
        self._failed: set[str] = set()

    # -- resilience: a failed call is kept and retried, never raised into the sweep --

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        self._retry_pending()
        try:
            return fn()
        except Exception as error:  # an unreachable server must not stop training
            self._pending.append((what, fn))
            if not self._warned:
                warnings.warn(
                    f"MLflow at {self.tracking_uri} failed ({type(error).__name__}: {error}); training goes on, "
                    "and the failed calls are retried",
                    stacklevel=2,
                )
                self._warned = True
            return None

    def _retry_pending(self) -> None:
        pending, self._pending = self._pending, []
        for index, (_what, fn) in enumerate(pending):
            try:
                fn()
            except Exception:
                self._pending.extend(pending[index:])
                return

    # -- the parent run --

    def setup(self, **info: Any) -> None:
        experiment = self.client.get_experiment_by_name(self.sweep.name)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(self.sweep.name)
        )
        existing = self._find_parent()
        if existing is not None:
            self.parent_run_id = existing
            for run in self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{existing}'",
                max_results=10000,
            ):
                trial_id = run.data.tags.get(_TAG_TRIAL)
                if trial_id:
                    self.trial_runs[trial_id] = run.info.run_id
            self.client.update_run(existing, status="RUNNING")
            return
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.sweep.name,
            tags={_TAG_SWEEP: self.sweep.name, _TAG_EXPERIMENT: self.experiment_path},
        )
        self.parent_run_id = run.info.run_id
        self._log_sweep_definition()

    def _find_parent(self) -> str | None:
        if not self.experiment_path:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{_TAG_EXPERIMENT}` = '{self.experiment_path}' and tags.`{_TAG_SWEEP}` = '{self.sweep.name}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _log_sweep_definition(self) -> None:
        from mlflow.entities import Param

        sweep = self.sweep
        params: dict[str, str] = {}
        definition = {
            "metric": sweep.metric,
            "mode": sweep.mode,
            "search_alg": sweep.search_alg,
            "scheduler": sweep.scheduler,
            "grace_period": sweep.grace_period,
            "reduction_factor": sweep.reduction_factor,
            "num_samples": sweep.num_samples,
            "max_concurrent_trials": sweep.max_concurrent_trials,
            "workers": sweep.resources.workers,
            "cpus_per_worker": sweep.resources.cpus_per_worker,
            "gpus_per_worker": sweep.resources.gpus_per_worker,
            "storage_path": sweep.storage_path,
        }
        _flatten("sweep", redact(definition, secrets=self._secrets), params)
        _flatten("base", redact(sweep.base.to_dict(), secrets=self._secrets), params)
        space = {k: _describe_domain(v) for k, v in sweep.search_space.items()}
        _flatten("search_space", redact(space, secrets=self._secrets), params)
        params["base_model"] = sweep.base.model.name_or_path
        params["base_model_revision"] = _model_revision(sweep.base)
        params["dataset_fingerprint"] = _dataset_fingerprint(sweep.base)
        for package in _PACKAGES:
            params[f"version.{package}"] = _version(package)
        self._call(
            "log sweep params",
            lambda: self.client.log_batch(
                self.parent_run_id, params=[Param(k, v) for k, v in params.items()]
            ),
        )
        payload = redact(
            {"sweep": definition, "base": sweep.base.to_dict(), "search_space": space}, secrets=self._secrets
        )
        self._call(
            "log sweep definition", lambda: self.client.log_dict(self.parent_run_id, payload, "sweep.json")
        )

    # -- child runs --

    def _trial_run(self, trial) -> str | None:
        run_id = self.trial_runs.get(trial.trial_id)
        if run_id is not None:
            return run_id
        run = self._call(
            "create trial run",
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=f"{self.sweep.name}_{trial.trial_id}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    _TAG_TRIAL: trial.trial_id,
                    _TAG_SWEEP: self.sweep.name,
                },
            ),
        )
        if run is None:
            return None
        run_id = run.info.run_id
        self.trial_runs[trial.trial_id] = run_id
        config = self.sweep.trial_config(dict(trial.config))
        self._log_trial_params(run_id, trial, config)
        return run_id

    def _log_trial_params(self, run_id: str, trial, config: FinetuneConfig) -> None:
        from mlflow.entities import Param

        a, t, d = config.adapter, config.training, config.data
        params = {
            "rank": a.r,
            "alpha": a.alpha,
            "learning_rate": t.learning_rate,
            "dropout": a.dropout,
            "target_modules": a.target_modules,
            "qlora": a.qlora,
            "use_rslora": a.use_rslora,
            "use_dora": a.use_dora,
            "batch_size": t.batch_size,
            "grad_accum_steps": t.grad_accum_steps,
            "max_length": d.max_length,
            "packing": d.packing,
            "max_steps": t.max_steps,
            "workers": self.sweep.resources.workers,
            "base_model": config.model.name_or_path,
        }
        flat: dict[str, str] = {}
        _flatten("", redact(params, secrets=self._secrets), flat)
        searched = {f"searched.{k}": v for k, v in dict(trial.config).items()}
        _flatten("", redact(searched, secrets=self._secrets), flat)
        self._call(
            "log trial params",
            lambda: self.client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()]),
        )

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._trial_run(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._trial_run(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        run_id = self._trial_run(trial)
        if run_id:
            retries = trial.run_metadata.num_failures if hasattr(trial, "run_metadata") else 0
            self._call("tag retry", lambda: self.client.set_tag(run_id, "raylora.retries", str(retries)))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self._trial_run(trial)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        points: list[Metric] = []
        for record in [*result.get(TRAIN_HISTORY, []), result]:
            step = int(record.get(STEP, 0))
            for key in _STEP_METRICS:
                value = record.get(key)
                if isinstance(value, int | float):
                    points.append(Metric(key, float(value), now, step))
        self._call("log metrics", lambda: self.client.log_batch(run_id, metrics=points))
        self._last[trial.trial_id] = result
        if result.get("checkpoint_path"):  # N-worker trials: the TorchTrainer's own storage
            self._note_checkpoint(trial, str(result["checkpoint_path"]), result)

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info: Any) -> None:
        latest = trial.latest_checkpoint_result
        metrics = latest.metrics if latest is not None else self._last.get(trial.trial_id, {})
        self._note_checkpoint(trial, checkpoint.path, metrics)

    def _note_checkpoint(self, trial, path: str, metrics: dict) -> None:
        """Remember the trial's best checkpoint (its adapter is logged when the trial ends)."""
        metric = metrics.get(self.sweep.metric)
        if isinstance(metric, int | float):
            best = self._best_checkpoint.get(trial.trial_id)
            if best is None or (metric < best[0] if self.sweep.mode == "min" else metric > best[0]):
                self._best_checkpoint[trial.trial_id] = (float(metric), path)
        run_id = self.trial_runs.get(trial.trial_id)
        if run_id and trial.trial_id not in self._resolved_logged:
            self._log_resolved_targets(run_id, trial.trial_id, path)

    def _log_resolved_targets(self, run_id: str, trial_id: str, checkpoint: str) -> None:
        run_config = Path(checkpoint) / ADAPTER_RUN_CONFIG
        if run_config.exists():
            from mlflow.entities import Param

            written = json.loads(run_config.read_text())
            params = {"target_modules_resolved": ",".join(written.get("resolved_target_modules", []))[:6000]}
            # What the trial did with its base: attention kernel, adapted experts, weights QLoRA left unquantised.
            for key, value in (written.get(RUN_CONFIG_MODEL_PLAN) or {}).items():
                params[f"model.{key}"] = str(value)[:6000]
            self._call(
                "log resolved targets",
                lambda: self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()]),
            )
            self._resolved_logged.add(trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = self._last.get(trial.trial_id, {})
        finished = int(last.get(STEP, 0)) >= self.sweep.base.training.max_steps
        # A trial that ended before max_steps without an error was stopped by the scheduler (ASHA).
        self._end_trial(
            trial,
            "FINISHED" if finished else "KILLED",
            None if finished else "stopped early by the scheduler",
        )

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._failed.add(trial.trial_id)
        reason = _error_text(trial)
        self._end_trial(trial, "FAILED", reason)

    def _end_trial(self, trial, status: str, reason: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._trial_run(trial)
        if run_id is None:
            return
        last = self._last.get(trial.trial_id, {})
        now = int(time.time() * 1000)
        step = int(last.get(STEP, 0))
        summary = [
            Metric(f"final_{k}" if k == PEAK_MEMORY_GIB else k, float(last[k]), now, step)
            for k in _SUMMARY_METRICS
            if isinstance(last.get(k), int | float)
        ]
        if isinstance(last.get(EVAL_LOSS), int | float):
            summary.append(Metric("final_eval_loss", float(last[EVAL_LOSS]), now, step))
        tags = [RunTag("raylora.status", status)]
        if last.get(WORKER_NODES):
            tags.append(RunTag("raylora.worker_nodes", str(last[WORKER_NODES])))
        if reason:
            tags.append(RunTag("raylora.reason", redact(reason, secrets=self._secrets)[:5000]))
        self._call("log summary", lambda: self.client.log_batch(run_id, metrics=summary, tags=tags))
        best = self._best_checkpoint.get(trial.trial_id)
        if best is not None:
            self._log_adapter(run_id, best[1])
        self._call("end trial run", lambda: self.client.set_terminated(run_id, status=status))

    def _log_adapter(self, run_id: str, checkpoint: str) -> None:
        """Log the adapter only (weights, adapter config, tokenizer, resolved config), never the base or optimizer."""
        source = Path(checkpoint)
        if not source.is_dir():
            return
        with tempfile.TemporaryDirectory(prefix="raylora-adapter-") as tmp:
            staged = Path(tmp) / "adapter"
            staged.mkdir()
            for file in source.iterdir():
                if file.is_file() and file.name != "trainer_state.pt":
                    if file.name == ADAPTER_RUN_CONFIG:
                        content = redact(json.loads(file.read_text()), secrets=self._secrets)
                        (staged / file.name).write_text(json.dumps(content, indent=2))
                    else:
                        shutil.copy2(file, staged / file.name)
            self._call("log adapter", lambda: self.client.log_artifacts(run_id, str(staged), "adapter"))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        from mlflow.entities import RunTag

        for trial in trials:  # no child run may stay RUNNING after the sweep
            run_id = self.trial_runs.get(trial.trial_id)
            if run_id is None:
                continue
            status = self._call("read run", lambda r=run_id: self.client.get_run(r).info.status)
            if status == "RUNNING":
                self._end_trial(trial, "KILLED", f"sweep ended with the trial {trial.status}")
        best = self._best_trial()
        tags = []
        if best is not None:
            trial_id, metric = best
            tags += [
                RunTag("raylora.best_trial_id", trial_id),
                RunTag("raylora.best_run_id", self.trial_runs.get(trial_id, "")),
                RunTag(f"raylora.best_{self.sweep.metric}", f"{metric:.6g}"),
            ]
            self._register_best(trial_id)
        self._retry_pending()
        if self._pending:
            self._lost = len(self._pending)
            tags.append(RunTag("raylora.mlflow_calls_lost", str(self._lost)))
        self._call("tag best", lambda: self.client.log_batch(self.parent_run_id, tags=tags))
        self._call("end sweep run", lambda: self.client.set_terminated(self.parent_run_id, status="FINISHED"))

    def _best_trial(self) -> tuple[str, float] | None:
        """The trial with the best final metric among those that did not fail (as `SweepResult.best`)."""
        scored = [
            (trial_id, float(result[self.sweep.metric]))
            for trial_id, result in self._last.items()
            if trial_id not in self._failed and isinstance(result.get(self.sweep.metric), int | float)
        ]
        if not scored:
            return None
        return (min if self.sweep.mode == "min" else max)(scored, key=lambda x: x[1])

    def _register_best(self, trial_id: str) -> None:
        run_id = self.trial_runs.get(trial_id)
        if run_id is None:
            return
        name = f"{self.sweep.name}-adapter"

        def register() -> None:
            from mlflow.exceptions import MlflowException

            with contextlib.suppress(MlflowException):  # already registered: add a version
                self.client.create_registered_model(name)
            self.client.create_model_version(name, source=f"runs:/{run_id}/adapter", run_id=run_id)

        self._call("register best adapter", register)


def _describe_domain(value: Any) -> Any:
    """A readable form of a Tune sampler for the parent run's params."""
    from ray.tune.search.sample import Categorical, Float, Integer

    if isinstance(value, dict) and "grid_search" in value:
        return {"grid_search": value["grid_search"]}
    if isinstance(value, Categorical):
        return {"choice": list(value.categories)}
    if isinstance(value, Float | Integer):
        sampler = type(value.get_sampler()).__name__.lower().replace("_", "")
        return {"range": [value.lower, value.upper], "sampler": sampler}
    return value


def _error_text(trial) -> str:
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).exists():
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
        return lines[-1] if lines else "error"
    return "trial failed"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _model_revision(config: FinetuneConfig) -> str:
    """The hub revision asked for, or for a local checkpoint a short hash of its config and weight index."""
    if config.model.revision:
        return config.model.revision
    from raylora.model import resolve_model_path

    try:
        path = Path(resolve_model_path(config.model))
    except Exception:
        return "unknown"
    if not path.is_dir():
        return "default"
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(
        p.name for p in path.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file()
    ):
        file = path / name
        digest.update(name.encode())
        digest.update(
            file.read_bytes() if file.stat().st_size < 64 * 2**20 else str(file.stat().st_size).encode()
        )
    return f"sha256:{digest.hexdigest()[:16]}"


def _dataset_fingerprint(config: FinetuneConfig) -> str:
    from raylora.data import data_fingerprint

    try:
        return data_fingerprint(config.data)
    except Exception as error:
        return f"unavailable ({type(error).__name__})"


# ---- loading a logged adapter ----------------------------------------------------------------------------------


def load_adapter(run_id: str, *, tracking_uri: str | None = None, device: str | None = None):
    """Base model + the adapter a trial run logged, ready for generation; returns (model, tokenizer).

    Loads the base exactly as the trial did (its logged `raylora_config.json`: model id, dtype, QLoRA).
    """
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoTokenizer

    from raylora.model import load_base_model

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    local = client.download_artifacts(run_id, "adapter", tempfile.mkdtemp(prefix="raylora-load-"))
    run_config = json.loads((Path(local) / ADAPTER_RUN_CONFIG).read_text())
    run_config.pop("resolved_target_modules", None)
    run_config.pop(RUN_CONFIG_MODEL_PLAN, None)
    config = FinetuneConfig.from_dict(run_config)
    base = load_base_model(config.model, qlora=config.adapter.qlora, device=device, adapter=config.adapter)
    model = PeftModel.from_pretrained(base, local)
    model.eval()
    return model, AutoTokenizer.from_pretrained(local)
