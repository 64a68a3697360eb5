"""The frozen base model and its LoRA adapter: loading, target-module presets, injection, parameter counts.

A trial goes through this module in one order: `load_tokenizer` and `load_base_model` (bf16, or 4-bit NF4
for QLoRA; every base weight frozen), `check_max_length`, `apply_lora` (which resolves the target modules to
full module paths and wraps exactly those), then `count_parameters` for the logs. Every problem that comes
from the user's input (a missing path, a target-module typo, a model that cannot be quantised, a sequence
longer than the model's) is a `ConfigError` naming the config field, the value and the fix.

`check_model` / `plan_model` run the same checks from the checkpoint's config alone, on a weightless
(meta-device) copy of the architecture and a tiny random one (`raylora.architecture`), so that a sweep can
refuse a bad trial before it loads any weights: a model that is not a causal LM, an attention kernel the
architecture cannot run, QLoRA on layers that cannot be quantised, packing where documents would mix. The
plan they return says which attention kernel runs and, under QLoRA, which weights stay unquantised.

Which layers the adapter wraps (presets per architecture, resolution to full module paths) is decided in
`raylora.targets`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raylora.architecture import ArchitectureCheck, check_architecture
from raylora.config import AdapterConfig, ConfigError, ModelConfig
from raylora.targets import (
    Targets,
    expert_parameters,
    linear_layers,
    modules_to_save_problem,
    resolve_targets,
)
from raylora.tiny import TINY_PRESETS, materialize_preset

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelPlan",
    "ParameterCount",
    "UnquantizedWeights",
    "apply_activation_checkpointing",
    "attention_kernel",
    "apply_lora",
    "base_dtype",
    "check_max_length",
    "check_model",
    "check_quantization",
    "check_quantized",
    "count_parameters",
    "decoder_layers",
    "describe_base",
    "load_base_model",
    "load_model_config",
    "load_tokenizer",
    "lora_config",
    "model_max_length",
    "nf4_config",
    "no_kv_cache",
    "qlora_skip_modules",
    "plan_model",
    "resolve_model_path",
    "unquantized_weights",
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


def _read_directly(model: torch.nn.Module) -> list[str]:
    """Linear layers whose weight the model's own code uses as a matrix rather than calling the layer: a
    Mamba mixer's dt_proj, x_proj, out_proj (fused kernels), a router the code multiplies by hand
    (LongCat's `classifier`, which a tiny copy's forward never calls), a weight RWKV rescales in place.
    bitsandbytes' packed 4-bit storage there would be read as if it were the matrix."""
    from raylora.architecture import check_architecture
    from raylora.targets import _kernel_mixer_reads, _pattern, _rewritten_in_place, _weights_read_directly

    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    never_called = (
        check_architecture(config, getattr(config, "_attn_implementation", None)).never_called
        if config is not None
        else frozenset()
    )
    rewritten = _rewritten_in_place(model)
    found = []
    for path in linear_layers(model, include_head=True):
        parent_path, _, leaf = path.rpartition(".")
        parent = modules.get(parent_path)
        if parent is None:
            continue
        if (
            leaf in _kernel_mixer_reads(parent)
            or (leaf in _weights_read_directly(type(parent)) and _pattern(path) in never_called)
            or any(path.endswith("." + pair) for pair in rewritten)
        ):
            found.append(path)
    return found


def qlora_skip_modules(skeleton: torch.nn.Module) -> list[str] | None:
    """`llm_int8_skip_modules` for the 4-bit load: None (transformers' own default: the head and tied
    weights) unless some layer must stay unquantised; then that default plus those layers."""
    keep = _read_directly(skeleton)
    if not keep:
        return None
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # older transformers keep it with the integrations
        from transformers.integrations import get_keys_to_not_convert
    return sorted(set(get_keys_to_not_convert(skeleton)) | set(keep))


def attention_kernel(model: ModelConfig) -> str | None:
    """What `from_pretrained` gets: None lets transformers choose (sdpa where supported, else eager)."""
    value = model.attn_implementation
    return None if value in (None, "auto") else value


