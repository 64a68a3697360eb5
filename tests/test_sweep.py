"""Sweeps on a real local Ray cluster (2 CPUs): the quickstart, ASHA, FSDP2 on 2 workers, crash recovery."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import Result

from raylora.cli import main
from raylora.config import ConfigError, demo_config
from raylora.names import EVAL_LOSS, STEP, TRAIN_LOSS, best_index
from raylora.report import write_report
from raylora.sweep import Resources, Sweep, experiment_path, load_sweep, run_sweep
from raylora.sweep.summary import summarise
from raylora.tracking import MlflowTracker
from raylora.training import train

from servers import S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
RAYLORA = [sys.executable, "-m", "raylora"]
_DASHBOARD: list[str] = []  # the module's Ray dashboard, for the state API


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # The dashboard serves Ray's state API, which counts the worker groups a TorchTrainer started.
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False)
    _DASHBOARD.append(f"http://{context.dashboard_url}")
    yield
    ray.shutdown()


def _small_base(steps: int = 30):
    base = demo_config()
    base.training.max_steps = steps
    base.training.eval_every = 10
    base.training.eval_batches = 2
    base.training.warmup_steps = 2
    return base


def test_quickstart_on_object_storage_logs_every_adapter_registers_a_real_one_and_resumes(tmp_path):
    """The whole quickstart, as a user runs it, with results on an S3 API (moto's server on 127.0.0.1)."""
    s3 = S3Server(tmp_path / "s3").start()
    try:
        db = f"sqlite:///{tmp_path / 'mlflow.db'}"
        command = [*RAYLORA, "run", str(REPO / "sweeps" / "quickstart.py"), "--verbose", "0"]
        command += ["--storage-path", "s3://raylora-test/results", "--tracking-uri", db]
        env = {**os.environ, **s3.env}
        first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "s3://raylora-test/results/quickstart/tuner.pkl" not in first.stderr
        assert "raylora-test/results/quickstart/tuner.pkl" in {
            f"raylora-test/{k}" for k in s3.keys("results/")
        }
        best_line = next(line for line in first.stdout.splitlines() if line.startswith("best trial "))
        best_trial = best_line.split()[2].rstrip(":")
        # Ray reports checkpoints on object storage without their scheme; the adapter is named by its URI.
        assert (
            f"  adapter: s3://raylora-test/results/quickstart/trial_{best_trial}/checkpoint_" in first.stdout
        )

        client = MlflowClient(tracking_uri=db)
        experiment = client.get_experiment_by_name("quickstart")
        (parent,) = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" not in r.data.tags
        ]
        children = client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(children) == 4 and parent.info.status == "FINISHED"
        for child in children:  # every trial's best adapter reached MLflow from the bucket
            assert child.data.tags["raylora.status"] in ("FINISHED", "STOPPED (ASHA)"), child.data.tags
            files = {a.path for a in client.list_artifacts(child.info.run_id, "adapter")}
            assert "adapter/adapter_model.safetensors" in files, (child.info.run_name, files)
        assert parent.data.tags["raylora.best_trial_id"] == best_trial  # the table's best is MLflow's best
        (version,) = client.search_model_versions("name = 'quickstart-adapter'")
        assert version.source == f"runs:/{parent.data.tags['raylora.best_run_id']}/adapter"
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(tmp_path / "registered"), tracking_uri=db
        )
        assert (Path(local) / "adapter_model.safetensors").stat().st_size > 0

        # --resume from the bucket (from another directory: nothing local is needed) continues the same run.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        again = subprocess.run(
            [*command, "--resume"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
        )
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"(parent run {parent.info.run_id})" in again.stdout
        assert len(client.search_runs([experiment.experiment_id])) == 5
        assert len(client.search_model_versions("name = 'quickstart-adapter'")) == 1  # registered once
        assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    finally:
        s3.stop()


