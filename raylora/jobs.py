"""Ray Jobs: send a sweep file to a Ray cluster as a job, then watch it, read its logs or stop it.

`submit_sweep` is `ray job submit --working-dir <project> -- python -m raylora run <sweep>` with the checks
a laptop-to-cluster hand-off needs, done before anything is uploaded:

- local mistakes first: a missing sweep file, a sweep that does not validate, a working directory whose
  upload would exceed Ray's package limit (measured by zipping it the way Ray does, with the excludes);
- then the cluster: the dashboard's job API must answer within seconds (no hang on a wrong address), and
  must accept the Ray auth token (from `RAY_AUTH_TOKEN`, the file at `RAY_AUTH_TOKEN_PATH`, or
  `~/.ray/auth_token`, the same order Ray itself uses).

Environment variables can travel with the job (`env`); their values are sent to the cluster but never
printed: anything with a secret name (HF_TOKEN, ...) shows as `***`. The job's driver runs
`raylora run` on the head node, so results go where `--storage-path` and `--tracking-uri` say, not to the
job's temporary working directory.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora.config import ConfigError
from raylora.raycompat import package_size, quiet_packaging_logs, upload_limit_bytes
from raylora.redaction import REDACTED, StreamRedactor, is_secret_name, redact, secret_values

__all__ = [
    "DEFAULT_EXCLUDES",
    "PASSTHROUGH_ENV",
    "JobError",
    "SubmittedJob",
    "connect",
    "follow_job",
    "job_logs",
    "job_status",
    "list_jobs",
    "resolve_address",
    "resolve_token",
    "stop_job",
    "submit_sweep",
]

# Never worth uploading: version control, environments, caches, and what earlier local runs wrote.
DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "**/__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    ".whl",
    "raylora_results",
    "outputs",
    "report",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "wandb",
    "node_modules",
)
# Sent along when set here, so a sweep submitted from a laptop reaches the same hub and tracking server.
# Secrets (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, ...) go only when named with `env`: on a cluster that keeps
# them in its own secret store, a copy from a laptop would override it unasked.
PASSTHROUGH_ENV = ("HF_ENDPOINT", "MLFLOW_TRACKING_URI")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_GRACE_S = 60
_CONNECT_TIMEOUT_S = 5.0
_PROJECT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")
_JOB_METADATA_KEY = "raylora.sweep"


class JobError(RuntimeError):
    """The cluster could not be reached, refused the request, or the job could not be found."""


@dataclass
class SubmittedJob:
    """A submitted sweep: its job id, where to watch it, and what was sent."""

    job_id: str
    address: str
    entrypoint: str
    working_dir: str
    package_bytes: int | None
    env: dict[str, str] = field(default_factory=dict)  # already redacted: safe to print

    @property
    def dashboard_url(self) -> str:
        return f"{self.address}/#/jobs/{self.job_id}"


# ---- where and who -------------------------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """The dashboard URL jobs go to: `address`, else `RAY_API_SERVER_ADDRESS`, else `RAY_ADDRESS`.

    Job submission talks HTTP to the dashboard (port 8265 by default), not to the GCS port (6379) that
    `ray.init` uses; a GCS or `ray://` address gets a hint instead of a confusing connection error.
    """
    raw = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not raw:
        raise JobError(
            "no cluster address: pass `--address http://HEAD:8265` (the Ray dashboard) or set "
            "RAY_API_SERVER_ADDRESS"
        )
    if raw.startswith("ray://") or raw == "auto":
        raise JobError(
            f"`--address` {raw!r} is a Ray client/GCS address; jobs are submitted to the dashboard: "
            "use http://HEAD:8265"
        )
    url = raw if "://" in raw else f"http://{raw}"
    if not url.startswith(("http://", "https://")):
        raise JobError(
            f"`--address` {raw!r} must be an http(s):// URL of the Ray dashboard, e.g. http://HEAD:8265"
        )
    if url.rstrip("/").endswith(":6379"):
        raise JobError(
            f"`--address` {raw!r} is the GCS port; jobs are submitted to the dashboard port (default 8265)"
        )
    return url.rstrip("/")


def resolve_token() -> str | None:
    """The Ray auth token, looked up as Ray does: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path).expanduser()] if path else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    for candidate in candidates:
        if candidate.is_file():
            text = candidate.read_text().strip()
            if text:
                return text
    return None


def _auth_headers() -> dict[str, str]:
    token = resolve_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _refused(address: str, status: int) -> JobError:
    has_token = resolve_token() is not None
    if status == 401 or not has_token:
        why = "it requires a Ray auth token and none was found here"
    else:
        why = "it did not accept the Ray auth token found here (wrong token, or one for another cluster)"
    return JobError(
        f"the cluster at {address} refused the request: {why}. Set RAY_AUTH_TOKEN to the cluster's token "
        "(on the head node: `ray get-auth-token`), or put it in ~/.ray/auth_token or a file named by "
        "RAY_AUTH_TOKEN_PATH"
    )


