"""The driver's side of a running sweep: the callbacks Tune calls, and stopping on a signal.

Tune pickles its whole `RunConfig` into `<storage>/<sweep>/tuner.pkl`, callbacks included, and
`Tuner.restore` brings back those pickled callbacks rather than the ones given to the run that restores.
So Tune is handed one `SweepEvents` relay, which pickles to nothing: it forwards every event to the
callbacks of the run in progress in this process (`attach`). A resumed sweep then logs with the tracking
settings given now, and no tracker (with its store URI and whatever it holds) is written to storage.

The relay also tells the callbacks what only `run_sweep` knows: whether the sweep resumes (`setup(...,
resume=True)`) and whether a signal interrupted it (`on_experiment_end(..., interrupted="SIGINT")`, with
`unfinished`, the ids of the trials it cut short). `stop_on_signals` turns SIGINT (Ctrl-C) and SIGTERM
(`raylora jobs stop`, a batch scheduler) into Tune's own graceful stop: trials stop, the experiment state is
saved for `--resume`, callbacks run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ray import tune

__all__ = ["RunState", "SweepEvents", "stop_on_signals"]

# Tune's trial states in which a trial has not ended: an interrupted sweep cut it short.
_UNFINISHED = ("RUNNING", "PAUSED", "PENDING")


@dataclass
class RunState:
    """One `run_sweep` call as its callbacks see it."""

    callbacks: list[Any]
    resume: bool = False
    interrupted: str | None = None  # the signal's name
    unfinished: set[str] = field(default_factory=set)  # trials cut short by the interruption


class SweepEvents(tune.Callback):
    """The callback Tune keeps: forwards each event to the callbacks of the run in progress (`attach`)."""

    _run: ClassVar[RunState | None] = None

    @classmethod
    @contextlib.contextmanager
    def attach(cls, run: RunState) -> Iterator[RunState]:
        """Route Tune's events to `run.callbacks` while the block runs (one sweep at a time per process)."""
        if cls._run is not None:
            raise RuntimeError("a sweep is already running in this process; run one sweep at a time")
        cls._run = run
        try:
            yield run
        finally:
            cls._run = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # nothing of the callbacks reaches tuner.pkl

    def __setstate__(self, state: dict[str, Any]) -> None:
        pass

    def _each(self, hook: str, **kwargs: Any) -> None:
        run = SweepEvents._run
        for callback in run.callbacks if run is not None else ():
            getattr(callback, hook)(**kwargs)

    def setup(self, **info: Any) -> None:
        run = SweepEvents._run
        self._each("setup", **info, resume=bool(run and run.resume))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._each("on_step_begin", iteration=iteration, trials=trials, **info)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        run = SweepEvents._run
        if run is not None and run.interrupted is None:
            # Tune marks the trials it stops on an interruption TERMINATED before the callbacks hear of it: the
            # state of the last step says which ones had not ended.
            run.unfinished = {
                t.trial_id
                for t in trials
                if t.status in _UNFINISHED and (t.status != "PENDING" or t.last_result)
            }
        self._each("on_step_end", iteration=iteration, trials=trials, **info)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._each("on_trial_start", iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._each("on_trial_restore", iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_save(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._each("on_trial_save", iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        self._each("on_trial_result", iteration=iteration, trials=trials, trial=trial, result=result, **info)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._each("on_trial_complete", iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._each("on_trial_recover", iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._each("on_trial_error", iteration=iteration, trials=trials, trial=trial, **info)

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info: Any) -> None:
        self._each(
            "on_checkpoint", iteration=iteration, trials=trials, trial=trial, checkpoint=checkpoint, **info
        )

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        run = SweepEvents._run
        interrupted = run.interrupted if run is not None else None
        unfinished = set(run.unfinished) if run is not None and interrupted else set()
        self._each("on_experiment_end", trials=trials, interrupted=interrupted, unfinished=unfinished, **info)


class _HideTunesRestoreHint(logging.Filter):
    """Tune ends an interrupted run with `Tuner.restore(...)`, which is not how a raylora sweep resumes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def stop_on_signals(run: RunState) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM stop the sweep as Tune stops it on Ctrl-C, and are remembered.

    The first signal asks Tune to stop (it stops the trials, saves the experiment for `--resume` and runs
    the callbacks); a second one stops at once. Only the main thread can handle signals: elsewhere the
    block runs without this.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    # Tune would install its own SIGINT handler over ours and swallow the signal; it always listens to
    # SIGUSR1 for the same graceful stop, which ours triggers.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    hint = _HideTunesRestoreHint()
    tune_logger = logging.getLogger("ray.tune.tune")

    def handler(signum: int, frame: Any) -> None:
        if run.interrupted is not None:
            raise KeyboardInterrupt  # a second signal: no more waiting
        run.interrupted = signal.Signals(signum).name
        print(
            f"\nraylora: {run.interrupted}: stopping the sweep; its state is saved so that `raylora run ... "
            "--resume` continues it (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        tunes_stop = signal.getsignal(signal.SIGUSR1)
        if not callable(tunes_stop):  # Tune is not running yet (or any more): nothing to stop gracefully
            raise KeyboardInterrupt
        tunes_stop(signal.SIGUSR1, frame)

    for sig in previous:
        signal.signal(sig, handler)
    tune_logger.addFilter(hint)
    try:
        yield
    finally:
        tune_logger.removeFilter(hint)
        for sig, old in previous.items():
            signal.signal(sig, old)
        if tune_sigint is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_sigint
