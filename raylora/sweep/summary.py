"""What a finished sweep reports: one `TrialSummary` per trial, the best one, a table, a JSON file.

Built from Ray Tune's `ResultGrid` once, on the driver, so that the CLI, the MLflow tracker and
`raylora report` read plain dataclasses (and `summary.json`) rather than Tune's result objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora.names import (
    BEST_PREFIX,
    FAILED,
    FINISHED,
    INTERRUPTED,
    PACK_ENGINE,
    PENDING,
    STEP,
    STOPPED_EARLY,
    best_index,
)
from raylora.sweep.spec import Sweep

__all__ = [
    "SweepResult",
    "TrialSummary",
    "checkpoint_uri",
    "error_line",
    "root_cause",
    "summarise",
    "write_summary",
]


@dataclass
class TrialSummary:
    """One row of the trials table.

    `metric` is the trial's best value of the sweep's metric over its evals (`raylora.names.best_index`),
    reached at `best_step`; `checkpoint` is that eval's checkpoint (a URI on object storage); `step` is the
    last step the trial reached; `status` one of `raylora.names`' trial outcomes.
    """

    trial_id: str
    config: dict[str, Any]
    status: str
    metric: float | None
    step: int | None
    checkpoint: str | None
    error: str | None
    engine: str | None = None  # the packing process that trained it (`raylora.sweep.packing`), if packed
    best_step: int | None = None


@dataclass
class SweepResult:
    """What a sweep reports: every trial, the best one, where results live, and whether it was interrupted.

    An interrupted sweep (`interrupted` names the signal) has no `best`: its trials did not all run, and
    `raylora run ... --resume` continues it.
    """

    sweep: Sweep
    trials: list[TrialSummary]
    best: TrialSummary | None
    experiment_path: str
    interrupted: str | None = None

    @property
    def all_failed(self) -> bool:
        return bool(self.trials) and all(t.status == FAILED for t in self.trials)

    def table(self) -> str:
        """A plain-text table of trials, best first."""
        keys = sorted({k for t in self.trials for k in t.config})
        packed = any(t.engine for t in self.trials)
        headers = ["trial", *[k.split(".")[-1] for k in keys], f"{BEST_PREFIX}{self.sweep.metric}"]
        headers += ["at step", "status", "steps"] + ["engine"] * packed + ["error"]
        # Engines by their order of first appearance: "engine 0" is shorter than a Ray actor name.
        engines = {e: i for i, e in enumerate(dict.fromkeys(t.engine for t in self.trials if t.engine))}
        sign = 1 if self.sweep.mode == "min" else -1
        rows = []
        for t in sorted(self.trials, key=lambda t: (t.metric is None, sign * (t.metric or 0.0))):
            cells = [t.trial_id, *[_short(t.config.get(k)) for k in keys]]
            cells += [
                "-" if t.metric is None else f"{t.metric:.4f}",
                "-" if t.best_step is None else str(t.best_step),
                t.status,
                "-" if t.step is None else str(t.step),
            ]
            if packed:
                cells.append("-" if t.engine is None else str(engines[t.engine]))
            cells.append(t.error or "")
            rows.append(cells)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        widths[-1] = len(headers[-1])  # the error goes last, in full: no padding after it
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def summarise(
    sweep: Sweep,
    grid,
    experiment_path: str,
    *,
    interrupted: str | None = None,
    unfinished: set[str] = frozenset(),
) -> SweepResult:
    """One `TrialSummary` per result in Ray Tune's `ResultGrid`, and the best trial (`best_index`).

    Args:
        interrupted: the signal that interrupted the sweep, if one did.
        unfinished: ids of the trials that were running (or waiting to be retried) when it was interrupted.
    """
    trials = [_trial_summary(sweep, result, unfinished) for result in grid]
    best = None
    if interrupted is None:
        scored = [t for t in trials if t.metric is not None and t.status != FAILED]
        index = best_index([t.metric for t in scored], sweep.mode)
        best = None if index is None else scored[index]
    return SweepResult(
        sweep=sweep, trials=trials, best=best, experiment_path=experiment_path, interrupted=interrupted
    )


def _trial_summary(sweep: Sweep, result, unfinished: set[str]) -> TrialSummary:
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
    evals = _evals(result, sweep.metric)
    index = best_index([value for _, value, _ in evals], sweep.mode)
    best_step, metric, reported_path = evals[index] if index is not None else (None, None, None)
    step = int(metrics[STEP]) if STEP in metrics else None
    if result.error:
        status = FAILED
    elif trial_id in unfinished:
        status = INTERRUPTED
    elif not metrics:
        status = PENDING
    else:
        status = FINISHED if (step or 0) >= sweep.base.training.max_steps else STOPPED_EARLY
    return TrialSummary(
        trial_id=trial_id,
        config=dict(result.config or {}),
        status=status,
        metric=metric,
        step=step,
        checkpoint=_checkpoint_uri(result, sweep, best_step, reported_path),
        error=error_line(result.error) if result.error else None,
        engine=metrics.get(PACK_ENGINE),
        best_step=best_step,
    )


def _evals(result, metric: str) -> list[tuple[int, float, str | None]]:
    """(step, value of the metric, checkpoint path an N-worker trial reported) of every eval, in order."""
    frame = result.metrics_dataframe
    rows: list[tuple[int, float, str | None]] = []
    if frame is not None and metric in frame and STEP in frame:
        paths = frame[_CHECKPOINT_PATH] if _CHECKPOINT_PATH in frame else [None] * len(frame)
        for step, value, path in zip(frame[STEP], frame[metric], paths, strict=True):
            step, value = _finite(step), _finite(value)
            if step is not None and value is not None:
                rows.append((int(step), value, path if isinstance(path, str) and path else None))
    elif isinstance((result.metrics or {}).get(metric), int | float):  # no history on disk: the last report
        last = result.metrics
        rows.append((int(last.get(STEP, 0)), float(last[metric]), last.get(_CHECKPOINT_PATH)))
    return rows


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# N-worker trials: Ray Train's TuneReportCallback reports each checkpoint's path (in the TorchTrainer's own
# storage, the sweep's storage path) as this metric rather than as a Tune checkpoint.
_CHECKPOINT_PATH = "checkpoint_path"


def _checkpoint_uri(result, sweep: Sweep, best_step: int | None, reported_path: str | None) -> str | None:
    """Where the best eval's checkpoint is: a local path, or a URI (`s3://...`) on object storage."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if sweep.metric in m]
    chosen = next((c for c, m in candidates if best_step is not None and m.get(STEP) == best_step), None)
    if chosen is None and candidates:
        index = best_index([m[sweep.metric] for _, m in candidates], sweep.mode)
        chosen = candidates[index][0] if index is not None else None
    if chosen is not None:
        return checkpoint_uri(chosen.path, chosen.filesystem)
    if reported_path:
        return checkpoint_uri(reported_path, storage=sweep.storage_path)
    return None


