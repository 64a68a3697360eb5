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


def test_qlora_loss_falls_on_a_4bit_base_and_checkpoints_only_the_adapter(tmp_path):
    config = _config(tmp_path / "qlora", max_steps=30, eval_every=30, checkpoint_every=30)
    config.adapter.qlora = True
    reporter = RecordingReporter()
    result = train(config, reporter=reporter)

    first, last = _falls(reporter)
    assert last < first - 0.3, f"QLoRA train loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert math.isfinite(result.eval_loss)
    # The checkpoint holds the trained tensors only: no quantisation state of the frozen 4-bit base (absmax,
    # quant_map, nested_*), so it is the size of the same adapter's checkpoint on a bf16 base.
    checkpoint = Path(latest_checkpoint(config.training.output_dir))
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert state["adapter"] and all("lora_" in k or "modules_to_save" in k for k in state["adapter"]), sorted(
        k for k in state["adapter"] if "lora_" not in k
    )[:5]
    plain = _config(tmp_path / "lora", max_steps=1, eval_every=1, checkpoint_every=1, warmup_steps=0)
    train(plain, reporter=RecordingReporter())
    plain_checkpoint = Path(latest_checkpoint(plain.training.output_dir))
    qlora_bytes, plain_bytes = (
        sum(f.stat().st_size for f in d.iterdir()) for d in (checkpoint, plain_checkpoint)
    )
    assert qlora_bytes == pytest.approx(plain_bytes, rel=0.01), (qlora_bytes, plain_bytes)


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


@pytest.mark.parametrize("dora", [False, True], ids=["seeded-masks", "peft-dropout"])
def test_resume_continues_at_the_saved_step_with_the_same_trajectory(tmp_path, dora):
    """With dropout on: the resumed steps draw the masks of the uninterrupted run. raylora's LoRA layers
    draw them from (seed, step, micro-batch) seeds; DoRA layers are peft's own, whose dropout draws from the
    global generator, which the loop reseeds from (seed, step) before every step."""

    def config_at(path: Path) -> FinetuneConfig:
        config = _config(path, max_steps=20, eval_every=10, checkpoint_every=10)
        config.adapter.dropout = 0.1
        config.adapter.use_dora = dora
        return config

    full = RecordingReporter()
    train(config_at(tmp_path / "full"), reporter=full)

    config = config_at(tmp_path / "cut")
    with pytest.raises(_Crash):
        train(config, reporter=CrashAfterCheckpoint())
    checkpoint = latest_checkpoint(config.training.output_dir)
    assert checkpoint is not None and checkpoint.endswith("step-000010")

    resumed = RecordingReporter()
    train(config, reporter=resumed, resume_from=checkpoint)
    steps = [s for s, _ in resumed.series(TRAIN_LOSS)]
    assert steps[0] == 15, f"resumed run started at step {steps[0]}, not right after the checkpoint's step 10"
    expected = dict(full.series(TRAIN_LOSS))
    for step, loss in resumed.series(TRAIN_LOSS):
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step} diverged after resume"
    assert resumed.series(EVAL_LOSS)[-1][1] == pytest.approx(full.series(EVAL_LOSS)[-1][1], rel=1e-5)
    assert latest_checkpoint(config.training.output_dir).endswith("step-000020")


@pytest.mark.parametrize(
    ("trained_head", "label_smoothing"),
    [(False, 0.0), (True, 0.0), (False, 0.1)],
    ids=["frozen-head", "trained-head", "label-smoothing"],
)
def test_a_step_s_gradients_are_the_plain_cross_entropy_s(
    tmp_path, monkeypatch, trained_head, label_smoothing
):
    """The loop's loss (the head applied a chunk at a time; for a frozen head, every real LoRA run, the
    gradient taken in the forward pass) against `F.cross_entropy` of the model's own logits, over two
    accumulated micro-batches of several chunks each."""
    import torch.nn.functional as F

    import raylora.loss
    from raylora.data import IGNORE_INDEX
    from raylora.loss import count_targets
    from raylora.recipe import LoraRecipe

    monkeypatch.setattr(raylora.loss, "LOSS_CHUNK_TOKENS", 64)
    config = _config(
        tmp_path, max_steps=1, warmup_steps=0, grad_accum_steps=2, label_smoothing=label_smoothing
    )
    config.adapter.dropout = 0.0
    config.adapter.modules_to_save = ["lm_head"] if trained_head else []
    recipe = LoraRecipe(config)
    recipe.setup()
    model, batches = recipe.model, recipe.next_batches()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in trained.items():  # B starts at zero: give every gradient path something to carry
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    assert any("lm_head" in n for n in trained) is trained_head

    targets = sum(count_targets(b) for b in batches)
    assert all(b["input_ids"][:, 1:].numel() > 2 * 64 for b in batches)  # several chunks per micro-batch
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            label_smoothing=label_smoothing,
        )
        (loss / targets).backward()
    expected = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad(set_to_none=True)

    got: dict[str, torch.Tensor] = {}
    for name, param in trained.items():  # the step's gradients as its backward leaves them, before clipping
        param.register_post_accumulate_grad_hook(lambda p, name=name: got.__setitem__(name, p.grad.clone()))
    recipe.step(batches)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        error = ((got[name] - grad).norm() / grad.norm()).item()
        assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"


def test_packed_documents_do_not_attend_to_each_other_in_training(tmp_path):
    """`data.packing` through `train()`: the first step's loss (LoRA's B starts at zero, so it is the base's)
    is that of every document of the batch run on its own."""
    from itertools import pairwise

    import torch.nn.functional as F

    from raylora.data import IGNORE_INDEX, iterate_batches, load_data
    from raylora.model import load_tokenizer

    config = _config(tmp_path, max_steps=1, warmup_steps=0, eval_every=1, log_every=1, checkpoint_every=0)
    config.data.packing = True
    config.data.max_length = 256
    config.training.batch_size = 2
    reporter = RecordingReporter()
    train(config, reporter=reporter)
    [(_, first_loss)] = reporter.series(TRAIN_LOSS)

    tokenizer = load_tokenizer(config.model)
    data = load_data(config.data, tokenizer, seed=config.training.seed)
    batch = next(
        iterate_batches(data.train, batch_size=2, seed=config.training.seed, pad_id=tokenizer.pad_token_id)
    )
    base = load_base_model(config.model, qlora=False)

    def loss_of(logits: torch.Tensor) -> float:
        labels = batch["labels"][:, 1:].reshape(-1)
        flat = logits[:, :-1].reshape(-1, logits.size(-1))
        return float(F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="sum")) / int(
            (labels != IGNORE_INDEX).sum()
        )

    with torch.no_grad():
        alone = []
        for ids, positions in zip(batch["input_ids"], batch["position_ids"], strict=True):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            assert len(starts) >= 3  # several documents in the row
            alone.append(torch.cat([base(input_ids=ids[None, a:b]).logits[0] for a, b in pairwise(starts)]))
        separate = loss_of(torch.stack(alone))
        attending = loss_of(base(input_ids=batch["input_ids"]).logits)  # one causal mask over each row
    assert abs(attending - separate) > 1e-3 * separate  # the documents' contexts matter on this model
    assert first_loss == pytest.approx(separate, rel=1e-5)


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
