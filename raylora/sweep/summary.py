"""What a finished sweep reports: one `TrialSummary` per trial, the best one, a table, a JSON file.

Built from Ray Tune's `ResultGrid` once, on the driver, so that the CLI, the MLflow tracker and
`raylora report` read plain dataclasses (and `summary.json`) rather than Tune's result objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora.names import PACK_ENGINE, STEP
from raylora.sweep.spec import Sweep

__all__ = ["SweepResult", "TrialSummary", "summarise", "write_summary"]


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
    engine: str | None = None  # the packing process that trained it (`raylora.sweep.packing`), if packed


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
        packed = any(t.engine for t in self.trials)
        headers = ["trial", *[k.split(".")[-1] for k in keys], self.sweep.metric, "status", "steps"]
        headers += ["engine"] * packed + ["error"]
        # Engines by their order of first appearance: "engine 0" is shorter than a Ray actor name.
        engines = {e: i for i, e in enumerate(dict.fromkeys(t.engine for t in self.trials if t.engine))}
        sign = 1 if self.sweep.mode == "min" else -1
        rows = []
        for t in sorted(self.trials, key=lambda t: (t.metric is None, sign * (t.metric or 0.0))):
            cells = [t.trial_id, *[_short(t.config.get(k)) for k in keys]]
            cells += [
                "-" if t.metric is None else f"{t.metric:.4f}",
                t.status,
                "-" if t.step is None else str(t.step),
            ]
            if packed:
                cells.append("-" if t.engine is None else str(engines[t.engine]))
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


def summarise(sweep: Sweep, grid, experiment_path: str) -> SweepResult:
    """One `TrialSummary` per result in Ray Tune's `ResultGrid`, and the best by the sweep's metric."""
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
                engine=metrics.get(PACK_ENGINE),
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