def test_asha_stops_clearly_worse_trials_early(tmp_path):
    # Two good learning rates first, then two hopeless ones: at the first rung the bad ones fall below
    # the good ones' median and ASHA stops them.
    sweep = Sweep(
        name="asha",
        base=_small_base(steps=40),
        search_space={"training.learning_rate": tune.grid_search([4e-3, 4e-3, 1e-7, 1e-7])},
        search_alg="grid",
        scheduler="asha",
        grace_period=10,
        reduction_factor=2,
        num_samples=1,
        max_concurrent_trials=2,
        storage_path=str(tmp_path),
    )
    tracker = MlflowTracker(
        sweep, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_path=experiment_path(sweep)
    )
    result = run_sweep(sweep, callbacks=[tracker], verbose=0)
    steps = {t.config["training.learning_rate"]: [] for t in result.trials}
    for t in result.trials:
        steps[t.config["training.learning_rate"]].append(t.step)
    assert all(s == 40 for s in steps[4e-3]), steps
    assert any(s < 40 for s in steps[1e-7]), f"ASHA stopped no bad trial early: {steps}"
    # A stopped trial is called the same in the table and in MLflow; its run is a complete one.
    runs = {
        r.data.tags["raylora.trial_id"]: r
        for r in MlflowClient(tracking_uri=tracker.tracking_uri).search_runs(
            [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
        )
    }
    for trial in result.trials:
        expected = "FINISHED" if trial.step == 40 else "STOPPED (ASHA)"
        row = next(line for line in result.table().splitlines() if line.startswith(trial.trial_id))
        assert trial.status == expected and expected in row, result.table()
        run = runs[trial.trial_id]
        assert run.data.tags["raylora.status"] == expected and run.info.status == "FINISHED"


class KillOnceAfterCheckpoint(tune.Callback):
    """Kills the trial's process (SIGKILL, as an OOM killer would) once Tune has registered its first checkpoint."""

    def __init__(self) -> None:
        self.killed_at: int | None = None
        self.steps: list[int] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.steps.append(int(result[STEP]))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.killed_at is None:
            self.killed_at = int(trial.last_result[STEP])
            os.kill(trial.last_result["pid"], signal.SIGKILL)


def test_a_killed_trial_resumes_from_its_checkpoint(tmp_path):
    killer = KillOnceAfterCheckpoint()
    sweep = Sweep(
        name="crash",
        base=_small_base(steps=30),
        search_space={"adapter.r": 8},
        scheduler="fifo",
        num_samples=1,
        max_failures=2,
        storage_path=str(tmp_path),
    )
    tracker = MlflowTracker(
        sweep, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_path=experiment_path(sweep)
    )
    result = run_sweep(sweep, callbacks=[killer, tracker], verbose=0)

    (trial,) = result.trials
    assert trial.status == "FINISHED" and trial.step == 30, trial
    assert killer.killed_at is not None
    assert killer.killed_at == 10
    # Reports after the kill continue past the checkpoint; a restart from step 0 would report step 10 again.
    assert killer.steps == [10, 20, 30], killer.steps
    # The retried trial continued its own MLflow run: one child run, each eval step logged once.
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    (child,) = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    )
    assert child.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, EVAL_LOSS)] == [10, 20, 30]


def _malformed_copy_of_the_demo_data(path: Path) -> Path:
    """The demo records, one without its response: readable (the pre-flight passes), refused by the loop."""
    lines = (REPO / "raylora" / "demo_data" / "demo.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    del record["output"]
    path.write_text("\n".join([*lines[:3], json.dumps(record), *lines[4:]]) + "\n")
    return path


def test_deterministic_failures_fail_at_once_with_their_reason_and_the_sweep_goes_on(tmp_path):
    base = _small_base(steps=20)
    base.training.max_grad_norm = 0.0
    base.training.warmup_steps = 0
    good = tmp_path / "good.jsonl"
    good.write_text((REPO / "raylora" / "demo_data" / "demo.jsonl").read_text())
    bad = _malformed_copy_of_the_demo_data(tmp_path / "bad.jsonl")
    sweep = Sweep(
        name="nan",
        base=base,
        search_space={
            "training.learning_rate": tune.grid_search([3e-3, 1e4]),
            "data.path": tune.grid_search([str(good), str(bad)]),
        },
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        max_failures=1,  # one retry shows that it trains nothing
        storage_path=str(tmp_path),
    )
    tracker = MlflowTracker(
        sweep, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_path=experiment_path(sweep)
    )
    result = run_sweep(sweep, callbacks=[tracker], verbose=0)
    trials = {
        (t.config["training.learning_rate"], Path(t.config["data.path"]).name): t for t in result.trials
    }
    assert trials[3e-3, "good.jsonl"].status == "FINISHED" and trials[3e-3, "good.jsonl"].step == 20
    assert result.best is trials[3e-3, "good.jsonl"] and not result.all_failed
    diverged = trials[1e4, "good.jsonl"]
    assert diverged.status == "FAILED"
    assert re.fullmatch(
        r"NonFiniteLossError: train loss is (nan|inf) at step \d+; .* \(not retried: .*\)", diverged.error
    ), diverged.error
    for lr in (3e-3, 1e4):  # a record the loop refuses: the first problem, not "... and N more problems"
        refused = trials[lr, "bad.jsonl"]
        assert refused.status == "FAILED" and refused.error.startswith("ConfigError: "), refused.error
        assert "bad.jsonl record 4" in refused.error and "`output`" in refused.error, refused.error
        assert "not retried" in refused.error, refused.error
    # The retries found the recorded failure and trained nothing: said in the table and in MLflow alike.
    rows = {line.split()[0]: line for line in result.table().splitlines()[1:]}
    runs = MlflowClient(tracking_uri=tracker.tracking_uri).search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    )
    reasons = {
        r.data.tags["raylora.trial_id"]: (r.info.status, r.data.tags.get("raylora.reason")) for r in runs
    }
    for trial in result.trials:
        if trial.status == "FAILED":
            assert rows[trial.trial_id].endswith(trial.error)
            assert reasons[trial.trial_id] == ("FAILED", trial.error)