def checkpoint_uri(path: str, filesystem=None, *, storage: str | None = None) -> str:
    """A checkpoint's path as a user can open it: Ray reports object-storage paths without their scheme
    (`bucket/x`); `filesystem` (pyarrow) or the sweep's `storage` URI says which scheme it had."""
    scheme = None
    if filesystem is not None:
        scheme = {"s3": "s3", "gcs": "gs", "abfs": "abfs", "hdfs": "hdfs"}.get(filesystem.type_name)
    elif storage and "://" in storage:
        scheme = storage.split("://", 1)[0]
    if scheme and "://" not in path:
        return f"{scheme}://{path}"
    return path


def _trial_id_from_path(path: str | None) -> str:
    return Path(path).name.removeprefix("trial_") if path else "?"


def error_line(error: BaseException | str) -> str:
    """What went wrong, in one line: the original error's type and the first line of its message.

    Ray wraps a trial's exception (RayTaskError, TuneError, a TorchTrainer's WorkerGroupError); the cause
    is what the user can act on. A `ConfigError` with many problems shows its first and how many more.
    """
    if isinstance(error, str):
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        return lines[-1] if lines else "error"
    cause = root_cause(error)
    problems = getattr(cause, "problems", None)
    if isinstance(problems, list) and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{type(cause).__name__}: {problems[0]}{more}"
    text = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    if _NAMED_ERROR.match(text):  # already says which error (a failure recorded by an earlier attempt)
        return text
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


_NAMED_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)(: |$)")


def root_cause(error: BaseException) -> BaseException:
    """The exception underneath Ray's wrappers: a task error's cause, a worker group's first worker failure."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            error = failures[min(failures)]
            continue
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            error = cause
            continue
        if error.__cause__ is not None and type(error).__module__.startswith("ray."):
            error = error.__cause__
            continue
        break
    return error


def write_summary(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Write the trials and the best trial as JSON (what `raylora report` reads)."""
    payload = {
        "sweep": result.sweep.name,
        "metric": result.sweep.metric,
        "mode": result.sweep.mode,
        "experiment_path": result.experiment_path,
        "interrupted": result.interrupted,
        "best": dataclasses.asdict(result.best) if result.best else None,
        "trials": [dataclasses.asdict(t) for t in result.trials],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
