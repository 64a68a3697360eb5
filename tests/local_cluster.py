"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes started with `ray start`.

Every node is its own `ray start --block` process (its own raylet, own CPUs), all bound to 127.0.0.1,
with token authentication on and a token of their own. Nodes are stopped through their pids: SIGTERM to the
`ray start --block` process stops that node's processes; anything still alive afterwards is found by the
cluster's own temp dir in its command line, never by a broad process name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class LocalCluster:
    temp_dir: Path
    token: str
    gcs_address: str = ""
    dashboard: str = ""
    nodes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client that holds the cluster's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_TOKEN=self.token)
        return env

    def _node_env(self) -> dict[str, str]:
        env = self.env
        env.update(
            RAY_AUTH_MODE="token",
            # Notice a dead node within a few seconds instead of the default ~30 s.
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def start_head(self, num_cpus: int) -> None:
        gcs, dashboard, client, agent = free_ports(4)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self._start(
            [
                "--head",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--temp-dir={self.temp_dir / 'head'}",
                "--min-worker-port=10002",
                "--max-worker-port=14999",
                f"--num-cpus={num_cpus}",
            ]
        )
        self.wait_for_nodes(1)

    def add_node(self, num_cpus: int, *, min_port: int = 15000, max_port: int = 19999) -> subprocess.Popen:
        (agent,) = free_ports(1)
        node = self._start(
            [
                f"--address={self.gcs_address}",
                # Its own temp dir, as on a separate machine: nodes sharing one would also share (and
                # delete) each other's unpacked job working directories.
                f"--temp-dir={self.temp_dir / f'n{len(self.nodes)}'}",
                f"--dashboard-agent-listen-port={agent}",
                f"--min-worker-port={min_port}",
                f"--max-worker-port={max_port}",
                f"--num-cpus={num_cpus}",
            ]
        )
        self.wait_for_nodes(len(self.nodes))
        return node

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = self.temp_dir / f"node{len(self.nodes)}.log"
        self.logs.append(log)
        node = subprocess.Popen(
            [*RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            env=self._node_env(),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        reply = requests.get(
            f"{self.dashboard}/api/v0/nodes",
            params={"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        reply.raise_for_status()
        return reply.json()["data"]["result"]["result"]

    def wait_for_nodes(self, count: int, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"a ray node exited ({node.returncode}); logs: {self.tail_logs()}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{count} nodes did not come up in {timeout_s} s; logs: {self.tail_logs()}")

    def raylet_pid(self, node: subprocess.Popen) -> int:
        for child in psutil.Process(node.pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
        raise RuntimeError("the node has no raylet process")

    def tail_logs(self, lines: int = 15) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                out.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=10)
        # Whatever outlived its `ray start` (a worker mid-start, say) is recognised by this cluster's temp dir.
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if marker in cmdline and proc.pid != os.getpid():
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(head_cpus: int, worker_cpus: int) -> LocalCluster:
    """A head and one worker node; Ray's socket paths must stay short, hence a temp dir right under /tmp."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    cluster = LocalCluster(temp_dir=temp_dir, token=secrets.token_hex(16))
    try:
        cluster.start_head(head_cpus)
        cluster.add_node(worker_cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster
