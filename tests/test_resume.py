"""Interrupting the sweep driver (Ctrl-C) and continuing with `raylora run --resume`, as a user would."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

SWEEP = """# raylora run {path}
from ray import tune

from raylora import Resources, Sweep, demo_config

base = demo_config()
base.training.max_steps = 100
base.training.eval_every = 10
base.training.eval_batches = 2
sweep = Sweep(
    name="resumable",
    base=base,
    search_space={{"adapter.r": tune.grid_search([4, 8, 16])}},
    search_alg="grid",
    scheduler="fifo",
    num_samples=1,
    max_concurrent_trials=1,
    resources=Resources(workers=1, cpus_per_worker=1),
    storage_path={storage!r},
)
"""


FULL = list(range(10, 101, 10))  # the eval reports of a whole trial


def _steps(trial_dir: Path) -> list[int]:
    result = trial_dir / "result.json"
    if not result.exists():
        return []
    return [int(json.loads(line)["step"]) for line in result.read_text().splitlines() if line.strip()]


def _trial_dirs(experiment: Path) -> list[Path]:
    return sorted(experiment.glob("trial_*")) if experiment.exists() else []


def _raylora(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "raylora.cli", *args]


def _runs(db: str) -> tuple:
    """The sweep's parent run and its trials' runs by trial id, as MLflow has them."""
    client = MlflowClient(tracking_uri=db)
    experiment = client.get_experiment_by_name("resumable")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent, {r.data.tags["raylora.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_an_interrupted_sweep_says_so_and_resumes_its_own_runs_without_rerunning_finished_trials(tmp_path):
    storage = tmp_path / "storage"
    sweep_file = tmp_path / "resumable.py"
    sweep_file.write_text(SWEEP.format(path=sweep_file, storage=str(storage)))
    experiment = storage / "resumable"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _raylora("run", str(sweep_file), "--tracking-uri", db, "--verbose", "0", cwd=tmp_path)

    driver = subprocess.Popen(
        run,
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "first.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Interrupt once the first trial has finished and the second has reported: a sweep caught mid-way.
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            dirs = _trial_dirs(experiment)
            # Two reports from the second trial: its step-10 checkpoint is registered by then.
            if len(dirs) >= 2 and _steps(dirs[0]) == FULL and len(_steps(dirs[1])) >= 2:
                break
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError(
                "the first trial did not finish in time:\n" + (tmp_path / "first.log").read_text()[-3000:]
            )
    finally:
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    # An interrupted sweep is not a finished one: it exits non-zero and says how to go on, in raylora's words.
    assert driver.wait(timeout=120) == 130
    log = (tmp_path / "first.log").read_text()
    hint = shlex.join(["raylora", "run", str(sweep_file), "--tracking-uri", db, "--resume"])
    assert f"Continue it with:\n  {hint}" in log, log[-3000:]
    assert "Tuner.restore" not in log and "best trial" not in log, log[-3000:]
    finished_before = _steps(_trial_dirs(experiment)[0])
    interrupted_before = _steps(_trial_dirs(experiment)[1])
    assert finished_before == FULL and interrupted_before and interrupted_before[-1] < 100, interrupted_before
    # Its runs end KILLED (the interrupted trial's and the sweep's), the finished trial's FINISHED; no adapter
    # of a half-trained sweep is registered.
    parent, trials = _runs(db)
    first_id, second_id = (d.name.removeprefix("trial_") for d in _trial_dirs(experiment)[:2])
    assert (parent.info.status, parent.data.tags["raylora.status"]) == ("KILLED", "INTERRUPTED")
    assert trials[first_id].info.status == "FINISHED"
    assert (trials[second_id].info.status, trials[second_id].data.tags["raylora.status"]) == (
        "KILLED",
        "INTERRUPTED",
    )
    client = MlflowClient(tracking_uri=db)
    assert client.search_registered_models() == []

    resumed = subprocess.run(
        [*run, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    dirs = _trial_dirs(experiment)
    assert len(dirs) == 3
    # The finished trial was not run again: its results are exactly the first run's.
    assert _steps(dirs[0]) == FULL
    # The interrupted trial continued from its last registered checkpoint, not from step 0: after the first
    # run's reports it repeats at most the steps after that checkpoint, then finishes.
    steps = _steps(dirs[1])
    assert steps[: len(interrupted_before)] == interrupted_before, steps
    continued = steps[len(interrupted_before) :]
    assert continued and 10 < continued[0] <= interrupted_before[-1] + 10, steps
    assert continued == list(range(continued[0], 101, 10)), steps
    assert _steps(dirs[2]) == FULL
    assert "best trial" in resumed.stdout and "(resuming)" in resumed.stdout
    # The same sweep run and the same trial runs went on, and ended.
    assert f"(parent run {parent.info.run_id})" in resumed.stdout
    again, trials_after = _runs(db)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert trials_after[second_id].info.run_id == trials[second_id].info.run_id
    assert {r.info.status for r in trials_after.values()} == {"FINISHED"} and len(trials_after) == 3
    assert len(client.search_model_versions("name = 'resumable-adapter'")) == 1

    # Resuming logs where it is told now, not where the first run's (pickled) settings pointed.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    moved = subprocess.run(
        _raylora("run", str(sweep_file), "--tracking-uri", other, "--resume", "--verbose", "0", cwd=tmp_path),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    moved_parent, _ = _runs(other)
    assert f"(parent run {moved_parent.info.run_id}) in {other}" in moved.stdout
    assert "parent run None" not in moved.stdout


def test_the_trainable_keeps_the_name_that_earlier_sweeps_were_started_with():
    # Tune records the trainable's name with a sweep, and `Tuner.restore` refuses a trainable with another
    # one: renaming the trial function would break `--resume` of every sweep started before the rename.
    from ray.tune.experiment import Experiment

    from raylora.sweep.trial import _run_trial

    assert Experiment.get_trainable_name(_run_trial) == "_run_trial"