def connect(address: str | None = None, *, timeout_s: float = _CONNECT_TIMEOUT_S):
    """A `JobSubmissionClient` for the cluster, after checking within `timeout_s` that it answers and accepts us.

    Raises:
        JobError: unreachable address, not a Ray dashboard, or the token is missing or wrong.
    """
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    headers = _auth_headers()
    try:
        reply = requests.get(f"{url}/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.Timeout:
        raise JobError(
            f"the Ray dashboard at {url} did not answer within {timeout_s:g} s: check the address and that "
            "the port is reachable from here (a head bound to 127.0.0.1 needs `kubectl port-forward` or "
            "`ray dashboard cluster.yaml`)"
        ) from None
    except requests.exceptions.RequestException as error:
        raise JobError(
            f"cannot reach the Ray dashboard at {url} ({type(error).__name__}): is the cluster up, and is "
            "this its dashboard address (http://HEAD:8265)?"
        ) from None
    if reply.status_code in (401, 403):
        raise _refused(url, reply.status_code)
    if reply.status_code != 200 or "ray_version" not in reply.text:
        raise JobError(
            f"{url} answered HTTP {reply.status_code} but is not a Ray dashboard; pass the dashboard's "
            "address (http://HEAD:8265)"
        )
    _warn_on_version_mismatch(url, reply.json().get("ray_version", ""))
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        raise _refused(url, 403) from None


def _warn_on_version_mismatch(url: str, remote: str) -> None:
    import ray

    if remote and remote.split(".")[:2] != ray.__version__.split(".")[:2]:
        print(
            f"raylora: warning: the cluster at {url} runs Ray {remote}, this machine Ray {ray.__version__}; "
            "keep them on the same minor version",
            file=sys.stderr,
        )


# ---- submit ------------------------------------------------------------------------------------------------


def submit_sweep(
    sweep_file: str | os.PathLike[str],
    *,
    address: str | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    excludes: Iterable[str] = (),
    env: Iterable[str] = (),
    pip: Sequence[str] = (),
    requirements: str | os.PathLike[str] | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    num_samples: int | None = None,
    resume: bool = False,
    mlflow: bool = True,
    job_id: str | None = None,
    progress: Callable[[str], None] = print,
) -> SubmittedJob:
    """Submit `raylora run <sweep_file>` as a Ray Job; return once the cluster has accepted it.

    Args:
        sweep_file: the sweep definition; it must lie inside `working_dir`.
        address: the dashboard URL (see `resolve_address`).
        working_dir: the directory uploaded as the job's working directory; default the project holding
            the sweep file (the nearest parent with pyproject.toml, setup.py or .git), else its folder.
        excludes: gitignore-style patterns left out of the upload, on top of `DEFAULT_EXCLUDES`,
            `.gitignore` and `.rayignore`.
        env: `NAME` (value taken from this environment) or `NAME=VALUE`, added to `PASSTHROUGH_ENV`.
        pip: packages installed for the job (runtime_env `pip`); `requirements` a requirements file.
            Neither: the job uses the cluster's own environment (an image with raylora installed).
        storage_path, tracking_uri, num_samples, resume, mlflow: passed to `raylora run` on the cluster
            (`--storage-path`, `--tracking-uri`, `--num-samples`, `--resume`, `--no-mlflow`). Without a
            storage path or tracking URI, results land in the job's temporary working directory on the
            head node: a warning says so.
        job_id: the submission id; default `raylora-<sweep>-<time>-<random>`.
        progress: where the one-line progress messages go.

    Raises:
        ConfigError: the sweep file is missing or invalid, or an `env` entry names an unset variable.
        JobError: the upload would be too large, or the cluster is unreachable or refuses the token.
    """
    from raylora.sweep import load_sweep

    sweep_path = Path(sweep_file).expanduser().resolve()
    sweep = load_sweep(sweep_path).validate()  # ConfigError: missing, fails to import, invalid
    root = Path(working_dir).expanduser().resolve() if working_dir else _project_root(sweep_path)
    if not root.is_dir():
        raise ConfigError(f"`--working-dir` {str(working_dir)!r} is not a directory")
    if not sweep_path.is_relative_to(root):
        raise ConfigError(
            f"sweep file {str(sweep_path)!r} is outside `--working-dir` {str(root)!r}, so the job could "
            "not find it; pass a working directory that contains it"
        )
    env_vars = _job_env(env)
    # `raylora jobs stop` has Ray send the driver SIGTERM, then SIGKILL after this many seconds (3 by default):
    # the driver needs longer to stop its trials, save the sweep for --resume and end its MLflow runs KILLED.
    # Ray's job supervisor reads it from the job's environment.
    env_vars.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_GRACE_S))
    all_excludes = [*DEFAULT_EXCLUDES, *excludes]
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": all_excludes}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if requirements:
        req = Path(requirements).expanduser()
        if not req.is_file():
            raise ConfigError(f"`--requirements` {str(requirements)!r} does not exist")
        runtime_env["pip"] = str(req.resolve())
    elif pip:
        runtime_env["pip"] = list(pip)
    run_args = _run_args(storage_path, tracking_uri, num_samples, resume, mlflow)
    for warning in _where_results_go(sweep, storage_path, tracking_uri if mlflow else "", env_vars):
        progress(f"warning: {warning}")
    progress(f"packing {root} (excludes: {', '.join(all_excludes)})")
    with quiet_packaging_logs():
        package_bytes = check_upload_size(root, all_excludes)
        client = connect(address)
        relative = sweep_path.relative_to(root).as_posix()
        entrypoint = shlex.join(["python", "-m", "raylora", "run", relative, *run_args])
        job_id = job_id or _new_job_id(sweep.name)
        from ray.exceptions import AuthenticationError

        try:
            submitted = client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={_JOB_METADATA_KEY: sweep.name},
            )
        except AuthenticationError:
            raise _refused(client.get_address(), 403) from None
        except RuntimeError as error:
            message = redact(str(error), secrets=secret_values(env_vars))
            raise JobError(f"the cluster did not accept the job: {message}") from None
    return SubmittedJob(
        job_id=submitted,
        address=client.get_address(),
        entrypoint=entrypoint,
        working_dir=str(root),
        package_bytes=package_bytes,
        env={
            k: (REDACTED if is_secret_name(k) else redact(v, secrets=secret_values(env_vars)))
            for k, v in env_vars.items()
        },
    )


