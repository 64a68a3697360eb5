"""Sweep comparison: the trials table (CSV, Markdown) and plots, from MLflow runs or a sweep directory.

`write_report(source, out_dir)` reads every trial of one sweep, either from MLflow (a parent run id: its
child runs' params and metric histories) or from the Ray Tune experiment directory (each trial's
`result.json`), and writes:

- `trials.csv`, `trials.md`: one row per trial (run name, searched settings, best and last eval loss, status,
  steps, trainable parameters, peak memory, throughput, wall time), under the names MLflow shows
- `loss_curves.png`: every trial's train and eval loss against step
- `eval_loss_vs_lr.png`, `eval_loss_vs_rank.png`
- `parallel_coordinates.png`: each trial a line across the settings that vary, coloured by eval loss
- `pareto_trainable_params.png`, `pareto_peak_memory.png`: eval loss against cost, the Pareto front marked

Trials are labelled by their run names (`r16-a32-lr2.2e-4-all-linear`), not their ids. A failed trial is
drawn apart (grey, marked "failed") and never scored as the worst loss; the table lists it last.
When the sweep has an MLflow parent run, the files are logged to it under `report/`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora.names import (
    ALPHA_RATIO_PARAM,
    BEST_PREFIX,
    EVAL_LOSS,
    FAILED,
    FINISHED,
    PEAK_MEMORY_GIB,
    STEP,
    TOKENS_PER_SEC,
    TOKENS_SEEN,
    TRAIN_LOSS,
    TRAIN_TIME_S,
    TRAINABLE_PARAMS,
    WALL_TIME_S,
    best_index,
    param_name,
    trial_run_name,
)

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
_FAILED = FAILED
_FAILED_STYLE = {"color": "0.55", "linestyle": "--"}


@dataclass
class TrialRecord:
    """One trial as the report sees it, whichever store it came from.

    `params` maps MLflow param names (`rank`, `lr`, `target_modules`, ...) to the trial's searched values.
    `best` is the trial's best value of the sweep's `metric` over its evals, by the one definition of best
    (`raylora.names.best_index`): what the trials table, MLflow's `best_<metric>` and the registry use.
    """

    trial_id: str
    params: dict[str, Any]
    status: str
    name: str = ""
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    trainable_params: float | None = None
    peak_memory_gib: float | None = None
    tokens_per_sec: float | None = None
    wall_time_s: float | None = None
    metric: str = EVAL_LOSS  # the sweep's metric and mode
    mode: str = "min"
    metric_points: list[tuple[int, float]] | None = None  # its history, when it is not `eval_loss`

    @property
    def failed(self) -> bool:
        return self.status in (_FAILED, "ERROR")

    @property
    def label(self) -> str:
        return self.name or self.trial_id

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_loss[-1][1] if self.eval_loss else None

    @property
    def best(self) -> float | None:
        points = self.eval_loss if self.metric_points is None else self.metric_points
        index = best_index([v for _, v in points], self.mode)
        return None if index is None else points[index][1]

    @property
    def best_name(self) -> str:
        return f"{BEST_PREFIX}{self.metric}"

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


def _store_missing(tracking_uri: str | None) -> str | None:
    """The local store file that `tracking_uri` names but that does not exist (never create one to look)."""
    from raylora.tracking import local_store_path, resolve_tracking_uri

    store = local_store_path(resolve_tracking_uri(tracking_uri))
    return str(store) if store is not None and not store.exists() else None


def _parent_for_directory(path: Path, tracking_uri: str | None) -> str | None:
    if _store_missing(tracking_uri):
        return None
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(path.name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`raylora.experiment_path` = '{path.resolve()}'",
        order_by=["attributes.start_time DESC"],  # the newest sweep run of that directory
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _read_mlflow(parent_run_id: str, tracking_uri: str | None) -> list[TrialRecord]:
    from mlflow.exceptions import MlflowException

    missing = _store_missing(tracking_uri)
    if missing:
        raise ValueError(
            f"{parent_run_id!r} is not a sweep directory, and there is no MLflow store at {missing} to look "
            "it up in; pass `--tracking-uri` (the store `raylora run` printed) or `<storage_path>/<sweep name>`"
        )
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
    metric = parent.data.params.get("sweep.metric", EVAL_LOSS)
    mode = parent.data.params.get("sweep.mode", "min")
    records = []
    for run in children:
        searched = [p for p in run.data.tags.get("raylora.searched", "").split(",") if p]
        params = {k: _parse(run.data.params[k]) for k in searched if k in run.data.params}
        metrics = run.data.metrics

        def history(key: str, run_id: str = run.info.run_id) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

        records.append(
            TrialRecord(
                trial_id=run.data.tags.get("raylora.trial_id", run.info.run_id[:8]),
                params=params,
                # The outcome in the trials table's words (STOPPED (ASHA), INTERRUPTED...); MLflow's status
                # for runs logged before raylora tagged it.
                status=run.data.tags.get("raylora.status") or run.info.status,
                name=run.info.run_name or "",
                train_loss=history(TRAIN_LOSS),
                eval_loss=history(EVAL_LOSS),
                trainable_params=metrics.get(TRAINABLE_PARAMS),
                peak_memory_gib=metrics.get(PEAK_MEMORY_GIB),
                tokens_per_sec=metrics.get(TOKENS_PER_SEC),
                wall_time_s=metrics.get(WALL_TIME_S),
                metric=metric,
                mode=mode,
                metric_points=None if metric == EVAL_LOSS else history(metric),
            )
        )
    return sorted(records, key=lambda r: r.trial_id)


def _read_tune_directory(path: Path) -> list[TrialRecord]:
    summary = path / "sweep_summary.json"  # `raylora run` writes it: the sweep's metric and mode
    written = json.loads(summary.read_text()) if summary.exists() else {}
    metric, mode = written.get("metric", EVAL_LOSS), written.get("mode", "min")
    statuses = {t["trial_id"]: t["status"] for t in written.get("trials", []) if "trial_id" in t}
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
        sampled = (
            json.loads((trial_dir / "params.json").read_text())
            if (trial_dir / "params.json").exists()
            else {}
        )
        params = _named_params(sampled)
        train_points = [
            (int(h[STEP]), float(h[TRAIN_LOSS]))
            for r in results
            for h in r.get("train_history", [])
            if TRAIN_LOSS in h
        ]
        eval_points = [(int(r[STEP]), float(r[EVAL_LOSS])) for r in results if EVAL_LOSS in r]
        last = results[-1] if results else {}
        errored = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
        train_time, tokens = last.get(TRAIN_TIME_S), last.get(TOKENS_SEEN)
        trial_id = trial_dir.name.removeprefix("trial_")
        records.append(
            TrialRecord(
                trial_id=trial_id,
                params=params,
                status=_FAILED if errored else statuses.get(trial_id, FINISHED if results else "UNKNOWN"),
                name=trial_run_name({k: v for k, v in params.items() if k != ALPHA_RATIO_PARAM}),
                train_loss=train_points,
                eval_loss=eval_points,
                trainable_params=last.get(TRAINABLE_PARAMS),
                peak_memory_gib=last.get(PEAK_MEMORY_GIB),
                tokens_per_sec=tokens / train_time if tokens and train_time else last.get(TOKENS_PER_SEC),
                wall_time_s=last.get(WALL_TIME_S),
                metric=metric,
                mode=mode,
                metric_points=None
                if metric == EVAL_LOSS
                else [(int(r[STEP]), float(r[metric])) for r in results if metric in r],
            )
        )
    if not records:
        raise ValueError(
            f"{str(path)!r} holds no trials (no trial_* directories); pass `<storage_path>/<sweep name>`"
        )
    return records


def _named_params(sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values (dotted fields) under MLflow's param names; alpha from a ratio when known."""
    params = {param_name(k): v for k, v in sampled.items()}
    ratio, rank = params.get(ALPHA_RATIO_PARAM), params.get("rank")
    if "alpha" not in params and isinstance(ratio, int | float) and isinstance(rank, int | float):
        params["alpha"] = float(ratio) * rank
    return params


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
    keys = _setting_keys(records)
    ranked = sorted(records, key=_rank_key)
    rows = [_row(r, keys) for r in ranked]
    header = list(rows[0]) if rows else ["run_name"]
    with (out / "trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[h]) for h in header) + " |" for row in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")

    _plot_loss_curves(ranked, out / "loss_curves.png")
    _plot_against(records, "lr", "learning rate (lr)", out / "eval_loss_vs_lr.png", log_x=True)
    _plot_against(records, "rank", "LoRA rank", out / "eval_loss_vs_rank.png", categorical=True)
    _plot_parallel(records, keys, out / "parallel_coordinates.png")
    _plot_pareto(records, "trainable_params", "trainable parameters", out / "pareto_trainable_params.png")
    _plot_pareto(records, "peak_memory_gib", "peak memory (GiB)", out / "pareto_peak_memory.png")
    written = [out / name for name in _REPORT_FILES]
    if parent is not None:
        _client(tracking_uri).log_artifacts(parent, str(out), "report")
    return written


