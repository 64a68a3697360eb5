"""What a run leaves on disk, and what it accepts to continue: no secret in any file, no mixed runs, resumes
that continue every counter, checkpoints written whole.

Real training of the tiny preset on the CPU, a handful of steps each.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylora.checkpoint import check_output_dir, latest_checkpoint
from raylora.cli import main
from raylora.config import ConfigError, FinetuneConfig, demo_config
from raylora.names import (
    CHECKPOINT_STATE_FILE,
    EVAL_LOSS,
    LEARNING_RATE,
    METRICS_FILE,
    STEP,
    TOKENS_SEEN,
    TRAIN_LOSS,
    TRAIN_TIME_S,
    WALL_TIME_S,
)
from raylora.recipe import lr_schedule
from raylora.training import ConsoleReporter, train

ENV_CANARY = "hf_envCanary0123456789"
CONFIG_CANARY = "hf_configCanary9876543210"


def _config(output_dir: Path, *, steps: int = 4, every: int = 2, data: Path | None = None) -> FinetuneConfig:
    config = demo_config()
    config.training.output_dir = str(output_dir)
    config.training.max_steps = steps
    config.training.eval_every = every
    config.training.checkpoint_every = every
    config.training.log_every = 1
    config.training.warmup_steps = 1
    config.training.eval_batches = 1
    if data is not None:
        config.data.path = str(data)
    return config


class _Quiet:
    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        pass


class _Crash(Exception):
    pass


class _CrashingConsole(ConsoleReporter):
    """The console reporter of a process killed once it has written the train report of step `at`."""

    def __init__(self, config: FinetuneConfig, at: int) -> None:
        super().__init__(config, show_progress=False)
        self._at = at

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        super().report(metrics, checkpoint_dir=checkpoint_dir)
        if int(metrics[STEP]) == self._at:
            raise _Crash


def _rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]


def test_no_secret_reaches_any_file_of_a_run_or_the_dump(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", ENV_CANARY)
    out = tmp_path / "run"
    config = _config(out)
    config.model.token = CONFIG_CANARY
    train(config)  # the console reporter: metrics.jsonl too
    config.training.max_steps = 6  # and a resumed run, given the token again
    result = train(config, resume_from=latest_checkpoint(out))
    assert result.step == 6
    files = [f for f in out.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {CHECKPOINT_STATE_FILE, "raylora_config.json", METRICS_FILE, "raylora_run.json"} <= names
    for file in files:  # every byte, pickles included
        content = file.read_bytes()
        assert CONFIG_CANARY.encode() not in content and ENV_CANARY.encode() not in content, file
    saved = json.loads((Path(result.adapter_dir) / "raylora_config.json").read_text())
    assert saved["model"]["token"] is None  # read back, it falls back to HF_TOKEN, never to a mask

    assert main(["train", "--set", f"model.token={CONFIG_CANARY}", "--dump"]) == 0
    dumped = capsys.readouterr()
    assert CONFIG_CANARY not in dumped.out and "--include-secrets" in dumped.err
    assert main(["train", "--set", f"model.token={CONFIG_CANARY}", "--dump", "--include-secrets"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["token"] == CONFIG_CANARY


def test_runs_never_mix_in_one_output_dir(tmp_path, capsys):
    out = tmp_path / "run"
    config = _config(out, steps=2)
    first = train(config, reporter=_Quiet())
    checkpoint = latest_checkpoint(out)
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}

    other = _config(out, steps=2)
    other.adapter.r = 4
    with pytest.raises(ConfigError, match=r"holds the run started .* differs in adapter\.r: 16 -> 4") as info:
        train(other, reporter=_Quiet())
    assert "Pick another `training.output_dir`" in str(info.value)
    with pytest.raises(ConfigError, match=r"already holds .* of this config: continue it from step-000002"):
        train(_config(out, steps=2), reporter=_Quiet())
    changed_lr = _config(out, steps=4)
    changed_lr.training.learning_rate = 1e-3
    with pytest.raises(ConfigError, match=r"training\.learning_rate: 0\.003 -> 0\.001"):
        train(changed_lr, resume_from=checkpoint, reporter=_Quiet())
    # A checkpoint of another run, resumed into a fresh directory: refused by name, not a size-mismatch trace.
    other.training.output_dir = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"belongs to another run: it differs in adapter\.r: 16 -> 4"):
        train(other, resume_from=checkpoint, reporter=_Quiet())
    with pytest.raises(ConfigError, match=r"workers: 1 -> 2"):
        check_output_dir(_config(out, steps=4), world_size=2, resume_from=checkpoint)
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # nothing touched

    # Resuming a finished run trains nothing and says so, with its real eval loss (no NaN).
    again = train(_config(out, steps=2), resume_from=checkpoint, reporter=_Quiet())
    assert again.start_step == again.step == 2 and again.eval_loss == pytest.approx(first.eval_loss, rel=1e-6)
    argv = ["train", "--output-dir", str(out), "--resume"]
    for setting in ("max_steps=2", "eval_every=2", "checkpoint_every=2", "log_every=1", "warmup_steps=1"):
        argv += ["--set", f"training.{setting}"]
    assert main([*argv, "--set", "training.eval_batches=1"]) == 0
    printed = capsys.readouterr().out
    assert "already finished" in printed and "nan" not in printed and "training.max_steps=4" in printed


def test_a_resume_continues_counters_and_metrics_without_duplicates(tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(Path(__file__).parents[1] / "raylora" / "demo_data" / "demo.jsonl", data)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(_config(full_dir, steps=8, every=4, data=data))
    cut = _config(cut_dir, steps=8, every=4, data=data)
    with pytest.raises(_Crash):  # killed after step 6, two train reports past its step-4 checkpoint
        train(cut, reporter=_CrashingConsole(cut, at=6))
    written = (cut_dir / METRICS_FILE).read_bytes()

    # A resume that fails in set-up (the data went bad) leaves the metrics as they were.
    data_bytes = data.read_bytes()
    data.write_text("{not json\n")
    with pytest.raises(ConfigError, match="data.jsonl"):
        train(cut, resume_from=latest_checkpoint(cut_dir))
    assert (cut_dir / METRICS_FILE).read_bytes() == written
    data.write_bytes(data_bytes)

    train(cut, resume_from=latest_checkpoint(cut_dir))
    rows, full = _rows(cut_dir), _rows(full_dir)
    keys = [(r[STEP], EVAL_LOSS in r) for r in rows]
    assert keys == [(r[STEP], EVAL_LOSS in r) for r in full], keys  # one row per report, none twice
    train_rows = [r for r in rows if EVAL_LOSS not in r]
    full_train = [r for r in full if EVAL_LOSS not in r]
    # tokens_seen continues from the checkpoint: the same count as the uninterrupted run at every step.
    assert [r[TOKENS_SEEN] for r in train_rows] == [r[TOKENS_SEEN] for r in full_train]
    for key in (TRAIN_TIME_S, WALL_TIME_S):
        series = [r[key] for r in rows if key in r]
        assert series == sorted(series) and series[0] > 0, (key, series)
    # The logged lr is the one the step used: step k ran at the schedule's factor for k - 1.
    factor = lr_schedule(cut.training)
    for row in train_rows:
        expected = cut.training.learning_rate * factor(int(row[STEP]) - 1)
        assert row[LEARNING_RATE] == pytest.approx(expected, rel=1e-12), row[STEP]
    assert [r[TRAIN_LOSS] for r in train_rows] == pytest.approx([r[TRAIN_LOSS] for r in full_train], rel=1e-4)


def test_a_resumed_attempt_replaces_the_checkpoints_of_a_later_one_and_skips_a_damaged_one(tmp_path, caplog):
    out, saved = tmp_path / "run", tmp_path / "saved-step-2"

    class KeepFirst(_Quiet):
        def report(self, metrics, *, checkpoint_dir=None):
            if checkpoint_dir and not saved.exists():
                shutil.copytree(checkpoint_dir, saved)

    config = _config(out, steps=6, every=2)
    train(config, reporter=KeepFirst())
    assert latest_checkpoint(out).endswith("step-000006")

    class CrashAtCheckpoint(_Quiet):
        def report(self, metrics, *, checkpoint_dir=None):
            if checkpoint_dir:
                raise _Crash

    # An attempt from the saved step-2 checkpoint writes step 4, then dies: its step 4 is the latest, and the
    # earlier attempt's step 6 (which it would recompute) is gone.
    with pytest.raises(_Crash):
        train(config, resume_from=saved, reporter=CrashAtCheckpoint())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]

    # A checkpoint damaged after it was written is skipped with a warning; the one before it is used.
    train(config, resume_from=latest_checkpoint(out), reporter=_Quiet())
    state = out / "checkpoints" / "step-000006" / CHECKPOINT_STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="raylora.checkpoint"):
        assert latest_checkpoint(out).endswith("step-000004")
    assert "skipping checkpoint" in caplog.text and "step-000006" in caplog.text


def test_a_full_disk_is_named_and_leaves_the_last_checkpoint_whole(tmp_path):
    """A real full disk: a 2.5 MiB tmpfs in a private mount namespace (`unshare`, no privileges needed), where
    the step-2 checkpoint fits and the step-4 one does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = mount / "run"
    report = tmp_path / "after.json"
    check = (
        "import json, sys; from pathlib import Path; from raylora.checkpoint import latest_checkpoint; "
        f"out = Path({str(out)!r}); "
        "names = sorted(p.name for p in (out / 'checkpoints').iterdir()); "
        f"Path({str(report)!r}).write_text(json.dumps([names, latest_checkpoint(out)]))"
    )
    train_cmd = [sys.executable, "-m", "raylora.cli", "train", "--output-dir", str(out)]
    for setting in ("max_steps=6", "eval_every=2", "checkpoint_every=2", "eval_batches=1", "warmup_steps=1"):
        train_cmd += ["--set", f"training.{setting}"]
    script = (
        f"mount -t tmpfs -o size=2560k tmpfs {mount} && {subprocess.list2cmdline(train_cmd)}; "
        f"echo rc=$?; {sys.executable} -c {json.dumps(check)}"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "rc=1" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert "raylora: error: the disk holding" in done.stderr and "is full" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    names, latest = json.loads(report.read_text())
    assert names == ["step-000002"], names  # the failed step-4 write left nothing, not even a temporary
    assert latest.endswith("step-000002")


def test_peak_memory_is_this_run_s_own_not_the_process_s(tmp_path):
    # An earlier trial in the same (reused) process peaked high; this run's figure does not inherit it.
    ballast = torch.ones(2 * 2**30 // 4)  # 2 GiB, touched
    del ballast
    rss = _current_rss_gib()
    reports = []

    class Keep(_Quiet):
        def report(self, metrics, *, checkpoint_dir=None):
            reports.append(metrics)

    train(_config(tmp_path / "run", steps=2), reporter=Keep())
    peak = max(r["peak_memory_gib"] for r in reports if "peak_memory_gib" in r)
    assert rss * 0.9 < peak < rss + 1.0, (rss, peak)


def _current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise AssertionError("no VmRSS in /proc/self/status")