def _run_args(
    storage_path: str | None, tracking_uri: str | None, num_samples: int | None, resume: bool, mlflow: bool
) -> list[str]:
    args: list[str] = []
    if storage_path:
        args += ["--storage-path", storage_path]
    if not mlflow:
        args.append("--no-mlflow")
    elif tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if num_samples:
        args += ["--num-samples", str(num_samples)]
    if resume:
        args.append("--resume")
    return args


def _where_results_go(
    sweep, storage_path: str | None, tracking_uri: str | None, env: dict[str, str]
) -> list[str]:
    """Warnings for results that would stay in the job's temporary directory on the head node."""
    warnings = []
    storage = storage_path or sweep.storage_path
    if "://" not in storage and not Path(storage).is_absolute():
        warnings.append(
            f"results go to {storage!r} inside the job's working directory on the head node, which Ray "
            "deletes later; pass --storage-path s3://bucket/path or a shared filesystem path"
        )
    if tracking_uri is None and "MLFLOW_TRACKING_URI" not in env:
        warnings.append(
            "no --tracking-uri (nor MLFLOW_TRACKING_URI here): MLflow runs go to a sqlite file in the job's "
            "working directory on the head node; pass --tracking-uri http://MLFLOW_HOST:5000 (a server the "
            "cluster reaches) or a database URI"
        )
    return warnings


def _project_root(sweep_path: Path) -> Path:
    for parent in sweep_path.parents:
        if any((parent / marker).exists() for marker in _PROJECT_MARKERS):
            return parent
    return sweep_path.parent


def _job_env(entries: Iterable[str]) -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if os.environ.get(name)}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not name.isidentifier():
            raise ConfigError(f"`--env {entry}`: {name!r} is not a variable name; use NAME or NAME=VALUE")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
        else:
            raise ConfigError(
                f"`--env {name}`: {name} is not set here; set it, or pass a value with --env {name}=VALUE"
            )
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):  # the cluster has its own; never ship ours
        env.pop(name, None)
    return env


def _new_job_id(sweep_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in sweep_name)[:40]
    return f"raylora-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_upload_size(root: Path, excludes: Sequence[str]) -> int | None:
    """Zip `root` the way the job upload will, and refuse it before uploading if Ray would reject it.

    Returns the package size in bytes, or None (with a warning) where this Ray moved the packer that
    `raylora.raycompat` measures with: the upload itself then reports an oversize package.

    Raises:
        JobError: the package reaches Ray's limit; the message lists the largest entries to exclude.
    """
    try:
        size = package_size(root, excludes)
        limit = upload_limit_bytes()
    except (ImportError, AttributeError) as error:
        print(
            f"raylora: warning: cannot measure the upload before sending it ({type(error).__name__}: {error}); "
            "an oversize working directory will be refused by the cluster instead",
            file=sys.stderr,
        )
        return None
    if size < limit:
        return size
    largest = sorted(_entry_sizes(root), key=lambda item: item[1], reverse=True)[:5]
    listing = ", ".join(f"{name} ({_mib(n)})" for name, n in largest)
    raise JobError(
        f"the working directory {root} packs to {_mib(size)}, over Ray's upload limit of "
        f"{_mib(limit)}. Largest entries: {listing}. Leave them out with "
        "`--exclude PATTERN` (or a .rayignore file), keep data and models on shared storage or the hub, "
        "or pass a smaller `--working-dir`"
    )


