"""From laptop to cluster, against a real 2-node Ray cluster on this machine (token auth on, 127.0.0.1).

`raylora submit` runs as users run it (a subprocess holding the cluster's token); jobs are checked through
Ray's own job API, trial results on the shared storage path, runs in MLflow. The last test kills the
second node's raylet mid-trial, so it must stay last in this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from local_cluster import LocalCluster, free_ports, start_cluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster():
    # Head: 3 CPUs, so a 2-worker trial (1 CPU each) plus its driver still fits there once node 2 is gone.
    local = start_cluster(head_cpus=3, worker_cpus=2)
    try:
        yield local
    finally:
        local.stop()


def _raylora(*args: str, env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylora", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _job_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("job submitted: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no job id printed:\n{stdout}")


def _two_worker_sweep(
    tmp_path: Path, name: str, strategy: str, steps: int, eval_every: int, workers: int = 2
) -> Path:
    """A sweep of one 2-worker FSDP trial (or `workers`), alone in its own project directory (the job's working
    dir)."""
    project = tmp_path / name
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'cluster-test'\nversion = '0'\n")
    sweep = project / "sweep.py"
    sweep.write_text(
        textwrap.dedent(
            f"""
            from ray import tune

            from raylora import Resources, Sweep, demo_config

            base = demo_config()
            base.training.max_steps = {steps}
            base.training.eval_every = {eval_every}
            base.training.eval_batches = 2
            base.training.warmup_steps = 2
            sweep = Sweep(
                name={name!r},
                base=base,
                search_space={{"adapter.r": tune.grid_search([8])}},
                search_alg="grid",
                scheduler="fifo",
                num_samples=1,
                resources=Resources(workers={workers}, cpus_per_worker=1, placement_strategy={strategy!r}),
            )
            """
        )
    )
    return sweep


def _reports(storage: Path, name: str) -> list[dict]:
    results = sorted((storage / name).glob("trial_*/result.json"))
    assert len(results) == 1, f"expected one trial under {storage / name}"
    return [json.loads(line) for line in results[0].read_text().splitlines() if line.strip()]


def _wait_for_end(client: JobSubmissionClient, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s:\n{client.get_job_logs(job_id)[-3000:]}")


def test_quickstart_submitted_as_a_job_succeeds_and_logs_to_mlflow(cluster: LocalCluster, tmp_path):
    storage, db = tmp_path / "results", tmp_path / "mlflow.db"
    env = dict(cluster.env, HF_TOKEN="hf_canary_value_123456")
    run = _raylora(
        "submit",
        "sweeps/quickstart.py",
        "--address",
        cluster.dashboard,
        "--storage-path",
        str(storage),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--env",
        "HF_TOKEN",
        "--follow",
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = _job_id(run.stdout)
    assert f"{cluster.dashboard}/#/jobs/{job_id}" in run.stdout
    assert "HF_TOKEN=***" in run.stdout and "hf_canary_value_123456" not in run.stdout + run.stderr
    assert f"job {job_id}: SUCCEEDED" in run.stdout

    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    assert str(client.get_job_status(job_id)) == "SUCCEEDED"
    # The token went along to the job only as Ray's own auth; HF_TOKEN did reach the job's environment.
    job_env = client.get_job_info(job_id).runtime_env["env_vars"]
    assert job_env["HF_TOKEN"] == "hf_canary_value_123456" and "RAY_AUTH_TOKEN" not in job_env

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = mlflow.get_experiment_by_name("quickstart")
    runs = mlflow.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and len(runs) == 5
    # Every run ended: FINISHED, or KILLED for a trial that ASHA stopped early; none FAILED or RUNNING.
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}

    status = _raylora("jobs", "status", job_id, "--address", cluster.dashboard, env=cluster.env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "HF_TOKEN" in status.stdout
    assert "hf_canary_value_123456" not in status.stdout
    listing = _raylora("jobs", "list", "--address", cluster.dashboard, env=cluster.env)
    assert job_id in listing.stdout and "quickstart" in listing.stdout
    logs = _raylora("jobs", "logs", job_id, "--address", cluster.dashboard, env=cluster.env)
    assert "best trial" in logs.stdout
    # A file store on the head node is said out loud, and the follow-up commands name the file really used.
    assert (
        f"raylora: WARNING: this sweep runs as Ray job {job_id} and logs MLflow to sqlite:///{db}"
        in logs.stdout
    )
    assert (
        f"raylora report {children[0].data.tags['mlflow.parentRunId']} --tracking-uri sqlite:///{db}"
        in logs.stdout
    )


def test_two_worker_trial_runs_one_worker_on_each_node(cluster: LocalCluster, tmp_path):
    storage = tmp_path / "results"
    sweep = _two_worker_sweep(tmp_path, "spread", "STRICT_SPREAD", steps=20, eval_every=10)
    run = _raylora(
        "submit", str(sweep), "--address", cluster.dashboard, "--storage-path", str(storage),
        "--no-mlflow", "--follow", env=cluster.env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    reports = _reports(storage, "spread")
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert [r["step"] for r in reports] == [10, 20]
    for report in reports:
        workers = report["worker_nodes"].split(",")
        assert len(workers) == 2 and set(workers) == nodes and report["num_nodes"] == 2
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"] + 0.5  # trained, and sanely


def test_submission_without_the_right_token_is_refused(cluster: LocalCluster, tmp_path):
    sweep = _two_worker_sweep(tmp_path, "refused", "SPREAD", steps=10, eval_every=10)
    wrong = dict(cluster.env, RAY_AUTH_TOKEN="not-the-cluster-token")
    run = _raylora("submit", str(sweep), "--address", cluster.dashboard, env=wrong, timeout=120)
    assert run.returncode == 2
    assert "refused" in run.stderr and "did not accept the Ray auth token" in run.stderr
    assert "not-the-cluster-token" not in run.stderr + run.stdout

    # No token at all: none in the environment, none in a (fresh) home directory.
    home = tmp_path / "home"
    home.mkdir()
    missing = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    missing["HOME"] = str(home)
    run = _raylora("jobs", "list", "--address", cluster.dashboard, env=missing, timeout=120)
    assert run.returncode == 2 and "requires a Ray auth token and none was found" in run.stderr

    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    assert not any((job.metadata or {}).get("raylora.sweep") == "refused" for job in client.list_jobs())


def test_followed_logs_mask_a_secret_split_across_chunks_and_one_given_only_to_the_job(
    cluster: LocalCluster, tmp_path, monkeypatch
):
    """A job prints two secrets, each in two writes seconds apart, so that Ray's log stream delivers each
    in two chunks: HF_TOKEN, set here too, and MY_API_KEY, given only in the job's env (as `--env
    MY_API_KEY=VALUE` sends it). Neither shows in the followed log nor in the whole log."""
    import asyncio
    import io
    import shlex
    import threading

    from raylora.jobs import follow_job, job_logs

    here, job_only = "hf_splitAcrossChunks0123456789", "sk-givenOnlyToTheJob9876543210"
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    monkeypatch.setenv("HF_TOKEN", here)
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        print("waiting", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.2)
        for name in ("HF_TOKEN", "MY_API_KEY"):
            secret = os.environ[name]
            sys.stdout.write(name + " is " + secret[:12]); sys.stdout.flush(); time.sleep(3)
            sys.stdout.write(secret[12:] + " ok\\n"); sys.stdout.flush(); time.sleep(1)
        """
    )
    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    job_id = client.submit_job(
        entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}",
        runtime_env={"env_vars": {"HF_TOKEN": here, "MY_API_KEY": job_only}},
    )
    followed, raw, status = io.StringIO(), [], []

    async def record() -> None:  # Ray's own stream, to see where its chunks break
        async for chunk in client.tail_job_logs(job_id):
            raw.append(chunk)

    threads = [
        threading.Thread(
            target=lambda: status.append(follow_job(job_id, address=cluster.dashboard, out=followed))
        ),
        threading.Thread(target=lambda: asyncio.run(record())),
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while not ("waiting" in "".join(raw) and "waiting" in followed.getvalue()):
        assert time.monotonic() < deadline, "the job's log never started"
        time.sleep(0.2)
    go.touch()  # both streams are live: the secrets arrive in pieces
    for thread in threads:
        thread.join(timeout=120)
    assert status == ["SUCCEEDED"], followed.getvalue()
    stream = "".join(raw)
    for secret in (here, job_only):
        assert secret in stream and not any(secret in chunk for chunk in raw)  # split by the stream itself
    shown = followed.getvalue()
    assert "HF_TOKEN is *** ok" in shown and "MY_API_KEY is *** ok" in shown, shown
    whole = job_logs(job_id, address=cluster.dashboard)
    assert here not in shown + whole and job_only not in shown + whole


def test_a_stream_is_masked_the_same_wherever_its_chunks_break():
    from raylora.redaction import StreamRedactor, redact

    secrets = ["hf_abcdefghijkl", "with a space"]
    text = "a hf_abcdefghijkl b https://user:pass@host/x c\rhf_abcdefghijklhf_abcdefghijkl with a space!"
    whole = redact(text, secrets=secrets)
    assert "hf_" not in whole and "pass" not in whole and "space" not in whole
    for first in range(1, len(text)):
        for second in range(first, len(text)):
            redactor = StreamRedactor(secrets)
            parts = (text[:first], text[first:second], text[second:])
            assert "".join(redactor.feed(p) for p in parts) + redactor.flush() == whole, parts


def test_unreachable_address_fails_within_seconds(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    sweep = REPO / "sweeps" / "quickstart.py"
    start = time.monotonic()
    run = _raylora("submit", str(sweep), "--address", f"http://127.0.0.1:{port}", env=dict(os.environ))
    assert time.monotonic() - start < 30  # interpreter start and the sweep's import included
    assert run.returncode == 2 and "cannot reach the Ray dashboard" in run.stderr

    run = _raylora("submit", "sweeps/nope.py", "--address", "http://127.0.0.1:1", env=dict(os.environ))
    assert run.returncode == 2 and "sweeps/nope.py' does not exist" in run.stderr


def test_working_dir_over_the_upload_limit_gets_a_hint(tmp_path):
    sweep = _two_worker_sweep(tmp_path, "big", "SPREAD", steps=10, eval_every=10)
    (sweep.parent / "weights.bin").write_bytes(os.urandom(3 * 2**20))  # incompressible
    # Ray's own limit, lowered through Ray's own variable so the test needs no 512 MiB file.
    env = dict(os.environ, RAY_max_grpc_message_size=str(2**20))
    run = _raylora("submit", str(sweep), "--address", "http://127.0.0.1:1", env=env)
    assert run.returncode == 2
    assert "over Ray's upload limit of 1.0 MiB" in run.stderr and "weights.bin (3.0 MiB)" in run.stderr
    assert "--exclude" in run.stderr

    run = _raylora(
        "submit", str(sweep), "--address", "http://127.0.0.1:1", "--exclude", "*.bin", env=env
    )  # fmt: skip
    assert "upload limit" not in run.stderr and "cannot reach the Ray dashboard" in run.stderr


def test_a_stopped_job_ends_its_runs_killed_and_resume_continues_them(cluster: LocalCluster, tmp_path):
    storage, db = tmp_path / "results", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Long enough that the trial is still training when the stop arrives.
    sweep = _two_worker_sweep(tmp_path, "stoppable", "PACK", steps=150, eval_every=10, workers=1)
    where = ["--address", cluster.dashboard, "--storage-path", str(storage), "--tracking-uri", db]
    run = _raylora("submit", str(sweep), *where, env=cluster.env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = _job_id(run.stdout)
    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    deadline = time.monotonic() + 300
    while not list((storage / "stoppable").glob("trial_*/checkpoint_*")):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        assert str(client.get_job_status(job_id)) in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[
            -3000:
        ]
        time.sleep(0.5)

    stop = _raylora("jobs", "stop", job_id, "--address", cluster.dashboard, env=cluster.env)
    assert stop.returncode == 0 and f"job {job_id}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    logs = client.get_job_logs(job_id)
    assert "SIGTERM" in logs and "--resume" in logs, logs[-3000:]
    mlflow = MlflowClient(tracking_uri=db)
    experiment = mlflow.get_experiment_by_name("stoppable")
    runs = mlflow.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # The job's driver handled the stop: nothing is left RUNNING, and the runs say why they ended.
    for ended in (parent, child):
        assert (ended.info.status, ended.data.tags["raylora.status"]) == ("KILLED", "INTERRUPTED"), (
            ended.data.tags
        )
    assert mlflow.search_registered_models() == []

    again = _raylora("submit", str(sweep), *where, "--resume", "--follow", env=cluster.env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the same sweep run and trial run went on
    for run_ in runs:
        assert run_.info.run_id in (parent.info.run_id, child.info.run_id) and run_.info.status == "FINISHED"
    reports = _reports(storage, "stoppable")
    steps = [r["step"] for r in reports]
    # Resumed from its checkpoint, not from step 0: every eval step is reported, the first one once. A stop
    # that lands between Tune's record of a report and its save of the sweep's state resumes from the
    # checkpoint before it, and that one report is made again, with the same numbers (the resume is exact).
    assert sorted(set(steps)) == [float(s) for s in range(10, 151, 10)] and steps.count(10.0) == 1, steps
    assert len(steps) - len(set(steps)) <= 1, steps
    by_step: dict[float, float] = {}
    for report in reports:
        loss = by_step.setdefault(report["step"], report["eval_loss"])
        assert report["eval_loss"] == pytest.approx(loss, rel=1e-6), (
            report["step"],
            loss,
            report["eval_loss"],
        )


def test_losing_a_node_mid_trial_resumes_from_checkpoint_and_the_job_succeeds(
    cluster: LocalCluster, tmp_path
):
    storage = tmp_path / "results"
    # Long enough that the loss of the node is noticed (a few seconds) well before the last step.
    steps, eval_every = 160, 10
    sweep = _two_worker_sweep(tmp_path, "nodeloss", "SPREAD", steps=steps, eval_every=eval_every)
    run = _raylora(
        "submit", str(sweep), "--address", cluster.dashboard, "--storage-path", str(storage),
        "--no-mlflow", env=cluster.env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = _job_id(run.stdout)
    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})

    # Once Tune has the first eval report (and so its checkpoint), take node 2 away: kill its raylet.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        results = list((storage / "nodeloss").glob("trial_*/result.json"))
        if results and results[0].read_text().strip():
            break
        assert str(client.get_job_status(job_id)) in ("PENDING", "RUNNING"), client.get_job_logs(job_id)
        time.sleep(0.2)
    else:
        raise AssertionError("no first report within 300 s:\n" + client.get_job_logs(job_id)[-3000:])
    first = _reports(storage, "nodeloss")[0]
    assert first["num_nodes"] == 2  # SPREAD put a worker on each node
    os.kill(cluster.raylet_pid(cluster.nodes[1]), signal.SIGKILL)

    assert _wait_for_end(client, job_id, 400) == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    reports = _reports(storage, "nodeloss")
    steps_seen = [r["step"] for r in reports]
    # Resumed from a checkpoint: no step reported twice (a restart from 0 would report step 10 again).
    assert steps_seen == sorted(set(steps_seen)) and steps_seen[-1] == steps
    assert reports[-1]["num_nodes"] == 1  # the retry ran on the head alone
    assert len(cluster.alive_nodes()) == 1
