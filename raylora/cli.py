"""`raylora` command line: thin parsing in front of the train, sweep, jobs and report modules."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raylora.config import ConfigError, FinetuneConfig, demo_config
from raylora.jobs import JobError
from raylora.names import INTERRUPTED, METRICS_FILE, PENDING

__all__ = ["main"]


def _parse_value(text: str) -> Any:
    """`--set` values are JSON when they parse as JSON (numbers, booleans, lists), else plain strings, which
    `FinetuneConfig.from_dict` then parses for the field's type (False, no, 0 -> false; None -> None)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_config(path: str | None, overrides: list[str]) -> FinetuneConfig:
    if path is None:
        config = demo_config()
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"`--config` {path!r} does not exist; pass a JSON file written by `raylora train --dump`"
            )
        try:
            config = FinetuneConfig.from_dict(json.loads(file.read_text()))
        except json.JSONDecodeError as error:
            raise ConfigError(f"`--config` {path!r} is not valid JSON: {error}") from None
    pairs: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"`--set {item}` must look like section.field=value, e.g. --set adapter.r=8")
        pairs[key.strip()] = _parse_value(value)
    return config.with_overrides(pairs) if pairs else config


def _cmd_train(args: argparse.Namespace) -> int:
    from raylora.training import latest_checkpoint, train, validate_with_model

    config = _load_config(args.config, args.set)
    if args.output_dir:
        config.training.output_dir = args.output_dir
    config.validate()  # field problems before the banner; model-dependent ones come from train()
    if args.dump:
        print(json.dumps(config.to_dict(secrets=args.include_secrets), indent=2))
        if config.model.token and not args.include_secrets:
            print("raylora: `model.token` left out (null); --include-secrets prints it", file=sys.stderr)
        return 0
    resume_from = None
    if args.resume:
        resume_from = (
            latest_checkpoint(config.training.output_dir) if args.resume == "latest" else args.resume
        )
        if resume_from is None:
            print(
                f"no checkpoint under {config.training.output_dir}/checkpoints; starting from step 0",
                file=sys.stderr,
            )
    print(
        f"raylora train: model {config.model.name_or_path}, data {config.data.path}, "
        f"{'QLoRA' if config.adapter.qlora else 'LoRA'} r={config.adapter.r} on {config.adapter.target_modules}, "
        f"{config.training.max_steps} steps -> {config.training.output_dir}",
        flush=True,
    )
    plan = validate_with_model(config)  # from config.json: attention kernel, experts, unquantised weights
    for note in plan.notes() if plan is not None else []:
        print(f"  {note}", flush=True)
    result = train(config, resume_from=resume_from)
    params = result.parameters
    if result.start_step >= result.step:
        print(
            f"already finished: {resume_from} is at step {result.step} = `training.max_steps`, so there was "
            f"nothing to train; eval_loss {result.eval_loss:.4f}\nadapter: {result.adapter_dir}\n"
            f"to train further, resume with a larger max_steps, e.g. --resume --set "
            f"training.max_steps={2 * result.step}"
        )
        return 0
    first = _first_train_loss(Path(config.training.output_dir) / METRICS_FILE)
    print(
        f"done: step {result.step}, eval_loss {result.eval_loss:.4f}"
        + (
            f", train loss {first:.3f} -> {result.metrics.get('train_loss', float('nan')):.3f}"
            if first
            else ""
        )
        + f"; trainable params {params.trainable:,} of {params.total:,} ({params.trainable_percent:.2f}%)\n"
        f"adapter: {result.adapter_dir}"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from raylora.sweep import load_sweep, run_sweep, write_summary

    sweep = load_sweep(args.sweep_file)
    if args.storage_path:
        sweep.storage_path = args.storage_path
    if args.num_samples is not None:  # 0 included: validate() refuses it rather than running the default
        sweep.num_samples = args.num_samples
    sweep.validate()
    print(
        f"raylora run: sweep {sweep.name!r}: {sweep.num_samples} trial(s), search {sweep.search_alg}, "
        f"scheduler {sweep.scheduler}, metric {sweep.metric} ({sweep.mode}), "
        f"{sweep.resources.workers} worker(s) per trial" + (" (resuming)" if args.resume else ""),
        flush=True,
    )
    from raylora.tracking import ray_job_id

    callbacks = []
    tracking_uri = None
    if not args.no_mlflow:
        from raylora.sweep import experiment_path
        from raylora.tracking import MlflowTracker, job_store_warning, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.tracking_uri)
        warning = job_store_warning(tracking_uri)
        if warning:
            _shout(warning)
        callbacks.append(
            MlflowTracker(sweep, tracking_uri=tracking_uri, experiment_path=experiment_path(sweep))
        )
    result = run_sweep(
        sweep, address=args.address, resume=args.resume, callbacks=callbacks, verbose=args.verbose
    )
    summary = Path(result.experiment_path) / "sweep_summary.json"
    if "://" not in result.experiment_path:
        write_summary(result, summary)
    print("\ntrials:\n" + result.table())
    if result.interrupted is None and result.best is not None:
        best = result.best
        print(
            f"\nbest trial {best.trial_id}: {sweep.metric} {best.metric:.4f} at step {best.best_step} "
            f"(its best eval, of {best.step} steps)\n"
            f"  config: {json.dumps(best.config, default=str)}\n"
            f"  adapter: {best.checkpoint}"
        )
    print(f"results: {result.experiment_path}")
    if tracking_uri is not None:
        _print_mlflow_follow_up(callbacks[0], tracking_uri)
    if result.interrupted is not None:
        unfinished = sum(t.status in (INTERRUPTED, PENDING) for t in result.trials)
        print(
            f"raylora: the sweep was interrupted ({result.interrupted}) with {unfinished} trial(s) unfinished; "
            f"nothing was registered. Continue it with:\n  {_resume_command(args)}",
            file=sys.stderr,
        )
        if ray_job_id() is not None:  # a Ray job's driver: from the laptop, the same submission resumes it
            print(
                f"  (from where you submitted it: raylora submit {args.sweep_file} ... --resume, with the same "
                "--storage-path and --tracking-uri)",
                file=sys.stderr,
            )
        # The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C).
        return 128 + signal.Signals[result.interrupted].value
    if result.all_failed:
        print("raylora: every trial failed; see the errors above", file=sys.stderr)
        return 1
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The `raylora run` command line that continues this sweep, with the options that locate it."""
    parts = ["raylora", "run", args.sweep_file]
    for flag, value in (
        ("--storage-path", args.storage_path),
        ("--address", args.address),
        ("--tracking-uri", args.tracking_uri),
    ):
        if value:
            parts += [flag, value]
    if args.no_mlflow:
        parts.append("--no-mlflow")
    return shlex.join([*parts, "--resume"])


def _print_mlflow_follow_up(tracker, tracking_uri: str) -> None:
    """Where the sweep's runs are and the commands that open them, naming the store really used."""
    from raylora.tracking import job_store_warning, local_store_path

    if tracker.parent_run_id is None:
        _shout(f"MLflow at {tracking_uri} never answered: this sweep has no run there")
        return
    print(
        f"MLflow: experiment {tracker.sweep.name!r}, sweep run {tracker.parent_run_name} "
        f"(parent run {tracker.parent_run_id}) in {tracking_uri}"
    )
    warning = job_store_warning(tracking_uri)
    if local_store_path(tracking_uri) is not None:
        if warning:
            print("  (a file on the head node: copy it off before the job's directory goes, or use a server)")
        print(f"  browse it: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    print(f"  trials:  {tracker.trials_url()}")
    print(f"  compare: {tracker.compare_url()}")
    print(f"  report:  raylora report {tracker.parent_run_id} --tracking-uri {tracking_uri}")
    if warning:
        _shout(warning)


def _shout(message: str) -> None:
    """A warning that must not scroll by unseen (lost tracking on a cluster)."""
    bar = "!" * 100
    print(f"{bar}\nraylora: WARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def _cmd_submit(args: argparse.Namespace) -> int:
    from raylora.jobs import follow_job, submit_sweep

    job = submit_sweep(
        args.sweep_file,
        address=args.address,
        working_dir=args.working_dir,
        excludes=args.exclude,
        env=args.env,
        pip=args.pip,
        requirements=args.requirements,
        storage_path=args.storage_path,
        tracking_uri=args.tracking_uri,
        num_samples=args.num_samples,
        resume=args.resume,
        mlflow=not args.no_mlflow,
        job_id=args.job_id,
        progress=lambda line: print(f"raylora submit: {line}", flush=True),
    )
    size = f", {job.package_bytes / 2**20:.1f} MiB packed" if job.package_bytes is not None else ""
    env = ", ".join(f"{k}={v}" for k, v in sorted(job.env.items())) or "(none)"
    where = f"--address {job.address}"
    print(
        f"job submitted: {job.job_id}\n"
        f"  working dir: {job.working_dir}{size}\n"
        f"  entrypoint:  {job.entrypoint}\n"
        f"  env:         {env}\n"
        f"  dashboard:   {job.dashboard_url}\n"
        f"  status:      raylora jobs status {job.job_id} {where}\n"
        f"  logs:        raylora jobs logs {job.job_id} {where} --follow\n"
        f"  stop:        raylora jobs stop {job.job_id} {where}",
        flush=True,
    )
    if not args.follow:
        return 0
    return _follow(job.job_id, job.address, follow_job)


def _follow(job_id: str, address: str, follow_job) -> int:
    try:
        status = follow_job(job_id, address=address)
    except KeyboardInterrupt:
        print(
            f"\nraylora: stopped following; job {job_id} goes on (raylora jobs stop {job_id} --address {address})",
            file=sys.stderr,
        )
        return 130
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_jobs(args: argparse.Namespace) -> int:
    from raylora import jobs

    if args.action == "list":
        rows = jobs.list_jobs(address=args.address, all_jobs=args.all)
        if not rows:
            print("no raylora jobs on this cluster" + ("" if args.all else " (--all lists every job)"))
        for row in rows:
            print(
                f"{row['job_id']}  {row['status']:<9}  {row['sweep']:<20}  {row['start_time']}  {row['end_time']}"
            )
        return 0
    if not args.job_id:
        raise ConfigError(f"`raylora jobs {args.action}` needs a JOB_ID; `raylora jobs list` shows them")
    if args.action == "status":
        info = jobs.job_status(args.job_id, address=args.address)
        for key, value in info.items():
            print(f"{key + ':':<12} {', '.join(value) if isinstance(value, list) else value}")
        return 0
    if args.action == "logs":
        if args.follow:
            return _follow(args.job_id, jobs.resolve_address(args.address), jobs.follow_job)
        print(jobs.job_logs(args.job_id, address=args.address), end="")
        return 0
    status = jobs.stop_job(args.job_id, address=args.address)
    print(f"job {args.job_id}: {status}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from raylora.report import write_report

    try:
        files = write_report(args.source, args.out, tracking_uri=args.tracking_uri)
    except ValueError as error:
        print(f"raylora: error: {error}", file=sys.stderr)
        return 2
    print("wrote:\n" + "\n".join(f"  {f}" for f in files))
    return 0


def _first_train_loss(metrics_file: Path) -> float | None:
    if not metrics_file.exists():
        return None
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            return float(record["train_loss"])
    return None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fields = "\n".join(f"  {name}: {text}" for name, text in FinetuneConfig.field_help().items())
    train_parser = commands.add_parser(
        "train",
        help="train one adapter in this process (default: the tiny preset on the demo data)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config fields (set with --set section.field=value):\n{fields}",
    )
    train_parser.add_argument("--config", help="a JSON config (see --dump); default: the offline demo config")
    train_parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one field, e.g. adapter.r=8",
    )
    train_parser.add_argument(
        "--output-dir", help="where checkpoints and the adapter go (training.output_dir)"
    )
    train_parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue from a checkpoint directory, or (no value) the latest one under the output dir that "
        "loads; the config must be the one that wrote it, except training.max_steps",
    )
    train_parser.add_argument(
        "--dump", action="store_true", help="print the resolved config as JSON and exit (without secrets)"
    )
    train_parser.add_argument(
        "--include-secrets", action="store_true", help="with --dump: print `model.token` too"
    )
    train_parser.set_defaults(func=_cmd_train)

    run_parser = commands.add_parser("run", help="run a sweep file on Ray (a local cluster unless --address)")
    run_parser.add_argument(
        "sweep_file", help="a Python file defining `sweep = Sweep(...)`, e.g. sweeps/quickstart.py"
    )
    run_parser.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)"
    )
    run_parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)"
    )
    run_parser.add_argument(
        "--storage-path", help="where trials and checkpoints are stored (sweep.storage_path)"
    )
    run_parser.add_argument(
        "--num-samples", type=int, help="override the number of trials (sweep.num_samples)"
    )
    run_parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Ray Tune's verbosity")
    run_parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    run_parser.add_argument("--no-mlflow", action="store_true", help="do not log the sweep to MLflow")
    run_parser.set_defaults(func=_cmd_run)

    submit_parser = commands.add_parser(
        "submit",
        help="submit a sweep file to a Ray cluster as a Ray Job (the project directory travels with it)",
        description="Submit `raylora run SWEEP_FILE` as a Ray Job. Equivalent to `ray job submit "
        "--working-dir . -- raylora run SWEEP_FILE`, plus checks before the upload.",
    )
    submit_parser.add_argument("sweep_file", help="a sweep file inside the working directory")
    submit_parser.add_argument(
        "--address",
        help="the Ray dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)",
    )
    submit_parser.add_argument(
        "--working-dir", help="directory uploaded with the job (default: the project holding the sweep file)"
    )
    submit_parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="gitignore-style pattern left out of the upload (repeatable; .git, .venv, caches and results are always left out)",
    )
    submit_parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="environment variable for the job (repeatable); values of secret names are never printed",
    )
    submit_parser.add_argument(
        "--pip", action="append", default=[], metavar="PACKAGE", help="pip package installed for the job"
    )
    submit_parser.add_argument("--requirements", help="a requirements.txt installed for the job")
    submit_parser.add_argument(
        "--storage-path",
        help="where trials and checkpoints go: s3://..., gs://... or a shared filesystem path",
    )
    submit_parser.add_argument("--tracking-uri", help="MLflow tracking URI the cluster reaches")
    submit_parser.add_argument("--num-samples", type=int, help="override the number of trials")
    submit_parser.add_argument(
        "--resume", action="store_true", help="continue the sweep from its storage path"
    )
    submit_parser.add_argument("--no-mlflow", action="store_true", help="do not log the sweep to MLflow")
    submit_parser.add_argument(
        "--job-id", help="the submission id (default: raylora-<sweep>-<time>-<random>)"
    )
    submit_parser.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's log until it ends; exit 0 only if it succeeded",
    )
    submit_parser.set_defaults(func=_cmd_submit)

    jobs_parser = commands.add_parser("jobs", help="status, logs, stop or list of jobs on a Ray cluster")
    jobs_parser.add_argument("action", choices=("status", "logs", "stop", "list"))
    jobs_parser.add_argument("job_id", nargs="?", help="the job id `raylora submit` printed")
    jobs_parser.add_argument(
        "--address", help="the Ray dashboard (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)"
    )
    jobs_parser.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jobs_parser.add_argument("--all", action="store_true", help="list: every job, not only raylora's")
    jobs_parser.set_defaults(func=_cmd_jobs)

    report_parser = commands.add_parser("report", help="trials table and comparison plots of a sweep")
    report_parser.add_argument(
        "source", help="a sweep directory (<storage_path>/<name>) or its MLflow parent run id"
    )
    report_parser.add_argument(
        "--out", default="report", help="directory for the CSV, Markdown and PNG files"
    )
    report_parser.add_argument("--tracking-uri", help="MLflow tracking URI (default as for `run`)")
    report_parser.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raylora` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, JobError) as error:
        print(f"raylora: error: {error}", file=sys.stderr)
        return 2
    except (
        FloatingPointError
    ) as error:  # NonFiniteLossError: the run diverged; its message says what to change
        print(f"raylora: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        from raylora.checkpoint import DiskFullError

        if not isinstance(error, DiskFullError):
            raise
        print(f"raylora: error: {error.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
