"""Checks of the cluster before any trial: enough resources, autoscaling, storage every node sees.

A sweep that cannot run on this cluster should fail in seconds with a message that says what to change,
not wait forever in Tune's pending queue (resources no node has) or lose work later (checkpoints written
to a directory the other nodes do not see). On a cluster that autoscales, missing resources may still
come: there the resource problems are warnings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from raylora.config import ConfigError
from raylora.raycompat import cluster_autoscales
from raylora.sweep.spec import TRAINER_DRIVER_CPU, Sweep

__all__ = ["check_cluster"]


def check_cluster(sweep: Sweep, storage: str) -> None:
    """Refuse, before any trial starts, what this cluster can never run (on an autoscaling one: warn).

    Raises:
        ConfigError: every problem found, at once.
    """
    import ray

    problems: list[str] = []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    res = sweep.resources
    need_cpu, need_gpu = res.cpus_per_worker, res.gpus_per_worker
    fitting = [r for r in per_node if r.get("CPU", 0) >= need_cpu and r.get("GPU", 0) >= need_gpu]
    total_cpu = sum(r.get("CPU", 0) for r in per_node)
    total_gpu = sum(r.get("GPU", 0) for r in per_node)
    if not fitting:
        largest = max(per_node, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        problems.append(
            f"`resources` asks {need_cpu:g} CPU and {need_gpu:g} GPU per worker, but no node has that much "
            f"(largest: {largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU); lower the per-worker request"
        )
    elif res.workers * need_cpu + (TRAINER_DRIVER_CPU if res.workers > 1 else 0) > total_cpu or (
        res.workers * need_gpu > total_gpu
    ):
        problems.append(
            f"`resources` asks {res.workers} workers x ({need_cpu:g} CPU, {need_gpu:g} GPU) per trial, but the "
            f"cluster has {total_cpu:g} CPU and {total_gpu:g} GPU in all; use fewer workers or a bigger cluster"
        )
    elif res.placement_strategy == "STRICT_SPREAD" and len(fitting) < res.workers:
        problems.append(
            f"`resources.placement_strategy` STRICT_SPREAD needs {res.workers} nodes that each fit a worker, "
            f"the cluster has {len(fitting)}; use SPREAD or fewer workers"
        )
    if problems and _autoscaling():
        # Nodes that would fit may be added on demand: say what is missing now, and let the autoscaler try.
        for problem in problems:
            print(
                f"raylora: warning: {problem} (the cluster autoscales, so the sweep goes ahead)",
                file=sys.stderr,
            )
        problems = []
    if len(nodes) > 1 and "://" not in storage:
        blind = _nodes_not_seeing(storage, [n["NodeID"] for n in nodes])
        if blind:
            problems.append(
                f"`sweep.storage_path` {storage!r} is a local directory that {len(blind)} of the cluster's "
                f"{len(nodes)} nodes do not see (a file written there from this driver was not found on node "
                f"{', '.join(b[:12] for b in blind)}): checkpoints written on one node would be invisible to "
                "the others. Use a cloud URI (s3://, gs://) or a path on a filesystem every node mounts (NFS)"
            )
    if problems:
        raise ConfigError(problems)


def _autoscaling() -> bool:
    """Whether the cluster has an autoscaler (KubeRay, `ray up`) that can add nodes while the sweep waits."""
    try:
        return cluster_autoscales()
    except (ImportError, AttributeError) as error:
        # Ray moved the private probe (tests/test_raycompat.py fails on that Ray): keep refusing what the
        # nodes up now cannot run, and say why an autoscaling cluster is treated as a fixed one.
        print(
            f"raylora: warning: cannot tell whether the cluster autoscales ({type(error).__name__}: {error}); "
            "checking resources against the nodes up now",
            file=sys.stderr,
        )
        return False


def _nodes_not_seeing(storage: str, node_ids: list[str], timeout_s: float = 60.0) -> list[str]:
    """The nodes on which a file just written under `storage` by this driver does not exist.

    Asking every node is the only test that holds for any set-up: an NFS mount, a path that happens to
    exist everywhere but is not shared, several nodes on one machine (which do share it).
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(storage)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".raylora-shared-check-{uuid.uuid4().hex}"
    probe.write_text("written by the sweep driver to check that every node sees this directory\n")
    check = ray.remote(num_cpus=0)(_path_exists)
    try:
        refs = {
            node: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(probe)
            )
            for node in node_ids
        }
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        blind = []
        for node, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=0)
            except Exception:  # no answer in time, or the node went away: not confirmed shared
                seen = False
            if not seen:
                blind.append(node)
        return blind
    finally:
        probe.unlink(missing_ok=True)


def _path_exists(path: str) -> bool:
    return os.path.exists(path)
