"""The frozen base model and its LoRA adapter: loading, target-module presets, injection, parameter counts.

A trial goes through this module in one order: `load_tokenizer` and `load_base_model` (bf16, or 4-bit NF4
for QLoRA; every base weight frozen), `check_max_length`, `apply_lora` (which resolves the target modules to
full module paths and wraps exactly those), then `count_parameters` for the logs. Every problem that comes
from the user's input (a missing path, a target-module typo, a model that cannot be quantised, a sequence
longer than the model's) is a `ConfigError` naming the config field, the value and the fix.

`check_model` runs the same checks from the checkpoint's config alone, on a weightless (meta-device) copy of
the architecture, so that a sweep can refuse a bad trial before it loads any weights.

Which layers the adapter wraps (presets per architecture, resolution to full module paths) is decided in
`raylora.targets`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raylora.config import AdapterConfig, ConfigError, ModelConfig
from raylora.targets import linear_layers, modules_to_save_problem, resolve_target_modules
from raylora.tiny import TINY_PRESETS, materialize_preset

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ParameterCount",
    "apply_activation_checkpointing",
    "apply_lora",
    "base_dtype",
    "check_max_length",
    "check_model",
    "check_quantization",
    "check_quantized",
    "count_parameters",
    "decoder_layers",
    "load_base_model",
    "load_model_config",
    "load_tokenizer",
    "lora_config",
    "model_max_length",
    "nf4_config",
    "resolve_model_path",
    "unwrap",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------------------
# Loading


def resolve_model_path(model: ModelConfig) -> str:
    """Where `from_pretrained` should load `model.name_or_path` from.

    A built-in preset (`tiny-llama`) is written to the local cache once and its directory returned; an
    existing local directory is returned as is (with ``~`` expanded); anything else that does not look like
    a local path is taken for a hub id and returned unchanged, so that `from_pretrained` fetches it.

    Args:
        model: the model section of the config.

    Raises:
        ConfigError: the name looks like a local path (starts with ``/``, ``.`` or ``~``, has more than one
            slash, or names a file) but no such directory exists. A path is never sent to the hub as an id,
            where it would fail with a confusing "repo id" message.
    """
    name = model.name_or_path
    if name in TINY_PRESETS:
        return materialize_preset(name)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        raise ConfigError(
            f"`model.name_or_path` is {name!r}, which is a file; give the checkpoint directory that holds "
            "config.json and the weights (e.g. its parent directory)"
        )
    looks_local = (
        name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )
    if looks_local:
        raise ConfigError(
            f"`model.name_or_path` is {name!r}, which looks like a local path but does not exist; give an "
            "existing checkpoint directory, a hub id such as 'org/model', or a preset "
            f"({', '.join(TINY_PRESETS)})"
        )
    return name


def _load_failed(model: ModelConfig, what: str, error: Exception) -> ConfigError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    revision = f" at revision {model.revision!r}" if model.revision else ""
    return ConfigError(
        f"`model.name_or_path` is {model.name_or_path!r}{revision}, whose {what} could not be loaded "
        f"({reason}); give a checkpoint directory holding config.json and weights, a preset "
        f"({', '.join(TINY_PRESETS)}), or a hub id this machine can reach (check the spelling, the network "
        "or HF_HUB_OFFLINE, and HF_TOKEN for gated models)"
    )


def load_model_config(model: ModelConfig) -> PretrainedConfig:
    """The checkpoint's `PretrainedConfig` (config.json only, no weights).

    Args:
        model: the model section of the config.

    Raises:
        ConfigError: the path does not exist, or the config cannot be loaded (a directory without
            config.json, an architecture this transformers does not know, an unknown or unreachable hub id).
    """
    return _load_config(model, resolve_model_path(model))


def _load_config(model: ModelConfig, path: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            path, revision=model.revision, trust_remote_code=model.trust_remote_code, token=model.token
        )
    except (OSError, ValueError) as error:  # ValueError: no `model_type`, or an architecture unknown here
        raise _load_failed(model, "config", error) from error


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, set up for training: a pad token, and padding on the right.

    A tokenizer without a pad token (Llama, GPT-2) pads with its end-of-sequence token; padded positions are
    masked out of the loss by the data code, so the choice only has to be a valid id.

    Args:
        model: the model section of the config.

    Raises:
        ConfigError: the path does not exist or holds no tokenizer, or the tokenizer has neither a pad nor
            an end-of-sequence token to pad with.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model.revision, trust_remote_code=model.trust_remote_code, token=model.token
        )
    except OSError as error:
        raise _load_failed(model, "tokenizer", error) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"`model.name_or_path` is {model.name_or_path!r}, whose tokenizer has neither a pad nor an "
                "end-of-sequence token to pad batches with; use a checkpoint whose tokenizer defines one"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _quantization_problem(
    model_config: PretrainedConfig, name: str, *, qlora: bool
) -> tuple[str | None, bool]:
    """(problem, prequantized_nf4) for loading a checkpoint with this config, with or without QLoRA.

    A checkpoint saved in bitsandbytes 4-bit NF4 is already what QLoRA would make of it: it loads as is
    under QLoRA, and is refused without it (it would load 4-bit anyway, and the run's logs would say
    otherwise). Any other quantisation (GPTQ, AWQ, FP8, bitsandbytes 8-bit...) cannot be re-quantised to
    NF4; without QLoRA it is left to transformers and peft, which train LoRA on several such formats.
    """
    quant = getattr(model_config, "quantization_config", None)
    if quant is None:
        return None, False
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = str(quant.get("quant_method", "unknown"))
    nf4 = (
        method == "bitsandbytes"
        and bool(quant.get("load_in_4bit"))
        and quant.get("bnb_4bit_quant_type") == "nf4"
    )
    if nf4 and not qlora:
        return (
            f"`adapter.qlora` is false, but the checkpoint {name!r} is stored in bitsandbytes 4-bit NF4; set "
            "`adapter.qlora` to true (it then loads as is), or use the unquantised checkpoint of this model",
            True,
        )
    if nf4 or not qlora:
        return None, nf4
    if method == "bitsandbytes":
        method = "bitsandbytes 8-bit" if quant.get("load_in_8bit") else "bitsandbytes FP4"
    return (
        f"`adapter.qlora` is true, but the checkpoint {name!r} is already quantised with {method}, which "
        "cannot be re-quantised to 4-bit NF4; use the unquantised (bf16/fp16) checkpoint of this model, or "
        f"set `adapter.qlora` to false to train LoRA on its {method} weights as they are",
        False,
    )


def _bitsandbytes_problem() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # an ImportError, or a RuntimeError from a broken native library
        return (
            "`adapter.qlora` is true, but bitsandbytes cannot be imported "
            f"({type(error).__name__}: {error}); install it (`pip install bitsandbytes`) or set "
            "`adapter.qlora` to false"
        )
    return None


def _device_map(device: torch.device | str | None) -> dict[str, Any] | None:
    # Loading straight onto the device (device_map) rather than `.to()` afterwards: a 4-bit model is
    # quantised while it loads, and a bf16 one never needs a full copy in host memory.
    return None if device is None else {"": torch.device(device)}


def load_base_model(
    model: ModelConfig, *, qlora: bool, device: torch.device | str | None = None
) -> PreTrainedModel:
    """The frozen base model, ready for `apply_lora`.

    Without QLoRA the weights are stored in `model.dtype` (`auto`: the checkpoint's own dtype). With QLoRA
    every linear layer but the output head becomes a bitsandbytes `Linear4bit` (NF4, double quantisation,
    bf16 compute) whose packed weights are stored as bf16, so that FSDP2 can shard them like any other bf16
    tensor. The modules that stay unquantised (embeddings, norms, the head) keep `model.dtype` (`auto`:
    bf16); they are deliberately *not* upcast to fp32 as peft's `prepare_model_for_kbit_training` does,
    since that upcast and the fp32 logits it brings cost more memory than the 4-bit base saves.

    Every parameter has ``requires_grad=False`` and the KV cache is off (it is useless in training).

    Args:
        model: the model section of the config.
        qlora: load the base in 4-bit NF4 (`adapter.qlora`).
        device: where to load the weights; None keeps them on the CPU.

    Raises:
        ConfigError: the checkpoint cannot be found or loaded; or QLoRA is asked for and cannot be done:
            bitsandbytes is missing, the checkpoint is already quantised with another method, or no linear
            layer became 4-bit after loading.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    model_config = _load_config(model, path)
    kwargs: dict[str, Any] = {
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "device_map": _device_map(device),
        "token": model.token,
    }
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    prequantized = check_quantization(model_config, model, qlora=qlora)
    if qlora and not prequantized:
        kwargs["quantization_config"] = nf4_config()
    kwargs["dtype"] = base_dtype(model, qlora=qlora)
    try:
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise _load_failed(model, "weights", error) from error
    if qlora:
        check_quantized(base, model)
    base.requires_grad_(False)
    base.config.use_cache = False
    return base


def nf4_config() -> Any:
    """The bitsandbytes config of a QLoRA base: NF4, double quantisation, bf16 compute, packed into bf16.

    The packed 4-bit weights are stored as bf16 elements (four 4-bit values each) so that FSDP2 shards them
    like any other bf16 tensor (`raylora.shards` loads them straight into their shards).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def base_dtype(model: ModelConfig, *, qlora: bool) -> torch.dtype | str:
    """The dtype the unquantised base weights are stored in (`auto`: the checkpoint's own; bf16 under QLoRA)."""
    if qlora:
        return _DTYPES.get(model.dtype, torch.bfloat16)
    return "auto" if model.dtype == "auto" else _DTYPES[model.dtype]


def check_quantization(model_config: PretrainedConfig, model: ModelConfig, *, qlora: bool) -> bool:
    """Refuse a checkpoint/QLoRA combination that cannot load; return whether it is stored in NF4 already.

    Raises:
        ConfigError: bitsandbytes is missing under QLoRA, or the checkpoint's quantisation does not fit.
    """
    problem, prequantized = _quantization_problem(model_config, model.name_or_path, qlora=qlora)
    if qlora:
        problem = problem or _bitsandbytes_problem()
    if problem:
        raise ConfigError(problem)
    return prequantized


def check_quantized(base: torch.nn.Module, model: ModelConfig) -> None:
    """Refuse a QLoRA base in which no linear layer became 4-bit (its layers are not `nn.Linear`)."""
    import bitsandbytes as bnb

    if not any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()):
        raise ConfigError(
            f"`adapter.qlora` is true, but no linear layer of {model.name_or_path!r} "
            f"({base.config.model_type}) was quantised to 4-bit (its layers are not torch.nn.Linear); "
            "set `adapter.qlora` to false to train LoRA on the unquantised base"
        )


# --------------------------------------------------------------------------------------------------------
# Sequence length


def model_max_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if the config does not say.

    Architectures spell it differently: ``max_position_embeddings`` (Llama and most), ``n_positions``
    (GPT-2), ``max_sequence_length`` or ``seq_length`` (some remote-code models).
    """
    if hasattr(config, "get_text_config"):  # a multimodal config keeps it on its text model
        config = config.get_text_config()
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_max_length(model_config: PretrainedConfig, max_length: int) -> None:
    """Refuse a `data.max_length` beyond what the model's position embeddings cover.

    Args:
        model_config: the base model's config (`model.config`, or `load_model_config`).
        max_length: `data.max_length`.

    Raises:
        ConfigError: `max_length` exceeds the model's maximum.
    """
    problem = _max_length_problem(model_config, max_length)
    if problem:
        raise ConfigError(problem)


def _max_length_problem(model_config: PretrainedConfig, max_length: int) -> str | None:
    limit = model_max_length(model_config)
    if limit is None or max_length <= limit:
        return None
    return (
        f"`data.max_length` is {max_length}, but this {model_config.model_type} model covers at most {limit} "
        f"positions; set `data.max_length` to {limit} or less"
    )


# --------------------------------------------------------------------------------------------------------
# LoRA


def apply_lora(
    model: PreTrainedModel, adapter: AdapterConfig, *, activation_checkpointing: bool | float = False
) -> tuple[PeftModel, list[str]]:
    """Wrap the resolved target modules of the frozen `model` with LoRA (or DoRA) adapters.

    The adapter weights are fp32 whatever the base dtype (peft's `autocast_adapter_dtype` upcasts them from
    bf16/fp16), so the optimizer updates them at full precision while the base stays bf16 or 4-bit. Modules
    in `adapter.modules_to_save` are trained in full, in the base's dtype.

    Args:
        model: the frozen base from `load_base_model`.
        adapter: the adapter section of the config; `peft_kwargs` go to `peft.LoraConfig` unchanged.
        activation_checkpointing: recompute decoder-layer activations in the backward pass (non-reentrant
            `torch.utils.checkpoint`), with the embedding output made to require grad so that gradients
            reach the adapters through checkpointed layers behind a frozen embedding. True checkpoints
            every decoder layer; a number in [0, 1] that fraction of them, spread evenly.

    Returns:
        The peft model and the sorted full paths of the wrapped modules (for the logs).

    Raises:
        ConfigError: a target module or a `modules_to_save` name matches nothing in the model.
    """
    from peft import get_peft_model

    config, targets = lora_config(model, adapter)
    if activation_checkpointing:
        apply_activation_checkpointing(model, float(activation_checkpointing))
    return get_peft_model(model, config), targets


def lora_config(model: torch.nn.Module, adapter: AdapterConfig) -> tuple[Any, list[str]]:
    """The `peft.LoraConfig` that `adapter` asks for on `model`, and the resolved target module paths.

    Args:
        model: the frozen base (or a peft model around it).
        adapter: the adapter section of the config; `peft_kwargs` go to `peft.LoraConfig` unchanged.

    Raises:
        ConfigError: a target module or a `modules_to_save` name matches nothing in the model.
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = resolve_target_modules(model, adapter.target_modules)
    modules_to_save = list(adapter.modules_to_save) or None
    if modules_to_save:
        problem = modules_to_save_problem(model, modules_to_save)
        if problem:
            raise ConfigError(problem)
    peft_kwargs = dict(adapter.peft_kwargs)
    layers = linear_layers(model, include_head=True)
    if any(isinstance(layers[path], Conv1D) for path in targets):
        # GPT-2's Conv1D stores its weight transposed; peft would flip this itself, with a warning per layer.
        peft_kwargs.setdefault("fan_in_fan_out", True)
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(targets),
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **peft_kwargs,
    )
    return config, targets


