"""Packed sweeps on a real local Ray cluster (2 CPUs): Tune stays in charge while an engine holds the base.

The engine is a real Ray actor running `PackedTrainer`; trials relay its reports to Tune, ASHA decides, and
MLflow-free runs keep the test short. On the CPU packing is slower than separate trials (one process does
the work of two); what these tests check is that it computes the same thing and that Tune's decisions,
retries and checkpoints work through it.
"""

from __future__ import annotations

import pytest
import ray
from ray import tune

from raylora.config import ConfigError, demo_config
from raylora.names import EVAL_LOSS, PACK_ENGINE, STEP
from raylora.sweep import Resources, Sweep, experiment_path, run_sweep
from raylora.sweep.packing import (
    AUTO_PACK_MAX_TOKENS,
    _Admission,
    _failed_by,
    auto_pack_reasons,
    engine_prefix,
)
from raylora.sweep.tuner import _fit_pack_to_nodes, _pack_cap
from raylora.tracking import MlflowTracker
from raylora.training import train


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="raylora-tests")
    yield
    ray.shutdown()


def _base(steps: int):
    base = demo_config()
    base.training.max_steps = steps
    base.training.eval_every = 10
    base.training.eval_batches = 2
    base.training.warmup_steps = 2
    return base


class _Last:
    def __init__(self) -> None:
        self.eval_loss: float | None = None

    def report(self, metrics, *, checkpoint_dir=None):
        if EVAL_LOSS in metrics:
            self.eval_loss = metrics[EVAL_LOSS]


def _engines(sweep_name: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(engine_prefix(sweep_name))
    ]


def test_a_packed_sweep_under_asha_trains_what_each_trial_trains_alone(tmp_path):
    # Two good trials first and two hopeless ones, two adapters at a time: ASHA stops the hopeless ones at
    # the first rung (far below the good ones), their adapters leave the pack and the next trials join it.
    # (Of the two good ones, ASHA may stop either at the second rung: in a pack their losses differ in the
    # last bits, so they are not a tie.)
    sweep = Sweep(
        name="packed-asha",
        base=_base(40),
        search_space={"training.learning_rate": tune.grid_search([4e-3, 4e-3, 1e-7, 1e-7])},
        search_alg="grid",
        scheduler="asha",
        grace_period=10,
        reduction_factor=2,
        num_samples=1,
        resources=Resources(workers=1, cpus_per_worker=1),
        storage_path=str(tmp_path / "storage"),
        pack=2,
    )
    tracker = MlflowTracker(
        sweep, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_path=experiment_path(sweep)
    )
    result = run_sweep(sweep, callbacks=[tracker], verbose=0)

    by_lr: dict[float, list] = {}
    for trial in result.trials:
        by_lr.setdefault(trial.config["training.learning_rate"], []).append(trial)
    assert len(result.trials) == 4 and not any(t.status == "FAILED" for t in result.trials), result.table()
    finished = [t for t in by_lr[4e-3] if t.step == 40]
    assert finished, result.table()
    assert any(t.step < 40 for t in by_lr[1e-7]), f"ASHA stopped no hopeless trial early:\n{result.table()}"
    assert len({t.engine for t in result.trials}) == 1 and result.trials[0].engine, result.table()
    assert "engine" in result.table().splitlines()[0]
    assert _engines(sweep.name) == [], "the sweep left its engine running"
    # MLflow says it too: every trial's run carries the engine it shared.
    children = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    )
    engines = {
        run.data.tags["raylora.trial_id"]: run.data.tags.get("raylora.pack_engine") for run in children
    }
    assert engines == {t.trial_id: t.engine for t in result.trials}, engines

    # Exactly what the trial computes alone (fp32 on the CPU: only the order of sums in shared matmuls
    # differs), through Tune, the relay and the engine.
    good = finished[0]
    alone = _Last()
    config = sweep.trial_config(good.config)
    config.training.output_dir = str(tmp_path / "alone")
    train(config, reporter=alone)
    assert good.metric == pytest.approx(alone.eval_loss, rel=1e-5)