def _entry_sizes(root: Path) -> list[tuple[str, int]]:
    sizes = []
    for entry in root.iterdir():
        if entry.is_file():
            sizes.append((entry.name, entry.stat().st_size))
        elif entry.is_dir():
            total = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            sizes.append((f"{entry.name}/", total))
    return sizes


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---- watch, logs, stop ---------------------------------------------------------------------------------


def job_status(job_id: str, *, address: str | None = None) -> dict[str, Any]:
    """The job's status, message, entrypoint, times and env var names (values of secrets masked)."""
    client = connect(address)
    info = _job_info(client, job_id)
    runtime_env = info.runtime_env or {}
    secrets = _job_secrets(info)
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": redact(info.message or "", secrets=secrets),
        "entrypoint": redact(info.entrypoint, secrets=secrets),
        "start_time": _format_ms(info.start_time),
        "end_time": _format_ms(info.end_time),
        "env": sorted((runtime_env.get("env_vars") or {}).keys()),
        "dashboard": f"{client.get_address()}/#/jobs/{job_id}",
    }


def job_logs(job_id: str, *, address: str | None = None) -> str:
    """The job's whole driver log so far, secrets masked (`_job_secrets`)."""
    client = connect(address)
    info = _job_info(client, job_id)
    return redact(client.get_job_logs(job_id), secrets=_job_secrets(info))


def follow_job(job_id: str, *, address: str | None = None, out=sys.stdout) -> str:
    """Stream the job's log to `out` until it ends, secrets masked across chunks; return its final status."""
    client = connect(address)
    redactor = StreamRedactor(_job_secrets(_job_info(client, job_id)))

    async def tail() -> None:
        try:
            async for chunk in client.tail_job_logs(job_id):
                out.write(redactor.feed(chunk))
                out.flush()
        finally:
            out.write(redactor.flush())
            out.flush()

    asyncio.run(tail())
    return _wait_until_ended(client, job_id, 30)  # the log closes as the job ends; the status follows


def _job_secrets(info) -> list[str]:
    """What to mask in a job's output: values of secret-named variables here and in the job's own
    `env_vars` (values given with `--env NAME=VALUE` exist only there)."""
    env_vars = (info.runtime_env or {}).get("env_vars") or {}
    return secret_values(env_vars)


def stop_job(job_id: str, *, address: str | None = None, wait_s: float = STOP_GRACE_S + 15.0) -> str:
    """Ask the cluster to stop the job; wait up to `wait_s` for it to end and return its status."""
    client = connect(address)
    _job_info(client, job_id)
    client.stop_job(job_id)
    return _wait_until_ended(client, job_id, wait_s)


def _wait_until_ended(client, job_id: str, wait_s: float) -> str:
    """The job's status once it has ended, or as it stands after `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    status = _status_name(str(client.get_job_status(job_id)))
    while status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(1)
        status = _status_name(str(client.get_job_status(job_id)))
    return status


def list_jobs(*, address: str | None = None, all_jobs: bool = False) -> list[dict[str, Any]]:
    """Jobs on the cluster, newest first: those raylora submitted, or every job with `all_jobs`."""
    client = connect(address)
    rows = []
    for job in client.list_jobs():
        metadata = job.metadata or {}
        if not all_jobs and _JOB_METADATA_KEY not in metadata:
            continue
        rows.append(
            {
                "job_id": job.submission_id or job.job_id,
                "sweep": metadata.get(_JOB_METADATA_KEY, ""),
                "status": _status_name(str(job.status)),
                "start_time": _format_ms(job.start_time),
                "end_time": _format_ms(job.end_time),
            }
        )
    return sorted(rows, key=lambda row: row["start_time"], reverse=True)


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise JobError(
                f"no job {job_id!r} on the cluster at {client.get_address()}; `raylora jobs list` shows them"
            ) from None
        raise JobError(f"the cluster could not report job {job_id!r}: {redact(str(error))}") from None


def _status_name(status: str) -> str:
    return status.rsplit(".", 1)[-1]


def _format_ms(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""
