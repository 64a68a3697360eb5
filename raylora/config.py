"""Typed configuration of one adapter fine-tuning run.

A run is four sections: the frozen base `model`, the `data`, the `adapter` (LoRA or QLoRA) and the
`training` loop. Each field carries one help line (``metadata["help"]``), which the CLI shows and the docs
quote. ``FinetuneConfig.validate()`` checks every field without touching a model or a file and raises one
`ConfigError` listing every problem, so that a user fixes a config in one edit rather than one per run.
Checks that need the model or the data (a target-module typo, a max length beyond the model's) live beside
the code that loads them (`raylora.model`, `raylora.data`) and use the same error type.

Values are parsed and type-checked against each field's annotation wherever a config is built from text or
plain data (`from_dict`: a `--config` JSON file, `--set section.field=value`, a sweep's sampled values): a
boolean field takes true/false (also yes/no, on/off, 1/0, in any case), an optional field takes None or
null, an integer field a whole number, a list-of-names field a list or a comma-separated string. Anything
else is a `ConfigError` naming the field, the value and the fix: a string "False" never counts as true.
`validate()` checks the types of a config built in Python the same way, without converting.

The config crosses into Ray as a plain dict (`to_dict(secrets=True)` / `from_dict`), and is written to files
and logs as `to_dict()`, which leaves secrets out (`model.token` is None there; `raylora.redaction` says
what a secret is); sweeps override single fields by dotted path (`with_overrides({"adapter.r": 16})`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from raylora.redaction import is_secret_name

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "TrainingConfig",
    "demo_config",
    "sharded_adapter_problem",
]

BASE_DTYPES = ("bfloat16", "float16", "float32", "auto")
# `auto`: sdpa where the architecture supports it, else eager (transformers' own default choice).
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DATA_FORMATS = ("text", "instruction", "chat")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
# `auto`: inductor on GPUs (one worker or several), off on the CPU; `aot_eager` traces without generating kernels.
COMPILE_MODES = ("auto", "off", "inductor", "aot_eager")
HEAD_LOSSES = ("auto", "liger", "chunked")


class ConfigError(ValueError):
    """One or more problems with a configuration, all listed in one message.

    Each problem names the field in backticks, the value received and the fix.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"found {len(self.problems)} problems in the configuration:\n{lines}"
        super().__init__(message)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _positive_int(problems: list[str], name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative integer" if allow_zero else "a positive integer"
        problems.append(f"`{name}` must be {kind}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _choice(problems: list[str], name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"`{name}` must be one of {', '.join(choices)}; got {value!r}")


# ---- parsing and type-checking field values ------------------------------------------------------------------

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")
_KIND_TEXT = {
    bool: ("true or false", "write true or false (yes/no, on/off and 1/0 also work)"),
    int: ("a whole number", "write an integer, e.g. 16"),
    float: ("a number", "write a number, e.g. 0.0002 or 2e-4"),
    str: ("a string", "write the text"),
    list: (
        "a list of names",
        'write a JSON list such as ["q_proj", "v_proj"] or a comma-separated q_proj,v_proj',
    ),
    dict: ("a mapping", 'write a JSON object such as {"bias": "lora_only"}'),
    type(None): ("None", "write null (or None)"),
}


class _BadValue(ValueError):
    pass


@functools.cache
def _field_kinds(section_cls: type) -> dict[str, tuple[type, ...]]:
    """Field name -> the plain types its annotation allows (bool, int, float, str, list, dict, NoneType)."""
    hints = typing.get_type_hints(section_cls)
    kinds: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(section_cls):
        hint = hints[f.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds[f.name] = tuple(typing.get_origin(o) or o for o in options)
    return kinds


def _kind_problem(name: str, value: Any, kinds: tuple[type, ...]) -> str:
    wanted = " or ".join(_KIND_TEXT[k][0] for k in kinds)
    fixes = "; ".join(_KIND_TEXT[k][1] for k in kinds if k is not type(None))
    return f"`{name}` must be {wanted}, got {value!r}; {fixes}"


def _parse(value: Any, kinds: tuple[type, ...]) -> Any:
    """`value` as one of `kinds`, converting text and numbers where the meaning is unambiguous.

    Raises:
        _BadValue: no kind takes the value.
    """
    if value is None:
        if type(None) in kinds:
            return None
    elif isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int):
        if int in kinds:
            return value
        if float in kinds:
            return float(value)
        if bool in kinds and value in (0, 1):
            return bool(value)
    elif isinstance(value, float):
        if float in kinds:
            return value
        if int in kinds and value.is_integer():
            return int(value)
    elif isinstance(value, str):
        return _parse_text(value, kinds)
    elif isinstance(value, list | tuple):
        if list in kinds and all(isinstance(v, str) for v in value):
            return list(value)
    elif isinstance(value, dict) and dict in kinds:
        return dict(value)
    raise _BadValue(value)


def _parse_text(value: str, kinds: tuple[type, ...]) -> Any:
    text = value.strip()
    low = text.lower()
    if type(None) in kinds and low in _NONE:
        return None
    if str in kinds:
        if list in kinds and "," in text:  # `adapter.target_modules=q_proj,v_proj`
            return [t.strip() for t in text.split(",") if t.strip()]
        return value
    if bool in kinds and low in _TRUE + _FALSE:
        return low in _TRUE
    if int in kinds:
        try:
            return int(text)
        except ValueError:
            pass
    if float in kinds:
        try:
            return float(text)
        except ValueError:
            pass
    if list in kinds and text:
        return [t.strip() for t in text.split(",") if t.strip()]
    raise _BadValue(value)


def _parse_section(
    section: str, section_cls: type, values: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Every known field of `values` parsed for its type; the problems of those that do not parse."""
    kinds = _field_kinds(section_cls)
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        if name not in kinds:
            continue
        try:
            parsed[name] = _parse(value, kinds[name])
        except _BadValue:
            problems.append(_kind_problem(f"{section}.{name}", value, kinds[name]))
            parsed[name] = value
    return parsed, problems


def _type_problems(section: str, obj: Any) -> dict[str, str]:
    """Fields of a section object whose value is not of its declared type: field name -> problem.

    A config built in Python is not converted: a string "False" in a boolean field is a problem that names
    the value to write instead (an int in a float field is fine).
    """
    problems: dict[str, str] = {}
    for name, kinds in _field_kinds(type(obj)).items():
        value = getattr(obj, name)
        where = f"{section}.{name}"
        try:
            parsed = _parse(value, kinds)
        except _BadValue:
            problems[name] = _kind_problem(where, value, kinds)
            continue
        same = type(parsed) is type(value) or (isinstance(parsed, float) and type(value) is int)
        if not same and not (isinstance(parsed, list) and isinstance(value, tuple)):
            problems[name] = (
                f"`{where}` must be {' or '.join(_KIND_TEXT[k][0] for k in kinds)}, got {value!r} "
                f"({type(value).__name__}); use {parsed!r}"
            )
    return problems


@dataclass
class ModelConfig:
    """The frozen base model."""

    name_or_path: str = _help(
        "A local directory, a Hugging Face hub id, or a built-in preset (`tiny-llama`: a 2-layer "
        "Llama-shaped model with a byte-level tokenizer that runs offline).",
        default="tiny-llama",
    )
    revision: str | None = _help(
        "Hub revision (branch, tag or commit) to load; None for the default.", default=None
    )
    dtype: str = _help(
        "Storage dtype of the frozen base: bfloat16, float16, float32, or auto (the checkpoint's own). "
        "Ignored for the quantised weights of a QLoRA base, which are NF4.",
        default="bfloat16",
    )
    attn_implementation: str | None = _help(
        "Attention kernel: auto (sdpa where the architecture supports it, else eager; checked from "
        "config.json before weights load, and the choice is logged), or one the model must run: sdpa, eager, "
        "flash_attention_2, flash_attention_3, flex_attention, or a hub kernel (org/name). None means auto.",
        default="auto",
    )
    trust_remote_code: bool = _help("Allow model code from the hub repository to run.", default=False)
    token: str | None = _help(
        "Hub access token for gated or private models; None uses HF_TOKEN or the cached login. Never logged "
        "nor written to a run's files (they hold null; a resumed run takes it from its config or HF_TOKEN).",
        default=None,
    )

    def problems(self) -> list[str]:
        problems: list[str] = []
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            problems.append(
                f"`model.name_or_path` must name a local directory, hub id or preset, got {self.name_or_path!r}"
            )
        _choice(problems, "model.dtype", self.dtype, BASE_DTYPES)
        attn = self.attn_implementation
        if attn is not None and not (
            isinstance(attn, str)
            and (attn in ATTN_IMPLEMENTATIONS or re.fullmatch(r"[\w.-]+/[\w.-]+(:\w+)?", attn))
        ):
            problems.append(
                f"`model.attn_implementation` must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, a hub kernel "
                f"such as 'kernels-community/flash-attn', or None (auto); got {attn!r}"
            )
        return problems


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    path: str = _help(
        "A local .jsonl/.json/.csv/.parquet file (or a directory of them), a hub dataset id, or `demo` "
        "for the packaged demo data.",
        default="demo",
    )
    format: str = _help(
        "How a record becomes text: `text` (one text field), `instruction` (alpaca-style "
        "instruction/input/output; prompt tokens are masked out of the loss) or `chat` (a list of "
        "messages rendered with the tokenizer's chat template; only assistant turns are trained).",
        default="instruction",
    )
    split: str = _help("Split to load from a hub dataset.", default="train")
    subset: str | None = _help(
        "Configuration name of a hub dataset (its `name`), if it has several.", default=None
    )
    eval_path: str | None = _help(
        "A separate eval file or hub split name; when None, `eval_fraction` of the data is held out.",
        default=None,
    )
    eval_fraction: float = _help(
        "Fraction of the records held out for eval when `eval_path` is None; strictly between 0 and 1.",
        default=0.1,
    )
    text_field: str = _help("Record field holding the text, for format `text`.", default="text")
    instruction_field: str = _help(
        "Record field holding the instruction, for format `instruction`.", default="instruction"
    )
    input_field: str = _help(
        "Optional record field holding extra input appended to the instruction, for format `instruction`.",
        default="input",
    )
    response_field: str = _help(
        "Record field holding the response, for format `instruction`.", default="output"
    )
    messages_field: str = _help(
        "Record field holding a list of {role, content} messages, for format `chat`.", default="messages"
    )
    max_length: int = _help(
        "Longest sequence in tokens; longer examples are truncated (and counted in the data summary).",
        default=256,
    )
    packing: bool = _help(
        "Concatenate examples into full `max_length` rows (no padding) instead of one example per row.",
        default=False,
    )
    split_seed: int = _help(
        "Seed of the eval hold-out: which records `eval_fraction` sets aside when `eval_path` is None. Apart "
        "from `training.seed` and fixed for a whole sweep, so that every trial is evaluated on the same "
        "records even when the search varies the training seed.",
        default=0,
    )

    def problems(self) -> list[str]:
        problems: list[str] = []
        if not isinstance(self.path, str) or not self.path.strip():
            problems.append(
                f"`data.path` must name a file, directory, hub dataset or `demo`, got {self.path!r}"
            )
        _choice(problems, "data.format", self.format, DATA_FORMATS)
        _positive_int(problems, "data.max_length", self.max_length)
        if isinstance(self.max_length, int) and 0 < self.max_length < 8:
            problems.append(f"`data.max_length` must be at least 8 tokens, got {self.max_length}")
        _positive_int(problems, "data.split_seed", self.split_seed, allow_zero=True)
        if self.eval_path is None and not (_number(self.eval_fraction) and 0 < self.eval_fraction < 1):
            problems.append(
                f"`data.eval_fraction` must be strictly between 0 and 1 (e.g. 0.1), got {self.eval_fraction!r}; "
                "or set `data.eval_path` to a separate eval file"
            )
        return problems


@dataclass
class AdapterConfig:
    """The LoRA adapter trained on the frozen base, and whether the base is quantised (QLoRA).

    These are the fields a sweep varies; they map one to one onto `peft.LoraConfig` (r, lora_alpha,
    lora_dropout, use_rslora, use_dora, modules_to_save), and `peft_kwargs` passes any other LoraConfig
    argument through unchanged rather than re-declaring peft's fields here.
    """

    r: int = _help("LoRA rank: the inner dimension of the A and B matrices.", default=16)
    alpha: float = _help(
        "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).", default=32.0
    )
    dropout: float = _help("Dropout on the LoRA input, in [0, 1).", default=0.05)
    target_modules: str | list[str] = _help(
        "A preset resolved per architecture from module names and shapes (`attention`, `mlp`, `all-linear`; "
        "on mixture-of-experts models `mlp` and `all-linear` include the routed experts, and `experts` is "
        'them alone; routers never), or a list of module names (e.g. ["q_proj", "v_proj"], '
        '"experts.down_proj"); every name must match at least one linear layer or expert weight.',
        default="attention",
    )
    use_rslora: bool = _help(
        "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.", default=False
    )
    use_dora: bool = _help(
        "DoRA: weight-decomposed LoRA (a magnitude vector per targeted layer).", default=False
    )
    modules_to_save: list[str] = _help(
        'Modules trained in full and saved with the adapter, e.g. ["lm_head", "embed_tokens"].',
        default_factory=list,
    )
    qlora: bool = _help(
        "Load the base in 4-bit NF4 with double quantisation and a bf16 compute dtype (bitsandbytes).",
        default=False,
    )
    peft_kwargs: dict[str, Any] = _help(
        'Further `peft.LoraConfig` arguments passed through unchanged (e.g. {"bias": "lora_only"}).',
        default_factory=dict,
    )

    def problems(self) -> list[str]:
        problems: list[str] = []
        _positive_int(problems, "adapter.r", self.r)
        if not (_number(self.alpha) and self.alpha > 0):
            problems.append(f"`adapter.alpha` must be a positive number (commonly 2 * r), got {self.alpha!r}")
        if not (_number(self.dropout) and 0 <= self.dropout < 1):
            problems.append(f"`adapter.dropout` must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets.strip():
                problems.append(
                    "`adapter.target_modules` is empty; give a preset (attention, mlp, all-linear) or names"
                )
        elif isinstance(targets, list | tuple):
            if not targets:
                problems.append(
                    "`adapter.target_modules` is an empty list; give at least one module name or a preset"
                )
            bad = [t for t in targets if not isinstance(t, str) or not t.strip()]
            if bad:
                problems.append(f"`adapter.target_modules` must hold module names (strings), got {bad!r}")
        else:
            problems.append(
                f"`adapter.target_modules` must be a preset name or a list of module names, got {targets!r}"
            )
        if not isinstance(self.modules_to_save, list | tuple) or not all(
            isinstance(m, str) for m in self.modules_to_save
        ):
            problems.append(
                f"`adapter.modules_to_save` must be a list of module names, got {self.modules_to_save!r}"
            )
        reserved = {
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "use_rslora",
            "use_dora",
            "modules_to_save",
        }
        clash = sorted(reserved & set(self.peft_kwargs if isinstance(self.peft_kwargs, dict) else ()))
        if clash:
            problems.append(
                f"`adapter.peft_kwargs` sets {clash}, which have their own adapter fields; set those fields instead"
            )
        return problems


@dataclass
class TrainingConfig:
    """The optimisation loop: steps, batch, schedule, eval, logging and checkpoints."""

    learning_rate: float = _help("Peak learning rate of AdamW (LoRA typically 1e-4 to 3e-4).", default=2e-4)
    max_steps: int = _help("Optimizer steps to train for.", default=100)
    batch_size: int = _help("Sequences per micro-batch on each worker.", default=8)
    grad_accum_steps: int = _help("Micro-batches accumulated into one optimizer step.", default=1)
    warmup_steps: int = _help("Steps of linear warmup from 0 to the peak learning rate.", default=10)
    lr_schedule: str = _help("Decay after warmup: cosine, linear or constant.", default="cosine")
    min_lr_ratio: float = _help("Learning rate at the last step, as a fraction of the peak.", default=0.1)
    weight_decay: float = _help("AdamW weight decay on the adapter parameters.", default=0.0)
    max_grad_norm: float = _help("Clip the global gradient norm to this; 0 turns clipping off.", default=1.0)
    label_smoothing: float = _help("Label smoothing of the cross-entropy loss, in [0, 1).", default=0.0)
    activation_checkpointing: bool | float | None = _help(
        "Recompute decoder-layer activations in the backward pass: less memory, more compute (a third more "
        "per checkpointed layer). true: every layer; a number in [0, 1]: that fraction of the layers, spread "
        "evenly (BENCHMARKS.md measures the trade); None (default): "
        "every layer with QLoRA, whose point is memory, none otherwise.",
        default=None,
    )
    compile: str = _help(
        "torch.compile each decoder layer: auto (inductor on GPUs, one worker or several; off on the CPU, "
        "where compiling costs more than it saves), off, inductor, or aot_eager (traced, eager kernels).",
        default="auto",
    )
    head_loss: str = _help(
        "How the loss of the frozen output head is computed: auto (Liger's fused linear cross-entropy on GPUs "
        "when liger-kernel is installed, `pip install 'raylora[gpu]'`, and label smoothing is off; raylora's "
        "chunked loss otherwise), liger, or chunked (the head 2048 tokens at a time, compiled with the layers). "
        "Both compute the same loss; BENCHMARKS.md measures them.",
        default="auto",
    )
    fp8: bool = _help(
        "Run the frozen base's linear layers in FP8 (weights stored in float8, per-tensor scales): faster "
        "matmuls on GPUs with FP8 tensor cores (compute capability 8.9+: H100, H200, L4, B200), half the base "
        "weight memory; the adapter trains against an fp8-rounded base. Off by default; not with QLoRA. "
        "Under FSDP2 the fp8 weights are sharded and gathered as fp8.",
        default=False,
    )
    precision: str = _help(
        "auto (bf16 autocast on GPU, fp32 on CPU), bf16, or fp32.",
        default="auto",
    )
    eval_every: int = _help("Evaluate (loss, perplexity) every this many steps, and at the end.", default=20)
    eval_batches: int | None = _help(
        "Cap on eval micro-batches per evaluation; None evaluates the whole split.", default=None
    )
    log_every: int = _help("Report train metrics every this many steps.", default=5)
    checkpoint_every: int = _help(
        "Save an adapter-only checkpoint every this many steps (0: only at the end).", default=50
    )
    output_dir: str = _help("Directory for checkpoints and the final adapter.", default="outputs/run")
    seed: int = _help(
        "Seed of the adapter init, dropout and data order: equal seeds give equal runs.", default=0
    )

    def problems(self) -> list[str]:
        problems: list[str] = []
        if not (_number(self.learning_rate) and self.learning_rate > 0):
            problems.append(
                f"`training.learning_rate` must be a positive number (LoRA typically 1e-4 to 3e-4), "
                f"got {self.learning_rate!r}"
            )
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "log_every"):
            _positive_int(problems, f"training.{name}", getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            _positive_int(problems, f"training.{name}", getattr(self, name), allow_zero=True)
        if self.eval_batches is not None:
            _positive_int(problems, "training.eval_batches", self.eval_batches)
        _choice(problems, "training.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice(problems, "training.precision", self.precision, PRECISIONS)
        _choice(problems, "training.compile", self.compile, COMPILE_MODES)
        _choice(problems, "training.head_loss", self.head_loss, HEAD_LOSSES)
        checkpointing = self.activation_checkpointing
        if not (
            checkpointing is None
            or isinstance(checkpointing, bool)
            or (_number(checkpointing) and 0 <= checkpointing <= 1)
        ):
            problems.append(
                "`training.activation_checkpointing` must be true, false, a fraction of the layers in [0, 1] "
                f"or None (every layer with QLoRA, none otherwise), got {checkpointing!r}"
            )
        if not isinstance(self.fp8, bool):
            problems.append(f"`training.fp8` must be true or false, got {self.fp8!r}")
        if not (_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            problems.append(f"`training.min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"`training.weight_decay` must be >= 0, got {self.weight_decay!r}")
        if not (_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            problems.append(
                f"`training.max_grad_norm` must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}"
            )
        if not (_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            problems.append(f"`training.label_smoothing` must be in [0, 1), got {self.label_smoothing!r}")
        if (
            isinstance(self.warmup_steps, int)
            and isinstance(self.max_steps, int)
            and self.max_steps > 0
            and self.warmup_steps >= self.max_steps
        ):
            problems.append(
                f"`training.warmup_steps` ({self.warmup_steps}) must be smaller than `training.max_steps` "
                f"({self.max_steps})"
            )
        if not isinstance(self.output_dir, str) or not self.output_dir:
            problems.append(f"`training.output_dir` must be a directory path, got {self.output_dir!r}")
        return problems


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "adapter": AdapterConfig, "training": TrainingConfig}


@dataclass
class FinetuneConfig:
    """Everything one adapter fine-tuning run needs; one trial of a sweep is one of these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> FinetuneConfig:
        """Check every field's type and value; raise one `ConfigError` listing all problems. Returns self when valid."""
        problems: list[str] = []
        for name in _SECTIONS:
            section = getattr(self, name)
            typed = _type_problems(name, section)
            problems.extend(typed.values())
            mistyped = tuple(f"`{name}.{field_name}`" for field_name in typed)
            problems.extend(p for p in section.problems() if not (mistyped and p.startswith(mistyped)))
        if self.training.fp8 is True and self.adapter.qlora is True:
            problems.append(
                "`training.fp8` and `adapter.qlora` both quantise the frozen base (FP8 and 4-bit NF4); "
                "turn one of them off"
            )
        if problems:
            raise ConfigError(problems)
        return self

    def to_dict(self, *, secrets: bool = False) -> dict[str, Any]:
        """A plain, JSON-serialisable dict.

        Args:
            secrets: keep the values of secret fields (`model.token`). Only the config that crosses into a
                Ray actor, in memory, needs them (a worker loading a gated model); the default, for files and
                logs, sets them to None, so a config read back from a file falls back to the environment
                (`HF_TOKEN`) or the cached login.
        """
        data = dataclasses.asdict(self)
        if not secrets:
            for section in data.values():
                for name in section:
                    if is_secret_name(name):
                        section[name] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Build from a nested dict (as `to_dict` writes), parsing each value for its field's type.

        Raises:
            ConfigError: unknown sections or fields, or values that no parse turns into the field's type.
        """
        problems: list[str] = []
        sections: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if key not in _SECTIONS:
                problems.append(f"unknown config section `{key}`; expected one of {', '.join(_SECTIONS)}")
                continue
            if not isinstance(value, dict):
                problems.append(f"config section `{key}` must be a mapping of fields, got {value!r}")
                continue
            section_cls = _SECTIONS[key]
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                problems.append(
                    f"unknown field(s) {', '.join(f'`{key}.{u}`' for u in unknown)}; "
                    f"`{key}` has: {', '.join(sorted(known))}"
                )
            parsed, bad = _parse_section(key, section_cls, value)
            problems.extend(bad)
            sections[key] = section_cls(**parsed)
        if problems:
            raise ConfigError(problems)
        return cls(**sections)

    def with_overrides(self, overrides: dict[str, Any]) -> FinetuneConfig:
        """A copy with fields replaced by dotted path, e.g. ``{"adapter.r": 8, "training.learning_rate": 1e-4}``."""
        data = copy.deepcopy(self.to_dict(secrets=True))
        problems: list[str] = []
        for path, value in overrides.items():
            section, _, name = path.partition(".")
            if section not in data or name not in data[section]:
                problems.append(
                    f"cannot override `{path}`: no such field; use `<section>.<field>` with section one of "
                    f"{', '.join(_SECTIONS)}"
                )
                continue
            data[section][name] = value
        if problems:
            raise ConfigError(problems)
        return FinetuneConfig.from_dict(data)

    @staticmethod
    def field_help() -> dict[str, str]:
        """Dotted field name -> help line, for the CLI and the docs."""
        return {
            f"{section}.{f.name}": f.metadata.get("help", "")
            for section, section_cls in _SECTIONS.items()
            for f in dataclasses.fields(section_cls)
        }


def demo_config() -> FinetuneConfig:
    """The embedded default: the offline `tiny-llama` preset on the packaged demo data, sized for a CPU.

    The tiny base is a random init: LoRA alone on a random base barely moves the loss, so the demo also
    trains the output head in full (`modules_to_save=["lm_head"]`) and uses a larger learning rate than
    real checkpoints want; the eval loss then falls from ~5.6 to ~1.7 in about 15 s on two cores.
    """
    return FinetuneConfig(
        model=ModelConfig(name_or_path="tiny-llama", dtype="float32"),
        data=DataConfig(path="demo", format="instruction", max_length=128),
        adapter=AdapterConfig(
            r=16, alpha=32.0, dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"]
        ),
        training=TrainingConfig(
            learning_rate=3e-3,
            max_steps=150,
            batch_size=8,
            warmup_steps=5,
            eval_every=25,
            log_every=5,
            checkpoint_every=50,
            output_dir="outputs/demo",
        ),
    )


# peft's `init_lora_weights` values that draw the adapter from the RNG alone (no base weights needed).
_RNG_INITS = (True, False, "gaussian")


def sharded_adapter_problem(adapter: AdapterConfig, workers: int) -> str | None:
    """Why `adapter` cannot start on a base loaded into shards (N workers), or None.

    Args:
        adapter: the adapter section of the config.
        workers: the trial's worker count.
    """
    if workers <= 1:
        return None
    if adapter.use_dora is True:
        return (
            f"`adapter.use_dora` is true with {workers} workers, but DoRA's magnitudes are computed from the "
            "base weights when the adapter is created, and a sharded trial builds the adapter before any rank "
            "holds them; set `resources.workers=1` or turn `adapter.use_dora` off"
        )
    init = dict(adapter.peft_kwargs).get("init_lora_weights", True)
    if not any(init is value or (isinstance(init, str) and init == value) for value in _RNG_INITS):
        return (
            f"`adapter.peft_kwargs.init_lora_weights` is {init!r} with {workers} workers, but that "
            "initialisation reads the base weights, and a sharded trial builds the adapter before any rank "
            "holds them; use true or 'gaussian', or set `resources.workers=1`"
        )
    return None
