"""The training loop on the tiny preset and the demo data: real torch, peft and bitsandbytes on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylora.config import ConfigError, FinetuneConfig, demo_config
from raylora.model import load_base_model
from raylora.names import EVAL_LOSS, STEP, TRAIN_LOSS, TRAINABLE_PARAMS
from raylora.training import (
    NonFiniteLossError,
    evaluate_adapter,
    latest_checkpoint,
    train,
)


class RecordingReporter:
    """A real Reporter: keeps every report, as a console or Tune reporter would receive them."""

    def __init__(self) -> None:
        self.reports: list[tuple[dict[str, float], str | None]] = []

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        self.reports.append((dict(metrics), checkpoint_dir))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [
            (int(m[STEP]), m[key])
            for m, _ in self.reports
            if key in m and (key != TRAIN_LOSS or EVAL_LOSS not in m)
        ]


def _config(tmp_path: Path, **training) -> FinetuneConfig:
    config = demo_config()
    config.training.output_dir = str(tmp_path / "run")
    config.training.max_steps = 40
    config.training.eval_every = 20
    config.training.log_every = 5
    config.training.checkpoint_every = 20
    config.training.eval_batches = 4
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


def _falls(reporter: RecordingReporter) -> tuple[float, float]:
    losses = [loss for _, loss in reporter.series(TRAIN_LOSS)]
    return losses[0], losses[-1]


def test_lora_loss_falls_and_writes_the_adapter(tmp_path):
    reporter = RecordingReporter()
    result = train(_config(tmp_path), reporter=reporter)

    first, last = _falls(reporter)
    assert last < first - 0.5, f"train loss did not fall enough: {first:.3f} -> {last:.3f}"
    evals = reporter.series(EVAL_LOSS)
    assert [s for s, _ in evals] == [20, 40] and evals[-1][1] < evals[0][1]
    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (adapter / "tokenizer.json").exists() and (adapter / "raylora_config.json").exists()
    # Only adapter weights are saved (LoRA pairs and the demo's fully trained lm_head): nothing of the frozen base.
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all("lora_" in key or "lm_head" in key for key in saved), sorted(saved)
    assert not any("embed_tokens" in key or "norm" in key for key in saved)
    assert reporter.reports[0][0][TRAINABLE_PARAMS] == result.parameters.trainable


def test_qlora_loss_falls_on_a_4bit_base(tmp_path):
    config = _config(tmp_path, max_steps=30, eval_every=30, checkpoint_every=0)
    config.adapter.qlora = True
    reporter = RecordingReporter()
    result = train(config, reporter=reporter)

    first, last = _falls(reporter)
    assert last < first - 0.3, f"QLoRA train loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert math.isfinite(result.eval_loss)


def test_only_adapter_parameters_change(tmp_path, tiny_llama_path):
    config = _config(tmp_path, max_steps=10, eval_every=10, checkpoint_every=0)
    before = load_base_model(config.model, qlora=False).state_dict()
    result = train(config, reporter=RecordingReporter())

    from peft import PeftModel

    trained = PeftModel.from_pretrained(load_base_model(config.model, qlora=False), result.adapter_dir)
    compared = 0
    for name, tensor in trained.get_base_model().state_dict().items():
        if "lora_" in name or "modules_to_save" in name:  # the adapter's own weights
            continue
        base_name = name.replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(tensor, before[base_name]), f"base weight {base_name} changed"
        compared += 1
    assert compared == len(before)
    lora_b = [t for n, t in trained.state_dict().items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), (
        "LoRA B stayed at its zero init: nothing trained"
    )


def test_saved_adapter_reproduces_eval_loss_on_a_fresh_base(tmp_path):
    config = _config(tmp_path, max_steps=20, eval_every=20, checkpoint_every=0)
    result = train(config, reporter=RecordingReporter())
    assert evaluate_adapter(config, result.adapter_dir) == pytest.approx(result.eval_loss, rel=1e-5)


class _Crash(Exception):
    pass


class CrashAfterCheckpoint(RecordingReporter):
    """Stops the run like a killed process would, right after the first checkpoint is reported."""

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        super().report(metrics, checkpoint_dir=checkpoint_dir)
        if checkpoint_dir:
            raise _Crash(checkpoint_dir)


def test_resume_continues_at_the_saved_step_with_the_same_trajectory(tmp_path):
    full = RecordingReporter()
    train(_config(tmp_path / "full"), reporter=full)

    config = _config(tmp_path / "cut")
    with pytest.raises(_Crash):
        train(config, reporter=CrashAfterCheckpoint())
    checkpoint = latest_checkpoint(config.training.output_dir)
    assert checkpoint is not None and checkpoint.endswith("step-000020")

    resumed = RecordingReporter()
    train(config, reporter=resumed, resume_from=checkpoint)
    steps = [s for s, _ in resumed.series(TRAIN_LOSS)]
    assert steps[0] == 25, f"resumed run started at step {steps[0]}, not right after the checkpoint's step 20"
    expected = dict(full.series(TRAIN_LOSS))
    for step, loss in resumed.series(TRAIN_LOSS):
        assert loss == pytest.approx(expected[step], rel=1e-4, abs=1e-5), f"step {step} diverged after resume"
    assert resumed.series(EVAL_LOSS)[-1][1] == pytest.approx(full.series(EVAL_LOSS)[-1][1], rel=1e-4)
    assert latest_checkpoint(config.training.output_dir).endswith("step-000040")


def test_metrics_file_and_reports_carry_the_documented_fields(tmp_path):
    config = _config(tmp_path, max_steps=10, eval_every=10, checkpoint_every=0)
    train(config)  # the console reporter
    records = [
        json.loads(line)
        for line in (Path(config.training.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    train_record = next(r for r in records if "train_loss" in r and "eval_loss" not in r)
    for key in (
        "train_loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "peak_memory_gib",
        "trainable_params",
        "total_params",
    ):
        assert key in train_record and math.isfinite(train_record[key]), key
    assert train_record["peak_memory_gib"] > 0.05  # the process's peak RSS: torch alone is larger than this
    eval_record = records[-1]
    assert eval_record["eval_perplexity"] == pytest.approx(math.exp(eval_record["eval_loss"]), rel=1e-6)


def test_a_nan_loss_stops_the_run_at_once(tmp_path):
    config = _config(tmp_path, learning_rate=1e4, max_grad_norm=0.0, warmup_steps=0)
    reporter = RecordingReporter()
    with pytest.raises(
        NonFiniteLossError, match=r"train loss is (nan|inf) at step \d+; lower `training.learning_rate`"
    ):
        train(config, reporter=reporter)
    assert all(int(m[STEP]) < 40 for m, _ in reporter.reports)


def test_bad_config_is_refused_with_every_problem_listed():
    config = demo_config()
    config.adapter.r = 0
    config.training.learning_rate = -1.0
    config.data.eval_fraction = 1.5
    with pytest.raises(ConfigError, match="found 3 problems") as info:
        config.validate()
    message = str(info.value)
    assert "`adapter.r` must be a positive integer, got 0" in message
    assert "`training.learning_rate` must be a positive number" in message and "-1.0" in message
    assert "`data.eval_fraction` must be strictly between 0 and 1" in message and "1.5" in message


def test_field_and_model_problems_are_reported_together_before_any_work(tmp_path):
    config = _config(tmp_path)
    config.adapter.r = 0
    config.adapter.target_modules = ["q_proj", "q_porj"]
    with pytest.raises(ConfigError, match="found 2 problems") as info:
        train(config, reporter=RecordingReporter())
    assert "`adapter.r` must be a positive integer, got 0" in str(info.value)
    assert "q_porj" in str(info.value) and "q_proj" in str(info.value)
    assert not Path(config.training.output_dir).exists()


def test_max_length_beyond_the_model_is_refused_before_training(tmp_path):
    config = _config(tmp_path)
    config.data.max_length = 4096  # the tiny preset knows 1024 positions
    with pytest.raises(ConfigError, match="max_length"):
        train(config, reporter=RecordingReporter())
    assert not (Path(config.training.output_dir) / "checkpoints").exists()