def apply_activation_checkpointing(model: PreTrainedModel, fraction: float = 1.0) -> None:
    """Recompute that `fraction` of the decoder layers in the backward pass (non-reentrant checkpointing).

    The embedding output is made to require grad, so that gradients reach the adapters through checkpointed
    layers behind a frozen embedding.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if fraction < 1.0:
        # transformers checkpoints every layer whose `gradient_checkpointing` flag is set (its decoder layers
        # check the flag on each call); keep it on for every 1/fraction-th layer, spread evenly.
        layers = [m for m in model.modules() if _checkpointing_layer(m)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = math.floor((index + 1) * fraction) > math.floor(index * fraction)
    # Newer transformers register the hook itself; registering it twice would leave a stale hook behind.
    if (
        not getattr(model, "_require_grads_hooks", None)
        and getattr(model, "_require_grads_hook", None) is None
    ):
        model.enable_input_require_grads()


def _checkpointing_layer(module: torch.nn.Module) -> bool:
    """A decoder layer that transformers checkpoints on its own flag (transformers >= 4.52)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


# --------------------------------------------------------------------------------------------------------
# Structure


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (the modules transformers never splits across devices), in order.

    They are the units of FSDP2 sharding, of per-layer compilation and of FP8 conversion.

    Raises:
        RuntimeError: the architecture declares no `_no_split_modules`, so its layers cannot be told apart.
    """
    no_split = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    # By class name along the class's bases: FSDP2 renames a sharded layer's class (FSDPLlamaDecoderLayer).
    layers = [m for m in model.modules() if any(c.__name__ in no_split for c in type(m).__mro__)]
    if not layers:
        raise RuntimeError(
            f"cannot find the decoder layers of {type(unwrap(model)).__name__} to shard with FSDP2 "
            "(its `_no_split_modules` is empty); run it on one worker"
        )
    return layers


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# --------------------------------------------------------------------------------------------------------
# Parameter counts


@dataclass(frozen=True)
class ParameterCount:
    """Logical parameter counts of a model: what the weights represent, not how they are stored."""

    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def _logical_numel(param: torch.Tensor, quantized_shapes: dict[int, torch.Size]) -> int:
    # bitsandbytes' Params4bit stores two 4-bit values per byte in its storage dtype (a 64x64 weight in bf16
    # storage is a [1024, 1] tensor); the quant_state keeps the logical shape. FSDP2 replaces the parameter
    # by a DTensor without that state, but the Linear4bit module keeps its own copy (`module.quant_state`).
    if id(param) in quantized_shapes:
        return math.prod(quantized_shapes[id(param)])
    quant_state = getattr(param, "quant_state", None)
    if getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    if type(param).__name__ == "Params4bit":  # no state to read: count two values per stored byte
        return param.numel() * param.element_size() * 2
    # A DTensor (FSDP2) reports its global shape, so a sharded parameter counts in full on every rank.
    return math.prod(param.shape)


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters, counted by their logical size.

    A 4-bit weight counts as the matrix it represents, so a QLoRA model reports the same total as its bf16
    twin. A parameter shared by several modules (tied embeddings) counts once. A `DTensor` parameter
    (sharded by FSDP2) counts its global shape, not the local shard, so every rank reports the whole model;
    a sharded 4-bit weight is measured from its Linear4bit module's quant_state.

    Args:
        model: any module (a base, a peft model, a sharded model).
    """
    quantized_shapes: dict[int, torch.Size] = {}
    for module in model.modules():
        quant_state = getattr(module, "quant_state", None)
        weight = module._parameters.get("weight")
        if weight is not None and getattr(quant_state, "shape", None) is not None:
            quantized_shapes[id(weight)] = quant_state.shape
    trainable = total = 0
    for param in model.parameters():  # parameters() yields a shared tensor once
        n = _logical_numel(param, quantized_shapes)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCount(trainable=trainable, total=total)


