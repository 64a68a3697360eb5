"""Sweep comparison: the trials table (CSV, Markdown) and plots, from MLflow runs or a sweep directory.

`write_report(source, out_dir)` reads every trial of one sweep, either from MLflow (a parent run id: its
child runs' params and metric histories) or from the Ray Tune experiment directory (each trial's
`result.json`), and writes:

- `trials.csv`, `trials.md`: one row per trial (searched config, final and best eval loss, status, steps,
  trainable parameters, peak memory)
- `loss_curves.png`: every trial's train and eval loss against step
- `eval_loss_vs_lr.png`, `eval_loss_vs_rank.png`
- `parallel_coordinates.png`: each trial a line across the searched settings, coloured by eval loss
- `pareto_trainable_params.png`, `pareto_peak_memory.png`: eval loss against cost, the Pareto front marked

When the sweep has an MLflow parent run, the files are logged to it under `report/`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora.names import EVAL_LOSS, PEAK_MEMORY_GIB, STEP, TRAIN_LOSS, TRAINABLE_PARAMS

__all__ = ["TrialRecord", "read_trials", "write_report"]

_REPORT_FILES = (
    "trials.csv",
    "trials.md",
    "loss_curves.png",
    "eval_loss_vs_lr.png",
    "eval_loss_vs_rank.png",
    "parallel_coordinates.png",
    "pareto_trainable_params.png",
    "pareto_peak_memory.png",
)


@dataclass
class TrialRecord:
    """One trial as the report sees it, whichever store it came from."""

    trial_id: str
    params: dict[str, Any]
    status: str
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    trainable_params: float | None = None
    peak_memory_gib: float | None = None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_loss[-1][1] if self.eval_loss else None

    @property
    def best_eval_loss(self) -> float | None:
        return min(v for _, v in self.eval_loss) if self.eval_loss else None

    @property
    def steps(self) -> int:
        points = self.train_loss + self.eval_loss
        return max((s for s, _ in points), default=0)


# ---- reading ------------------------------------------------------------------------------------------------


def read_trials(source: str, *, tracking_uri: str | None = None) -> tuple[list[TrialRecord], str | None]:
    """Trials of a sweep and its MLflow parent run id (None when read from a directory without MLflow).

    Args:
        source: a sweep directory (`<storage_path>/<sweep name>`) or an MLflow parent run id.
        tracking_uri: MLflow store to read; default `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.

    Raises:
        ValueError: `source` is neither an existing directory nor a run id in the store.
    """
    path = Path(source)
    if path.is_dir():
        parent = _parent_for_directory(path, tracking_uri)
        if parent is not None:
            return _read_mlflow(parent, tracking_uri), parent
        return _read_tune_directory(path), None
    return _read_mlflow(source, tracking_uri), source


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from raylora.tracking import resolve_tracking_uri

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def _parent_for_directory(path: Path, tracking_uri: str | None) -> str | None:
    from raylora.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # no store here: don't create an empty one just to look
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(path.name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`raylora.experiment_path` = '{path.resolve()}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _read_mlflow(parent_run_id: str, tracking_uri: str | None) -> list[TrialRecord]:
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as error:
        raise ValueError(
            f"{parent_run_id!r} is neither a sweep directory nor a run in the MLflow store "
            f"({client.tracking_uri}); pass `<storage_path>/<sweep name>` or the sweep's parent run id"
        ) from error
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=10000,
    )
    records = []
    for run in children:
        params = {
            k.removeprefix("searched."): _parse(v)
            for k, v in run.data.params.items()
            if k.startswith("searched.")
        }
        params.setdefault("adapter.r", _parse(run.data.params.get("rank", "nan")))
        params.setdefault("training.learning_rate", _parse(run.data.params.get("learning_rate", "nan")))

        def history(key: str, run_id: str = run.info.run_id) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

        records.append(
            TrialRecord(
                trial_id=run.data.tags.get("raylora.trial_id", run.info.run_id[:8]),
                params=params,
                status=run.info.status,
                train_loss=history(TRAIN_LOSS),
                eval_loss=history(EVAL_LOSS),
                trainable_params=run.data.metrics.get(TRAINABLE_PARAMS),
                peak_memory_gib=run.data.metrics.get(
                    f"final_{PEAK_MEMORY_GIB}", run.data.metrics.get(PEAK_MEMORY_GIB)
                ),
            )
        )
    return sorted(records, key=lambda r: r.trial_id)


def _read_tune_directory(path: Path) -> list[TrialRecord]:
    records = []
    for trial_dir in sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("trial_")):
        results = (
            [
                json.loads(line)
                for line in (trial_dir / "result.json").read_text().splitlines()
                if line.strip()
            ]
            if (trial_dir / "result.json").exists()
            else []
        )
        params = (
            json.loads((trial_dir / "params.json").read_text())
            if (trial_dir / "params.json").exists()
            else {}
        )
        train_points = [
            (int(h[STEP]), float(h[TRAIN_LOSS]))
            for r in results
            for h in r.get("train_history", [])
            if TRAIN_LOSS in h
        ]
        eval_points = [(int(r[STEP]), float(r[EVAL_LOSS])) for r in results if EVAL_LOSS in r]
        last = results[-1] if results else {}
        errored = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
        records.append(
            TrialRecord(
                trial_id=trial_dir.name.removeprefix("trial_"),
                params=params,
                status="FAILED" if errored else ("FINISHED" if results else "UNKNOWN"),
                train_loss=train_points,
                eval_loss=eval_points,
                trainable_params=last.get(TRAINABLE_PARAMS),
                peak_memory_gib=last.get(PEAK_MEMORY_GIB),
            )
        )
    if not records:
        raise ValueError(
            f"{str(path)!r} holds no trials (no trial_* directories); pass `<storage_path>/<sweep name>`"
        )
    return records


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


# ---- writing ------------------------------------------------------------------------------------------------


def write_report(source: str, out_dir: str | Path, *, tracking_uri: str | None = None) -> list[Path]:
    """Write the table and plots for the sweep at `source` into `out_dir`; log them to its parent run.

    Returns the written files.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only

    records, parent = read_trials(source, tracking_uri=tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in records for k in r.params})
    rows = [_row(r, keys) for r in records]
    rows.sort(key=lambda row: (row["best_eval_loss"] is None, row["best_eval_loss"] or 0.0))
    header = list(rows[0]) if rows else ["trial_id"]
    with (out / "trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[h]) for h in header) + " |" for row in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")

    _plot_loss_curves(records, out / "loss_curves.png")
    _plot_against(records, "training.learning_rate", "learning rate", out / "eval_loss_vs_lr.png", log_x=True)
    _plot_against(records, "adapter.r", "LoRA rank", out / "eval_loss_vs_rank.png", log_x=True)
    _plot_parallel(records, keys, out / "parallel_coordinates.png")
    _plot_pareto(records, "trainable_params", "trainable parameters", out / "pareto_trainable_params.png")
    _plot_pareto(records, "peak_memory_gib", "peak memory (GiB)", out / "pareto_peak_memory.png")
    written = [out / name for name in _REPORT_FILES]
    if parent is not None:
        _client(tracking_uri).log_artifacts(parent, str(out), "report")
    return written


def _row(record: TrialRecord, keys: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"trial_id": record.trial_id}
    row.update({k: record.params.get(k) for k in keys})
    row.update(
        {
            "final_eval_loss": record.final_eval_loss,
            "best_eval_loss": record.best_eval_loss,
            "status": record.status,
            "steps": record.steps,
            "trainable_params": record.trainable_params,
            "peak_memory_gib": record.peak_memory_gib,
        }
    )
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _label(record: TrialRecord) -> str:
    return record.trial_id


def _figure():
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, 5), dpi=100)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_loss_curves(records: list[TrialRecord], path: Path) -> None:
    fig, ax = _figure()
    for index, record in enumerate(records):
        color = f"C{index % 10}"
        if record.train_loss:
            ax.plot(
                *zip(*record.train_loss, strict=True), color=color, alpha=0.5, label=f"{_label(record)} train"
            )
        if record.eval_loss:
            ax.plot(
                *zip(*record.eval_loss, strict=True), color=color, marker="o", label=f"{_label(record)} eval"
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss curves (lines: train, markers: eval)")
    if records:
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _plot_against(records: list[TrialRecord], key: str, label: str, path: Path, *, log_x: bool) -> None:
    fig, ax = _figure()
    points = [(_numeric(r.params.get(key)), r.best_eval_loss, r) for r in records]
    points = [(x, y, r) for x, y, r in points if x is not None and y is not None]
    for x, y, r in points:
        ax.scatter(x, y, s=40)
        ax.annotate(_label(r), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x and points and all(x > 0 for x, _, _ in points):
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("best eval loss")
    ax.set_title(f"eval loss against {label}" + ("" if points else f" (no trial varied {key})"))
    _save(fig, path)


def _plot_parallel(records: list[TrialRecord], keys: list[str], path: Path) -> None:
    """Each searched setting an axis scaled to [0, 1] (categories by their index), one line per trial."""
    import matplotlib.pyplot as plt

    fig, ax = _figure()
    axes = [*keys, "best_eval_loss"]
    columns: list[list[float]] = []
    ticks: list[list[str]] = []
    for key in axes:
        values = [r.best_eval_loss if key == "best_eval_loss" else r.params.get(key) for r in records]
        numeric = [_numeric(v) for v in values]
        if all(v is not None for v in numeric) and key != "adapter.target_modules":
            low, high = min(numeric), max(numeric)
            span = (high - low) or 1.0
            columns.append([(v - low) / span for v in numeric])
            ticks.append([f"{low:.3g}", f"{high:.3g}"])
        else:
            categories = sorted({json.dumps(v, default=str) for v in values})
            columns.append(
                [categories.index(json.dumps(v, default=str)) / max(1, len(categories) - 1) for v in values]
            )
            ticks.append([categories[0], categories[-1]] if categories else ["", ""])
    losses = [r.best_eval_loss for r in records]
    finite = [v for v in losses if v is not None]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    for index in range(len(records)):
        shade = 0.5 if losses[index] is None else (losses[index] - low) / ((high - low) or 1.0)
        ax.plot(range(len(axes)), [col[index] for col in columns], color=cmap(shade), marker="o", alpha=0.8)
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels(
        [f"{a.split('.')[-1]}\n{t[0]} .. {t[1]}" for a, t in zip(axes, ticks, strict=True)], fontsize=7
    )
    ax.set_yticks([])
    ax.set_title("parallel coordinates (colour: eval loss, dark = lower)")
    _save(fig, path)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with lower-or-equal cost and lower-or-equal loss."""
    front, best = [], math.inf
    for cost, loss in sorted(points):
        if loss < best:
            front.append((cost, loss))
            best = loss
    return front


def _plot_pareto(records: list[TrialRecord], attribute: str, label: str, path: Path) -> None:
    fig, ax = _figure()
    points = [(getattr(r, attribute), r.best_eval_loss, r) for r in records]
    points = [(c, y, r) for c, y, r in points if c is not None and y is not None]
    for cost, loss, record in points:
        ax.scatter(cost, loss, s=40, color="C0")
        ax.annotate(_label(record), (cost, loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = _pareto([(c, y) for c, y, _ in points])
    if front:
        ax.plot(*zip(*front, strict=True), color="C3", drawstyle="steps-post", label="Pareto front")
        ax.legend()
    ax.set_xlabel(label)
    ax.set_ylabel("best eval loss")
    ax.set_title(f"eval loss against {label}")
    _save(fig, path)
