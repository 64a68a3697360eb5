"""Train a tiny random copy of each causal-LM type that transformers ships, the way a user's run would.

`survey_architecture(model_type, workdir)` builds a tiny checkpoint of the type from its config class
(`raylora.tiny.tiny_config_for_type`, offline) and takes it through raylora's own path in three modes: LoRA
on `all-linear`, QLoRA on `all-linear`, and LoRA with `data.packing`. Each mode either trains (two
optimizer steps with a finite loss, every adapter tensor receiving a gradient, a finite eval loss; with
packing, the logits of a packed document equal those of the same document alone on the trained model,
through the loop's own forward) or is refused by `raylora.training.validate_with_model` before any
weight loads, with the reason. Anything else (a crash, a NaN, an adapter that gets no gradient) is a
failure: raylora would train that model wrongly or not at all.

The breadth test (tests/test_architectures.py) runs a deterministic sample of the types on every CI run and
all of them on demand; `scripts/architectures.py` writes the table in docs/architectures.md.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylora.config import AdapterConfig, ConfigError, DataConfig, FinetuneConfig, ModelConfig, TrainingConfig

__all__ = [
    "MODES",
    "REFUSALS",
    "ArchitectureOutcome",
    "ModeOutcome",
    "causal_lm_types",
    "survey_architecture",
    "survey_in_worker",
]

MODES = ("lora", "qlora", "packing")

# Every reason raylora gives for refusing a model before its weights load, by the start of its message:
# the refusals the docs list. A refusal whose message matches none of these is an undocumented one.
REFUSALS = {
    "not causal": r"`model.name_or_path` is .*, a \S+ model that is not causal",
    "encoder-decoder": r"`model.name_or_path` is .*, which is an encoder-decoder model",
    "no causal-LM class": r"`model.name_or_path` is .*, for which transformers has no causal-LM class",
    "nothing to quantise": r"`adapter.qlora` is true, but no weight of .* can be quantised to 4-bit",
    "packing mixes documents": r"`data.packing` is true, but this \S+ model lets packed documents see each other",
    "packing unverifiable": r"`data.packing` is true, but raylora could not check",
    "attention kernel": r"`model.attn_implementation` is .*, which this \S+ model cannot run",
}
_MAX_LENGTH = 48
_STEPS = 2


@dataclass
class ModeOutcome:
    """One mode of one architecture: trained, refused (with the reason), or failed (with the error)."""

    status: str  # "trained", "refused", "failed"
    detail: str = ""  # the refusal's or failure's message; for "trained", what was adapted
    refusal: str | None = None  # the `REFUSALS` key a refusal matched
    seconds: float = 0.0


@dataclass
class ArchitectureOutcome:
    """What the survey found for one model type."""

    model_type: str
    built: bool
    build_error: str = ""
    attention: str = ""
    experts: int = 0  # fused expert weights adapted by all-linear
    modes: dict[str, ModeOutcome] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "built": self.built,
            "build_error": self.build_error,
            "attention": self.attention,
            "experts": self.experts,
            "modes": {k: vars(v) for k, v in self.modes.items()},
        }


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _write_data(path: Path) -> Path:
    """24 short plain-text records, the same on every machine."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "pack",
        "their",
        "boxes",
    ]
    records = [
        {"text": " ".join(words[(i * 5 + j * 3) % len(words)] for j in range(4 + i % 7))} for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(checkpoint: str, data: Path, output: Path, mode: str) -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelConfig(name_or_path=checkpoint, dtype="bfloat16" if mode == "qlora" else "float32"),
        data=DataConfig(
            path=str(data),
            format="text",
            max_length=_MAX_LENGTH,
            eval_fraction=0.25,
            packing=mode == "packing",
        ),
        adapter=AdapterConfig(
            r=4, alpha=8.0, dropout=0.0, target_modules="all-linear", qlora=mode == "qlora"
        ),
        training=TrainingConfig(
            learning_rate=1e-3,
            max_steps=_STEPS,
            batch_size=2,
            warmup_steps=0,
            eval_every=_STEPS,
            eval_batches=1,
            log_every=1,
            checkpoint_every=0,
            output_dir=str(output),
            seed=0,
        ),
    )


def _scrub(message: str) -> str:
    """A message without this machine's temporary paths, so that the table reads the same everywhere."""
    return re.sub(r"'/[^']*/checkpoint'", "'<tiny checkpoint>'", message)


def _refusal(message: str) -> str | None:
    return next((name for name, pattern in REFUSALS.items() if re.match(pattern, message, re.DOTALL)), None)


def survey_architecture(
    model_type: str, workdir: str | Path, *, modes: tuple[str, ...] = MODES
) -> ArchitectureOutcome:
    """Build a tiny `model_type` checkpoint under `workdir` and run each of `modes` through raylora.

    Never raises for what a model does: a crash inside raylora's path is recorded as that mode's failure.
    """
    from raylora.tiny import tiny_checkpoint, tiny_config_for_type

    workdir = Path(workdir)
    try:
        config = tiny_config_for_type(model_type)
    except RuntimeError as error:
        return ArchitectureOutcome(model_type, built=False, build_error=str(error))
    try:
        checkpoint = tiny_checkpoint(config, workdir / "checkpoint")
    except Exception as error:  # building or saving the tiny model itself
        return ArchitectureOutcome(
            model_type, built=False, build_error=f"no tiny {model_type} model could be saved: {error}"
        )
    data = _write_data(workdir / "data.jsonl")
    outcome = ArchitectureOutcome(model_type, built=True)
    for mode in modes:
        started = time.perf_counter()
        result = _run_mode(checkpoint, data, workdir / mode, mode, outcome)
        result.seconds = round(time.perf_counter() - started, 2)
        outcome.modes[mode] = result
    return outcome