def load_base_model(
    model: ModelConfig,
    *,
    qlora: bool,
    device: torch.device | str | None = None,
    adapter: AdapterConfig | None = None,
) -> PreTrainedModel:
    """The frozen base model, ready for `apply_lora`.

    Without QLoRA the weights are stored in `model.dtype` (`auto`: the checkpoint's own dtype). With QLoRA
    every linear layer that transformers' bitsandbytes integration converts (the exact `torch.nn.Linear`
    and `Conv1D` layers but the output head) becomes a `Linear4bit` (NF4, double quantisation, bf16
    compute) whose packed weights are stored as bf16, so that FSDP2 can shard them like any other bf16
    tensor. The routed experts of a mixture-of-experts model (fused 3-D weights, which transformers does
    not convert) are quantised to NF4 with bitsandbytes' parametrization where the adapter leaves them
    alone, or where peft can adapt a quantised weight (`ModelPlan.unquantized` says which stay bf16 and
    why). The modules that stay unquantised (embeddings, norms, the head) keep `model.dtype` (`auto`:
    bf16); they are deliberately *not* upcast to fp32 as peft's `prepare_model_for_kbit_training` does,
    since that upcast and the fp32 logits it brings cost more memory than the 4-bit base saves.

    The attention kernel is `model.attn_implementation` (`auto`: transformers' choice, sdpa where the
    architecture supports it, else eager). Every parameter has ``requires_grad=False`` and the KV cache is
    off (it is useless in training).

    Args:
        model: the model section of the config.
        qlora: load the base in 4-bit NF4 (`adapter.qlora`).
        device: where to load the weights; None keeps them on the CPU.
        adapter: the adapter that will be applied; under QLoRA, it decides which routed experts are
            quantised (see above). None: the experts are treated as adapted.

    Raises:
        ConfigError: the checkpoint cannot be found or loaded; or QLoRA is asked for and cannot be done:
            bitsandbytes is missing, the checkpoint is already quantised with another method, or no weight
            of the architecture can be quantised to 4-bit.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    model_config = _load_config(model, path)
    kwargs: dict[str, Any] = {
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "device_map": _device_map(device),
        "token": model.token,
        "attn_implementation": attention_kernel(model),
    }
    prequantized = check_quantization(model_config, model, qlora=qlora)
    if qlora and not prequantized:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                model_config, trust_remote_code=model.trust_remote_code
            )
        kwargs["quantization_config"] = nf4_config(qlora_skip_modules(skeleton))
    kwargs["dtype"] = base_dtype(model, qlora=qlora)
    try:
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise _load_failed(model, "weights", error) from error
    if qlora:
        adapted = resolve_targets(base, adapter.target_modules).parameters if adapter is not None else None
        _quantize_experts(base, adapted)
        _keep_cpu_4bit_layers_on_the_general_kernel(base)
        check_quantized(base, model)
    base.requires_grad_(False)
    no_kv_cache(base.config)
    return base


def nf4_config(skip: list[str] | None = None) -> Any:
    """The bitsandbytes config of a QLoRA base: NF4, double quantisation, bf16 compute, packed into bf16.

    The packed 4-bit weights are stored as bf16 elements (four 4-bit values each) so that FSDP2 shards them
    like any other bf16 tensor (`raylora.shards` loads them straight into their shards). `skip`: the modules
    to keep unquantised (`qlora_skip_modules`); None leaves transformers' default (the head, tied weights).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=skip,
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
    """Refuse a QLoRA base in which no weight became 4-bit (`unquantized_weights` says why for each)."""
    report = unquantized_weights(base)
    if report.quantized_params == 0:
        raise ConfigError(_nothing_quantised(model.name_or_path, base.config.model_type, report))


def no_kv_cache(config: PretrainedConfig) -> None:
    """KV cache off in the config and in every sub-config: a multimodal model's language model reads its own
    `text_config.use_cache`, and with a cache transformers skips the packed-sequence detection that keeps
    packed documents apart (and a training step has no use for a cache)."""
    config.use_cache = False
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "use_cache"):
            sub.use_cache = False
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if hasattr(text, "use_cache"):
            text.use_cache = False


# --------------------------------------------------------------------------------------------------------
# QLoRA: what is quantised, what stays in the base dtype and why


