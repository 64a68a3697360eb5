"""What a checkpoint's architecture does, measured on a tiny random copy before any weight loads.

Some properties that decide whether a run is sound cannot be read from config.json: whether the model is
causal at all (BERT-style LM heads attend both ways unless `is_decoder` is set), and whether documents
packed into one row stay apart. Packing (`data.packing`) lays several documents end to end with position
ids restarting at 0 for each and no attention mask; transformers turns restarting position ids into a
block-diagonal mask, but only for architectures that build their masks through it: ALiBi models (BLOOM,
MPT), models that derive positions from the attention mask (OPT, BioGPT), and every recurrent or
convolutional token mixer (Mamba, RWKV, the linear-attention layers of Qwen3-Next) let a document see the
one before it. A table of such architectures would be out of date with the next transformers release.

So `check_architecture` builds the checkpoint's own architecture and options at tiny sizes
(`raylora.tiny.tiny_config`: width 64, two to four layers) with random weights, in fp32 on the CPU, and
measures: the logits before the last position must not change when the last token does (causal), and the
logits of two documents packed into one row must equal those of each document alone (packing). Both
differences are exactly 0 up to fp32 rounding (relative 4e-7 at most, measured over every causal LM of
transformers 5.24) or clearly not (2.6e-4 relative at the least), so the threshold of 1e-5 separates
them. The result is cached per (config, attention implementation): a sweep checks each once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["LEAK_TOLERANCE", "ArchitectureCheck", "check_architecture"]

# Largest logit difference, relative to max(1, largest logit), still counted as fp32 rounding.
LEAK_TOLERANCE = 1e-5
# The probe's documents: token ids from the tiny vocabulary's byte range, two documents of these lengths.
_DOCUMENTS = (5, 7)
_cache: dict[tuple[str, str | None], ArchitectureCheck] = {}


@dataclass(frozen=True)
class ArchitectureCheck:
    """What a tiny random copy of an architecture showed; None where it could not be measured."""

    model_type: str
    attn_implementation: str | None  # what transformers chose for the copy
    causal: bool | None
    causal_leak: float | None  # relative change of earlier logits when the last token changes
    packing_isolated: bool | None
    packing_leak: float | None  # relative difference of packed and lone documents' logits
    error: str | None = None  # why no copy could be built or run
    # Linear layers of the copy, as path patterns with indices as `*`, through which no gradient passes in a
    # forward and backward pass: never called (the model reads the weight directly, as Jamba's dt_proj, or
    # does not use the layer on text), or feeding only a non-differentiable choice (a sparse-attention
    # indexer's top-k). A LoRA on them would get no gradient. A pattern counts only if none of its layers
    # (experts, say) gets one.
    uncalled_linears: frozenset[str] = frozenset()
    # Of those, the ones a forward pass never calls at all (their weight may be read directly).
    never_called: frozenset[str] = frozenset()
    # Classes that subclass torch.nn.Linear with a forward of their own that is not `x @ W.T + b`
    # (DeepSeek-V4's block-diagonal grouped projection): peft would wrap them as plain linear layers.
    irregular_linear_classes: frozenset[str] = frozenset()
    # Whether a forward and backward pass runs with activation checkpointing on, set up as the loop does it;
    # None when the architecture declares no support (nothing to try) or the copy could not be run.
    checkpointing_error: str | None = None

    def packing_problem(self) -> str | None:
        """Why `data.packing` cannot be used with this architecture, or None when it can."""
        if self.packing_isolated:
            return None
        if self.packing_isolated is None:
            return (
                f"`data.packing` is true, but raylora could not check that packed documents stay apart in this "
                f"{self.model_type} model (no tiny copy of it could be run: {self.error}); set `data.packing` "
                "to false"
            )
        return (
            f"`data.packing` is true, but this {self.model_type} model lets packed documents see each other: "
            f"on a tiny random copy of it the logits of a document packed behind another differ from the "
            f"same document alone by {self.packing_leak:.1e} (relative), so it does not honour the restarting "
            "position ids that packing relies on (ALiBi or mask-derived positions, or a recurrent or "
            "convolutional token mixer); set `data.packing` to false"
        )


def check_architecture(config: PretrainedConfig, attn_implementation: str | None = None) -> ArchitectureCheck:
    """Build a tiny random copy of `config`'s architecture and measure causality and packing isolation.

    Args:
        config: the checkpoint's config (no weights are read).
        attn_implementation: the attention kernel the run will use (None: transformers' default choice);
            only ``eager`` and ``sdpa`` run on the CPU, so any other is measured with transformers' default.

    Returns:
        The measurement; with `error` set and the measured fields None when no copy could be built or run
        (a size relation the tiny copy does not know about is not a property of the architecture).
    """
    attn = attn_implementation if attn_implementation in ("eager", "sdpa") else None
    key = (_config_key(config), attn)
    if key not in _cache:
        # The global RNG is left as it was (dropout in the gradient pass draws from it): whether a run finds
        # the result cached must not change its adapter's initial weights.
        with torch.random.fork_rng(devices=[]):
            _cache[key] = _measure(config, attn)
    return _cache[key]


def _measure(config: PretrainedConfig, attn: str | None) -> ArchitectureCheck:
    model_type = str(getattr(config, "model_type", type(config).__name__))

    def unknown(error: Exception) -> ArchitectureCheck:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return ArchitectureCheck(
            model_type, None, None, None, None, None, f"{type(error).__name__}: {reason}"[:300]
        )

    try:
        model = _tiny_model(config, attn)
        model.eval()
        called = _record_calls(model)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (1, sum(_DOCUMENTS)), generator=generator)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 7) % 256
        first = _DOCUMENTS[0]
        positions = torch.cat([torch.arange(n) for n in _DOCUMENTS])[None]
        with torch.no_grad():
            logits = _logits(model, ids)
            scale = max(1.0, float(logits.abs().max()))
            causal_leak = float((logits[0, :-1] - _logits(model, changed)[0, :-1]).abs().max()) / scale
            packed = _logits(model, ids, positions)
            alone = torch.cat([_logits(model, ids[:, :first]), _logits(model, ids[:, first:])], dim=1)
            packing_leak = float((packed - alone).abs().max()) / scale
    except Exception as error:  # whatever the copy raises says nothing about the real checkpoint
        return unknown(error)
    ever_called = set(called)
    try:
        trained = _linears_with_gradients(model, ids, called)
    except Exception:  # no backward on the copy: nothing is left out on its account
        trained = set(_linear_paths(model))
    chosen = getattr(model.config, "_attn_implementation", None)
    all_linears = {_pattern(path) for path in _linear_paths(model)}
    return ArchitectureCheck(
        model_type,
        chosen,
        causal_leak <= LEAK_TOLERANCE,
        causal_leak,
        packing_leak <= LEAK_TOLERANCE,
        packing_leak,
        uncalled_linears=frozenset(all_linears - {_pattern(p) for p in trained}),
        never_called=frozenset(all_linears - {_pattern(p) for p in ever_called}),
        irregular_linear_classes=_irregular_linear_classes(model),
        checkpointing_error=_checkpointing_error(model, ids),
    )


def _checkpointing_error(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """Why a checkpointed forward and backward fails on the copy (GIT adds position embeddings in place to
    an output that checkpointing made a leaf requiring grad), or None when it runs or is not offered."""
    from raylora.model import apply_activation_checkpointing

    if not getattr(model, "supports_gradient_checkpointing", False):
        return None
    try:
        model.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.requires_grad_(True)
        apply_activation_checkpointing(model, 1.0)
        model.train()
        model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
    except Exception as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {text}"[:300]
    return None


def _irregular_linear_classes(model: torch.nn.Module) -> frozenset[str]:
    """Names of nn.Linear subclasses in `model` whose forward does not compute `F.linear(x, W, b)`."""
    found: set[str] = set()
    checked: set[type] = set()
    for module in model.modules():
        cls = type(module)
        if (
            not isinstance(module, torch.nn.Linear)
            or cls.forward is torch.nn.Linear.forward
            or cls in checked
        ):
            continue
        checked.add(cls)
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                regular = torch.allclose(
                    module(x), F.linear(x, module.weight, module.bias), atol=1e-5, rtol=1e-4
                )
        except Exception:
            regular = False
        if not regular:
            found.add(cls.__name__)
    return frozenset(found)


def _pattern(path: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _linear_paths(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]


def _linears_with_gradients(model: torch.nn.Module, ids: torch.Tensor, called: set[str]) -> set[str]:
    """Paths of the called linear layers whose weight gets a nonzero gradient from a next-token loss."""
    from transformers.pytorch_utils import Conv1D

    called.clear()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}
    model.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    model.train()
    # Any scalar of all the logits reaches every layer on their path; the model's own loss would also
    # depend on label conventions (image positions, a separate decoder vocabulary) that differ by model.
    model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
    model.eval()
    return {
        n
        for n, m in linears.items()
        if n in called and m.weight.grad is not None and bool(m.weight.grad.any())
    }


def _record_calls(model: torch.nn.Module) -> set[str]:
    """Paths of the linear layers whose forward runs, filled in as the model is called."""
    from transformers.pytorch_utils import Conv1D

    called: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D):
            module.register_forward_hook(lambda m, args, out, name=name: called.add(name))
    return called


def _tiny_model(config: PretrainedConfig, attn: str | None) -> torch.nn.Module:
    """A random fp32 copy of the architecture at tiny sizes; a checkpoint already that small as it is, when
    cutting its sizes further breaks one of its own size rules."""
    from transformers import AutoModelForCausalLM

    from raylora.tiny import _TINY_MAX_PARAMETERS, tiny_config

    def build(cfg: PretrainedConfig) -> torch.nn.Module:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)

    try:
        return build(tiny_config(config))
    except Exception:
        with torch.device("meta"):
            count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if count > _TINY_MAX_PARAMETERS:
            raise
        return build(config)


def _logits(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    # As the loss calls it for a packed batch: no attention mask, position ids restarting per document, no
    # cache (with a cache, transformers skips its packed-sequence detection).
    return model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False).logits.float()


# Config entries that say how a copy was loaded, not what the architecture is.
_LOADING_KEYS = {
    "dtype",
    "torch_dtype",
    "use_cache",
    "transformers_version",
    "_name_or_path",
    "quantization_config",
}


def _config_key(config: PretrainedConfig) -> str:
    def strip(d: dict) -> dict:
        return {
            k: strip(v) if isinstance(v, dict) else v
            for k, v in d.items()
            if k not in _LOADING_KEYS and not str(k).startswith("_attn_implementation")
        }

    return json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
