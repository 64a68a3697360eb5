"""Everything MLflow: a parent run per sweep, a child run per trial, artifacts, the registry.

All logging happens in one process, the sweep's driver, through a Ray Tune callback (`MlflowTracker`):
trials never open the tracking store themselves, so N concurrent trials don't fight over one sqlite file
and a retried trial continues its own run. Calls go through `MlflowClient`; a tracking server that stops
answering mid-sweep does not stop training: the failed calls are kept, retried on the next event and at
the end, and whatever is still lost is counted in a tag on the parent run.

What a person sees is set up here too (MLflow 3.17's UI): trial runs named after their searched settings,
one short param per setting, summaries logged once at step 0 (table columns and bar charts, not one-point
lines), and shared views stored as experiment tags that the experiment's and each sweep run's descriptions
link to (the runs table with the columns people compare, and a chart comparison of a sweep run's trials).

Secrets never reach MLflow: values of config fields or environment variables whose names contain token,
key, secret or password are replaced by `***` in params, tags and every logged config file (the rule
lives in `raylora.redaction`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ray import tune

from raylora.config import FinetuneConfig
from raylora.names import (
    ADAPTER_RUN_CONFIG,
    ALPHA_RATIO_PARAM,
    BEST_PREFIX,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    GRAD_NORM,
    LEARNING_RATE,
    NUM_NODES,
    PEAK_MEMORY_GIB,
    STEP,
    TOKENS_PER_SEC,
    TOKENS_SEEN,
    TOTAL_PARAMS,
    TRAIN_HISTORY,
    TRAIN_LOSS,
    TRAIN_TIME_S,
    TRAINABLE_PARAMS,
    TRAINABLE_PERCENT,
    TRIAL_CONFIG_ARTIFACT,
    TRIAL_PARAMS,
    WALL_TIME_S,
    WORKER_NODES,
    WORKERS_PARAM,
    display_value,
    param_name,
    trial_run_name,
)
from raylora.redaction import REDACTED, redact, secret_values
from raylora.sweep import ALPHA_RATIO, Sweep

__all__ = [
    "BEST_ALIAS",
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT_KIND",
    "REDACTED",
    "TRIALS_VIEW",
    "MlflowTracker",
    "absolute_tracking_uri",
    "job_store_warning",
    "load_adapter",
    "local_store_path",
    "ray_job_id",
    "redact",
    "resolve_tracking_uri",
    "ui_url",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Per-step metrics (logged at their step: curves) and per-trial summaries (logged once, at step 0, when the
# trial ends: MLflow's UI charts a metric that never passed step 0 as one bar per run, not as a one-point line,
# and shows it as a table column).
_STEP_METRICS = (TRAIN_LOSS, EVAL_LOSS, EVAL_PERPLEXITY, LEARNING_RATE, GRAD_NORM)
_SUMMARY_METRICS = (
    TRAINABLE_PARAMS,
    TOTAL_PARAMS,
    TRAINABLE_PERCENT,
    PEAK_MEMORY_GIB,
    TOKENS_PER_SEC,
    TOKENS_SEEN,
    WALL_TIME_S,
)
# MLflow's runs table shows every digit of a metric; summaries are rounded to what a comparison reads (a loss to
# 1e-4, memory to 1 MiB, a token per second). Curves keep full precision.
_SUMMARY_DIGITS = {PEAK_MEMORY_GIB: 3, TOKENS_PER_SEC: 0, WALL_TIME_S: 1, TRAINABLE_PERCENT: 3}
_BEST_DIGITS = 4
_TAG_TRIAL = "raylora.trial_id"
_TAG_SWEEP = "raylora.sweep"
_TAG_SWEEP_RUN = "raylora.sweep_run"  # the parent's run name on each child: the trials view groups by it
_TAG_SEARCHED = "raylora.searched"  # the param names of the searched settings, comma-separated
_TAG_EXPERIMENT = "raylora.experiment_path"
_TAG_NOTE = "mlflow.note.content"  # a run's or experiment's description, rendered as Markdown by the UI
# MLflow 3.x's UI reads the experiment kind for its landing tab; `custom_model_development` is the value its own
# kind selector writes for "Machine learning" (runs table, not the GenAI traces overview).
_TAG_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A shared runs-table view: the UI applies the JSON state stored in the experiment tag `<prefix><key>` when a
# URL carries `viewStateShareKey=<key>` (columns, sort, filter, grouping, charts).
_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
TRIALS_VIEW = "raylora-trials"
BEST_ALIAS = "best"
_PACKAGES = ("raylora", "torch", "transformers", "peft", "ray", "bitsandbytes", "datasets", "mlflow")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else `MLFLOW_TRACKING_URI`, else a sqlite store in the working directory; local paths made absolute.

    A relative `sqlite:///mlflow.db` names a different file in every directory (and, inside a Ray job, one in
    the job's temporary working directory), so it is resolved once, here, and every printed command names the
    file that was really used.
    """
    return absolute_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///relative.db` or a bare relative path made absolute; any other URI unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:" and not path.startswith("?"):
            return f"sqlite:///{Path(path).resolve()}"
    elif "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).resolve())
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file or directory behind a local tracking URI (sqlite, file store); None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    if "://" not in uri:
        return Path(uri)
    return None


