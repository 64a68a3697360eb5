"""Which weights an adapter trains: presets read from module names and shapes, resolved to full paths.

Target modules are resolved here rather than handed to peft as short names, for two reasons: peft raises
only when *no* name matches (a typo beside a valid name passes silently), and some architectures reuse a
leaf name in attention and MLP (GPT-2's ``c_proj``, GPT-NeoX's ``dense``), so a short name would wrap both.
The resolved list of full paths is what peft receives and what the tracking code logs.

The presets work on any causal LM, from what its modules are called and how they are shaped, without a
table per architecture:

- ``attention``: the linear layers under a module whose name says attention (``self_attn``, ``attn``,
  ``attention``, ``self_attention``, ``linear_attn``...), or beside a ``q_proj``/``qkv_proj`` in the same
  block (an attention block called ``mixer``).
- ``mlp``: the other linear layers under an MLP-like module (``mlp``, ``ffn``, ``feed_forward``, shared
  experts...), the ``fc1``/``fc2`` that OPT-style layers keep directly, and the routed experts.
- ``experts``: the routed experts of a mixture-of-experts model. transformers 5 stores them fused, one 3-D
  parameter per projection (``mlp.experts.gate_up_proj``: experts x out x in), not as ``nn.Linear``, so
  module targeting never reaches them; peft adapts such a parameter through
  ``LoraConfig(target_parameters=...)``, one low-rank pair per expert.
- ``all-linear``: every linear layer of the language model but the output head and the routers, plus the
  routed experts.

A router (``router``, ``gate``, ``shared_expert_gate``) is never in a preset: it decides which experts run,
and adapting it moves the load balance the experts were trained for. Nor is a linear layer whose LoRA would
never see a gradient: one through which a tiny copy of the architecture passes no gradient in a forward and
backward pass (never called, or feeding only a non-differentiable top-k; `raylora.architecture`); one whose
weight a Mamba-style mixer hands to its fused CUDA kernel (`out_proj`, `x_proj`, `dt_proj`; peft itself
refuses `out_proj` on the Mamba models it knows); one whose weight the model rewrites in place (RWKV's
eval-time rescaling); a `torch.nn.Linear` subclass whose forward is not `x @ W.T + b` (DeepSeek-V4's grouped
projection). `Targets.skipped` names them. An explicit list may still name any of these; the loop then
refuses, at the first step, a layer whose adapter got no gradient.
Only the language model is searched (`get_decoder()`), so a multimodal model's vision or audio tower, which
a text run never calls, gets no adapter. `TARGET_PRESETS` keeps the architectures whose names mislead
these rules (none among those transformers ships today; the table is where one would go).

Everything here reads module names, types, shapes and the architecture's source, and the measurements of a
tiny random copy built from the config, never a weight: it runs on a weightless (meta-device) copy of the
architecture as well as on a loaded model, so `raylora.model.check_model` resolves targets before any
weight loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from raylora.config import ConfigError

__all__ = [
    "EXPERTS_PRESET",
    "PRESET_NAMES",
    "TARGET_PRESETS",
    "Targets",
    "expert_parameters",
    "linear_layer_names",
    "linear_layers",
    "modules_to_save_problem",
    "resolve_target_modules",
    "resolve_targets",
    "router_layers",
]

# Per-architecture presets for the exceptions, as module *path suffixes* that include the parent module
# ("attn.c_proj", not "c_proj"). Empty: every causal LM of transformers 5.24 resolves by the rules below
# (the breadth test, tests/test_architectures.py, checks that on all of them).
TARGET_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {}

PRESET_NAMES = ("attention", "mlp", "all-linear")
# A preset of its own: only mixture-of-experts models have routed experts.
EXPERTS_PRESET = "experts"

# A path component that names an attention block, an MLP block, or a router.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|feed_?forward|^ff$|moe|experts?$|^intermediate$", re.IGNORECASE)
_ROUTER = re.compile(r"^(router|gate|wg|(shared_)?experts?_gate)$|^router_", re.IGNORECASE)
# Leaf names of the query projection: a block holding one is an attention block whatever it is called.
_QUERY_LEAVES = frozenset({"q_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv"})
# MLP layer names that count wherever they sit outside attention: OPT-style decoder layers hold fc1/fc2
# directly, and some hybrid models name their MLP block like their mamba block (`mixer`).
_MLP_LEAVES = frozenset(
    {"fc1", "fc2", "fc_in", "fc_out", "c_fc", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}
)
# Config fields that count a model's routed experts.
_EXPERT_COUNT_FIELDS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")


@dataclass(frozen=True)
class Targets:
    """What an adapter trains: linear layers (peft `target_modules`) and fused expert weights (peft
    `target_parameters`), each by full path."""

    modules: tuple[str, ...]
    parameters: tuple[str, ...] = ()
    # Linear layers a preset leaves out although they match it, as (path pattern, why): a LoRA on them would
    # get no gradient.
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def paths(self) -> list[str]:
        """Every target, sorted: what is logged as the resolved target modules."""
        return sorted(self.modules + self.parameters)


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


def _unwrapped_path(path: str) -> str:
    # peft nests a wrapped module's original under `base_layer` (twice for two adapted parameters).
    return ".".join(part for part in path.split(".") if part != "base_layer")


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
            # Its children are its base layer and its adapter's own linear pairs; a wrapped expert block
            # (peft's ParamWrapper) is no linear layer itself.
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


def _expert_count(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.insert(0, config.get_text_config())
    for cfg in configs:
        for field in _EXPERT_COUNT_FIELDS:
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
    return None


def expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Full path -> parameter for every fused routed-expert weight of the language model.

    A fused expert weight is a 3-D parameter (experts x out x in, or x in x out) of a module that is not a
    torch layer (convolution weights are 3-D too), with one slice per routed expert: its leading size is the
    expert count from the config (`num_local_experts`, `n_routed_experts`, `num_experts`...) or the module's
    own `num_experts`. Paths are those of the transformers model, before and after `apply_lora` (without
    peft's prefixes and `base_layer`); a weight that bitsandbytes quantised through a parametrization is
    found by the shape it represents.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    count = _expert_count(base)
    found: dict[str, torch.nn.Parameter] = {}
    for name, module in _language_model(base).named_modules(prefix=_language_prefix(base)):
        if isinstance(module, torch.nn.modules.conv._ConvNd | torch.nn.Embedding | torch.nn.Linear):
            continue
        sizes = {count, getattr(module, "num_experts", None)} - {None}
        candidates = [(n, p, p.shape) for n, p in module.named_parameters(recurse=False)]
        for param_name, chain in getattr(module, "parametrizations", {}).items():
            state = getattr(chain[0], "quant_state", None)  # bitsandbytes' 4-bit parametrization
            candidates.append((param_name, chain.original, getattr(state, "shape", chain.original.shape)))
        for param_name, param, shape in candidates:
            if len(shape) == 3 and min(shape[1:]) > 1 and shape[0] in sizes:
                found[f"{_unwrapped_path(name)}.{param_name}"] = param
    return found


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder (a multimodal model's language model), or the whole model where none is exposed."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    getter = getattr(base, "get_decoder", None)
    try:
        decoder = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        decoder = None
    # Some models name their output projection `decoder` (ModernBERT's decoder): only a module that holds
    # layers of its own counts.
    if decoder is None or isinstance(decoder, _linear_types()) or next(decoder.children(), None) is None:
        return model
    return decoder


def _language_prefix(model: torch.nn.Module) -> str:
    decoder = _language_model(model)
    if decoder is model:
        return ""
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return ""


def _is_router(path: str) -> bool:
    return any(_ROUTER.search(part) for part in path.split("."))


def router_layers(model: torch.nn.Module) -> list[str]:
    """Sorted paths of the linear routers and expert gates, which presets leave out."""
    return sorted(path for path in _language_linears(model) if _is_router(path))


def _language_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    decoder = _language_model(model)
    layers = linear_layers(model)
    if decoder is model:
        return layers
    inside = {id(m) for m in decoder.modules()}
    return {path: layer for path, layer in layers.items() if id(layer) in inside}


def _attention_blocks(paths: list[str]) -> set[str]:
    """Parent paths that hold a query projection: attention blocks, whatever their own name."""
    return {path.rsplit(".", 1)[0] for path in paths if path.rsplit(".", 1)[-1] in _QUERY_LEAVES}


def _classify(paths: list[str]) -> dict[str, list[str]]:
    """{'attention': [...], 'mlp': [...], 'other': [...]} for the non-router linear layer paths."""
    blocks = _attention_blocks(paths)
    kinds: dict[str, list[str]] = {"attention": [], "mlp": [], "other": []}
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        parents = parent.split(".") if parent else []
        if any(_ATTENTION.search(part) for part in parents) or parent in blocks:
            kinds["attention"].append(path)
        elif any(_MLP.search(part) for part in parents) or leaf in _MLP_LEAVES:
            kinds["mlp"].append(path)
        else:
            kinds["other"].append(path)
    return kinds


def _matches(path: str, name: str) -> bool:
    # peft's own rule for a list entry: the full path, or a suffix on a module boundary.
    return path == name or path.endswith("." + name)


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


# `self.<child>.weight` used as a value: not a look at its dtype, device or shape.
_WEIGHT_READ = re.compile(
    r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|data|ndim|requires_grad|size|numel|is_meta)\b)"
)
_weight_reads: dict[type, frozenset[str]] = {}


def _weights_read_directly(cls: type) -> frozenset[str]:
    """Children whose weight a method of `cls` (other than its initialisers) uses as a value."""
    if cls not in _weight_reads:
        import inspect

        names: set[str] = set()
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch."):
                break
            for name, function in vars(klass).items():
                if not inspect.isfunction(function) or "init" in name:
                    continue
                try:
                    names.update(_WEIGHT_READ.findall(inspect.getsource(function)))
                except (OSError, TypeError):
                    continue
        _weight_reads[cls] = frozenset(names)
    return _weight_reads[cls]


def _kernel_mixer_reads(module: torch.nn.Module) -> frozenset[str]:
    """For a state-space (Mamba-style) mixer, the linear children whose weights its code hands to a fused
    kernel (`mamba_inner_fn(..., self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight)`) or
    multiplies itself (Jamba's `self.dt_proj.weight @ ...`): a LoRA around them is skipped on that path, which
    on a GPU with the kernels installed is the path taken. Recognised by its causal convolution (`conv1d`)."""
    if not any(isinstance(child, torch.nn.Conv1d) for child in module.children()):
        return frozenset()
    return _weights_read_directly(type(module))


# `a.b.weight.mul_(...)` and the like: code that rewrites a layer's weight in place (RWKV rescales two
# layers of each block when it switches to eval mode), which a LoRA on the layer would not follow.
_WEIGHT_REWRITE = re.compile(r"\.(\w+)\.(\w+)\.weight(?:\.data)?\.(?:mul_|div_|add_|sub_|copy_)\(")
_rewrites: dict[type, frozenset[str]] = {}


def _rewritten_in_place(model: torch.nn.Module) -> frozenset[str]:
    """`parent.child` name pairs whose weight some module class of `model` rewrites in place."""
    import inspect

    found: set[str] = set()
    for cls in {type(m) for m in model.modules()}:
        if cls not in _rewrites:
            names: set[str] = set()
            for klass in cls.__mro__:
                if klass.__module__.startswith("torch."):
                    break
                for name, function in vars(klass).items():
                    if inspect.isfunction(function) and "init" not in name:
                        try:
                            names.update(
                                ".".join(m) for m in _WEIGHT_REWRITE.findall(inspect.getsource(function))
                            )
                        except (OSError, TypeError):
                            continue
            _rewrites[cls] = frozenset(names)
        found |= _rewrites[cls]
    return frozenset(found)


def _pattern(path: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _bypassed(model: torch.nn.Module, paths: list[str]) -> dict[str, str]:
    """Linear layers (of `paths`) that a LoRA wrapper would not reach, with the reason, by path."""
    from raylora.architecture import check_architecture

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    modules = dict(base.named_modules())
    found: dict[str, str] = {}
    config = getattr(base, "config", None)
    uncalled: frozenset[str] = frozenset()
    irregular: frozenset[str] = frozenset()
    if config is not None and hasattr(config, "to_json_string"):
        measured = check_architecture(config, getattr(config, "_attn_implementation", None))
        uncalled, irregular = measured.uncalled_linears, measured.irregular_linear_classes
    rewritten = _rewritten_in_place(base)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = modules.get(parent_path)
        layer = modules.get(path)
        base_layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if type(base_layer).__name__ in irregular:
            found[path] = (
                f"its class {type(base_layer).__name__} is a torch.nn.Linear whose forward is not x @ W.T + b"
            )
        elif any(path.endswith("." + pair) for pair in rewritten):
            found[path] = (
                "the model rewrites its weight in place (eval-time rescaling), which a LoRA would not follow"
            )
        elif parent is not None and leaf in _kernel_mixer_reads(parent):
            found[path] = f"{type(parent).__name__} hands its weight to a fused kernel or reads it directly"
        elif _pattern(path) in uncalled:
            found[path] = (
                "no gradient reaches it on a tiny copy (never called, read directly, or behind a top-k)"
            )
    return found


def _preset(model: torch.nn.Module, spec: str) -> Targets:
    """The targets of a preset name, or a ConfigError that lists what the model has."""
    model_type = _model_type(model)
    available = ", ".join(linear_layer_names(model))
    candidates = sorted(path for path in _language_linears(model) if not _is_router(path))
    bypassed = _bypassed(model, candidates)
    linears = [path for path in candidates if path not in bypassed]
    skipped = tuple(sorted({(_pattern(p), why) for p, why in bypassed.items()}))
    experts = sorted(expert_parameters(model))
    table = TARGET_PRESETS.get(model_type)
    if table is not None and spec in ("attention", "mlp"):
        found = sorted(path for path in linears if any(_matches(path, s) for s in table[spec]))
        return Targets(tuple(found), tuple(experts) if spec == "mlp" else (), skipped)
    kinds = _classify(linears)
    if spec == EXPERTS_PRESET:
        if not experts:
            raise ConfigError(
                f"`adapter.target_modules` is {spec!r}, but this {model_type} model has no routed experts "
                f"(no fused expert weights); use 'attention', 'mlp' or 'all-linear' (its linear layers are: "
                f"{available})"
            )
        return Targets((), tuple(experts))
    if spec == "all-linear":
        return Targets(tuple(linears), tuple(experts), skipped)
    if spec == "mlp":
        if not kinds["mlp"] and not experts:
            raise ConfigError(
                f"`adapter.target_modules` is 'mlp', but no MLP layer of this {model_type} model can be "
                f"recognised (no linear layer under an mlp/ffn/feed_forward module); give an explicit list of "
                f"module names (its linear layers are: {available}), or use 'all-linear'"
            )
        mlp = {_pattern(p) for p in _classify(candidates)["mlp"]}
        return Targets(tuple(kinds["mlp"]), tuple(experts), tuple(x for x in skipped if x[0] in mlp))
    if not kinds["attention"]:
        raise ConfigError(
            f"`adapter.target_modules` is 'attention', but no attention projection of this {model_type} "
            f"model can be recognised (no linear layer under a module named like attn/attention, none beside "
            f"a q_proj); give an explicit list of module names (its linear layers are: {available}), or use "
            "'all-linear'"
        )
    attention = {_pattern(p) for p in _classify(candidates)["attention"]}
    return Targets(tuple(kinds["attention"]), (), tuple(x for x in skipped if x[0] in attention))


def resolve_targets(model: torch.nn.Module, spec: str | list[str]) -> Targets:
    """The linear layers and fused expert weights that LoRA will adapt for `adapter.target_modules`.

    `spec` is a preset (``attention``, ``mlp``, ``all-linear``, ``experts``; see the module docstring) or a
    list of names, each matching linear layers by leaf name (``q_proj``) or by path suffix
    (``self_attn.q_proj``, ``model.layers.0.mlp.down_proj``), or fused expert weights the same way
    (``experts.gate_up_proj``). A single string that is not a preset is read as a one-name list. Presets
    never include the output head or a router; an explicit list may name them.

    Args:
        model: the base model (before `apply_lora`), or its meta-device skeleton.
        spec: `adapter.target_modules`.

    Raises:
        ConfigError: a name matches nothing (all such names are listed, with the model's linear layer
            names); a preset that finds nothing in this model.
    """
    model_type = _model_type(model)
    if isinstance(spec, str) and (spec in PRESET_NAMES or spec == EXPERTS_PRESET):
        return _preset(model, spec)

    available = ", ".join(linear_layer_names(model))
    names = [spec] if isinstance(spec, str) else list(spec)
    all_layers = linear_layers(model, include_head=True)
    experts = expert_parameters(model)
    unmatched = [
        name
        for name in names
        if not any(_matches(path, name) for path in all_layers)
        and not any(_matches(p, name) for p in experts)
    ]
    if unmatched:
        expert_note = f"; its fused expert weights are: {', '.join(_short_names(experts))}" if experts else ""
        if isinstance(spec, str):
            raise ConfigError(
                f"`adapter.target_modules` is {spec!r}, which is neither a preset "
                f"({', '.join(PRESET_NAMES)}), nor {EXPERTS_PRESET!r} (the routed experts of a MoE model), nor "
                f"a linear layer of this {model_type} model; give a preset or a list of module names (its "
                f"linear layers are: {available}{expert_note})"
            )
        raise ConfigError(
            f"`adapter.target_modules` names {', '.join(unmatched)}, which match no linear layer of this "
            f"{model_type} model; fix the spelling or remove them (its linear layers are: {available}"
            f"{expert_note})"
        )
    modules = sorted(path for path in all_layers if any(_matches(path, name) for name in names))
    parameters = sorted(path for path in experts if any(_matches(path, name) for name in names))
    return Targets(tuple(modules), tuple(parameters))


def resolve_target_modules(model: torch.nn.Module, spec: str | list[str]) -> list[str]:
    """The sorted full paths that LoRA will adapt for `adapter.target_modules` (`resolve_targets`): linear
    layers, and on mixture-of-experts models the fused expert weights."""
    return resolve_targets(model, spec).paths


def _short_names(experts: dict[str, torch.nn.Parameter]) -> list[str]:
    return sorted({".".join(path.split(".")[-2:]) for path in experts})


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
