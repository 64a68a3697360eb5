"""Sweeps: a `Sweep` written in plain Python, searched by Ray Tune, each trial one run of `raylora.training.train`.

Flow: `Sweep` (the search space over `FinetuneConfig` fields, by dotted path) -> `run_sweep` builds a Ray
Tune `Tuner` -> one trial per sampled config -> `_run_trial` -> a `SweepResult`. One module per concern:

- `spec`: `Sweep` and `Resources`, their checks (all at once, no cluster needed), `load_sweep`;
- `tuner`: `run_sweep` and `experiment_path`: Ray, storage, the `Tuner` and its `TuneConfig`;
- `cluster`: what the cluster must offer before any trial starts (resources, shared storage);
- `events`: the driver's side of a running sweep: the callbacks Tune calls (never pickled into storage) and
  stopping on SIGINT/SIGTERM so that `--resume` continues;
- `trial`: the Tune trial function, in-process for 1 worker, a `TorchTrainer` for N; failures that would
  repeat are recorded and not retried;
- `summary`: `TrialSummary`, `SweepResult` and its table, `write_summary`.

This package re-exports the public names; its modules import each other by module path, never through
here. Importing it loads no torch, transformers or Ray: a CLI or a job submission that only reads a
sweep file does not pay for them.
"""

from raylora.sweep.spec import ALPHA_RATIO, Resources, Sweep, load_sweep
from raylora.sweep.summary import SweepResult, TrialSummary, write_summary
from raylora.sweep.tuner import experiment_path, run_sweep

__all__ = [
    "ALPHA_RATIO",
    "Resources",
    "Sweep",
    "SweepResult",
    "TrialSummary",
    "experiment_path",
    "load_sweep",
    "run_sweep",
    "write_summary",
]