def ray_job_id() -> str | None:
    """The Ray job this process is the driver of (`ray job submit`, `raylora submit`), or None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return str(json.loads(raw).get("metadata", {}).get("job_submission_id") or "unknown")
    except (json.JSONDecodeError, AttributeError):
        return "unknown"


def job_store_warning(uri: str) -> str | None:
    """A warning when this process is a Ray job's driver and logs to a store on the head node's disk.

    The laptop never sees such a store: `mlflow ui` there opens an empty one; a relative path even lands in the
    job's temporary working directory, which Ray deletes.
    """
    job = ray_job_id()
    path = local_store_path(uri)
    if job is None or path is None:
        return None
    where = f"{path} on the head node"
    if path.resolve().is_relative_to(Path.cwd().resolve()):
        where += ", inside the job's temporary working directory, which Ray deletes"
    return (
        f"this sweep runs as Ray job {job} and logs MLflow to {uri}: a file at {where}. Your laptop will "
        "not see these runs (`mlflow ui` there opens an empty store). Log to a tracking server the cluster "
        "reaches instead: `--tracking-uri http://MLFLOW_HOST:5000` (raylora run or raylora submit) or "
        "MLFLOW_TRACKING_URI."
    )


def ui_url(tracking_uri: str, fragment: str, *, local_ui: str = "http://127.0.0.1:5000") -> str:
    """An absolute MLflow UI link: on the tracking server itself, or on a local `mlflow ui` for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else local_ui
    return f"{base}/{fragment}"


