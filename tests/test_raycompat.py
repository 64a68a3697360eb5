"""The private Ray APIs raylora relies on (`raylora.raycompat`), pinned against the installed Ray.

If a Ray upgrade moves or changes one of them, a test here fails: at run time raylora only warns and
falls back (treats the cluster as fixed, skips measuring the upload).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from raylora import raycompat
from raylora.config import ConfigError, demo_config
from raylora.sweep import Resources, Sweep
from raylora.sweep.cluster import check_cluster

MIB = 2**20


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def autoscaler_config(local_cluster):
    """A cluster config in the GCS, published as an autoscaler (KubeRay, `ray up`) does: one GPU node group."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE, GcsClient
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del

    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(
                name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4
            )
        ]
    )
    GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())
    yield config
    _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)


def _gpu_sweep(tmp_path: Path) -> Sweep:
    return Sweep(
        name="gpu", base=demo_config(), resources=Resources(gpus_per_worker=1), storage_path=str(tmp_path)
    )


def test_a_local_cluster_does_not_autoscale(local_cluster, tmp_path):
    from ray._private.state import state

    assert callable(state.get_cluster_config)  # the private function the probe calls
    assert raycompat.cluster_autoscales() is False
    with pytest.raises(ConfigError, match="no node has that much"):
        check_cluster(_gpu_sweep(tmp_path), str(tmp_path))


def test_a_cluster_with_an_autoscaler_config_autoscales(autoscaler_config):
    assert raycompat.cluster_autoscales() is True


def test_on_an_autoscaling_cluster_missing_resources_warn_instead_of_refusing(
    autoscaler_config, tmp_path, capsys
):
    check_cluster(_gpu_sweep(tmp_path), str(tmp_path))
    assert "the cluster autoscales, so the sweep goes ahead" in capsys.readouterr().err


def test_a_moved_autoscaler_probe_warns_and_checks_the_nodes_up_now(
    local_cluster, tmp_path, capsys, monkeypatch
):
    def moved() -> bool:
        raise ImportError("cannot import name 'state' from 'ray._private.state'")

    monkeypatch.setattr("raylora.sweep.cluster.cluster_autoscales", moved)
    with pytest.raises(ConfigError, match="no node has that much"):
        check_cluster(_gpu_sweep(tmp_path), str(tmp_path))
    assert "cannot tell whether the cluster autoscales (ImportError" in capsys.readouterr().err


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "weights.bin").write_bytes(os.urandom(MIB))  # incompressible
    (root / "train.py").write_text("print('hello')\n")
    (root / ".git").mkdir()
    (root / ".git" / "pack").write_bytes(os.urandom(MIB))  # left out by Ray's default excludes
    return root


def test_package_size_honours_default_excludes_excludes_and_ignore_files(project, monkeypatch):
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    small = 64 * 1024

    whole = raycompat.package_size(project, [])
    assert MIB < whole < MIB + small  # weights.bin in, .git out
    assert raycompat.package_size(project, ["*.bin"]) < small
    assert raycompat.package_size(project, ["data"]) < small

    (project / ".gitignore").write_text("*.bin\n")
    assert raycompat.package_size(project, []) < small
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # Ray's own switch: .gitignore not read
    assert raycompat.package_size(project, []) > MIB
    (project / ".rayignore").write_text("data/\n")  # read whatever the switch says
    assert raycompat.package_size(project, []) < small


def test_the_upload_limit_follows_rays_own_variable():
    probe = "from raylora.raycompat import upload_limit_bytes; print(upload_limit_bytes())"
    env = dict(os.environ, RAY_max_grpc_message_size=str(3 * MIB))
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == 3 * MIB
    assert raycompat.upload_limit_bytes() >= 100 * MIB  # the default: Ray's gRPC message limit (512 MiB)
