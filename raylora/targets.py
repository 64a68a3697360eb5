"""Which layers an adapter wraps: target-module presets per architecture and their resolution to full paths.

Target modules are resolved here rather than handed to peft as short names, for two reasons: peft raises
only when *no* name matches (a typo beside a valid name passes silently), and some architectures reuse a
leaf name in attention and MLP (GPT-2's ``c_proj``, GPT-NeoX's ``dense``), so a short name would wrap both.
The resolved list of full paths is what peft receives and what the tracking code logs.

Everything here reads module names and types only, so it runs on a weightless (meta-device) copy of the
architecture as well as on a loaded model: `raylora.model.check_model` resolves targets before any weight
loads.
"""

from __future__ import annotations

import torch

from raylora.config import ConfigError

__all__ = [
    "PRESET_NAMES",
    "TARGET_PRESETS",
    "linear_layer_names",
    "linear_layers",
    "modules_to_save_problem",
    "resolve_target_modules",
]

# Presets name module *path suffixes* that include the parent module ("attn.c_proj", not "c_proj"): GPT-2
# calls both its attention output and its MLP output `c_proj`, GPT-NeoX calls its attention output `dense`
# beside `dense_h_to_4h`, so a bare leaf name would put MLP layers into the `attention` preset.
_LLAMA_STYLE = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}

TARGET_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,
    "phi3": {
        "attention": ("self_attn.qkv_proj", "self_attn.o_proj"),
        "mlp": ("mlp.gate_up_proj", "mlp.down_proj"),
    },
    "phi": {
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
        "mlp": ("mlp.fc1", "mlp.fc2"),
    },
    "gpt2": {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    # OPT keeps fc1/fc2 directly in the decoder layer, with no `mlp` parent.
    "opt": {
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        "mlp": ("fc1", "fc2"),
    },
    "gpt_neox": {
        "attention": ("attention.query_key_value", "attention.dense"),
        "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    },
}

# `all-linear` is attention + mlp where the architecture has presets, else every linear layer but the head.
PRESET_NAMES = ("attention", "mlp", "all-linear")


def _linear_types() -> tuple[type, ...]:
    # bitsandbytes' Linear4bit/Linear8bitLt subclass torch.nn.Linear; GPT-2 family models use transformers'
    # Conv1D (a transposed linear), which peft also wraps.
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        return None


def linear_layers(model: torch.nn.Module, *, include_head: bool = False) -> dict[str, torch.nn.Module]:
    """Full path -> module for every linear-like layer, without the output head unless asked.

    A layer that peft has already wrapped counts once, under its own path (not its `base_layer` and
    `lora_A`/`lora_B` children), so the names stay the same before and after `apply_lora`.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = _output_head(model)
    head_parts = {id(m) for m in head.modules()} if head is not None else set()  # a wrapped head too
    types = _linear_types()
    layers: dict[str, torch.nn.Module] = {}
    skip = None  # the path of the last peft-wrapped layer; named_modules() lists its children right after it
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(module, BaseTunerLayer):
            skip = name + "."
            module = module.get_base_layer()
        if not isinstance(module, types):
            continue
        is_head = id(module) in head_parts or (head is None and name.rsplit(".", 1)[-1] == "lm_head")
        if is_head and not include_head:
            continue
        layers[name] = module
    return layers


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Sorted unique leaf names of the model's linear layers, without the output head.

    Counts `torch.nn.Linear` (bitsandbytes' 4-bit and 8-bit layers are subclasses) and transformers'
    `Conv1D` (GPT-2). These are the names an explicit `adapter.target_modules` list can use.
    """
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})


def _matches(path: str, name: str) -> bool:
    # peft's own rule for a list entry: the full path, or a suffix on a module boundary.
    return path == name or path.endswith("." + name)


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def resolve_target_modules(model: torch.nn.Module, spec: str | list[str]) -> list[str]:
    """The sorted full module paths that LoRA will wrap for `adapter.target_modules`.

    `spec` is a preset (``attention``, ``mlp``, ``all-linear``), resolved by the model's `model_type` through
    `TARGET_PRESETS`, or a list of module names, each matching linear layers by leaf name (``q_proj``) or by
    path suffix (``self_attn.q_proj``, ``model.layers.0.mlp.down_proj``). A single string that is not a
    preset is read as a one-name list. Presets never include the output head; an explicit list may name it.
    `all-linear` on an architecture without presets takes every linear layer but the output head.

    Args:
        model: the base model (before `apply_lora`).
        spec: `adapter.target_modules`.

    Raises:
        ConfigError: a name matches no linear layer (all such names are listed, with the model's linear
            layer names); `attention` or `mlp` on an architecture with no preset; a preset that matches
            nothing in this model.
    """
    model_type = _model_type(model)
    layers = linear_layers(model)
    available = ", ".join(linear_layer_names(model))
    if isinstance(spec, str) and spec in PRESET_NAMES:
        presets = TARGET_PRESETS.get(model_type)
        if presets is None:
            if spec == "all-linear":
                return sorted(layers)
            raise ConfigError(
                f"`adapter.target_modules` is {spec!r}, but raylora has no `{spec}` preset for model_type "
                f"{model_type!r}; give an explicit list of module names instead (its linear layers are: "
                f"{available}), or use 'all-linear'"
            )
        suffixes = presets["attention"] + presets["mlp"] if spec == "all-linear" else presets[spec]
        resolved = sorted(path for path in layers if any(_matches(path, s) for s in suffixes))
        if not resolved:
            raise ConfigError(
                f"`adapter.target_modules` is {spec!r}, whose {model_type} preset ({', '.join(suffixes)}) "
                "matches no linear layer of this model; give an explicit list of module names (its linear "
                f"layers are: {available})"
            )
        return resolved

    names = [spec] if isinstance(spec, str) else list(spec)
    all_layers = linear_layers(model, include_head=True)
    unmatched = [name for name in names if not any(_matches(path, name) for path in all_layers)]
    if unmatched:
        if isinstance(spec, str):
            raise ConfigError(
                f"`adapter.target_modules` is {spec!r}, which is neither a preset "
                f"({', '.join(PRESET_NAMES)}) nor a linear layer of this {model_type} model; give a preset "
                f"or a list of module names (its linear layers are: {available})"
            )
        raise ConfigError(
            f"`adapter.target_modules` names {', '.join(unmatched)}, which match no linear layer of this "
            f"{model_type} model; fix the spelling or remove them (its linear layers are: {available})"
        )
    return sorted(path for path in all_layers if any(_matches(path, name) for name in names))


def modules_to_save_problem(model: torch.nn.Module, names: list[str]) -> str | None:
    paths = [path for path, _ in model.named_modules() if path]
    unmatched = [name for name in names if not any(_matches(path, name) for path in paths)]
    if not unmatched:
        return None
    # Candidates: leaf names of modules that hold weights themselves (embeddings, norms, linears, the head).
    holders = sorted(
        {
            path.rsplit(".", 1)[-1]
            for path, m in model.named_modules()
            if path and next(m.parameters(recurse=False), None) is not None
        }
    )
    return (
        f"`adapter.modules_to_save` names {', '.join(unmatched)}, which match no module of this "
        f"{_model_type(model)} model; fix the spelling or remove them (its modules with weights are: "
        f"{', '.join(holders)})"
    )