def _runs_fragment(experiment_id: str, view: str, *, charts: bool = False) -> str:
    """The UI route of an experiment's runs page with a shared view, in MLflow's "Model training" mode."""
    query = f"workflowType=machine_learning&viewStateShareKey={view}"
    return f"#/experiments/{experiment_id}/runs?{query}" + ("&compareRunsMode=CHART" if charts else "")


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


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

    What a person sees in the MLflow UI is set up here: the experiment opens on its runs (experiment kind) with
    a description linking a trials view (columns, sort, grouping by sweep run); the parent run is named after
    the sweep and its start and links a chart comparison of its trials; each trial's run is named after its
    searched settings (`r16-a32-lr2.2e-4-all-linear`) and logs one short param per setting (`raylora.names`),
    per-step curves, and its summaries once.

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
        self.parent_run_name: str | None = None
        self.experiment_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self.run_names: dict[str, str] = {}
        self.best_metric = f"{BEST_PREFIX}{sweep.metric}"
        self._last: dict[str, dict[str, Any]] = {}
        self._best: dict[str, float] = {}
        self._best_checkpoint: dict[str, tuple[float, str]] = {}
        self._configs: dict[str, FinetuneConfig] = {}
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

    # -- names and views --

    def _searched_fields(self) -> list[str]:
        """The config fields the sweep searches (alpha when a ratio sets it), in search-space order."""
        fields = [f for f in self.sweep.search_space if f != ALPHA_RATIO]
        if ALPHA_RATIO in self.sweep.search_space and "adapter.alpha" not in fields:
            fields.append("adapter.alpha")
        return fields

    def _searched_params(self) -> list[str]:
        return [param_name(f) for f in self._searched_fields()]

    def _table_columns(self) -> list[str]:
        """The runs-table columns of both views: the settings people compare, then the numbers."""
        params = ["rank", "alpha", "lr", "target_modules"]
        params += [p for p in self._searched_params() if p not in params]
        metrics = (self.best_metric, TRAINABLE_PARAMS, PEAK_MEMORY_GIB)
        return [_column("params", p) for p in params] + [_column("metrics", m) for m in metrics]

    def _table_layout(self) -> dict[str, Any]:
        """Columns, sort, and a run-name column wide enough for `r16-a32-lr2.2e-4-all-linear` and group names."""
        return {
            "selectedColumns": self._table_columns(),
            "columnWidths": {_column("attributes", "Run Name"): 340},
            "orderByKey": _column("metrics", self.best_metric),
            "orderByAsc": self.sweep.mode == "min",
        }

    def trials_view(self) -> dict[str, Any]:
        """Every trial of the experiment, grouped under its sweep run, best first, with its settings and numbers."""
        return {
            "searchFilter": f"tags.`{_TAG_TRIAL}` != ''",
            **self._table_layout(),
            "groupBy": {
                "aggregateFunction": "min" if self.sweep.mode == "min" else "max",
                "groupByKeys": [{"mode": "tag", "groupByData": _TAG_SWEEP_RUN}],
            },
        }

    def compare_view(self) -> dict[str, Any]:
        """This sweep run's trials as charts: the searched settings against the best metric, cost and curves."""
        section = "raylora"
        base = {"deleted": False, "isGenerated": False, "metricSectionId": section, "runsCountToCompare": 100}
        searched = [p for p in self._searched_params() if p != ALPHA_RATIO_PARAM] or ["rank", "lr"]
        charts = [
            {
                **base,
                "uuid": "raylora-parallel",
                "type": "PARALLEL",
                "selectedParams": searched,
                "selectedMetrics": [self.best_metric],
                "showAllRuns": True,
            },
            {
                **base,
                "uuid": "raylora-curve",
                "type": "LINE",
                "metricKey": self.sweep.metric,
                "selectedMetricKeys": [self.sweep.metric],
                "xAxisKey": "step",
                "scaleType": "linear",
                "lineSmoothness": 0,
            },
        ]
        for cost in (TRAINABLE_PARAMS, PEAK_MEMORY_GIB):
            charts.append(
                {
                    **base,
                    "uuid": f"raylora-{cost}",
                    "type": "SCATTER",
                    "xaxis": {"key": cost, "type": "METRIC"},
                    "yaxis": {"key": self.best_metric, "type": "METRIC"},
                }
            )
        return {
            "searchFilter": f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            **self._table_layout(),
            "compareRunCharts": charts,
            # Two charts a row, so that the parallel coordinates have room for their axes.
            "compareRunSections": [
                {"uuid": section, "name": "Trials", "display": True, "isReordered": False, "columns": 2}
            ],
            "isAccordionReordered": True,
        }

    def compare_view_key(self) -> str:
        return f"raylora-{self.parent_run_id}"

    def trials_url(self, *, local_ui: str = "http://127.0.0.1:5000") -> str:
        """Where a person compares every trial of this sweep's experiment in the MLflow UI."""
        return ui_url(self.tracking_uri, _runs_fragment(self.experiment_id, TRIALS_VIEW), local_ui=local_ui)

    def compare_url(self, *, local_ui: str = "http://127.0.0.1:5000") -> str:
        """Where a person compares this sweep run's trials as charts in the MLflow UI."""
        fragment = _runs_fragment(self.experiment_id, self.compare_view_key(), charts=True)
        return ui_url(self.tracking_uri, fragment, local_ui=local_ui)

    def _experiment_description(self) -> str:
        base = self.sweep.base
        columns = ", ".join(f"`{c.split('`')[1]}`" for c in self._table_columns())
        return (
            f"**[Compare trials]({_runs_fragment(self.experiment_id, TRIALS_VIEW)})** of raylora sweep "
            f"`{self.sweep.name}`: LoRA{'/QLoRA' if base.adapter.qlora else ''} adapters of "
            f"`{base.model.name_or_path}` on `{base.data.path}`, {self.sweep.metric} ({self.sweep.mode}).\n\n"
            f"The link shows every trial grouped under its sweep run, best `{self.best_metric}` first, with "
            f"{columns}. Each sweep run (`<sweep>-<start>`) is a parent run whose description links a chart "
            "comparison of its trials; each trial is named after its searched settings "
            f"(`r<rank>-a<alpha>-lr<lr>-<target modules>`), its full config in `{TRIAL_CONFIG_ARTIFACT}`. "
            f"Best adapters are registered as `{self.sweep.name}-adapter` (alias `@{BEST_ALIAS}`)."
        )

    def _parent_description(self, best: tuple[str, float] | None = None) -> str:
        text = (
            f"Sweep `{self.sweep.name}`, run `{self.parent_run_name}`: {self.sweep.num_samples} trial(s), search "
            f"{self.sweep.search_alg}, scheduler {self.sweep.scheduler}, {self.sweep.metric} ({self.sweep.mode}).\n\n"
            f"**[Compare its trials]({_runs_fragment(self.experiment_id, self.compare_view_key(), charts=True)})**: "
            f"{', '.join(self._searched_params())} against `{self.best_metric}`, `{TRAINABLE_PARAMS}` and "
            f"`{PEAK_MEMORY_GIB}`, and the {self.sweep.metric} curves."
        )
        if best is not None:
            trial_id, value = best
            run_id = self.trial_runs.get(trial_id, "")
            runs = quote(json.dumps(sorted(self.trial_runs.values())).replace(" ", ""))
            experiments = quote(json.dumps([self.experiment_id]))
            text += (
                f"\n\nBest trial: [{self.run_names.get(trial_id, trial_id)}]"
                f"(#/experiments/{self.experiment_id}/runs/{run_id}), {self.best_metric} {value:.4f}. "
                f"[All trials side by side](#/compare-runs?runs={runs}&experiments={experiments})."
            )
        return text

    def _set_experiment_presentation(self) -> None:
        """Experiment tags: landing on runs, the description with its links, the shared trials view."""
        tags = {
            _TAG_KIND: EXPERIMENT_KIND,
            _TAG_SWEEP: self.sweep.name,
            _TAG_NOTE: self._experiment_description(),
            f"{_VIEW_TAG_PREFIX}{TRIALS_VIEW}": json.dumps(self.trials_view()),
        }
        for key, value in tags.items():
            self._call(
                "tag experiment",
                lambda k=key, v=value: self.client.set_experiment_tag(self.experiment_id, k, v),
            )

    # -- the parent run --

    def setup(self, **info: Any) -> None:
        experiment = self.client.get_experiment_by_name(self.sweep.name)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(self.sweep.name)
        )
        self._set_experiment_presentation()
        existing = self._find_parent()
        if existing is not None:
            self.parent_run_id = existing
            self.parent_run_name = self.client.get_run(existing).info.run_name
            for run in self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{existing}'",
                max_results=10000,
            ):
                trial_id = run.data.tags.get(_TAG_TRIAL)
                if trial_id:
                    self.trial_runs[trial_id] = run.info.run_id
                    self.run_names[trial_id] = run.info.run_name
            self.client.update_run(existing, status="RUNNING")
            return
        self.parent_run_name = f"{self.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.parent_run_name,
            tags={_TAG_SWEEP: self.sweep.name, _TAG_EXPERIMENT: self.experiment_path},
        )
        self.parent_run_id = run.info.run_id
        self._call(
            "describe sweep run",
            lambda: self.client.set_tag(self.parent_run_id, _TAG_NOTE, self._parent_description()),
        )
        view = json.dumps(self.compare_view())
        self._call(
            "compare view",
            lambda: self.client.set_experiment_tag(
                self.experiment_id, f"{_VIEW_TAG_PREFIX}{self.compare_view_key()}", view
            ),
        )
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
        """A few params to filter sweep runs on; the whole definition and base config in `sweep.json`."""
        from mlflow.entities import Param

        sweep = self.sweep
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
        space = {k: _describe_domain(v) for k, v in sweep.search_space.items()}
        versions = {package: _version(package) for package in _PACKAGES}
        params: dict[str, str] = {}
        _flatten("sweep", redact(definition, secrets=self._secrets), params)
        params["search_space"] = json.dumps(redact(space, secrets=self._secrets), default=str)[:6000]
        params["base_model"] = sweep.base.model.name_or_path
        params["base_model_revision"] = _model_revision(sweep.base)
        params["dataset_fingerprint"] = _dataset_fingerprint(sweep.base)
        params.update({f"version.{package}": v for package, v in versions.items()})
        self._call(
            "log sweep params",
            lambda: self.client.log_batch(
                self.parent_run_id, params=[Param(k, v) for k, v in params.items()]
            ),
        )
        payload = redact(
            {"sweep": definition, "base": sweep.base.to_dict(), "search_space": space, "versions": versions},
            secrets=self._secrets,
        )
        self._call(
            "log sweep definition", lambda: self.client.log_dict(self.parent_run_id, payload, "sweep.json")
        )

    # -- child runs --

    def _run_name(self, config: FinetuneConfig, trial_id: str) -> str:
        """The searched settings in short (`r16-a32-lr2.2e-4-all-linear`), made unique within the sweep run."""
        values = {param_name(f): _field(config, f) for f in self._searched_fields()}
        name = trial_run_name(values) or f"trial-{trial_id}"
        taken = set(self.run_names.values())
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}-{n}", n + 1
        return unique

    def _trial_run(self, trial) -> str | None:
        run_id = self.trial_runs.get(trial.trial_id)
        if run_id is not None:
            if trial.trial_id not in self._configs:  # a run from before a resume
                self._configs[trial.trial_id] = self.sweep.trial_config(dict(trial.config))
            return run_id
        config = self.sweep.trial_config(dict(trial.config))
        name = self._run_name(config, trial.trial_id)
        run = self._call(
            "create trial run",
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    _TAG_TRIAL: trial.trial_id,
                    _TAG_SWEEP: self.sweep.name,
                    _TAG_SWEEP_RUN: self.parent_run_name or "",
                    _TAG_SEARCHED: ",".join(self._searched_params()),
                },
            ),
        )
        if run is None:
            return None
        run_id = run.info.run_id
        self.trial_runs[trial.trial_id] = run_id
        self.run_names[trial.trial_id] = name
        self._configs[trial.trial_id] = config
        self._log_trial_params(run_id, trial, config)
        return run_id

    def _trial_params(self, trial, config: FinetuneConfig) -> dict[str, str]:
        """One short name per setting (`raylora.names.TRIAL_PARAMS`), rounded for display; searched extras too."""
        params = {name: _field(config, f) for f, name in TRIAL_PARAMS.items()}
        params[WORKERS_PARAM] = self.sweep.resources.workers
        for field in self.sweep.search_space:
            name = param_name(field)
            if name not in params:
                params[name] = trial.config.get(field) if field == ALPHA_RATIO else _field(config, field)
        return {k: display_value(v)[:6000] for k, v in redact(params, secrets=self._secrets).items()}

    def _log_trial_params(self, run_id: str, trial, config: FinetuneConfig) -> None:
        from mlflow.entities import Param

        flat = self._trial_params(trial, config)
        self._call(
            "log trial params",
            lambda: self.client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()]),
        )
        self._log_trial_config(run_id, trial.trial_id, config, dict(trial.config))

    def _log_trial_config(
        self, run_id: str, trial_id: str, config: FinetuneConfig, searched: dict, resolved: list | None = None
    ) -> None:
        """The full resolved config, searched values at full precision and resolved modules, as one JSON file."""
        payload = redact(
            {
                "sweep": self.sweep.name,
                "trial_id": trial_id,
                "searched": searched,
                "config": config.to_dict(),
                "resolved_target_modules": resolved,
            },
            secrets=self._secrets,
        )
        self._call("log trial config", lambda: self.client.log_dict(run_id, payload, TRIAL_CONFIG_ARTIFACT))

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
        value = result.get(self.sweep.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            best = self._best.get(trial.trial_id)
            if best is None or (value < best if self.sweep.mode == "min" else value > best):
                self._best[trial.trial_id] = float(value)
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
            self._log_resolved_targets(run_id, trial, path)

    def _log_resolved_targets(self, run_id: str, trial, checkpoint: str) -> None:
        run_config = Path(checkpoint) / ADAPTER_RUN_CONFIG
        if run_config.exists():
            resolved = json.loads(run_config.read_text()).get("resolved_target_modules", [])
            config = self._configs.get(trial.trial_id) or self.sweep.trial_config(dict(trial.config))
            self._log_trial_config(run_id, trial.trial_id, config, dict(trial.config), resolved)
            self._resolved_logged.add(trial.trial_id)

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

    def _summary(self, trial_id: str) -> dict[str, float]:
        """The trial's one-value metrics: its best metric, size, memory, throughput and time."""
        last = self._last.get(trial_id, {})
        summary = {k: float(last[k]) for k in _SUMMARY_METRICS if isinstance(last.get(k), int | float)}
        train_time = last.get(TRAIN_TIME_S)
        if isinstance(train_time, int | float) and train_time > 0 and TOKENS_SEEN in summary:
            # The whole trial's rate (tokens over time in optimizer steps), not the last log window's.
            summary[TOKENS_PER_SEC] = summary[TOKENS_SEEN] / float(train_time)
        if trial_id in self._best:
            summary[self.best_metric] = self._best[trial_id]
        return {k: _rounded(k, v, self.best_metric) for k, v in summary.items()}

    def _end_trial(self, trial, status: str, reason: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._trial_run(trial)
        if run_id is None:
            return
        last = self._last.get(trial.trial_id, {})
        now = int(time.time() * 1000)
        summary = [Metric(k, v, now, 0) for k, v in self._summary(trial.trial_id).items()]
        tags = [RunTag("raylora.status", status)]
        if last.get(WORKER_NODES):
            tags.append(RunTag("raylora.worker_nodes", str(last[WORKER_NODES])))
        if isinstance(last.get(NUM_NODES), int | float):
            tags.append(RunTag("raylora.num_nodes", str(int(last[NUM_NODES]))))
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
        from mlflow.entities import Metric, RunTag

        for trial in trials:  # no child run may stay RUNNING after the sweep
            run_id = self.trial_runs.get(trial.trial_id)
            if run_id is None:
                continue
            status = self._call("read run", lambda r=run_id: self.client.get_run(r).info.status)
            if status == "RUNNING":
                self._end_trial(trial, "KILLED", f"sweep ended with the trial {trial.status}")
        best = self._best_trial()
        tags = [RunTag(_TAG_NOTE, self._parent_description(best))]
        metrics = []
        if best is not None:
            trial_id, value = best
            tags += [
                RunTag("raylora.best_trial_id", trial_id),
                RunTag("raylora.best_run_id", self.trial_runs.get(trial_id, "")),
                RunTag("raylora.best_run_name", self.run_names.get(trial_id, "")),
            ]
            metrics.append(Metric(self.best_metric, round(value, _BEST_DIGITS), int(time.time() * 1000), 0))
            self._register_best(trial_id, value)
        self._retry_pending()
        if self._pending:
            self._lost = len(self._pending)
            tags.append(RunTag("raylora.mlflow_calls_lost", str(self._lost)))
        self._call("tag best", lambda: self.client.log_batch(self.parent_run_id, metrics=metrics, tags=tags))
        self._call("end sweep run", lambda: self.client.set_terminated(self.parent_run_id, status="FINISHED"))

    def _best_trial(self) -> tuple[str, float] | None:
        """The trial with the best value of the sweep's metric over its evals, among those that did not fail.

        The same value the trial's `best_<metric>` shows and its registered (best) checkpoint was scored by.
        """
        scored = [(t, v) for t, v in self._best.items() if t not in self._failed]
        if not scored:
            return None
        return (min if self.sweep.mode == "min" else max)(scored, key=lambda x: x[1])

    def _register_best(self, trial_id: str, value: float) -> None:
        """Register the best trial's adapter, described and tagged; alias `best` on the sweep's best version."""
        run_id = self.trial_runs.get(trial_id)
        if run_id is None:
            return
        name = f"{self.sweep.name}-adapter"
        config = self._configs[trial_id]  # set by `_trial_run` for every trial that reported a result
        adapter = config.adapter
        run_name = self.run_names.get(trial_id, trial_id)
        # Five tags, the ones a registry page lists first: what the adapter is for and how good it is.
        tags = {
            "base_model": config.model.name_or_path,
            "rank": str(adapter.r),
            "target_modules": display_value(adapter.target_modules),
            "qlora": display_value(bool(adapter.qlora)),
            self.best_metric: f"{round(value, _BEST_DIGITS):g}",
        }
        alpha = display_value(float(adapter.alpha))
        lr = display_value(float(config.training.learning_rate))
        description = (
            f"Trial `{run_name}` of sweep run `{self.parent_run_name}` (experiment `{self.sweep.name}`): a "
            f"{'QLoRA' if adapter.qlora else 'LoRA'} adapter of `{config.model.name_or_path}`, rank {adapter.r}, "
            f"alpha {alpha}, lr {lr}, target modules {tags['target_modules']}; "
            f"{self.best_metric} {value:.4f}.\n\n"
            f'Load it: `from raylora.tracking import load_adapter; model, tokenizer = load_adapter("models:/{name}/VERSION")` '
            "(the base loaded as the trial did, plus this adapter)."
        )
        model_description = (
            f"LoRA adapters of raylora sweep `{self.sweep.name}` on `{self.sweep.base.model.name_or_path}`: each "
            f"sweep run registers its best trial; alias `@{BEST_ALIAS}` is the version with the best "
            f"{self.best_metric}. Load it: "
            f'`from raylora.tracking import load_adapter; model, tokenizer = load_adapter("models:/{name}@{BEST_ALIAS}")`.'
        )

        def register() -> None:
            from mlflow.exceptions import MlflowException

            with contextlib.suppress(MlflowException):  # already registered: add a version
                self.client.create_registered_model(
                    name, tags={_TAG_SWEEP: self.sweep.name}, description=model_description
                )
            version = self.client.create_model_version(
                name, source=f"runs:/{run_id}/adapter", run_id=run_id, tags=tags
            )
            self.client.update_model_version(
                name, version.version, description=description.replace("VERSION", str(version.version))
            )
            try:
                current = self.client.get_model_version_by_alias(name, BEST_ALIAS)
                held = float(current.tags.get(self.best_metric, "nan"))
            except MlflowException:
                held = math.nan
            better = value < held if self.sweep.mode == "min" else value > held
            if math.isnan(held) or better:
                self.client.set_registered_model_alias(name, BEST_ALIAS, version.version)

        self._call("register best adapter", register)


def _rounded(key: str, value: float, best_metric: str) -> float:
    digits = _BEST_DIGITS if key == best_metric else _SUMMARY_DIGITS.get(key)
    return value if digits is None else float(round(value, digits))


def _field(config: FinetuneConfig, dotted: str) -> Any:
    """A config field's value by dotted path (`adapter.r`)."""
    section, _, name = dotted.partition(".")
    return getattr(getattr(config, section), name)


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


def load_adapter(source: str, *, tracking_uri: str | None = None, device: str | None = None):
    """Base model + the adapter a trial run logged, ready for generation; returns (model, tokenizer).

    Loads the base exactly as the trial did (its logged `raylora_config.json`: model id, dtype, QLoRA).

    Args:
        source: a trial's run id, or a registered version: `models:/<sweep>-adapter@best` (an alias) or
            `models:/<sweep>-adapter/3` (a version number).
        tracking_uri: the MLflow store the sweep logged to (`raylora run` prints it); default
            `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working directory.
        device: where to load the base; default as `load_base_model` chooses.

    Raises:
        ValueError: the store does not exist, or holds no such run, model or version.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoTokenizer

    from raylora.model import load_base_model

    uri = resolve_tracking_uri(tracking_uri)
    hint = (
        "pass `tracking_uri=` the store the sweep logged to (`raylora run` printed it, e.g. "
        "sqlite:////abs/path/mlflow.db or http://MLFLOW_HOST:5000) or set MLFLOW_TRACKING_URI"
    )
    store = local_store_path(uri)
    if store is not None and not store.exists():
        # MlflowClient would create an empty store here and then report a missing run.
        raise ValueError(
            f"no MLflow store at {uri}: {store} does not exist (a relative path is read from the working "
            f"directory, {Path.cwd()}); {hint}"
        )
    client = MlflowClient(tracking_uri=uri)
    try:
        run_id = _run_of(client, source)
        local = client.download_artifacts(run_id, "adapter", tempfile.mkdtemp(prefix="raylora-load-"))
    except MlflowException as error:
        raise ValueError(
            f"{source!r} is not in the MLflow store at {uri} ({str(error).splitlines()[0]}); {hint}"
        ) from error
    run_config = json.loads((Path(local) / ADAPTER_RUN_CONFIG).read_text())
    run_config.pop("resolved_target_modules", None)
    config = FinetuneConfig.from_dict(run_config)
    base = load_base_model(config.model, qlora=config.adapter.qlora, device=device)
    model = PeftModel.from_pretrained(base, local)
    model.eval()
    return model, AutoTokenizer.from_pretrained(local)


def _run_of(client, source: str) -> str:
    """The run id behind a run id, `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    if not source.startswith("models:/"):
        client.get_run(source)  # raises for an unknown run, before any download
        return source
    name, sep, alias = source.removeprefix("models:/").partition("@")
    if sep:
        return client.get_model_version_by_alias(name, alias).run_id
    name, _, version = name.rpartition("/")
    return client.get_model_version(name, version).run_id