@dataclass(frozen=True)
class UnquantizedWeights:
    """Under QLoRA: the linear and expert weights of the language model that stay in the base dtype.

    `groups` holds (path pattern with layer indices as ``*``, weights, reason); embeddings, norms and the
    output head are left out (they are never quantised, by design). `extra_bytes` is what these weights
    cost over NF4 (4.13 bits a weight with double quantisation).
    """

    groups: tuple[tuple[str, int, str], ...]
    params: int
    bytes: int
    quantized_params: int

    @property
    def extra_bytes(self) -> int:
        return max(0, self.bytes - int(self.params * _NF4_BITS / 8))

    def describe(self) -> str:
        """One line for banners and logs; empty when every linear and expert weight is 4-bit."""
        if not self.params:
            return ""
        by_reason: dict[str, list[str]] = {}
        for pattern, count, reason in self.groups:
            by_reason.setdefault(reason, []).append(f"{pattern} ({count:,})")
        groups = "; ".join(f"{', '.join(patterns)}: {reason}" for reason, patterns in by_reason.items())
        return (
            f"{self.params:,} weights stay unquantised, {self.bytes / 2**20:,.1f} MiB "
            f"({self.extra_bytes / 2**20:,.1f} MiB more than NF4): {groups}"
        )


# NF4 with double quantisation: 4 bits a weight, an 8-bit absmax per block of 64, and the absmax's own fp32
# scale per 256 blocks (QLoRA paper, section 3).
_NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def _pattern(path: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _is_4bit(module: torch.nn.Module, name: str = "weight") -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:
        return False
    if name == "weight" and isinstance(module, bnb.nn.Linear4bit):
        return True
    chains = getattr(module, "parametrizations", None)
    return (
        chains is not None and name in chains and type(chains[name][0]).__name__ == "Bnb4bitParametrization"
    )


def unquantized_weights(
    model: torch.nn.Module, *, expert_reasons: dict[str, str | None] | None = None
) -> UnquantizedWeights:
    """Measure which linear and routed-expert weights of `model` are not 4-bit, with the reason for each.

    Works on a loaded model, and on a meta-device skeleton that transformers' bitsandbytes integration has
    converted (`plan_model`): there `expert_reasons` says, per expert weight, why it will stay in the base
    dtype (None: it will be quantised while loading, and counts as such).
    """
    from transformers.pytorch_utils import Conv1D

    base = unwrap(model)
    itemsize = getattr(base, "dtype", torch.bfloat16).itemsize
    groups: dict[tuple[str, str], int] = {}
    quantized = 0
    read_directly = set(_read_directly(base))
    for path, layer in linear_layers(base).items():
        weight = layer.weight
        count = math.prod(getattr(getattr(weight, "quant_state", None), "shape", None) or weight.shape)
        if _is_4bit(layer):
            quantized += count
            continue
        if type(layer) is not torch.nn.Linear and not isinstance(layer, Conv1D):
            reason = (
                f"its class {type(layer).__name__} subclasses torch.nn.Linear, and transformers' bitsandbytes "
                "integration converts only layers whose type is exactly torch.nn.Linear (or Conv1D)"
            )
        elif path in read_directly:
            reason = "the model's code reads its weight directly, which 4-bit storage would break"
        else:
            reason = "transformers keeps it out of 4-bit (the model's last module, or in its skip list)"
        groups[(_pattern(path), reason)] = groups.get((_pattern(path), reason), 0) + count
    modules = dict(base.named_modules())
    for path, param in expert_parameters(base).items():
        owner_path, _, name = path.rpartition(".")
        owner = modules.get(owner_path)
        if owner is not None and _is_4bit(owner, name):
            quantized += math.prod(owner.parametrizations[name][0].quant_state.shape)
            continue
        count = param.numel()
        if expert_reasons is not None:
            reason = expert_reasons.get(path)
            if reason is None:  # the plan: quantised while loading
                quantized += count
                continue
        else:
            reason = _experts_unquantizable_reason(adapted=True) or "left unquantised"
        groups[(_pattern(path), reason)] = groups.get((_pattern(path), reason), 0) + count
    params = sum(groups.values())
    ordered = tuple((pattern, count, reason) for (pattern, reason), count in sorted(groups.items()))
    return UnquantizedWeights(ordered, params, params * itemsize, quantized)


def _nothing_quantised(name: str, model_type: str, report: UnquantizedWeights) -> str:
    reasons = "; ".join(sorted({reason for _, _, reason in report.groups})) or "it has no linear layer"
    return (
        f"`adapter.qlora` is true, but no weight of {name!r} ({model_type}) can be quantised to 4-bit: "
        f"{reasons}; set `adapter.qlora` to false to train LoRA on the unquantised base"
    )


def _experts_unquantizable_reason(adapted: bool) -> str | None:
    """Why routed experts cannot be 4-bit here, or None when they can (bitsandbytes' parametrization)."""
    try:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit  # noqa: F401
    except Exception:
        return (
            "fused expert weights are not torch.nn.Linear, so transformers does not quantise them, and this "
            "bitsandbytes has no `nn.parametrize.replace_parameter_4bit` to quantise a parameter (0.48 or newer)"
        )
    if adapted and not _peft_adapts_quantized_parameters():
        import peft

        return (
            f"adapted routed experts stay in the base dtype: peft {peft.__version__} cannot put LoRA on a "
            "bitsandbytes-quantised expert weight (its LoRA parametrization stays on the weight after each "
            "forward, so the update would compound); target 'attention' to quantise the experts instead"
        )
    return None


_PEFT_ON_QUANTIZED: list[bool] = []


def _peft_adapts_quantized_parameters() -> bool:
    """Whether peft's parameter LoRA works on a bitsandbytes-parametrized weight, measured once.

    A tiny module with a 3-D weight (2 experts) is quantised, adapted, and run twice: the LoRA
    parametrization must be gone after each forward, and both outputs equal.
    """
    if _PEFT_ON_QUANTIZED:
        return _PEFT_ON_QUANTIZED[0]
    works = False
    try:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit
        from peft import LoraConfig, get_peft_model

        class _Experts(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(
                    torch.randn(2, 64, 64, dtype=torch.bfloat16), requires_grad=False
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.einsum("bi,eoi->beo", x, self.weight)

        class _Holder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.experts = _Experts()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.experts(x)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            holder = _Holder()
            replace_parameter_4bit(holder.experts, "weight", quant_type="nf4")
            lora = LoraConfig(
                r=2, target_modules=[], target_parameters=["experts.weight"], init_lora_weights=False
            )
            peft_model = get_peft_model(holder, lora)
            x = torch.randn(3, 64, dtype=torch.bfloat16)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                first, second = peft_model(x), peft_model(x)
        chain = holder.experts.parametrizations["weight"]
        works = len(chain) == 1 and torch.equal(first, second)
    except Exception:  # any failure means "cannot", which keeps the experts in bf16
        works = False
    _PEFT_ON_QUANTIZED.append(works)
    return works


def _quantize_experts(model: torch.nn.Module, adapted: tuple[str, ...] | None) -> None:
    """NF4 for the routed experts that can take it (`_experts_unquantizable_reason`), in place.

    `adapted`: the expert weights the adapter will target (None: all of them). Each weight is quantised
    where it lies (its device), one at a time, so the peak is one expert weight in bf16 beside the rest.
    """
    experts = expert_parameters(model)
    if not experts:
        return
    modules = dict(model.named_modules())
    for path in sorted(experts):
        is_adapted = adapted is None or path in adapted
        if _experts_unquantizable_reason(is_adapted) is not None:
            continue
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        owner_path, _, name = path.rpartition(".")
        replace_parameter_4bit(modules[owner_path], name, compress_statistics=True, quant_type="nf4")


def _keep_cpu_4bit_layers_on_the_general_kernel(model: torch.nn.Module) -> None:
    """On the CPU, bitsandbytes repacks a Linear4bit's weight for a faster kernel the first time it runs
    without grad (an eval), and that repacking assumes an output size that is a multiple of 32 and an input
    size that is a multiple of the quantisation block (64): otherwise the first eval crashes ("N must be
    divisible by block_n", or a reshape error), as on Qwen2-MoE's 1-wide `shared_expert_gate` or a narrow
    expert MLP. Such layers keep the general kernel, which is what training already runs."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64) or 64
        if module.out_features % 32 or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------------------------------------
# Sequence length


def model_max_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if the config does not say.

    Architectures spell it differently: ``max_position_embeddings`` (Llama and most), ``n_positions``
    (GPT-2), ``max_seq_len`` (MPT), ``n_ctx`` (some GPT-2 descendants), ``max_target_positions`` (decoders
    of speech and OCR models), ``max_sequence_length`` or ``seq_length`` (some remote-code models).
    """
    if hasattr(config, "get_text_config"):  # a multimodal config keeps it on its text model
        config = config.get_text_config()
    for attribute in (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "n_ctx",
        "max_target_positions",
        "max_sequence_length",
        "seq_length",
    ):
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
    """Wrap the resolved targets of the frozen `model` with LoRA (or DoRA) adapters.

    Linear layers are peft `target_modules`; the fused routed-expert weights of a mixture-of-experts model
    are peft `target_parameters` (one low-rank pair per expert, `peft.tuners.lora.ParamWrapper`), so the
    saved adapter loads with plain peft. The adapter weights are fp32 whatever the base dtype (peft's
    `autocast_adapter_dtype` upcasts them from bf16/fp16), so the optimizer updates them at full precision
    while the base stays bf16 or 4-bit. Modules in `adapter.modules_to_save` are trained in full, in the
    base's dtype.

    Args:
        model: the frozen base from `load_base_model`.
        adapter: the adapter section of the config; `peft_kwargs` go to `peft.LoraConfig` unchanged.
        activation_checkpointing: recompute decoder-layer activations in the backward pass (non-reentrant
            `torch.utils.checkpoint`), with the embedding output made to require grad so that gradients
            reach the adapters through checkpointed layers behind a frozen embedding. True checkpoints
            every decoder layer; a number in [0, 1] that fraction of them, spread evenly.

    Returns:
        The peft model and the sorted full paths of the adapted layers and expert weights (for the logs).

    Raises:
        ConfigError: a target module or a `modules_to_save` name matches nothing in the model, or the
            adapter settings do not apply to the fused expert weights it targets.
    """
    from peft import get_peft_model

    config, targets = lora_config(model, adapter)
    if activation_checkpointing:
        apply_activation_checkpointing(model, float(activation_checkpointing))
    return get_peft_model(model, config), targets.paths


def lora_config(model: torch.nn.Module, adapter: AdapterConfig) -> tuple[Any, Targets]:
    """The `peft.LoraConfig` that `adapter` asks for on `model`, and its resolved targets (linear layers and
    routed-expert weights, by full path).

    Args:
        model: the frozen base (or a peft model around it).
        adapter: the adapter section of the config; `peft_kwargs` go to `peft.LoraConfig` unchanged.

    Raises:
        ConfigError: a target module or a `modules_to_save` name matches nothing in the model, or the
            adapter settings do not apply to the fused expert weights it targets.
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, adapter.target_modules)
    problems = _expert_adapter_problems(adapter, targets, str(getattr(model.config, "model_type", "")))
    modules_to_save = list(adapter.modules_to_save) or None
    if modules_to_save:
        problem = modules_to_save_problem(model, modules_to_save)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    peft_kwargs = dict(adapter.peft_kwargs)
    layers = linear_layers(model, include_head=True)
    if any(isinstance(layers[path], Conv1D) for path in targets.modules):
        # GPT-2's Conv1D stores its weight transposed; peft would flip this itself, with a warning per layer.
        peft_kwargs.setdefault("fan_in_fan_out", True)
    if targets.parameters:
        peft_kwargs["target_parameters"] = list(targets.parameters)
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(targets.modules),
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

    A 4-bit weight counts as the matrix it represents (a 4-bit expert stack as its experts x out x in), so
    a QLoRA model reports the same total as its bf16 twin. LoRA pairs on fused expert weights are ordinary
    trainable parameters and count as such. A parameter shared by several modules (tied embeddings) counts once. A `DTensor` parameter
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
        # A routed-expert weight quantised by bitsandbytes' parametrization: the packed data is the
        # parametrization's `original`, and its first step holds the quant_state with the logical shape.
        for chain in (
            getattr(module, "parametrizations", {}).values() if hasattr(module, "parametrizations") else ()
        ):
            state = getattr(chain[0], "quant_state", None)
            if getattr(state, "shape", None) is not None:
                quantized_shapes[id(chain.original)] = state.shape
    trainable = total = 0
    for param in model.parameters():  # parameters() yields a shared tensor once
        n = _logical_numel(param, quantized_shapes)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCount(trainable=trainable, total=total)


# --------------------------------------------------------------------------------------------------------
# Checks before loading weights


@dataclass(frozen=True)
class ModelPlan:
    """What a run will do with its base model, decided from config.json before any weight loads.

    `check_model` and `plan_model` build it; the CLI prints `notes()` in its banner, and the run writes
    `as_params()` beside the adapter (`raylora_config.json`), where the sweep's MLflow tracking logs them as
    params of the trial.
    """

    model_type: str
    attn_implementation: str  # the kernel the run uses; `auto` resolved
    attn_requested: str  # as configured
    targets: Targets
    unquantized: UnquantizedWeights | None  # QLoRA only
    packing_checked: ArchitectureCheck | None = None  # when `data.packing`
    supports_activation_checkpointing: bool = True

    def notes(self) -> list[str]:
        """Human-readable lines: attention kernel, adapted experts, weights QLoRA leaves unquantised."""
        lines = [
            f"attention: {self.attn_implementation}"
            + (" (auto)" if self.attn_requested in ("auto", "None") else "")
        ]
        if self.targets.parameters:
            patterns = sorted({_pattern(p) for p in self.targets.parameters})
            lines.append(f"routed experts adapted through peft target_parameters: {', '.join(patterns)}")
        if self.targets.skipped:
            skipped = "; ".join(f"{pattern} ({why})" for pattern, why in self.targets.skipped)
            lines.append(f"not adapted, a LoRA there would get no gradient: {skipped}")
        if self.unquantized is not None and self.unquantized.params:
            lines.append(f"QLoRA: {self.unquantized.describe()}")
        if not self.supports_activation_checkpointing:
            lines.append(
                f"activation checkpointing: {self.model_type} cannot run with it (QLoRA, which turns it on by "
                "default, then trains without; asking for it is refused)"
            )
        if self.packing_checked is not None:
            lines.append(
                "packing: documents stay apart (checked on a tiny copy, difference "
                f"{self.packing_checked.packing_leak:.0e})"
            )
        return lines

    def as_params(self) -> dict[str, str]:
        """Flat string params for MLflow."""
        params = {
            "attn_implementation": self.attn_implementation,
            "expert_targets": ",".join(sorted({_pattern(p) for p in self.targets.parameters})),
            "skipped_targets": ",".join(pattern for pattern, _ in self.targets.skipped),
        }
        if self.unquantized is not None:
            params["unquantized_params"] = str(self.unquantized.params)
            params["unquantized_mib"] = f"{self.unquantized.bytes / 2**20:.2f}"
            params["unquantized_weights"] = self.unquantized.describe()[:6000]
        return params


def describe_base(base: PreTrainedModel, model: ModelConfig, adapter: AdapterConfig) -> ModelPlan:
    """The `ModelPlan` of a loaded base (before `apply_lora`), measured rather than predicted: the attention
    kernel transformers set up, the targets, and under QLoRA the weights that did stay unquantised."""
    return ModelPlan(
        model_type=str(base.config.model_type),
        attn_implementation=str(getattr(base.config, "_attn_implementation", None)),
        attn_requested=str(model.attn_implementation),
        targets=resolve_targets(base, adapter.target_modules),
        unquantized=unquantized_weights(base) if adapter.qlora else None,
    )


def check_model(
    model: ModelConfig, adapter: AdapterConfig, *, max_length: int, packing: bool = False
) -> list[str]:
    """Check the model-dependent fields from the checkpoint's config alone, before any weights load.

    See `plan_model`, which this calls.

    Returns:
        The resolved targets (full paths of linear layers and fused expert weights), as `apply_lora` will
        resolve them.

    Raises:
        ConfigError: every problem found (see `plan_model`).
    """
    return plan_model(model, adapter, max_length=max_length, packing=packing).targets.paths


def plan_model(
    model: ModelConfig, adapter: AdapterConfig, *, max_length: int, packing: bool = False
) -> ModelPlan:
    """Decide and check everything model-dependent from the checkpoint's config, before any weights load.

    Builds the architecture on the meta device (no memory, no weights) to resolve the target modules and
    `modules_to_save`, the attention kernel, and, under QLoRA, which weights transformers and bitsandbytes
    will quantise (transformers' own bitsandbytes conversion runs on the skeleton). A tiny random copy of
    the architecture (`raylora.architecture`) is run to refuse a model that is not causal and, with
    `data.packing`, one whose packed documents would see each other.

    Args:
        model: the model section of the config.
        adapter: the adapter section of the config.
        max_length: `data.max_length`.
        packing: `data.packing`.

    Raises:
        ConfigError: every problem found: the checkpoint cannot be found; it is not a causal LM; the
            attention kernel asked for is one the architecture cannot run; QLoRA cannot be done; a target
            module or `modules_to_save` name matches nothing; the adapter settings do not apply to fused
            expert weights; `max_length` exceeds the model's; packing would mix documents.
    """
    model_config = load_model_config(model)
    name = model.name_or_path
    problems: list[str] = []
    problem, prequantized = _quantization_problem(model_config, name, qlora=adapter.qlora)
    if adapter.qlora:
        problem = problem or _bitsandbytes_problem()
    if problem:
        problems.append(problem)
    length_problem = _max_length_problem(model_config, max_length)
    if length_problem:
        problems.append(length_problem)
    not_causal = _not_a_causal_lm(model_config, name, model.trust_remote_code)
    if not_causal:
        raise ConfigError([*problems, not_causal])  # nothing else can be checked without the architecture
    skeleton, attn_problem = _skeleton(model, model_config, dtype=_DTYPES.get(model.dtype, torch.bfloat16))
    if attn_problem:
        problems.append(attn_problem)
    chosen = str(getattr(skeleton.config, "_attn_implementation", None) or attention_kernel(model))
    measured = check_architecture(model_config, chosen)
    if measured.causal is False:
        problems.append(
            f"`model.name_or_path` is {name!r}, a {model_config.model_type} model that is not causal: on a tiny "
            f"random copy of it, predictions for earlier tokens change when a later token changes "
            f"(by {measured.causal_leak:.1e}); raylora trains causal LMs (for a BERT-style model meant as a "
            "decoder, set `is_decoder: true` in its config.json)"
        )
    packing_problem = measured.packing_problem() if packing else None
    if packing_problem:
        problems.append(packing_problem)
    targets = Targets(())
    try:
        targets = resolve_targets(skeleton, adapter.target_modules)
    except ConfigError as error:
        problems.extend(error.problems)
    problems.extend(_expert_adapter_problems(adapter, targets, model_config.model_type))
    if adapter.modules_to_save:
        problem = modules_to_save_problem(skeleton, list(adapter.modules_to_save))
        if problem:
            problems.append(problem)
    unquantized = None
    if adapter.qlora and not _qlora_refused(problems):
        unquantized = _plan_quantization(skeleton, model_config, targets, prequantized)
        if unquantized.quantized_params == 0:
            problems.append(_nothing_quantised(name, model_config.model_type, unquantized))
    if problems:
        raise ConfigError(problems)
    return ModelPlan(
        model_type=str(model_config.model_type),
        attn_implementation=chosen,
        attn_requested=str(model.attn_implementation),
        targets=targets,
        unquantized=unquantized,
        packing_checked=measured if packing else None,
        supports_activation_checkpointing=bool(getattr(skeleton, "supports_gradient_checkpointing", True))
        and measured.checkpointing_error is None,
    )


def _qlora_refused(problems: list[str]) -> bool:
    """QLoRA is already refused (bitsandbytes missing, a quantised checkpoint): no plan to make."""
    return any(p.startswith("`adapter.qlora`") for p in problems)


def _not_a_causal_lm(config: PretrainedConfig, name: str, trust_remote_code: bool) -> str | None:
    """Why `config` is not a decoder-only causal LM that transformers can build, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = str(getattr(config, "model_type", type(config).__name__))
    if getattr(config, "is_encoder_decoder", False):
        return (
            f"`model.name_or_path` is {name!r}, a {model_type} model, which is an encoder-decoder model; "
            "raylora trains causal LMs (decoder-only models such as Llama, Qwen, Mistral, GPT-2)"
        )
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        return (
            f"`model.name_or_path` is {name!r}, a {model_type} model, for which transformers has no causal-LM "
            f"class (AutoModelForCausalLM does not take a {type(config).__name__}: an encoder, an "
            "encoder-decoder or another kind of model); raylora trains causal LMs (decoder-only models such "
            "as Llama, Qwen, Mistral, GPT-2)"
        )
    return None


def _skeleton(
    model: ModelConfig, config: PretrainedConfig, *, dtype: torch.dtype
) -> tuple[PreTrainedModel, str | None]:
    """The architecture on the meta device with the run's attention kernel; and why that kernel cannot
    run (then the skeleton has transformers' default kernel, so that the other checks still run)."""
    from transformers import AutoModelForCausalLM

    def build(attn: str | None) -> PreTrainedModel:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=model.trust_remote_code, attn_implementation=attn, dtype=dtype
            )

    attn = attention_kernel(model)
    try:
        return build(attn), None
    except (ValueError, ImportError) as error:
        if attn is None:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        skeleton = build(None)
        default = skeleton.config._attn_implementation
    return skeleton, (
        f"`model.attn_implementation` is {attn!r}, which this {config.model_type} model cannot run "
        f"(transformers: {reason}); set it to 'auto' (here: {default}) or to a kernel the model supports"
    )


def _expert_adapter_problems(adapter: AdapterConfig, targets: Targets, model_type: str) -> list[str]:
    """What peft's LoRA on fused expert weights (`ParamWrapper`) cannot do, for the settings asked for.

    peft refuses these itself, from inside `get_peft_model`: dropout (the input of each expert is not a
    tensor LoRA sees, so it cannot be dropped), DoRA, a LoRA bias, and fan_in_fan_out.
    """
    if not targets.parameters:
        return []
    spec = adapter.target_modules
    where = f"`adapter.target_modules` ({spec!r}) adapts the routed experts of this {model_type} model"
    narrow = (
        "target 'attention', or name the linear layers to adapt, to leave the experts out"
        if spec in ("all-linear", "mlp")
        else "or leave the experts out of `adapter.target_modules`"
    )
    problems = []
    if isinstance(adapter.dropout, int | float) and adapter.dropout > 0:
        problems.append(
            f"`adapter.dropout` is {adapter.dropout}, but {where}, and peft's LoRA on fused expert weights has "
            f"no dropout (it adapts the weight, not an input it could drop); set `adapter.dropout` to 0, or "
            f"{narrow}"
        )
    if adapter.use_dora:
        problems.append(
            f"`adapter.use_dora` is true, but {where}, and peft has no DoRA for fused expert weights; "
            f"set `adapter.use_dora` to false, or {narrow}"
        )
    for key in ("lora_bias", "fan_in_fan_out"):
        if adapter.peft_kwargs.get(key):
            problems.append(
                f"`adapter.peft_kwargs` sets {key}, but {where}, and peft's LoRA on fused expert weights does "
                f"not support it; remove it, or {narrow}"
            )
    return problems


def _plan_quantization(
    skeleton: PreTrainedModel, config: PretrainedConfig, targets: Targets, prequantized: bool
) -> UnquantizedWeights:
    """What QLoRA will leave unquantised: transformers' bitsandbytes conversion run on the meta skeleton,
    and the experts' fate decided as `load_base_model` will."""
    from transformers.quantizers import AutoHfQuantizer

    quantization = (
        getattr(config, "quantization_config", None)
        if prequantized
        else nf4_config(qlora_skip_modules(skeleton))
    )
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=prequantized)
    quantizer.preprocess_model(skeleton, device_map=None)
    adapted = set(targets.parameters)
    reasons = {path: _experts_unquantizable_reason(path in adapted) for path in expert_parameters(skeleton)}
    return unquantized_weights(skeleton, expert_reasons=reasons)