def survey_in_worker(job: tuple[str, str]) -> ArchitectureOutcome:
    """`survey_architecture(model_type, workdir)` for a worker process (transformers' warnings quiet)."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    return survey_architecture(*job)


def _run_mode(
    checkpoint: str, data: Path, output: Path, mode: str, outcome: ArchitectureOutcome
) -> ModeOutcome:
    from raylora.recipe import LoraRecipe
    from raylora.training import validate_with_model

    config = _config(checkpoint, data, output, mode)
    try:
        plan = validate_with_model(config)
    except ConfigError as error:
        message = error.problems[0] if len(error.problems) == 1 else str(error)
        return ModeOutcome("refused", _scrub(message), _refusal(error.problems[0]))
    except Exception as error:  # a crash in the checks themselves
        return ModeOutcome("failed", f"validate: {type(error).__name__}: {error}"[:600])
    if plan is not None:
        outcome.attention = plan.attn_implementation
        outcome.experts = max(outcome.experts, len(plan.targets.parameters))
    try:
        recipe = LoraRecipe(config)
        recipe.setup()
        touched: dict[int, bool] = {}

        def record(optimizer, args, kwargs) -> None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None and bool(param.grad.abs().sum() > 0):
                        touched[id(param)] = True

        recipe.optimizer.register_step_pre_hook(record)
        losses = [recipe.step(recipe.next_batches())["train_loss"] for _ in range(_STEPS)]
        eval_loss = recipe.evaluate()
        names = {id(p): n for n, p in recipe.model.named_parameters() if p.requires_grad}
        untouched = sorted(name for pid, name in names.items() if pid not in touched)
        if not all(math.isfinite(x) for x in [*losses, eval_loss]):
            return ModeOutcome("failed", f"non-finite loss: train {losses}, eval {eval_loss}")
        if untouched:
            shown = ", ".join(untouched[:4]) + (
                f" and {len(untouched) - 4} more" if len(untouched) > 4 else ""
            )
            return ModeOutcome(
                "failed", f"{len(untouched)} of {len(names)} adapter tensors got no gradient: {shown}"
            )
        if mode == "packing":
            leak = _packed_difference(recipe)
            if leak is not None and leak > 1e-4:
                return ModeOutcome(
                    "failed", f"packed documents differ from lone ones by {leak:.1e} after training"
                )
        detail = f"{len(recipe.target_modules)} targets, {recipe.parameters.trainable:,} trainable"
        if mode == "lora":
            _load_with_plain_peft(recipe, output / "adapter", config)
        return ModeOutcome("trained", detail)
    except ConfigError as error:  # refused while loading: a check that should have come before
        return ModeOutcome("failed", f"refused only after loading: {error}"[:600])
    except Exception as error:
        return ModeOutcome("failed", f"{type(error).__name__}: {str(error).strip()}"[:600])


@torch.no_grad()
def _packed_difference(recipe) -> float | None:
    """Largest relative logit difference between a packed row and its documents run alone, on the trained
    model, through the loop's own forward (`raylora.loss.forward`: no attention mask for a packed batch)."""
    from raylora.data import iterate_batches
    from raylora.loss import forward

    rows = [row for row in recipe.data.train if sum(p == 0 for p in row.position_ids) >= 2]
    if not rows:
        return None
    model = recipe.model
    model.eval()
    try:
        batch = next(iterate_batches(rows[:1], batch_size=1, seed=0, pad_id=recipe.tokenizer.pad_token_id))
        packed = _logits(model, forward(model, batch))[0]
        ids, positions = batch["input_ids"][0], batch["position_ids"][0]
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        alone = []
        for a, b in zip(starts, starts[1:], strict=False):
            single = {
                "input_ids": ids[None, a:b],
                "attention_mask": torch.ones(1, b - a, dtype=torch.long),
                "position_ids": positions[None, a:b],
            }
            alone.append(_logits(model, forward(model, single))[0])
        scale = max(1.0, float(packed.abs().max()))
        return float((packed - torch.cat(alone)).abs().max()) / scale
    finally:
        model.train()


def _logits(model, output) -> torch.Tensor:
    if output.head is None:
        return output.hidden.float()
    return output.head(output.hidden).float()


def _load_with_plain_peft(recipe, directory: Path, config: FinetuneConfig) -> None:
    """The saved adapter loads onto a fresh base with plain peft and gives the trained model's loss."""
    from peft import PeftModel

    from raylora.model import load_base_model

    recipe.save_adapter(directory)
    base = load_base_model(config.model, qlora=config.adapter.qlora, adapter=config.adapter)
    loaded = PeftModel.from_pretrained(base, str(directory))
    loaded.eval()
    recipe.model.eval()
    ids = torch.arange(3, 3 + 24)[None]
    with torch.no_grad():
        # The next-token loss, not the logits: in a mixture of experts a last-digit difference in a router can
        # send a token to another expert, which moves that token's logits a lot and the loss hardly at all.
        expected = _next_token_loss(recipe.model, ids)
        got = _next_token_loss(loaded, ids)
    recipe.model.train()
    if abs(expected - got) > 1e-4 * max(1.0, abs(expected)):
        raise RuntimeError(
            f"the adapter loaded with plain peft gives another loss ({got} against {expected})"
        )


def _next_token_loss(model, ids: torch.Tensor) -> float:
    # Computed here: a model's own `labels` handling varies (GIT expects image positions in them).
    logits = model(input_ids=ids, use_cache=False).logits[0, -ids.size(1) :].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]))
