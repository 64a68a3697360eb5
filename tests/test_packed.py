"""Packed training: adapters trained together on one base compute what each computes alone.

Real peft LoRA on the tiny preset, fp32 on the CPU. The tolerance is fixed before the run: 1e-5 relative on
every step's train loss over 50 steps and on the final eval loss. Only the order of fp32 sums inside the
shared matmuls may differ between a packed and a solo step; a wrong row, a mask drawn from another stream,
a mis-normalised loss or a skipped micro-batch moves the loss by far more (1e-3 or more within a few steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from raylora.config import ConfigError, FinetuneConfig, demo_config
from raylora.model import load_base_model
from raylora.names import EVAL_LOSS, STEP, TRAIN_LOSS
from raylora.packed import PackedTrainer
from raylora.training import evaluate_adapter, train

STEPS = 50


class _Losses:
    """A Reporter that keeps the train loss of every step and the last eval loss."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.eval: float | None = None

    def report(self, metrics, *, checkpoint_dir=None):
        if EVAL_LOSS in metrics:
            self.eval = metrics[EVAL_LOSS]
        elif TRAIN_LOSS in metrics:
            self.train[int(metrics[STEP])] = metrics[TRAIN_LOSS]


class _Stopped(Exception):
    pass


class _StopAfter(_Losses):
    """Stops the run (as a crash would) once it has reported the train loss of step `last`."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.last = last

    def report(self, metrics, *, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir=checkpoint_dir)
        if self.last in self.train:
            raise _Stopped


def _config(output_dir: Path, **fields) -> FinetuneConfig:
    config = demo_config()  # trains lm_head in full too: each adapter its own copy
    config.training.max_steps = STEPS
    config.training.eval_every = STEPS
    config.training.log_every = 1
    config.training.checkpoint_every = 0
    config.training.eval_batches = 2
    config.training.output_dir = str(output_dir)
    for path, value in fields.items():
        section, name = path.split("__")
        setattr(getattr(config, section), name, value)
    return config


# Adapters that differ in what a search varies: rank, alpha, targets, dropout, rsLoRA, learning rate and
# schedule, warmup, batch size, accumulation, clipping, label smoothing.
ADAPTERS = {
    "trial_a": {"adapter__r": 4, "adapter__dropout": 0.1, "training__learning_rate": 3e-3},
    "trial_b": {
        "adapter__r": 16,
        "adapter__alpha": 8.0,
        "adapter__target_modules": "attention",
        "adapter__dropout": 0.0,
        "training__learning_rate": 1e-3,
        "training__batch_size": 4,
        "training__lr_schedule": "linear",
        "training__warmup_steps": 0,
    },
    "trial_c": {
        "adapter__r": 8,
        "adapter__dropout": 0.05,
        "adapter__use_rslora": True,
        "training__grad_accum_steps": 2,
        "training__label_smoothing": 0.1,
        "training__max_grad_norm": 0.5,
    },
}


def _train_packed(
    configs: dict[str, FinetuneConfig], steps: int = STEPS
) -> tuple[PackedTrainer, dict[str, dict[int, float]]]:
    trainer = PackedTrainer(next(iter(configs.values())))
    for name, config in configs.items():
        trainer.add(name, config)
    losses: dict[str, dict[int, float]] = {name: {} for name in configs}
    while any(adapter.global_step < steps for adapter in trainer.adapters.values()):
        for adapter in trainer.adapters.values():
            adapter.paused = adapter.global_step >= steps
        for name, metrics in trainer.step().stepped.items():
            losses[name][trainer.adapters[name].global_step] = metrics[TRAIN_LOSS]
    return trainer, losses


def test_packed_adapters_follow_their_solo_runs_step_for_step(tmp_path):
    solo: dict[str, _Losses] = {}
    for name, fields in ADAPTERS.items():
        solo[name] = _Losses()
        train(_config(tmp_path / "solo" / name, **fields), reporter=solo[name])
    configs = {name: _config(tmp_path / "packed" / name, **fields) for name, fields in ADAPTERS.items()}
    trainer, packed = _train_packed(configs)

    for name in ADAPTERS:
        expected = solo[name].train
        assert sorted(packed[name]) == sorted(expected) == list(range(1, STEPS + 1)), name
        for step, loss in expected.items():
            assert packed[name][step] == pytest.approx(loss, rel=1e-5), f"{name} step {step}"
        assert expected[STEPS] < expected[1] - 0.3, (
            f"{name} did not learn: {expected[1]} -> {expected[STEPS]}"
        )
        assert trainer.evaluate(name) == pytest.approx(solo[name].eval, rel=1e-5), name

    # The adapter a pack writes is an ordinary peft adapter: plain peft loads it onto a fresh base, and
    # the eval loss it gives there is the packed eval loss.
    directory = trainer.save_adapter("trial_c", tmp_path / "adapter_c")
    weights = load_file(str(directory / "adapter_model.safetensors"))
    assert weights and all("lora_" in k or "lm_head" in k for k in weights), sorted(weights)[:5]
    loaded = PeftModel.from_pretrained(load_base_model(configs["trial_c"].model, qlora=False), str(directory))
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].use_rslora
    assert evaluate_adapter(configs["trial_c"], directory) == pytest.approx(
        trainer.evaluate("trial_c"), rel=1e-5
    )


def test_a_step_that_fails_midway_is_run_again_as_if_it_had_not_begun(tmp_path):
    """An engine that runs out of memory drops one adapter and steps the others again: their step must start
    over from its first micro-batch with no gradient, and then compute what it would have computed."""
    from raylora.model import decoder_layers, unwrap

    steps = 8
    unfailed, reference = _train_packed(
        {name: _config(tmp_path / "ref" / name, **fields) for name, fields in ADAPTERS.items()}, steps
    )
    configs = {name: _config(tmp_path / "faulty" / name, **fields) for name, fields in ADAPTERS.items()}
    trainer = PackedTrainer(next(iter(configs.values())))
    for name, config in configs.items():
        trainer.add(name, config)
    calls, failures = [0], []
    layer = decoder_layers(unwrap(trainer.model))[-1]

    def run_out_of_memory(module, args, output):
        # Once when trial_c is at its second micro-batch (its accumulated gradient must go), once at a first.
        calls[0] += 1
        if calls[0] in (6, 9):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at forward {calls[0]})")

    layer.register_forward_hook(run_out_of_memory)
    losses: dict[str, dict[int, float]] = {name: {} for name in configs}
    while any(adapter.global_step < steps for adapter in trainer.adapters.values()):
        for adapter in trainer.adapters.values():
            adapter.paused = adapter.global_step >= steps
        try:
            stepped = trainer.step().stepped
        except torch.OutOfMemoryError as error:
            failures.append(str(error))
            continue
        for name, metrics in stepped.items():
            losses[name][trainer.adapters[name].global_step] = metrics[TRAIN_LOSS]
    assert len(failures) == 2, failures
    for name in ADAPTERS:
        assert sorted(losses[name]) == list(range(1, steps + 1)), name
        for step, loss in reference[name].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-6), f"{name} step {step}"
        # The throughput counts what trained: the tokens of the failed steps are not counted.
        assert trainer.adapters[name].window_tokens == unfailed.adapters[name].window_tokens, name


def test_compiled_pack_layers_compute_the_eager_solo_runs_and_compile_once(tmp_path):
    """With `training.compile` on, a pack's decoder layers compile around its LoRA layers (which read the row
    layout at run time): the same losses as the eager solo runs, and an adapter joining compiles nothing new."""
    import torch
    from torch._dynamo.utils import counters

    steps = 6
    fields = {name: {**ADAPTERS[name], "training__max_steps": steps} for name in ("trial_a", "trial_c")}
    solo: dict[str, _Losses] = {}
    for name, extra in fields.items():
        solo[name] = _Losses()
        train(_config(tmp_path / "solo" / name, **extra), reporter=solo[name])  # compile "auto": eager here
    compiled = {
        name: _config(tmp_path / "packed" / name, **extra, training__compile="aot_eager")
        for name, extra in fields.items()
    }
    torch._dynamo.reset()
    trainer, packed = _train_packed(compiled, steps)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "the pack's decoder layers were not compiled"
    for name in fields:
        assert [packed[name][s] for s in range(1, steps + 1)] == pytest.approx(
            [solo[name].train[s] for s in range(1, steps + 1)], rel=1e-5
        ), name

    # Another adapter on the same target modules: its rows run through the graphs already compiled.
    joining = {**fields["trial_a"], "training__learning_rate": 5e-4, "training__max_steps": steps + 2}
    trainer.add("trial_d", _config(tmp_path / "packed" / "trial_d", **joining, training__compile="aot_eager"))
    for adapter in trainer.adapters.values():
        adapter.paused = adapter.name != "trial_d"
    assert [sorted(trainer.step().stepped) for _ in range(2)] == [["trial_d"], ["trial_d"]]
    assert counters["stats"]["unique_graphs"] == graphs


def test_an_adapter_leaves_and_another_joins_without_disturbing_the_rest(tmp_path):
    configs = {name: _config(tmp_path / name, **fields) for name, fields in ADAPTERS.items()}
    trainer = PackedTrainer(configs["trial_a"])
    for name in ("trial_a", "trial_b", "trial_c"):  # trial_a first in: peft's active adapter
        trainer.add(name, configs[name])
    while trainer.adapters["trial_b"].global_step < 2:  # trial_c, accumulating 2 micro-batches: step 1
        trainer.step()
    # The active adapter leaves: peft would then train its new active adapter only.
    trainer.remove("trial_a")
    assert "trial_a" not in trainer.adapters
    assert not any(".trial_a." in name for name, _ in trainer.model.named_parameters())
    losses: dict[str, dict[int, float]] = {"trial_b": {}, "trial_c": {}}
    while min(trainer.adapters[n].global_step for n in losses) < 6:
        for adapter in trainer.adapters.values():
            adapter.paused = adapter.global_step >= 6
        for name, metrics in trainer.step().stepped.items():
            losses[name][trainer.adapters[name].global_step] = metrics[TRAIN_LOSS]

    alone: dict[str, _StopAfter] = {}
    for name in losses:
        alone[name] = _StopAfter(6)  # the same config (its schedule spans 50 steps), stopped after 6
        with pytest.raises(_Stopped):
            train(_config(tmp_path / f"alone_{name}", **ADAPTERS[name]), reporter=alone[name])
        steps = sorted(losses[name])
        assert steps[-1] == 6 and steps[0] <= 3, (name, steps)
        expected = [alone[name].train[s] for s in steps]
        assert [losses[name][s] for s in steps] == pytest.approx(expected, rel=1e-5), name

    # Every adapter leaves (the engine waits for trials); the next one starts from its own initial weights,
    # on the frozen base (not on a leaver's trained head).
    trainer.remove("trial_b")
    trainer.remove("trial_c")
    assert trainer.adapters == {} and trainer.model is None
    trainer.add("trial_d", configs["trial_b"])
    first = [trainer.step().stepped["trial_d"][TRAIN_LOSS] for _ in range(3)]
    assert first == pytest.approx([alone["trial_b"].train[s] for s in range(1, 4)], rel=1e-5)


def test_a_packed_checkpoint_resumes_solo_on_the_same_trajectory(tmp_path):
    fields = ADAPTERS["trial_c"]
    config = _config(tmp_path / "packed", **fields)
    config.training.max_steps = 10
    trainer = PackedTrainer(config)
    trainer.add("trial_c", config)
    while trainer.adapters["trial_c"].global_step < 4:
        trainer.step()
    checkpoint = trainer.save_checkpoint("trial_c")
    assert checkpoint.name == "step-000004"

    full, resumed = _Losses(), _Losses()
    reference = _config(tmp_path / "full", **fields)
    reference.training.max_steps = 10
    train(reference, reporter=full)
    train(config, reporter=resumed, resume_from=checkpoint)
    assert sorted(resumed.train) == list(range(5, 11))
    for step, loss in resumed.train.items():
        assert loss == pytest.approx(full.train[step], rel=1e-5), step


def test_what_cannot_share_the_pack_is_refused_with_the_reason(tmp_path):
    config = _config(tmp_path / "a", **ADAPTERS["trial_a"])
    trainer = PackedTrainer(config)
    other_data = _config(tmp_path / "b", data__max_length=64)
    dora = _config(tmp_path / "c", adapter__use_dora=True)
    embeddings = _config(tmp_path / "d", adapter__modules_to_save=["embed_tokens"])
    with pytest.raises(ConfigError, match="base model, data, seed or numeric set-up differ"):
        trainer.add("trial_b", other_data)
    with pytest.raises(ConfigError, match="use_dora"):
        trainer.add("trial_c", dora)
    with pytest.raises(ConfigError, match=r"modules_to_save` names \['embed_tokens'\]"):
        trainer.add("trial_d", embeddings)
    assert trainer.adapters == {}
