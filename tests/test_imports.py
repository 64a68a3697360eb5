"""What importing raylora costs: the CLI, a job submission and a sweep driver load no torch until they train.

Each check runs in a fresh interpreter: this test session has long since imported torch and Ray.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "ray")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


@pytest.mark.parametrize("module", ["raylora", "raylora.sweep", "raylora.jobs", "raylora.cli"])
def test_importing_loads_no_torch_transformers_or_ray(module):
    loaded = _loaded_after(f"import {module}")
    assert not [name for name in HEAVY if name in loaded]


def test_the_public_api_imports_as_before_and_train_is_still_the_function():
    code = """
from raylora.sweep import (
    ALPHA_RATIO, Resources, Sweep, SweepResult, TrialSummary, experiment_path, load_sweep, run_sweep, write_summary,
)
import raylora
from raylora import Resources as R, Sweep as S, SweepResult as SR, load_sweep as ls, run_sweep as rs
assert (R, S, SR, ls, rs) == (Resources, Sweep, SweepResult, load_sweep, run_sweep)
import raylora.training                  # the module that defines them
from raylora.training import TrainResult, train
from raylora import TrainResult as TR, train as t
assert t is train and raylora.train is train and TR is TrainResult, (t, raylora.train)
"""
    _loaded_after(code)