# --------------------------------------------------------------------------------------------------------
# Checks before loading weights


def check_model(model: ModelConfig, adapter: AdapterConfig, *, max_length: int) -> list[str]:
    """Check the model-dependent fields from the checkpoint's config alone, before any weights load.

    Builds the architecture on the meta device (no memory, no weights) to resolve the target modules and
    `modules_to_save`, and checks QLoRA support and the sequence length, raising one `ConfigError` that
    lists every problem found.

    Args:
        model: the model section of the config.
        adapter: the adapter section of the config.
        max_length: `data.max_length`.

    Returns:
        The resolved target modules (full paths), as `apply_lora` will resolve them.

    Raises:
        ConfigError: every problem found: the checkpoint cannot be found; QLoRA cannot be done; a target
            module or `modules_to_save` name matches nothing; `max_length` exceeds the model's.
    """
    from transformers import AutoModelForCausalLM

    model_config = load_model_config(model)
    problems: list[str] = []
    problem = _quantization_problem(model_config, model.name_or_path, qlora=adapter.qlora)[0]
    if adapter.qlora:
        problem = problem or _bitsandbytes_problem()
    if problem:
        problems.append(problem)
    length_problem = _max_length_problem(model_config, max_length)
    if length_problem:
        problems.append(length_problem)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model.trust_remote_code)
    targets: list[str] = []
    try:
        targets = resolve_target_modules(skeleton, adapter.target_modules)
    except ConfigError as error:
        problems.extend(error.problems)
    if adapter.modules_to_save:
        problem = modules_to_save_problem(skeleton, list(adapter.modules_to_save))
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return targets
