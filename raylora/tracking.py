"""Everything MLflow: a parent run per sweep, a child run per trial, artifacts, the registry.

All logging happens in one process, the sweep's driver, through a Ray Tune callback (`MlflowTracker`):
trials never open the tracking store themselves, so N concurrent trials don't fight over one sqlite file
and a retried trial continues its own run. Calls go through `MlflowClient`, on a thread of their own: a
tracking server that is slow or stops answering never holds up training (MLflow's own retries take minutes);
the calls wait, bounded, and are replayed in order once it answers, without duplicates; whatever is lost is
said at the end and counted in a tag on the parent run.

What a person sees is set up here too (MLflow 3.17's UI): trial runs named after their searched settings,
one short param per setting, summaries logged once at step 0 (table columns and bar charts, not one-point
lines), and shared views stored as experiment tags that the experiment's and each sweep run's descriptions
link to (the runs table with the columns people compare, and a chart comparison of a sweep run's trials).

Every trial's run ends with its outcome in the tag `raylora.status`, in the words of the trials table
(`raylora.names`): FINISHED, STOPPED (ASHA) (both FINISHED in MLflow: complete trials), FAILED, or
INTERRUPTED (KILLED in MLflow; `--resume` continues it). "Best" is `raylora.names.best_index` everywhere:
a trial's `best_<metric>` and logged adapter are its best eval's; the registered adapter is the best trial's.

Secrets never reach MLflow: values of config fields or environment variables whose names contain token,
key, secret or password are replaced by `***` in params, tags and every logged config file (the rule
lives in `raylora.redaction`); the tracker keeps no secret value itself.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
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
    CHECKPOINT_STATE_FILE,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    FAILED,
    FINISHED,
    GRAD_NORM,
    INTERRUPTED,
    LEARNING_RATE,
    NUM_NODES,
    PACK_ENGINE,
    PEAK_MEMORY_GIB,
    RUN_CONFIG_MODEL_PLAN,
    STEP,
    STOPPED_EARLY,
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
    best_index,
    display_value,
    param_name,
    trial_run_name,
)
from raylora.redaction import REDACTED, redact
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
_TAG_STATUS = "raylora.status"  # a trial's outcome in the words of the trials table (`raylora.names`)
_TAG_KEY = "raylora.run_key"  # a run's own key, so that a replayed create finds the run it made
_TAG_BEST_VALUE = "raylora.best_value"  # a trial's best value of the sweep's metric, every digit
_TAG_BEST_STEP = "raylora.best_step"  # and the step of that eval
# N-worker trials: Ray Train's TuneReportCallback reports each checkpoint's path as this metric.
_CHECKPOINT_PATH = "checkpoint_path"
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


# ---- writing without waiting ------------------------------------------------------------------------------------

# MLflow error codes that mean "the store is not answering now", not "this call is wrong": MLflow reports a
# connection that failed through its own retries as INTERNAL_ERROR, a 5xx by its code.
_UNAVAILABLE_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}
_PAUSE_MAX_S = 30.0
# A call in flight this long means the store is not answering: MLflow's client may go on retrying it for
# minutes (its defaults) before it gives up, which is when the writer would otherwise first hear of it.
_SLOW_S = 15.0
# A call that fails this often while the store answers its health check is dropped: the call, not the store,
# is at fault (a server-side error on one request would otherwise hold up every call behind it).
_ATTEMPTS_WHILE_HEALTHY = 3


class _Writer:
    """MLflow calls on a thread of their own, in the order they were made: the sweep never waits for MLflow.

    A call that fails because the store does not answer (a refused connection, a timeout, a 5xx: MLflow's
    own retries, minutes long by default, run here, not in the Tune driver) stays at the head of the queue
    and is tried again, after a pause that grows to 30 s, until it goes through: calls are replayed in
    order once the store is back, and calls that are replayed are written so that a replay adds nothing
    twice (metric points carry the time they were taken; runs are found again by a key of their own). A
    call the store refuses (a bad value) is dropped, said and counted. The queue holds `capacity` calls;
    beyond that new calls are dropped and counted (`lost`). `flush` waits for the queue to empty, up to a
    deadline.
    """

    def __init__(self, tracking_uri: str, *, capacity: int) -> None:
        self._uri = tracking_uri
        self._capacity = capacity
        self._queue: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._in_flight: tuple[str, float] | None = None  # the call being made, since when
        self.lost: list[str] = []  # what was dropped, for the parent run's tag and the end-of-sweep warning

    def submit(self, what: str, call: Callable[[], Any]) -> None:
        """Queue `call` (named `what` in warnings); never blocks."""
        self._check_slow()
        with self._cond:
            if len(self._queue) >= self._capacity:
                self.lost.append(what)
                if len(self.lost) == 1:
                    _warn(
                        f"MLflow at {self._uri} is {len(self._queue)} calls behind; further calls are dropped "
                        "until it catches up (training goes on)"
                    )
                return
            self._queue.append((what, call))
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="raylora-mlflow", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> int:
        """Wait until every queued call has gone through (or `timeout_s` passed); return how many remain."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                self._check_slow()
            return len(self._queue)

    def close(self) -> list[str]:
        """Stop the thread; return what was still queued (lost with this process)."""
        with self._cond:
            self._closed = True
            left = [what for what, _ in self._queue]
            self._queue.clear()
            self._cond.notify_all()
        return left

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                what, call = self._queue[0]
                self._busy = True
                self._in_flight = (what, time.monotonic())
            try:
                call()
            except Exception as error:
                failures += 1
                self._in_flight = None
                if _store_unavailable(error) and (failures < _ATTEMPTS_WHILE_HEALTHY or not self._healthy()):
                    self._note_outage(what, _short_error(error))
                    deadline = time.monotonic() + min(_PAUSE_MAX_S, 2.0 ** min(failures, 5))
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                        while not self._closed and time.monotonic() < deadline:
                            self._cond.wait(timeout=deadline - time.monotonic())
                    continue
                _warn(
                    f"MLflow at {self._uri} refused to {what} ({_short_error(error)}); that call is dropped"
                )
                self.lost.append(what)
            else:
                if self._down_since is not None:
                    print(
                        f"raylora: MLflow at {self._uri} answers again after {time.monotonic() - self._down_since:.0f} "
                        f"s; replaying the {len(self._queue)} calls kept meanwhile, in order",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._down_since = None
            failures = 0
            with self._cond:
                if self._queue and self._queue[0][1] is call:
                    self._queue.popleft()
                self._busy = False
                self._in_flight = None
                self._cond.notify_all()

    def _check_slow(self) -> None:
        """Called as calls come in: a call in flight for long says the store is down before MLflow gives up."""
        in_flight = self._in_flight
        if in_flight is not None and time.monotonic() - in_flight[1] > _SLOW_S:
            self._note_outage(in_flight[0], f"no answer for {time.monotonic() - in_flight[1]:.0f} s")

    def _note_outage(self, what: str, error: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            _warn(
                f"MLflow at {self._uri} does not answer ({error}) while trying to {what}; training goes on, "
                f"and the {len(self._queue)} calls waiting (more as the sweep goes on) are kept and replayed "
                "in order once it answers"
            )

    def _healthy(self) -> bool:
        """Whether the store answers at all: a server's /health, or a local store's file being there."""
        store = local_store_path(self._uri)
        if store is not None:
            return store.exists()
        try:
            with urllib.request.urlopen(f"{self._uri.rstrip('/')}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False


def _store_unavailable(error: Exception) -> bool:
    """Whether `error` says the store is not answering (retry the call later) rather than refusing the call."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in _UNAVAILABLE_CODES
    # A connection or a file that failed (requests' errors are OSErrors), a sqlite store locked by another writer.
    return isinstance(error, OSError) or type(error).__name__ in ("OperationalError", "TimeoutError")


def _short_error(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:300]}"


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


# ---- the driver-side logger ---------------------------------------------------------------------------------


class MlflowTracker(tune.Callback):
    """A Ray Tune callback that mirrors a sweep into MLflow, from the driver process only.

    What a person sees in the MLflow UI is set up here: the experiment opens on its runs (experiment kind) with
    a description linking a trials view (columns, sort, grouping by sweep run); the parent run is named after
    the sweep and its start and links a chart comparison of its trials; each trial's run is named after its
    searched settings (`r16-a32-lr2.2e-4-all-linear`) and logs one short param per setting (`raylora.names`),
    per-step curves, and its summaries once.

    The Tune hooks only queue MLflow calls; a thread of their own makes them (`_Writer`), so a slow or
    unreachable store never holds up a trial's report. `run_sweep` gives the tracker to Tune on every call
    (a resumed sweep logs where this tracker points), tells `setup` whether the sweep resumes (then the
    newest sweep run of this storage path is continued) and `on_experiment_end` whether a signal
    interrupted it (then runs end KILLED and nothing is registered).

    Args:
        sweep: the sweep being run (its definition goes onto the parent run).
        tracking_uri: MLflow tracking URI; default `resolve_tracking_uri()`.
        experiment_path: where Ray Tune stores the sweep; tags the parent so `--resume` finds it again.
        flush_timeout_s: how long the end of the sweep waits for queued calls (a store that is down); what
            is still queued then is lost, and said.
        capacity: queued calls at most; beyond that, calls are dropped and counted.
    """

    def __init__(
        self,
        sweep: Sweep,
        *,
        tracking_uri: str | None = None,
        experiment_path: str = "",
        flush_timeout_s: float = 300.0,
        capacity: int = 100_000,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.sweep = sweep
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_path = experiment_path
        self.flush_timeout_s = flush_timeout_s
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.best_metric = f"{BEST_PREFIX}{sweep.metric}"
        self._capacity = capacity
        self._writer = _Writer(self.tracking_uri, capacity=capacity)
        # Set by the writer thread, as the store answers.
        self.parent_run_id: str | None = None
        self.parent_run_name: str | None = None
        self.experiment_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self.run_names: dict[str, str] = {}
        self._open: set[str] = set()  # trials whose run is RUNNING
        self._resolved_logged: set[str] = set()
        self._pack_engines: dict[str, str] = {}  # trial id -> the pack engine last tagged on its run
        # Kept by the Tune hooks (the driver's thread); the writer's calls get copies.
        self._last: dict[str, dict[str, Any]] = {}
        self._best: dict[str, tuple[float, int]] = {}  # trial -> (best value, its step)
        self._best_checkpoint: dict[str, tuple[float, int, Any]] = {}  # trial -> (value, step, Checkpoint)
        self._configs: dict[str, FinetuneConfig] = {}
        # Set by the writer: a resumed trial's best eval before the resume, from its run's tags.
        self._prior_best: dict[str, tuple[float, int]] = {}

    def _submit(self, what: str, call: Callable[[], Any]) -> None:
        self._writer.submit(what, call)

    @property
    def lost_calls(self) -> list[str]:
        """MLflow calls that never went through (dropped, or still queued when the sweep ended)."""
        return list(self._writer.lost)

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
            self.client.set_experiment_tag(self.experiment_id, key, value)

    # -- the parent run --

    def setup(self, resume: bool = False, **info: Any) -> None:
        self._writer = _Writer(self.tracking_uri, capacity=self._capacity)
        self._submit("open the sweep run", lambda: self._open_sweep_run(resume))

    def _open_sweep_run(self, resume: bool) -> None:
        experiment = self.client.get_experiment_by_name(self.sweep.name)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(self.sweep.name)
        )
        self._set_experiment_presentation()
        existing = self._find_parent() if resume else None
        if resume and existing is None:
            print(
                f"raylora: no sweep run of {self.experiment_path} in {self.tracking_uri}: the resumed sweep logs "
                "to a new one",
                file=sys.stderr,
                flush=True,
            )
        if existing is not None:
            self.parent_run_id = existing
            self.parent_run_name = self.client.get_run(existing).info.run_name
            for run in self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{existing}'",
                max_results=10000,
            ):
                trial_id = run.data.tags.get(_TAG_TRIAL)
                if trial_id and trial_id not in self.trial_runs:
                    self.trial_runs[trial_id] = run.info.run_id
                    self.run_names[trial_id] = run.info.run_name
            self.client.update_run(existing, status="RUNNING")
            self.client.set_tag(existing, _TAG_STATUS, "RUNNING")
            return
        self.parent_run_name = f"{self.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.parent_run_id = self._create_once(
            run_name=self.parent_run_name,
            tags={_TAG_SWEEP: self.sweep.name, _TAG_EXPERIMENT: self.experiment_path, _TAG_STATUS: "RUNNING"},
        )
        self.client.set_tag(self.parent_run_id, _TAG_NOTE, self._parent_description())
        self.client.set_experiment_tag(
            self.experiment_id,
            f"{_VIEW_TAG_PREFIX}{self.compare_view_key()}",
            json.dumps(self.compare_view()),
        )
        self._log_sweep_definition()

    def _create_once(self, *, run_name: str, tags: dict[str, str]) -> str:
        """Create a run exactly once, however often this call is replayed.

        MLflow's client retries a request whose answer was lost (and this tracker replays a call that
        failed): the store may then hold the run already, or twice. A key of this run's own, set as a tag,
        finds it: the first run with the key is kept, any other deleted.
        """
        key = tags.setdefault(_TAG_KEY, uuid.uuid4().hex)
        found = self._runs_with_key(key)
        if not found:
            self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            found = self._runs_with_key(key)
        keep, *duplicates = found
        for run in duplicates:
            self.client.delete_run(run.info.run_id)
        return keep.info.run_id

    def _runs_with_key(self, key: str) -> list:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{_TAG_KEY}` = '{key}'", max_results=10
        )
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _find_parent(self) -> str | None:
        """The newest sweep run of this storage path: the one `--resume` continues."""
        if not self.experiment_path:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{_TAG_EXPERIMENT}` = '{self.experiment_path}' and tags.`{_TAG_SWEEP}` = '{self.sweep.name}'",
            order_by=["attributes.start_time DESC"],
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
            "pack": sweep.pack,
            "workers": sweep.resources.workers,
            "cpus_per_worker": sweep.resources.cpus_per_worker,
            "gpus_per_worker": sweep.resources.gpus_per_worker,
            "storage_path": sweep.storage_path,
        }
        space = {k: _describe_domain(v) for k, v in sweep.search_space.items()}
        versions = {package: _version(package) for package in _PACKAGES}
        params: dict[str, str] = {}
        _flatten("sweep", redact(definition), params)
        params["search_space"] = json.dumps(redact(space), default=str)[:6000]
        params["base_model"] = sweep.base.model.name_or_path
        params["base_model_revision"] = _model_revision(sweep.base)
        params["dataset_fingerprint"] = _dataset_fingerprint(sweep.base)
        params.update({f"version.{package}": v for package, v in versions.items()})
        self.client.log_batch(self.parent_run_id, params=[Param(k, v) for k, v in params.items()])
        payload = redact(
            {"sweep": definition, "base": sweep.base.to_dict(), "search_space": space, "versions": versions}
        )
        self.client.log_dict(self.parent_run_id, payload, "sweep.json")

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

    def _trial_config(self, trial) -> FinetuneConfig:
        config = self._configs.get(trial.trial_id)
        if config is None:
            config = self._configs[trial.trial_id] = self.sweep.trial_config(dict(trial.config))
        return config

    def _open_trial(self, trial) -> None:
        """Queue: the trial's run, created once, or continued (RUNNING again) when it already exists."""
        config = self._trial_config(trial)
        trial_id, searched = trial.trial_id, dict(trial.config)
        self._submit("open a trial run", lambda: self._open_trial_run(trial_id, config, searched))

    def _open_trial_run(self, trial_id: str, config: FinetuneConfig, searched: dict[str, Any]) -> None:
        if self.parent_run_id is None:
            return  # the sweep run could not be created: nothing to hang trials on
        run_id = self.trial_runs.get(trial_id)
        if run_id is not None:  # a retried or resumed trial continues its own run
            if trial_id not in self._open:
                tags = self.client.get_run(run_id).data.tags
                if _TAG_BEST_VALUE in tags and trial_id not in self._prior_best:  # its evals before a resume
                    self._prior_best[trial_id] = (float(tags[_TAG_BEST_VALUE]), int(tags[_TAG_BEST_STEP]))
                self.client.update_run(run_id, status="RUNNING")
                self.client.set_tag(run_id, _TAG_STATUS, "RUNNING")
                self._open.add(trial_id)
            return
        name = self._run_name(config, trial_id)
        self.run_names[trial_id] = name
        self.trial_runs[trial_id] = self._create_once(
            run_name=name,
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                _TAG_TRIAL: trial_id,
                _TAG_SWEEP: self.sweep.name,
                _TAG_SWEEP_RUN: self.parent_run_name or "",
                _TAG_SEARCHED: ",".join(self._searched_params()),
                _TAG_STATUS: "RUNNING",
            },
        )
        self._open.add(trial_id)
        self._log_trial_params(trial_id, config, searched)

    def _trial_params(self, searched: dict[str, Any], config: FinetuneConfig) -> dict[str, str]:
        """One short name per setting (`raylora.names.TRIAL_PARAMS`), rounded for display; searched extras too."""
        params = {name: _field(config, f) for f, name in TRIAL_PARAMS.items()}
        params[WORKERS_PARAM] = self.sweep.resources.workers
        for field in self.sweep.search_space:
            name = param_name(field)
            if name not in params:
                params[name] = searched.get(field) if field == ALPHA_RATIO else _field(config, field)
        return {k: display_value(v)[:6000] for k, v in redact(params).items()}

    def _log_trial_params(self, trial_id: str, config: FinetuneConfig, searched: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = self._trial_params(searched, config)
        self.client.log_batch(self.trial_runs[trial_id], params=[Param(k, v) for k, v in flat.items()])
        self._log_trial_config(trial_id, config, searched)

    def _log_trial_config(
        self,
        trial_id: str,
        config: FinetuneConfig,
        searched: dict,
        resolved: list | None = None,
        model_plan: dict | None = None,
    ) -> None:
        """The full resolved config, searched values at full precision, resolved modules and what the trial did
        with its base, as one JSON file; the model plan (attention kernel, adapted experts, weights QLoRA left
        unquantised) also as `model.*` params, since it can differ between trials of one sweep."""
        from mlflow.entities import Param

        run_id = self.trial_runs[trial_id]
        payload = redact(
            {
                "sweep": self.sweep.name,
                "trial_id": trial_id,
                "searched": searched,
                "config": config.to_dict(),
                "resolved_target_modules": resolved,
                RUN_CONFIG_MODEL_PLAN: model_plan,
            }
        )
        self.client.log_dict(run_id, payload, TRIAL_CONFIG_ARTIFACT)
        if model_plan:
            params = [Param(f"model.{k}", str(v)[:6000]) for k, v in model_plan.items() if str(v)]
            self.client.log_batch(run_id, params=params)

    def _in_run(self, trial_id: str, call: Callable[[str], Any]) -> Callable[[], Any]:
        """A call on the trial's run, whenever the writer gets to it (skipped if the run never came to be)."""

        def on_run() -> None:
            run_id = self.trial_runs.get(trial_id)
            if run_id is not None:
                call(run_id)

        return on_run

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._open_trial(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._open_trial(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        retries = str(trial.run_metadata.num_failures) if hasattr(trial, "run_metadata") else "0"
        self._submit(
            "tag a retry",
            self._in_run(
                trial.trial_id, lambda run_id: self.client.set_tag(run_id, "raylora.retries", retries)
            ),
        )

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        if trial.trial_id not in self._configs:
            self._open_trial(trial)  # a result before any start event (a restored trial)
        now = int(
            time.time() * 1000
        )  # fixed now: a replayed call logs the very same points, which MLflow skips
        points: list[Metric] = []
        for record in [*result.get(TRAIN_HISTORY, []), result]:
            step = int(record.get(STEP, 0))
            for key in _STEP_METRICS:
                value = record.get(key)
                if isinstance(value, int | float):
                    points.append(Metric(key, float(value), now, step))
        self._submit(
            "log metrics",
            self._in_run(trial.trial_id, lambda run_id: self.client.log_batch(run_id, metrics=points)),
        )
        self._last[trial.trial_id] = {k: v for k, v in result.items() if k != TRAIN_HISTORY}
        engine = result.get(PACK_ENGINE)
        if engine and self._pack_engines.get(trial.trial_id) != engine:
            # Which trials shared a base: a packed trial's runs carry their engine's name (a retry may move it).
            self._pack_engines[trial.trial_id] = str(engine)
            self._submit(
                "tag the pack engine",
                self._in_run(
                    trial.trial_id,
                    lambda run_id: self.client.set_tag(run_id, "raylora.pack_engine", str(engine)),
                ),
            )
        value, step = result.get(self.sweep.metric), int(result.get(STEP, 0))
        best = self._best.get(trial.trial_id)
        if best_index([best[0] if best else None, value], self.sweep.mode) == 1:
            self._best[trial.trial_id] = (float(value), step)
        if result.get(_CHECKPOINT_PATH):  # N-worker trials: the TorchTrainer's own storage
            self._note_checkpoint(trial, self._storage_checkpoint(str(result[_CHECKPOINT_PATH])), result)

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info: Any) -> None:
        # The result this checkpoint came with is the trial's last: Tune saves a reported checkpoint before it
        # asks the trial for more, and calls this before the trial's own record of it
        # (`trial.latest_checkpoint_result`) moves on, which is still the previous checkpoint's here.
        self._note_checkpoint(trial, checkpoint, self._last.get(trial.trial_id, {}))

    def _storage_checkpoint(self, path: str):
        """A checkpoint an N-worker trial reported by path: on the sweep's storage, whose scheme Ray drops."""
        from ray.tune import Checkpoint

        if "://" in self.experiment_path:
            import pyarrow.fs

            filesystem, _ = pyarrow.fs.FileSystem.from_uri(self.experiment_path)
            return Checkpoint(path, filesystem=filesystem)
        return Checkpoint(path)

    def _note_checkpoint(self, trial, checkpoint, metrics: dict) -> None:
        """Remember the trial's best checkpoint (`best_index`: its adapter is logged when the trial ends)."""
        value, step = metrics.get(self.sweep.metric), int(metrics.get(STEP, 0))
        best = self._best_checkpoint.get(trial.trial_id)
        if best_index([best[0] if best else None, value], self.sweep.mode) == 1:
            self._best_checkpoint[trial.trial_id] = (float(value), step, checkpoint)
        if trial.trial_id not in self._resolved_logged:
            self._resolved_logged.add(trial.trial_id)
            config, searched = self._trial_config(trial), dict(trial.config)
            self._submit(
                "log resolved target modules",
                self._in_run(
                    trial.trial_id,
                    lambda _run_id: self._log_trial_config(
                        trial.trial_id, config, searched, *_written_run_files(checkpoint)
                    ),
                ),
            )

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = self._last.get(trial.trial_id, {})
        step = int(last.get(STEP, 0))
        if step >= self.sweep.base.training.max_steps:
            self._end_trial(trial, FINISHED, None)
        else:
            # A trial that ended before max_steps without an error was stopped by the scheduler (ASHA): a
            # complete trial (its run FINISHED), whose best checkpoint is as usable as any other.
            reason = (
                f"stopped at step {step} of {self.sweep.base.training.max_steps} by ASHA: its {self.sweep.metric} "
                "was behind the other trials' at that rung"
            )
            self._end_trial(trial, STOPPED_EARLY, reason)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        # Read now, from the driver's own copy: storage gets this attempt's error file only at the next sync.
        self._end_trial(trial, FAILED, _trial_error(trial))

    def _summary(self, trial_id: str) -> dict[str, float]:
        """The trial's one-value metrics: size, memory, throughput and time (its best metric: `_end_trial`)."""
        last = self._last.get(trial_id, {})
        summary = {k: float(last[k]) for k in _SUMMARY_METRICS if isinstance(last.get(k), int | float)}
        train_time = last.get(TRAIN_TIME_S)
        if isinstance(train_time, int | float) and train_time > 0 and TOKENS_SEEN in summary:
            # The whole trial's rate (tokens over time in optimizer steps), not the last log window's.
            summary[TOKENS_PER_SEC] = summary[TOKENS_SEEN] / float(train_time)
        return {k: _rounded(k, v, self.best_metric) for k, v in summary.items()}

    def _end_trial(self, trial, status: str, reason: str | None) -> None:
        """Queue the trial's summaries, its best adapter and the end of its run, as `status` says."""
        from mlflow.entities import Metric, RunTag

        trial_id = trial.trial_id
        last = self._last.get(trial_id, {})
        now = int(time.time() * 1000)
        summary = [Metric(k, v, now, 0) for k, v in self._summary(trial_id).items()]
        tags = [RunTag(_TAG_STATUS, status)]
        if last.get(WORKER_NODES):
            tags.append(RunTag("raylora.worker_nodes", str(last[WORKER_NODES])))
        if isinstance(last.get(NUM_NODES), int | float):
            tags.append(RunTag("raylora.num_nodes", str(int(last[NUM_NODES]))))
        scored = self._best.get(trial_id)
        checkpoint = self._best_checkpoint.get(trial_id)
        run_status = _RUN_STATUS[status]

        def end(run_id: str) -> None:
            extra = [RunTag("raylora.reason", redact(reason)[:5000])] if reason else []
            # The trial's best eval over all its evals: those before a --resume too (`best_index`; a tie
            # keeps the earlier one). Its full value in a tag: the sweep's best is chosen on it, unrounded.
            candidates = [self._prior_best.get(trial_id), scored]
            index = best_index([c[0] if c else None for c in candidates], self.sweep.mode)
            best = candidates[index] if index is not None else None
            metrics = list(summary)
            if best is not None:
                metrics.append(
                    Metric(self.best_metric, _rounded(self.best_metric, best[0], self.best_metric), now, 0)
                )
                extra += [RunTag(_TAG_BEST_VALUE, repr(best[0])), RunTag(_TAG_BEST_STEP, str(best[1]))]
            self.client.log_batch(run_id, metrics=metrics, tags=tags + extra)
            # Its adapter: the best eval's checkpoint, when this run of the trial reached it (one from before
            # a resume was logged then).
            if checkpoint is not None and best is not None and checkpoint[1] == best[1]:
                self._log_adapter(run_id, checkpoint[2])
            self.client.set_terminated(run_id, status=run_status)
            self._open.discard(trial_id)

        self._submit(f"end the run of trial {trial_id}", self._in_run(trial_id, end))

    def _log_adapter(self, run_id: str, checkpoint) -> None:
        """Log the adapter only (weights, adapter config, tokenizer, resolved config), never the base or optimizer.

        Read through the checkpoint's own filesystem (Ray's `Checkpoint`): on object storage Ray gives paths
        without their scheme, which no local path check would find.
        """
        with tempfile.TemporaryDirectory(prefix="raylora-adapter-") as tmp:
            staged = Path(tmp) / "adapter"
            if not _copy_adapter_files(checkpoint, staged):
                _warn(f"checkpoint {checkpoint.path} holds no adapter; none is logged to run {run_id}")
                return
            run_config = staged / ADAPTER_RUN_CONFIG
            if run_config.exists():
                run_config.write_text(json.dumps(redact(json.loads(run_config.read_text())), indent=2))
            self.client.log_artifacts(run_id, str(staged), "adapter")

    def on_experiment_end(
        self, trials: list, interrupted: str | None = None, unfinished: set[str] | None = None, **info: Any
    ) -> None:
        """End every run: FINISHED and the best adapter registered, or, interrupted, KILLED and nothing registered.

        Waits for the queued calls (up to `flush_timeout_s`; less when interrupted, so that a job's stop
        grace period is kept): a store that is down then loses them, and says so.
        """
        for trial in trials:  # runs of trials that never ended stay open: end them with the sweep
            if trial.trial_id in (unfinished or set()) or trial.status not in ("TERMINATED", "ERROR"):
                status = INTERRUPTED if interrupted else FAILED
                why = (
                    f"the sweep was interrupted ({interrupted}); `raylora run <sweep file> --resume` continues it"
                    if interrupted
                    else f"the sweep ended with the trial {trial.status}"
                )
                self._end_trial(trial, status, why)
        self._submit("end the sweep run", lambda: self._end_sweep_run(interrupted))
        left = self._writer.flush(min(self.flush_timeout_s, 20.0) if interrupted else self.flush_timeout_s)
        lost = self._writer.lost + self._writer.close()
        if lost or left:
            _warn(
                f"{len(lost)} MLflow call(s) to {self.tracking_uri} never went through ({', '.join(sorted(set(lost)))}): "
                "the sweep's runs there are incomplete; its results in storage are whole"
            )

    def _end_sweep_run(self, interrupted: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        if self.parent_run_id is None:
            return
        for trial_id in list(self._open):  # what the per-trial ends did not close
            self.client.set_terminated(
                self.trial_runs[trial_id], status="KILLED" if interrupted else "FAILED"
            )
            self._open.discard(trial_id)
        # Runs left RUNNING by an earlier driver that was killed outright (no signal to handle), whose trials
        # did not run again after the resume.
        for run in self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=10000,
        ):
            self.client.set_tag(
                run.info.run_id, "raylora.reason", "its sweep's driver was killed before it ended this run"
            )
            self.client.set_terminated(run.info.run_id, status="KILLED")
        tags: list[RunTag] = []
        metrics: list[Metric] = []
        if interrupted:
            tags += [
                RunTag(_TAG_STATUS, INTERRUPTED),
                RunTag(
                    "raylora.reason",
                    f"interrupted by {interrupted}; `raylora run <sweep file> --resume` continues this run",
                ),
            ]
        else:
            best = self._best_trial()
            tags += [RunTag(_TAG_NOTE, self._parent_description(best)), RunTag(_TAG_STATUS, FINISHED)]
            if best is not None:
                trial_id, value = best
                tags += [
                    RunTag("raylora.best_trial_id", trial_id),
                    RunTag("raylora.best_run_id", self.trial_runs.get(trial_id, "")),
                    RunTag("raylora.best_run_name", self.run_names.get(trial_id, "")),
                ]
                metrics.append(
                    Metric(self.best_metric, round(value, _BEST_DIGITS), int(time.time() * 1000), 0)
                )
                self._register_best(trial_id, value)
        if self._writer.lost:
            tags.append(RunTag("raylora.mlflow_calls_lost", str(len(self._writer.lost))))
        self.client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(self.parent_run_id, status="KILLED" if interrupted else "FINISHED")

    def _best_trial(self) -> tuple[str, float] | None:
        """The sweep's best trial: `raylora.names.best_index` over its trials' best values (full precision, from
        their runs: trials that ended before a `--resume` count too), among trials that did not fail."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10000,
        )
        scored = sorted(
            (run.data.tags[_TAG_TRIAL], float(run.data.tags[_TAG_BEST_VALUE]))
            for run in runs
            if run.data.tags.get(_TAG_STATUS) in (FINISHED, STOPPED_EARLY)
            and _TAG_BEST_VALUE in run.data.tags
            and _TAG_TRIAL in run.data.tags
        )
        index = best_index([value for _, value in scored], self.sweep.mode)
        return None if index is None else scored[index]

    def _register_best(self, trial_id: str, value: float) -> None:
        """Register the best trial's adapter, described and tagged; alias `best` on the sweep's best version.

        Only an adapter that reached MLflow is registered (a version must point at a real artifact), and a
        run is registered once however often this is replayed or the sweep resumed.
        """
        from mlflow.exceptions import MlflowException

        run_id = self.trial_runs.get(trial_id)
        if run_id is None:
            return
        if not self.client.list_artifacts(run_id, "adapter"):
            _warn(
                f"the best trial's adapter ({self.run_names.get(trial_id, trial_id)}, run {run_id}) is not in "
                f"MLflow at {self.tracking_uri}; nothing is registered"
            )
            return
        name = f"{self.sweep.name}-adapter"
        config = self._configs.get(trial_id) or self._logged_trial_config(run_id)
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
            f"{self.best_metric} {value:.4f} (its best eval).\n\n"
            f'Load it: `from raylora.tracking import load_adapter; model, tokenizer = load_adapter("models:/{name}/VERSION")` '
            "(the base loaded as the trial did, plus this adapter)."
        )
        model_description = (
            f"LoRA adapters of raylora sweep `{self.sweep.name}` on `{self.sweep.base.model.name_or_path}`: each "
            f"sweep run registers its best trial; alias `@{BEST_ALIAS}` is the version with the best "
            f"{self.best_metric}. Load it: "
            f'`from raylora.tracking import load_adapter; model, tokenizer = load_adapter("models:/{name}@{BEST_ALIAS}")`.'
        )
        with contextlib.suppress(MlflowException):  # already registered: add a version
            self.client.create_registered_model(
                name, tags={_TAG_SWEEP: self.sweep.name}, description=model_description
            )
        registered = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if registered:
            version = registered[0]
        else:
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
        if math.isnan(held) or best_index([held, value], self.sweep.mode) == 1:
            self.client.set_registered_model_alias(name, BEST_ALIAS, version.version)

    def _logged_trial_config(self, run_id: str) -> FinetuneConfig:
        """A trial's config as its run logged it (a trial that ended before a `--resume`)."""
        with tempfile.TemporaryDirectory(prefix="raylora-config-") as tmp:
            path = self.client.download_artifacts(run_id, TRIAL_CONFIG_ARTIFACT, tmp)
            return FinetuneConfig.from_dict(json.loads(Path(path).read_text())["config"])


# What MLflow's run status says for each trial outcome (the tag `raylora.status` says the outcome itself).
_RUN_STATUS = {FINISHED: "FINISHED", STOPPED_EARLY: "FINISHED", FAILED: "FAILED", INTERRUPTED: "KILLED"}


def _trial_error(trial) -> str:
    """The error that ended a trial, in one line (the original error, not Ray's wrapper)."""
    from raylora.sweep.summary import error_line

    error = None
    try:
        # The driver's copy first: the copy in storage is the previous attempt's until Ray syncs this one.
        local = trial.pickled_error_file
        if local and Path(local).is_file():
            import cloudpickle

            error = cloudpickle.loads(Path(local).read_bytes())
        error = error or trial.get_pickled_error() or trial.get_error()
    except Exception:  # an error file that cannot be read back: what was read, or say that much below
        pass
    return error_line(error) if error is not None else "the trial failed (its error could not be read)"


def _checkpoint_files(checkpoint) -> list:
    """The files of a Ray checkpoint, through its own filesystem (local, S3, GCS...)."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(checkpoint.path, allow_not_found=True)
    return [i for i in checkpoint.filesystem.get_file_info(selector) if i.type == pyarrow.fs.FileType.File]


def _copy_adapter_files(checkpoint, target: Path) -> bool:
    """Copy a checkpoint's adapter files (never the optimizer state) into `target`; False if it holds none."""
    files = [f for f in _checkpoint_files(checkpoint) if f.base_name != CHECKPOINT_STATE_FILE]
    if not any(f.base_name.startswith("adapter_model") for f in files):
        return False
    target.mkdir(parents=True, exist_ok=True)
    for info in files:
        with checkpoint.filesystem.open_input_stream(info.path) as source:
            (target / info.base_name).write_bytes(source.read())
    return True


def _written_run_files(checkpoint) -> tuple[list[str] | None, dict | None]:
    """The module paths a trial's adapter resolved to and its model plan, from its checkpoint's run config."""
    path = f"{checkpoint.path.rstrip('/')}/{ADAPTER_RUN_CONFIG}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as source:
            written = json.loads(source.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None, None
    return written.get("resolved_target_modules"), written.get(RUN_CONFIG_MODEL_PLAN)


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

    Loads the base as the trial did (its logged `raylora_config.json`: model id, dtype, QLoRA). An adapter
    trained with `training.fp8` loads on the bf16 base, for generation at full precision: it trained against
    an fp8-rounded copy of those weights, so its outputs differ slightly from the run's (a warning says so;
    `raylora.training.evaluate_adapter` evaluates it on the fp8 base, as the run's `eval_loss` was).

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
    config = _logged_run_config(Path(local))
    if config.training.fp8:
        _warn(
            f"{source!r} was trained with `training.fp8` against an fp8-rounded base; it is loaded on the bf16 "
            "base, so its outputs differ slightly from the run's (`evaluate_adapter` uses the fp8 base)"
        )
    base = load_base_model(config.model, qlora=config.adapter.qlora, device=device, adapter=config.adapter)
    model = PeftModel.from_pretrained(base, local)
    model.eval()
    return model, AutoTokenizer.from_pretrained(local)


def _logged_run_config(adapter_dir: Path) -> FinetuneConfig:
    """The run config logged beside an adapter, ready to load its base.

    Its `model.token` was masked (`***`) when it was logged: a masked token is no token, so loading falls
    back to what the hub client finds itself (HF_TOKEN, the cached login), never sends `***` to the hub.
    """
    run_config = json.loads((adapter_dir / ADAPTER_RUN_CONFIG).read_text())
    run_config.pop("resolved_target_modules", None)
    run_config.pop(RUN_CONFIG_MODEL_PLAN, None)
    config = FinetuneConfig.from_dict(run_config)
    if config.model.token == REDACTED:
        config.model.token = None
    return config


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