def test_a_sweep_whose_every_trial_failed_exits_non_zero(tmp_path, capsys):
    bad = _malformed_copy_of_the_demo_data(tmp_path / "bad.jsonl")
    sweep_file = tmp_path / "all_bad.py"
    sweep_file.write_text(
        "from raylora import Sweep, demo_config\n"
        "base = demo_config()\n"
        f"base.data.path = {str(bad)!r}\n"
        f"sweep = Sweep(name='all-bad', base=base, scheduler='fifo', num_samples=1, max_failures=0, storage_path={str(tmp_path)!r})\n"
    )
    assert main(["run", str(sweep_file), "--no-mlflow", "--verbose", "0"]) == 1
    assert "every trial failed" in capsys.readouterr().err
    # A sweep that could never run is refused before Ray does anything: `--num-samples 0` is no longer
    # taken for "the default".
    assert main(["run", str(sweep_file), "--no-mlflow", "--num-samples", "0"]) == 2
    assert "`sweep.num_samples` must be a positive integer, got 0" in capsys.readouterr().err


def test_a_diverging_fsdp_trial_fails_at_once(tmp_path):
    """A NaN on 2 workers reaches the trial as Ray Train's WorkerGroupError: still not retried, anywhere."""
    base = _small_base(steps=10)
    base.training.learning_rate = 1e4
    base.training.max_grad_norm = 0.0
    base.training.warmup_steps = 0
    sweep = Sweep(
        name="fsdp-nan",
        base=base,
        search_space={"adapter.r": 8},
        scheduler="fifo",
        num_samples=1,
        max_failures=1,
        resources=Resources(workers=2, cpus_per_worker=0.95),
        storage_path=str(tmp_path),
    )
    started = _train_workers_started()
    (trial,) = run_sweep(sweep, verbose=0).trials
    assert trial.status == "FAILED", trial
    assert re.fullmatch(
        r"NonFiniteLossError: train loss is (nan|inf) at step \d+; .* \(not retried: .*\)", trial.error
    ), trial.error
    # One worker group of two trained, once: Ray Train retried nothing inside the attempt, and Tune's
    # retries raised the recorded failure without starting a TorchTrainer.
    assert _train_workers_started() - started == 2