class _KillEngineOnce(tune.Callback):
    """Kills the engine (as an OOM killer would) once Tune has registered a trial's first checkpoint."""

    def __init__(self, sweep_name: str) -> None:
        self.sweep_name = sweep_name
        self.killed_at: int | None = None
        self.steps: dict[str, list[int]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.steps.setdefault(trial.trial_id, []).append(int(result[STEP]))
        assert result[PACK_ENGINE]

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.killed_at is None:
            self.killed_at = int(trial.last_result[STEP])
            (name,) = _engines(self.sweep_name)
            ray.kill(ray.get_actor(name))


def test_when_the_engine_dies_its_trials_resume_from_their_checkpoints(tmp_path):
    killer = _KillEngineOnce("packed-crash")
    sweep = Sweep(
        name="packed-crash",
        base=_base(30),
        search_space={"adapter.r": tune.grid_search([4, 8])},
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        max_failures=2,
        resources=Resources(workers=1, cpus_per_worker=1),
        storage_path=str(tmp_path / "storage"),
        pack=2,
    )
    result = run_sweep(sweep, callbacks=[killer], verbose=0)

    assert killer.killed_at == 10
    assert all(t.status == "FINISHED" and t.step == 30 for t in result.trials), result.table()
    # Each trial reports every eval once: a restart from step 0 would report step 10 again.
    assert all(steps == [10, 20, 30] for steps in killer.steps.values()), killer.steps


def test_a_pack_that_cannot_apply_is_refused_with_the_reason(tmp_path):
    base = _base(20)
    varied = {"adapter.r": tune.choice([4, 8]), "data.max_length": tune.choice([64, 128])}
    sweep = Sweep(name="no-pack", base=base, search_space=varied, storage_path=str(tmp_path), pack=True)
    with pytest.raises(
        ConfigError, match=r"`sweep.pack` is True, but the search space varies data.max_length"
    ):
        run_sweep(sweep, verbose=0)
    # An engine that could not fit beside the trials it serves would wait for them forever.
    greedy = Sweep(
        name="greedy-pack",
        base=base,
        resources=Resources(cpus_per_worker=2),
        storage_path=str(tmp_path),
        pack=True,
    )
    with pytest.raises(ConfigError, match=r"an engine needs `resources.cpus_per_worker` \(2\) CPUs"):
        run_sweep(greedy, verbose=0)
    for bad in (-1, None, "yes"):
        with pytest.raises(ConfigError, match=r"`sweep.pack` must be 'auto', true, false or a number"):
            Sweep(name="bad-pack", base=base, pack=bad).validate()


def test_a_gpu_engine_admits_adapters_one_at_a_time_from_measured_steps():
    """Admission from measured steps: with nothing measured, a pack of eight large trials once took all eight
    and ran out of memory on its first step (then again with seven, six...)."""
    gib = 1024**3
    total = 140 * gib  # 0.85 of it is filled: 119 GiB
    admission = _Admission(cap=8)
    assert admission.fits(0, total) == 1
    assert admission.fits(1, total) == 1  # no second adapter before the first has stepped
    admission.learn(active=1, peak_bytes=33 * gib, base_bytes=3 * gib)  # 30 GiB over the base
    assert admission.fits(1, total) == 2
    assert admission.fits(2, total) == 2  # the pair must step before a third joins
    # Two took 70 GiB: the second added 40, more than the first's 30; the next is planned at 40.
    admission.learn(active=2, peak_bytes=73 * gib, base_bytes=3 * gib)
    assert admission.per_adapter_bytes == 40 * gib
    assert admission.fits(2, total) == 3  # 3 + 70 + 40 = 113 <= 119
    # A later step of the pair peaked higher (77 GiB): the second adapter added 47, and 3 + 77 + 47 > 119.
    admission.learn(active=2, peak_bytes=80 * gib, base_bytes=3 * gib)
    assert admission.per_adapter_bytes == 47 * gib
    assert admission.fits(2, total) == 2
    # One of the pair leaves. The one left steps; the device's peak (kept since the pack began) is the pair's.
    admission.learn(active=1, peak_bytes=80 * gib, base_bytes=3 * gib)
    assert admission.fits(1, total) == 2  # a pair stepped before: the slot is taken again
    # A step that ran out of memory: never that many again.
    admission.failed(2)
    assert admission.cap == 1 and admission.fits(1, total) == 1
    # Small trials fill the cap, one join per step.
    small = _Admission(cap=3)
    for active in (1, 2, 3):
        assert small.fits(active - 1, total) == active
        small.learn(active=active, peak_bytes=(3 + 2 * active) * gib, base_bytes=3 * gib)
    assert small.fits(3, total) == 3


def test_a_pack_out_of_memory_fails_only_the_trial_that_joined_last():
    """The pack fitted before its last adapter joined: that trial is retried from its checkpoint and the others
    step on (their step starts over, `tests/test_packed.py`). Any other failure, or a pack of one, fails all."""
    assert _failed_by(["a", "b", "c"], out_of_memory=True) == ["c"]
    assert _failed_by(["a"], out_of_memory=True) == ["a"]
    assert _failed_by(["a", "b", "c"], out_of_memory=False) == ["a", "b", "c"]


def test_pack_auto_packs_small_whole_gpu_sweeps_and_says_why_it_leaves_others_unpacked():
    """The default packs where packing measured faster: two or more small 1-worker trials on whole GPUs."""
    base = _base(20)  # 8 x 128 tokens a micro-batch
    lrs = {"training.learning_rate": tune.choice([1e-3, 2e-3])}
    gpu = Resources(workers=1, cpus_per_worker=1, gpus_per_worker=1)

    def sweep(**changes):
        fields = dict(name="auto", base=base, search_space=lrs, num_samples=2, resources=gpu)
        return Sweep(**{**fields, **changes}).validate()

    assert Sweep(name="default", base=base).pack == "auto"
    assert auto_pack_reasons(sweep()) == []
    assert _pack_cap(sweep()) == (8, [])
    varied = {**lrs, "adapter.r": tune.choice([4, 8]), "training.batch_size": tune.choice([2, 8])}
    assert auto_pack_reasons(sweep(search_space=varied)) == []  # adapters may differ in all of these
    grid = {"training.learning_rate": tune.grid_search([1e-3, 2e-3])}
    assert auto_pack_reasons(sweep(search_space=grid, search_alg="grid", num_samples=1)) == []  # 2 trials

    def why(**changes) -> str:
        reasons = auto_pack_reasons(sweep(**changes))
        assert reasons and _pack_cap(sweep(**changes)) == (None, reasons)  # unpacked, not refused
        return "; ".join(reasons)

    assert "train on CPUs" in why(resources=Resources(workers=1, cpus_per_worker=1))
    assert "0.5 GPU each" in why(resources=Resources(workers=1, cpus_per_worker=1, gpus_per_worker=0.5))
    assert "one trial" in why(num_samples=1)
    assert "4 workers" in why(resources=Resources(workers=4, cpus_per_worker=1, gpus_per_worker=1))
    # A trial whose own micro-batch is large trains faster alone: 40 x 128 tokens, by choice or range.
    assert AUTO_PACK_MAX_TOKENS < 40 * 128
    large = f"up to {40 * 128} tokens"
    assert large in why(search_space={**lrs, "training.batch_size": tune.choice([8, 40])})
    assert large in why(search_space={**lrs, "training.batch_size": tune.randint(8, 40)})
    assert "up to 5120 tokens" in why(base=base.with_overrides({"data.max_length": 640}))
    # What a pack cannot share or compute.
    assert "varies data.max_length" in why(search_space={**lrs, "data.max_length": tune.choice([64, 128])})
    assert "use_dora" in why(search_space={**lrs, "adapter.use_dora": tune.choice([False, True])})


def test_a_pack_is_fitted_to_the_cluster_auto_falls_back_where_true_is_refused():
    """An engine that no node can hold beside its trials would wait for them forever."""
    base = _base(20)
    grid = {"training.learning_rate": tune.grid_search([1e-3, 2e-3])}
    gpu = Resources(workers=1, cpus_per_worker=4, gpus_per_worker=1)
    auto = Sweep(name="auto", base=base, search_space=grid, search_alg="grid", num_samples=1, resources=gpu)
    roomy, tight, no_gpu = {"CPU": 16.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 64.0}
    head = {"CPU": 0.0, "memory": 1e9}  # `ray start --head --num-cpus 0`: no trial lands there
    assert _fit_pack_to_nodes(auto, 8, [], [head, roomy]) == (8, [])
    pack, why = _fit_pack_to_nodes(auto, 8, [], [head, tight])
    assert pack is None and why == [
        "an engine needs `resources.cpus_per_worker` (4) CPUs and 8 x 0.01 for the trials it serves on one node "
        "with a GPU, but the largest has 4"
    ]
    # A packed trial may land on a CPU-only node, where no engine can start: auto does not pack there.
    pack, why = _fit_pack_to_nodes(auto, 8, [], [no_gpu, roomy])
    assert pack is None and "1 node(s) with CPUs and no GPU could take a packed trial" in why[0]
    explicit = Sweep(name="true", base=base, search_space=grid, search_alg="grid", resources=gpu, pack=True)
    with pytest.raises(ConfigError, match=r"`sweep.pack`: an engine needs .* set `Sweep\(pack=False\)`"):
        _fit_pack_to_nodes(explicit, 8, [], [head, tight])
    assert _fit_pack_to_nodes(explicit, 8, [], [no_gpu, roomy]) == (8, [])  # asked for: the trial says where
    assert _fit_pack_to_nodes(explicit, None, ["x"], []) == (None, ["x"])
