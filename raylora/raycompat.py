"""Every use of Ray's private (`ray._private`) modules, in one place, for the two things Ray has no public API for.

Each function names the private API it calls, why, and the behaviour raylora relies on;
`tests/test_raycompat.py` pins that behaviour against the installed Ray, so an upgrade that moves or
changes one of them fails a test instead of silently changing what raylora does. The imports happen inside
the functions, and nothing here catches their failure: an `ImportError` or `AttributeError` means the API
moved, and the caller decides whether that is fatal or degrades with a warning.

Public APIs looked at first (Ray 2.60), and why they do not do the job:

- Is there an autoscaler? `ray.autoscaler.sdk` drives a cluster from its launcher YAML (`request_resources`
  asks for resources but nothing says whether anyone will add nodes); `ray.util.state` lists nodes, actors,
  tasks and jobs, not the autoscaler's configuration; `ray.nodes()` / `ray.cluster_resources()` describe
  the nodes up now. Ray's own libraries ask the private state API below (Ray Data's
  `is_autoscaling_enabled`, Ray Train V2's check of cluster resources before placing workers).
- How large is a working_dir upload? `JobSubmissionClient.submit_job` packs and uploads in one call, and the
  size limit is enforced by the dashboard only after the upload. No public function packs a directory
  without uploading it, and a copy of Ray's packer (its default excludes, .gitignore and .rayignore
  handling) would drift from the real one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["cluster_autoscales", "package_size", "quiet_packaging_logs", "upload_limit_bytes"]


def cluster_autoscales() -> bool:
    """Whether the connected cluster runs an autoscaler (KubeRay, `ray up`) that may add nodes on demand.

    Private API: `ray._private.state.state.get_cluster_config()`, which reads the cluster configuration an
    autoscaler publishes to the GCS (KV namespace `__autoscaler`, key `__autoscaler_cluster_config`).
    Relied on: it returns None when no autoscaler has published one (a local `ray.init`, nodes started by
    hand with `ray start`), and the config once one has. Needs `ray.init` first.

    Raises:
        ImportError, AttributeError: this Ray moved or renamed the private API.
    """
    from ray._private.state import state

    return state.get_cluster_config() is not None


def upload_limit_bytes() -> int:
    """The size a job's working_dir package must stay under: the dashboard refuses anything larger.

    Private API: `ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE`, the bound the dashboard checks
    each uploaded package against. Relied on: it follows Ray's own `RAY_max_grpc_message_size` (read when
    the module is first imported), so a cluster configured with a larger limit is measured the same way here.

    Raises:
        ImportError, AttributeError: this Ray moved or renamed the private API.
    """
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def package_size(root: str | os.PathLike[str], excludes: Sequence[str]) -> int:
    """The size in bytes of the zip that `JobSubmissionClient.submit_job` uploads for the working_dir `root`.

    Private API: `ray._private.runtime_env.packaging.create_package`, the packer the job SDK calls, given
    what the SDK adds: the default excludes (`ray._private.ray_constants.get_runtime_env_default_excludes`:
    .git, .venv, venv, __pycache__ unless overridden) and the switch that stops reading .gitignore
    (`RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1`). Relied on: gitignore-style `excludes`, `.gitignore` and
    `.rayignore` files all leave entries out of the package.

    Raises:
        ImportError, AttributeError: this Ray moved or renamed the private API.
    """
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE, get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    all_excludes = [*get_runtime_env_default_excludes(), *excludes]
    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    with tempfile.TemporaryDirectory(prefix="raylora-pkg-") as tmp:
        package = Path(tmp) / "package.zip"
        create_package(
            str(root), package, include_gitignore=include_gitignore, excludes=all_excludes, logger=None
        )
        return package.stat().st_size


@contextlib.contextmanager
def quiet_packaging_logs() -> Iterator[None]:
    """Ray logs every ignore file it reads, several times per upload; raylora's own line says what is packed.

    Relies on the names of the loggers of Ray's packer (a private module) and of the job SDK: if they
    change, the only effect is Ray's lines showing again.
    """
    names = ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
