"""Interrupting the sweep driver (Ctrl-C) and continuing with `raylora run --resume`, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    storage = tmp_path / "storage"
    sweep_file = tmp_path / "resumable.py"
    sweep_file.write_text(SWEEP.format(path=sweep_file, storage=str(storage)))
    experiment = storage / "resumable"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    driver = subprocess.Popen(
        _raylora("run", str(sweep_file), "--no-mlflow", "--verbose", "0", cwd=tmp_path),
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
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    driver.wait(timeout=120)
    finished_before = _steps(_trial_dirs(experiment)[0])
    interrupted_before = _steps(_trial_dirs(experiment)[1])
    assert finished_before == FULL and interrupted_before and interrupted_before[-1] < 100, interrupted_before

    resumed = subprocess.run(
        _raylora("run", str(sweep_file), "--no-mlflow", "--resume", "--verbose", "0", cwd=tmp_path),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
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


def test_the_trainable_keeps_the_name_that_earlier_sweeps_were_started_with():
    # Tune records the trainable's name with a sweep, and `Tuner.restore` refuses a trainable with another
    # one: renaming the trial function would break `--resume` of every sweep started before the rename.
    from ray.tune.experiment import Experiment

    from raylora.sweep.trial import _run_trial

    assert Experiment.get_trainable_name(_run_trial) == "_run_trial"
