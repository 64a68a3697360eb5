"""Sweeps on a real local Ray cluster (2 CPUs): the quickstart, ASHA, FSDP2 on 2 workers, crash recovery."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from raylora.config import ConfigError, demo_config
from raylora.names import EVAL_LOSS, STEP, TRAIN_LOSS
from raylora.sweep import Resources, Sweep, experiment_path, load_sweep, run_sweep
from raylora.tracking import MlflowTracker
from raylora.training import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _small_base(steps: int = 30):
    base = demo_config()
    base.training.max_steps = steps
    base.training.eval_every = 10
    base.training.eval_batches = 2
    base.training.warmup_steps = 2
    return base


def test_quickstart_runs_and_names_the_lowest_eval_loss_best(tmp_path):
    sweep = load_sweep(REPO / "sweeps" / "quickstart.py")
    sweep.storage_path = str(tmp_path)
    result = run_sweep(sweep, verbose=0)

    assert len(result.trials) == 4 and not any(t.status == "ERROR" for t in result.trials)
    finished = [t for t in result.trials if t.metric is not None]
    assert result.best is min(finished, key=lambda t: t.metric)
    assert result.best.checkpoint and (Path(result.best.checkpoint) / "adapter_model.safetensors").exists()
    table = result.table()
    assert result.best.trial_id in table.splitlines()[1]  # best first


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
    result = run_sweep(sweep, verbose=0)
    steps = {t.config["training.learning_rate"]: [] for t in result.trials}
    for t in result.trials:
        steps[t.config["training.learning_rate"]].append(t.step)
    assert all(s == 40 for s in steps[4e-3]), steps
    assert any(s < 40 for s in steps[1e-7]), f"ASHA stopped no bad trial early: {steps}"


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
    assert trial.status != "ERROR" and trial.step == 30, trial
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


def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path):
    base = _small_base(steps=20)
    base.training.max_grad_norm = 0.0
    base.training.warmup_steps = 0
    sweep = Sweep(
        name="nan",
        base=base,
        search_space={"training.learning_rate": tune.grid_search([3e-3, 1e4])},
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        max_failures=2,
        storage_path=str(tmp_path),
    )
    result = run_sweep(sweep, verbose=0)
    by_lr = {t.config["training.learning_rate"]: t for t in result.trials}
    assert by_lr[3e-3].status != "ERROR" and by_lr[3e-3].step == 20
    failed = by_lr[1e4]
    assert (
        failed.status == "ERROR" and "NonFiniteLossError" in failed.error and "train loss is" in failed.error
    )
    assert result.best is by_lr[3e-3] and not result.all_failed
    # A NaN is deterministic for its config: Tune's retries re-raise the recorded divergence at once
    # instead of training again, so the final error still names the step where the loss diverged.
    assert re.search(r"train loss is (nan|inf) at step \d+", failed.error), failed.error


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
    assert trial.status != "ERROR" and trial.step == 10, trial

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
    ],
)
def test_bad_search_spaces_are_refused_before_any_trial(space, extra, message):
    sweep = Sweep(name="bad", base=_small_base(), search_space=space, **extra)
    with pytest.raises(ConfigError, match=message):
        sweep.validate(against_model=True)


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


def test_train_loss_history_reaches_tune_with_each_eval(tmp_path):
    seen: list[dict] = []

    class Collect(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append(result)

    sweep = Sweep(
        name="history",
        base=_small_base(steps=20),
        search_space={"adapter.r": 4},
        scheduler="fifo",
        num_samples=1,
        storage_path=str(tmp_path),
    )
    run_sweep(sweep, callbacks=[Collect()], verbose=0)
    assert [int(r[STEP]) for r in seen] == [10, 20]
    assert all(EVAL_LOSS in r for r in seen)
    history_steps = [int(h[STEP]) for r in seen for h in r["train_history"]]
    assert history_steps == [5, 10, 15, 20] and all(TRAIN_LOSS in h for r in seen for h in r["train_history"])


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
        assert trial.status != "ERROR", trial.error

    one, two = results[1], results[2]
    gib = 2**30
    # One worker holds the whole base (and the adapter); each of two workers holds its half of both.
    assert one[PARAMETER_MEMORY_GIB] == pytest.approx(model_bytes / gib, rel=0.01)
    assert two[PARAMETER_MEMORY_GIB] == pytest.approx(one[PARAMETER_MEMORY_GIB] / 2, rel=0.02)
    # The largest rank's peak resident set is at least a third below the single worker's: measured 2.08
    # against 3.28 GiB (each rank also holds its process's own 0.6 GiB and a few gathered layers at a time).
    assert two[PEAK_MEMORY_GIB] < one[PEAK_MEMORY_GIB] * 2 / 3, (one[PEAK_MEMORY_GIB], two[PEAK_MEMORY_GIB])