def _train_workers_started() -> int:
    """Ray Train workers this cluster has started so far, the dead ones included (Ray's state API)."""
    from ray.util.state import list_actors

    workers = list_actors(
        address=_DASHBOARD[-1],  # this test's cluster: the machine may run others
        filters=[("class_name", "=", "RayTrainWorker")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return len(workers)


def _two_workers_against_one(tmp_path: Path, *, qlora: bool, **overrides) -> tuple[float, float]:
    """Eval loss after 10 steps: a 2-worker FSDP2 trial at batch 2 per worker, and one process at batch 4,
    both with 2 micro-batches per step, LoRA dropout on, packed rows and a bf16 base under bf16 autocast."""
    base = _small_base(steps=10).with_overrides(
        {
            "model.dtype": "bfloat16",
            "training.precision": "bf16",
            "training.batch_size": 2,  # per worker: 2 workers x 2 = the 1-worker run's 4
            "training.grad_accum_steps": 2,
            "adapter.dropout": 0.1,
            "adapter.qlora": qlora,
            "data.packing": True,
            **overrides,
        }
    )
    sweep = Sweep(
        name="qlora-fsdp" if qlora else "fsdp",
        base=base,
        search_space={"adapter.r": 8},
        scheduler="fifo",
        num_samples=1,
        max_failures=0,
        # 0.95: the trial's own driver process holds a sliver of a CPU beside the two workers.
        resources=Resources(workers=2, cpus_per_worker=0.95),
        storage_path=str(tmp_path),
    )
    (trial,) = run_sweep(sweep, verbose=0).trials
    assert trial.status == "FINISHED" and trial.step == 10, trial

    single = base.with_overrides({"training.batch_size": 4, "adapter.r": 8})
    single.training.output_dir = str(tmp_path / "single")
    reporter = _LastReport()
    train(single, reporter=reporter)
    return trial.metric, reporter.last[EVAL_LOSS]


def test_two_worker_fsdp_trial_matches_one_worker_at_equal_global_batch(tmp_path):
    # A frozen head (the loss applies it in chunks on both sides) and compiled decoder layers on both sides.
    sharded, single = _two_workers_against_one(
        tmp_path, qlora=False, **{"adapter.modules_to_save": [], "training.compile": "aot_eager"}
    )
    # Same examples, dropout masks and loss normalisation per step: the two runs compute the same function;
    # only bf16 rounding differs, since a matmul over 2 rows rounds otherwise than over 4. Measured 5.14665
    # against 5.14679 (2.6e-5 relative). A wrong shard, a mis-scaled loss, a skipped batch or other masks
    # move it by 1e-2 or more.
    assert sharded == pytest.approx(single, rel=2e-4)


def test_a_qlora_trial_under_fsdp2_matches_one_worker(tmp_path):
    # The head trains here (`modules_to_save`): under FSDP2 the model's own forward applies it.
    sharded, single = _two_workers_against_one(tmp_path, qlora=True)
    # The 4-bit layers reshard after forward and are gathered again for backward; the 4-bit matmul
    # computes in bf16, whose rounding depends on the batch shape: measured 3.86864 against 3.86859 (1.5e-5
    # relative). A wrong shard or a lost gradient moves it by 1e-2 or more (4.78 when eval read the
    # gathered 4-bit weights in bitsandbytes' CPU layout, raylora.shards.pack_for_sharding says why).
    assert sharded == pytest.approx(single, rel=2e-4)
    assert sharded < 5.0  # and it learned: the base starts near ln(259) = 5.56


class _LastReport:
    """A Reporter that keeps the last report."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def report(self, metrics, *, checkpoint_dir=None):
        self.last = metrics


def test_every_shipped_sweep_loads_and_validates():
    files = sorted((REPO / "sweeps").glob("*.py"))
    assert len(files) >= 4
    for file in files:
        sweep = load_sweep(file)
        sweep.validate()
        first = file.read_text().splitlines()[0]
        assert first.startswith("# raylora run sweeps/") or first.startswith("# raylora submit"), file


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ({"adapter.r": tune.choice([])}, {}, "empty tune.choice"),
        ({"training.learning_rate": tune.loguniform(3e-4, 1e-4)}, {}, "inverted or empty bounds"),
        ({"training.learning_rate": tune.uniform(-1e-4, 1e-4)}, {}, "learning rate bound"),
        ({"training.learning_rate": tune.choice([1e-4, 0.0])}, {}, "learning_rate"),
        ({"adapter.target_modules": tune.choice(["attention", "attn-only"])}, {}, "attn-only"),
        ({"adapter.r": tune.grid_search([8, 16])}, {"search_alg": "optuna"}, "cannot take tune.grid_search"),
        (
            {"training.learning_rate": tune.loguniform(1e-4, 3e-4)},
            {"search_alg": "grid"},
            "grid search cannot",
        ),
        ({"adapter.rank": tune.choice([8])}, {}, "not a config field"),
        ({"adapter.r": 8}, {"metric": "val_loss"}, "never reported"),
        # Both ends of a range are values of the field: a dropout range below 0 is no dropout at all.
        (
            {"adapter.dropout": tune.uniform(-0.9, -0.1)},
            {},
            r"bound -0.9: `adapter.dropout` must be in \[0, 1\)",
        ),
        ({"adapter.r": tune.randint(0, 8)}, {}, "bound 0: `adapter.r` must be a positive integer"),
        # Every model the search lists is checked, not only the base.
        ({"model.name_or_path": tune.choice(["tiny-llama", "/no/such/model"])}, {}, "'/no/such/model'"),
        ({"model.name_or_path": tune.sample_from(lambda _: "tiny-llama")}, {}, "random sampler"),
        (
            {"data.path": tune.choice(["demo", "/no/such/data.jsonl"])},
            {},
            "/no/such/data.jsonl.*does not exist",
        ),
        ({"data.split_seed": tune.choice([0, 1])}, {}, "eval split must be the same for every trial"),
    ],
)
def test_bad_search_spaces_are_refused_before_any_trial(space, extra, message):
    sweep = Sweep(name="bad", base=_small_base(), search_space=space, **extra)
    with pytest.raises(ConfigError, match=message):
        sweep.validate(against_model=True)


def test_missing_and_corrupt_data_are_refused_before_any_trial(tmp_path):
    base = _small_base()
    base.data.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="missing.jsonl.*does not exist"):
        Sweep(name="no-data", base=base, storage_path=str(tmp_path)).validate(against_model=True)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    base.data.path = str(corrupt)
    with pytest.raises(ConfigError, match=r"corrupt.jsonl line 2: not valid JSON"):
        run_sweep(Sweep(name="corrupt", base=base, storage_path=str(tmp_path)), verbose=0)
    assert not (tmp_path / "corrupt").exists()


def test_adapters_initialised_from_base_weights_on_several_workers_are_refused_before_any_trial():
    # A sharded trial builds the adapter on a meta base: DoRA and PiSSA-style inits would read no weights.
    dora = _small_base().with_overrides({"adapter.use_dora": True})
    sweep = Sweep(name="dora", base=dora, search_space={"adapter.r": 8}, resources=Resources(workers=2))
    with pytest.raises(ConfigError, match=r"`adapter.use_dora` is true with 2 workers"):
        sweep.validate()
    pissa = _small_base().with_overrides({"adapter.peft_kwargs": {"init_lora_weights": "pissa"}})
    sweep = Sweep(name="pissa", base=pissa, search_space={"adapter.r": 8}, resources=Resources(workers=2))
    with pytest.raises(
        ConfigError, match=r"`adapter.peft_kwargs.init_lora_weights` is 'pissa' with 2 workers"
    ):
        sweep.validate()
    # fp8 base layers shard like bf16 ones now; one worker takes either adapter.
    fp8 = _small_base().with_overrides({"training.fp8": True})
    Sweep(name="fp8", base=fp8, search_space={"adapter.r": 8}, resources=Resources(workers=2)).validate()
    Sweep(name="dora1", base=dora, search_space={"adapter.r": 8}).validate()


def test_a_liger_head_loss_on_cpu_trials_is_refused_before_any_trial():
    liger = _small_base().with_overrides({"training.head_loss": "liger"})
    with pytest.raises(ConfigError, match=r"`training.head_loss` is 'liger', but the trials run on CPUs"):
        Sweep(name="liger", base=liger).validate()
    # On GPUs the trial's worker decides (a head node without liger-kernel may submit to GPU workers with it).
    Sweep(name="liger-gpu", base=liger, resources=Resources(gpus_per_worker=1)).validate()


def test_resources_the_cluster_cannot_satisfy_are_refused(tmp_path):
    sweep = Sweep(
        name="too-big",
        base=_small_base(),
        resources=Resources(workers=4, cpus_per_worker=1),
        storage_path=str(tmp_path),
    )
    with pytest.raises(ConfigError, match="cluster has 2 CPU"):
        run_sweep(sweep, verbose=0)
    gpu = Sweep(
        name="gpu", base=_small_base(), resources=Resources(gpus_per_worker=1), storage_path=str(tmp_path)
    )
    with pytest.raises(ConfigError, match="no node has that much"):
        run_sweep(gpu, verbose=0)
    assert not (tmp_path / "too-big").exists() and not (tmp_path / "gpu").exists()


def test_all_problems_are_listed_at_once():
    sweep = Sweep(
        name="many",
        base=_small_base(),
        search_space={"adapter.r": tune.choice([]), "training.learning_rate": tune.loguniform(1e-3, 1e-4)},
        metric="nope",
    )
    with pytest.raises(ConfigError, match="found 3 problems"):
        sweep.validate()


def test_a_file_without_a_sweep_is_refused(tmp_path):
    empty = tmp_path / "nothing.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no sweep"):
        load_sweep(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.py")


def test_train_loss_history_reaches_tune_and_best_means_one_thing_everywhere(tmp_path):
    seen: list[dict] = []

    class Collect(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append(result)

    # mode "max" makes the first eval the best (the loss falls): "best" cannot pass for "last" anywhere.
    sweep = Sweep(
        name="history",
        base=_small_base(steps=20),
        search_space={"adapter.r": 4},
        mode="max",
        scheduler="fifo",
        num_samples=1,
        storage_path=str(tmp_path),
    )
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(sweep, tracking_uri=db, experiment_path=experiment_path(sweep))
    result = run_sweep(sweep, callbacks=[Collect(), tracker], verbose=0)
    assert [int(r[STEP]) for r in seen] == [10, 20]
    assert all(EVAL_LOSS in r for r in seen)
    history_steps = [int(h[STEP]) for r in seen for h in r["train_history"]]
    assert history_steps == [5, 10, 15, 20] and all(TRAIN_LOSS in h for r in seen for h in r["train_history"])

    first, last = seen[0][EVAL_LOSS], seen[1][EVAL_LOSS]
    assert first > last
    # The table: the trial's best eval, where it was reached, and that eval's checkpoint.
    (trial,) = result.trials
    assert (trial.metric, trial.best_step, trial.step) == (pytest.approx(first), 10, 20)
    assert result.best is trial and json.loads((Path(trial.checkpoint) / "raylora_config.json").read_text())
    best_weights = (Path(trial.checkpoint) / "adapter_model.safetensors").read_bytes()
    # MLflow: the same value, that checkpoint's adapter logged and registered.
    client = MlflowClient(tracking_uri=db)
    parent = client.get_run(tracker.parent_run_id)
    child = client.get_run(parent.data.tags["raylora.best_run_id"])
    assert child.data.metrics["best_eval_loss"] == parent.data.metrics["best_eval_loss"] == round(first, 4)
    logged = Path(client.download_artifacts(child.info.run_id, "adapter", str(tmp_path / "logged")))
    assert (logged / "adapter_model.safetensors").read_bytes() == best_weights
    (version,) = client.search_model_versions("name = 'history-adapter'")
    assert version.run_id == child.info.run_id and version.tags["best_eval_loss"] == f"{round(first, 4):g}"
    # The report: the same best value, from the same history.
    write_report(tracker.parent_run_id, tmp_path / "report", tracking_uri=db)
    with (tmp_path / "report" / "trials.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["best_eval_loss"]) == pytest.approx(first)

    # Started again without --resume, the sweep is refused: it would add its trials to this run's.
    trial_dirs = sorted(p.name for p in (tmp_path / "history").iterdir())
    with pytest.raises(
        ConfigError, match=r"already holds a run of sweep 'history'.*--resume.*another `--storage-path`"
    ):
        run_sweep(
            sweep,
            callbacks=[MlflowTracker(sweep, tracking_uri=db, experiment_path=experiment_path(sweep))],
            verbose=0,
        )
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == trial_dirs
    assert len(client.search_runs([tracker.experiment_id])) == 2  # no second sweep run either


def test_the_best_checkpoint_of_an_fsdp_trial_is_its_best_eval_not_its_last(tmp_path):
    """N-worker trials report checkpoints by path (Ray Train's storage); the summary picks the best eval's."""
    trial_dir = tmp_path / "history" / "trial_00000"
    trial_dir.mkdir(parents=True)
    rows = [
        {
            STEP: 10,
            EVAL_LOSS: 2.5,
            "checkpoint_path": "/results/history-train-00000/checkpoint_a",
            "trial_id": "00000",
        },
        {
            STEP: 20,
            EVAL_LOSS: 2.1,
            "checkpoint_path": "/results/history-train-00000/checkpoint_b",
            "trial_id": "00000",
        },
        {
            STEP: 30,
            EVAL_LOSS: 2.4,
            "checkpoint_path": "/results/history-train-00000/checkpoint_c",
            "trial_id": "00000",
        },
    ]
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (trial_dir / "params.json").write_text(json.dumps({"adapter.r": 4}))
    sweep = Sweep(
        name="history", base=_small_base(steps=30), search_space={"adapter.r": 4}, storage_path=str(tmp_path)
    )
    result = summarise(sweep, [Result.from_path(str(trial_dir))], str(tmp_path / "history"))
    (trial,) = result.trials
    assert (trial.metric, trial.best_step, trial.step, trial.status) == (2.1, 20, 30, "FINISHED")
    assert trial.checkpoint == "/results/history-train-00000/checkpoint_b"
    assert (
        best_index([None, 2.5, float("nan"), 2.1, 2.1, 2.4], "min") == 3
    )  # the earliest of a tie, NaN never
    assert best_index([2.5, 2.1, 2.4], "max") == 0 and best_index([None, float("inf")], "min") is None


def _deep_checkpoint(root: Path) -> tuple[str, int]:
    """A random-init fp32 Llama of 64 layers of width 768 (604M parameters, 2.25 GiB), written with
    `save_pretrained` beside the tiny preset's tokenizer. Big against a Ray worker's own footprint (about
    0.6 GiB), so that what sharding saves shows in the resident set; in many thin layers, since each rank
    also holds a few gathered layers at a time; and a step of 32 tokens stays cheap."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raylora.tiny import materialize_preset

    tokenizer = AutoTokenizer.from_pretrained(materialize_preset("tiny-llama"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=64,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    path = root / "deep-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), sum(p.numel() * p.element_size() for p in model.parameters())


def test_each_of_two_workers_holds_half_the_base_and_a_third_less_memory(tmp_path):
    from raylora.names import PARAMETER_MEMORY_GIB, PEAK_MEMORY_GIB

    path, model_bytes = _deep_checkpoint(tmp_path)
    data = tmp_path / "short.jsonl"
    data.write_text("".join(f'{{"text": "record {i}: the quick brown fox jumps"}}\n' for i in range(40)))
    base = _small_base(steps=1).with_overrides(
        {
            "model.name_or_path": path,
            "data.path": str(data),
            "data.format": "text",
            "data.max_length": 32,
            "adapter.modules_to_save": [],
            "adapter.target_modules": "attention",
            "training.eval_every": 1,
            "training.eval_batches": 1,
            "training.warmup_steps": 0,
        }
    )
    results: dict[int, dict] = {}

    class Collect(tune.Callback):
        def __init__(self, workers: int) -> None:
            self.workers = workers

        def on_trial_result(self, iteration, trials, trial, result, **info):
            results[self.workers] = result

    for workers in (1, 2):
        sweep = Sweep(
            name=f"memory-{workers}",
            base=base.with_overrides({"training.batch_size": 2 // workers}),
            search_space={"adapter.r": 8},
            scheduler="fifo",
            num_samples=1,
            max_failures=0,
            resources=Resources(workers=workers, cpus_per_worker=1.0 if workers == 1 else 0.95),
            storage_path=str(tmp_path / "runs"),
        )
        (trial,) = run_sweep(sweep, callbacks=[Collect(workers)], verbose=0).trials
        assert trial.status == "FINISHED", trial.error

    one, two = results[1], results[2]
    gib = 2**30
    # One worker holds the whole base (and the adapter); each of two workers holds its half of both.
    assert one[PARAMETER_MEMORY_GIB] == pytest.approx(model_bytes / gib, rel=0.01)
    assert two[PARAMETER_MEMORY_GIB] == pytest.approx(one[PARAMETER_MEMORY_GIB] / 2, rel=0.02)
    # The largest rank's peak resident set is at least a third below the single worker's: measured 2.08
    # against 3.28 GiB (each rank also holds its process's own 0.6 GiB and a few gathered layers at a time).
    assert two[PEAK_MEMORY_GIB] < one[PEAK_MEMORY_GIB] * 2 / 3, (one[PEAK_MEMORY_GIB], two[PEAK_MEMORY_GIB])
