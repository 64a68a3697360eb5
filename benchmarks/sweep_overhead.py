"""Sweep overhead: what Ray costs a sweep beyond the training itself, on the in-trial and TorchTrainer paths.

Runs, on a local Ray cluster in this process:
  (a) N tiny 1-worker trials (the loop runs inside the Tune trial), 2 at a time;
  (b) one 2-worker trial (a Ray Train TorchTrainer inside the trial, FSDP2 over gloo).
and prints, per path: the sweep's wall time, the sum of the trials' pure training time (seconds inside
optimizer steps), and the fixed overhead per trial: from Tune starting the trial (driver clock) to the
trial's first optimizer step (the trial's clock; same machine). Set-up inside the loop (model load,
tokenizing) is shown apart, as `setup`: it is the part raylora itself controls.

    python benchmarks/sweep_overhead.py --trials 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import ray
from ray import tune

from raylora import Resources, Sweep, demo_config, run_sweep
from raylora.names import FIRST_STEP_AT, SETUP_TIME_S, TRAIN_TIME_S


class TrialClock(tune.Callback):
    """Driver-side timestamps: when Tune starts each trial, and each trial's last result."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.last: dict[str, dict] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result


def measure(name: str, trials: int, resources: Resources, steps: int, storage: str) -> dict[str, float]:
    base = demo_config()
    base.training.max_steps = steps
    base.training.eval_every = steps
    base.training.eval_batches = 2
    sweep = Sweep(
        name=name,
        base=base,
        search_space={"adapter.r": tune.grid_search([4, 8, 16, 32] * ((trials + 3) // 4))},
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        max_concurrent_trials=2 if resources.workers == 1 else 1,
        resources=resources,
        storage_path=storage,
    )
    sweep.search_space["adapter.r"]["grid_search"] = sweep.search_space["adapter.r"]["grid_search"][:trials]
    clock = TrialClock()
    began = time.time()
    run_sweep(sweep, callbacks=[clock], verbose=0)
    wall = time.time() - began
    overhead = [clock.last[t][FIRST_STEP_AT] - clock.started[t] for t in clock.last]
    setup = [clock.last[t][SETUP_TIME_S] for t in clock.last]
    training = sum(clock.last[t][TRAIN_TIME_S] for t in clock.last)
    return {
        "trials": len(clock.last),
        "wall_s": wall,
        "train_s": training,
        "overhead_median_s": statistics.median(overhead),
        "overhead_first_s": overhead[0] if overhead else float("nan"),
        "overhead_max_s": max(overhead),
        "setup_median_s": statistics.median(setup),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8, help="1-worker trials to run (2 at a time)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per trial")
    args = parser.parse_args(argv)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raylora-bench-") as storage:
        rows.append(
            (
                "in-trial, 1 worker",
                measure("overhead-1w", args.trials, Resources(1, 1.0), args.steps, storage),
            )
        )
        rows.append(
            ("TorchTrainer, 2 workers", measure("overhead-2w", 1, Resources(2, 0.95), args.steps, storage))
        )
    ray.shutdown()

    print(f"\nsweep overhead, {args.steps} steps per trial, tiny-llama on the demo data, 2 CPUs")
    header = f"{'path':<24}{'trials':>7}{'sweep wall s':>14}{'sum train s':>13}{'overhead/trial s (median, first, max)':>40}{'setup s':>9}"
    print(header)
    for label, r in rows:
        spread = f"{r['overhead_median_s']:.1f}, {r['overhead_first_s']:.1f}, {r['overhead_max_s']:.1f}"
        print(
            f"{label:<24}{r['trials']:>7}{r['wall_s']:>14.1f}{r['train_s']:>13.1f}{spread:>40}{r['setup_median_s']:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