def _setting_keys(records: list[TrialRecord]) -> list[str]:
    """The settings the table shows: rank, alpha, lr, target modules first, then other searched ones."""
    present = {k for r in records for k in r.params if k != ALPHA_RATIO_PARAM}
    first = [k for k in ("rank", "alpha", "lr", "target_modules") if k in present]
    return first + sorted(present - set(first))


def _rank_key(record: TrialRecord) -> tuple[bool, bool, float]:
    """Best first; trials without an eval, then failed trials, last."""
    best = record.best
    sign = 1 if record.mode == "min" else -1
    return (record.failed, best is None, sign * best if best is not None else 0.0)


def _best_label(records: list[TrialRecord]) -> str:
    return records[0].best_name if records else f"{BEST_PREFIX}{EVAL_LOSS}"


def _row(record: TrialRecord, keys: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"run_name": record.label, "trial_id": record.trial_id}
    row.update({k: record.params.get(k) for k in keys})
    row.update(
        {
            record.best_name: record.best,
            EVAL_LOSS: record.final_eval_loss,
            "status": record.status,
            "steps": record.steps,
            TRAINABLE_PARAMS: record.trainable_params,
            PEAK_MEMORY_GIB: record.peak_memory_gib,
            TOKENS_PER_SEC: record.tokens_per_sec,
            WALL_TIME_S: record.wall_time_s,
        }
    )
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # parameter counts, steps: every digit
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _figure(width: float = 8):
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, 5), dpi=100)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_loss_curves(records: list[TrialRecord], path: Path) -> None:
    fig, ax = _figure(10)
    for index, record in enumerate(records):
        style = _FAILED_STYLE if record.failed else {"color": f"C{index % 10}"}
        label = record.label + (" (failed)" if record.failed else "")
        if record.train_loss:
            ax.plot(*zip(*record.train_loss, strict=True), alpha=0.4, **style)
        if record.eval_loss:
            ax.plot(*zip(*record.eval_loss, strict=True), marker="o", label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss curves (faint: train, markers: eval)")
    if records:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="run name")
    _save(fig, path)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _scatter(ax, x: float, y: float, record: TrialRecord, color: str = "C0") -> None:
    if record.failed:
        ax.scatter(x, y, s=60, marker="x", color=_FAILED_STYLE["color"])
        text = f"{record.label} (failed)"
    else:
        ax.scatter(x, y, s=40, color=color)
        text = record.label
    ax.annotate(text, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")


def _plot_against(
    records: list[TrialRecord],
    key: str,
    label: str,
    path: Path,
    *,
    log_x: bool = False,
    categorical: bool = False,
) -> None:
    """Best eval loss against one setting; a categorical axis has one tick per value tried."""
    fig, ax = _figure()
    points = [(_numeric(r.params.get(key)), r.best, r) for r in records]
    points = [(x, y, r) for x, y, r in points if x is not None and y is not None]
    values = sorted({x for x, _, _ in points})
    for x, y, r in points:
        _scatter(ax, values.index(x) if categorical else x, y, r)
    if categorical:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.set_xlim(-0.5, len(values) - 0.5)
    elif log_x and points and all(x > 0 for x, _, _ in points):
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(_best_label(records))
    ax.set_title(f"{_best_label(records)} against {label}" + ("" if points else f" (no trial has `{key}`)"))
    _save(fig, path)


def _plot_parallel(records: list[TrialRecord], keys: list[str], path: Path) -> None:
    """One axis per setting that varies, plus the best eval loss; ticks at every value, colour = eval loss.

    Numeric axes are scaled to [0, 1] between their extremes (a log scale for a learning rate that spans a
    decade); categories sit at equal steps. A failed trial is a grey dashed line ending at "failed".
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    varying = [k for k in keys if len({json.dumps(r.params.get(k), default=str) for r in records}) > 1]
    fig, ax = _figure(10)
    axes = [*varying, _best_label(records)]
    positions: list[list[float | None]] = []
    for index, key in enumerate(axes):
        values = [r.best if key == _best_label(records) else r.params.get(key) for r in records]
        scaled, ticks = _axis(values, log=key == "lr")
        positions.append(scaled)
        for y, text in ticks:  # left of the axis, clear of the lines' markers
            ax.text(index - 0.04, y, text, fontsize=7, va="center", ha="right", color="0.25")
        ax.axvline(index, color="0.8", linewidth=1)
    losses = [r.best if not r.failed else None for r in records]
    finite = [v for v in losses if v is not None]
    norm = Normalize(min(finite), max(finite)) if finite else Normalize(0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    for i, record in enumerate(records):
        ys = [col[i] for col in positions]
        if record.failed or losses[i] is None:
            ys[-1] = 1.08  # apart from every scored trial, above the loss axis
            ax.plot(range(len(axes)), ys, marker="x", **_FAILED_STYLE)
        else:
            ax.plot(range(len(axes)), ys, color=cmap(norm(losses[i])), marker="o", linewidth=2)
        ax.annotate(
            record.label, (len(axes) - 1, ys[-1]), fontsize=7, xytext=(40, 0), textcoords="offset points"
        )
    if any(r.failed or r.best is None for r in records):
        ax.text(len(axes) - 1, 1.08, " failed", fontsize=7, va="center", color="0.4")
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels(axes)
    ax.set_yticks([])
    ax.set_xlim(-0.45, len(axes) - 0.2)
    ax.set_ylim(-0.08, 1.15)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=_best_label(records), pad=0.12)
    ax.set_title("parallel coordinates: the settings that vary, coloured by best eval loss (failed: grey)")
    _save(fig, path)


def _axis(values: list[Any], *, log: bool) -> tuple[list[float | None], list[tuple[float, str]]]:
    """Positions in [0, 1] and (position, label) ticks, one per distinct value, for one parallel axis."""
    numeric = [_numeric(v) for v in values]
    known = [v for v in numeric if v is not None]
    if (
        known
        and len(known) == sum(v is not None for v in values)
        and not any(isinstance(v, str) for v in values)
    ):
        use_log = log and min(known) > 0
        scale = (lambda v: math.log10(v)) if use_log else (lambda v: v)
        low, high = scale(min(known)), scale(max(known))
        span = (high - low) or 1.0
        scaled = [None if v is None else (scale(v) - low) / span for v in numeric]
        return scaled, [((scale(v) - low) / span, f"{v:.3g}") for v in sorted(set(known))]
    labels = [json.dumps(v, default=str).strip('"') if v is not None else "-" for v in values]
    categories = sorted(set(labels))
    step = 1 / max(1, len(categories) - 1)
    return [categories.index(t) * step for t in labels], [(i * step, t) for i, t in enumerate(categories)]


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
    points = [(getattr(r, attribute), r.best, r) for r in records]
    points = [(c, y, r) for c, y, r in points if c is not None and y is not None]
    for cost, loss, record in points:
        _scatter(ax, cost, loss, record)
    front = _pareto([(c, y) for c, y, r in points if not r.failed])
    if front:
        ax.plot(*zip(*front, strict=True), color="C3", drawstyle="steps-post", label="Pareto front")
        ax.legend()
    ax.set_xlabel(f"{label} ({attribute})")
    ax.set_ylabel(_best_label(records))
    ax.set_title(f"{_best_label(records)} against {label}")
    _save(fig, path)
