"""Loading a base model straight into its FSDP2 shards, so that no rank ever holds the whole base.

FSDP only lets a trial fine-tune a base that one GPU cannot hold if no rank loads the whole of it first. So an
N-worker trial does not call `from_pretrained`; each rank:

1. builds the architecture with its parameters on the meta device (`base_skeleton`: no memory; buffers such
   as the rotary frequencies are small and built for real), with bitsandbytes' 4-bit layers swapped in by
   transformers' own quantizer under QLoRA;
2. wraps the adapter around it (`adapters_on_cpu`: the adapter weights are real, drawn from the run's seed
   exactly as on one worker, see below), and turns the base weights into their storage shapes
   (`pack_for_sharding`: a 4-bit weight becomes its packed bf16 column);
3. shards it with FSDP2 (`raylora.distributed.shard_with_fsdp2`);
4. fills only its own shard of each base weight from the checkpoint's safetensors files (`load_shards`):
   - an unquantised weight: the rank reads only the rows it owns (`safe_open(...).get_slice`), so neither its
     device nor its host memory ever holds more than its 1/N of the base;
   - a 4-bit (QLoRA) weight: NF4 with double quantisation takes statistics over the whole matrix (the block
     scales are quantised again around their mean), so each rank reads and quantises one whole matrix at a
     time with the very call transformers makes on one worker (`bnb.nn.Params4bit(...).to(device)`), keeps
     its rows of the packed weight and the matrix's quantisation state (about 1/32 of the packed bytes, held
     whole on every rank: bitsandbytes reads it from the module), and frees the rest;
   - an FP8 weight (`training.fp8`): the same, with `raylora.fastpath`'s per-tensor e4m3 scale.
   So a rank's memory peaks at its shards plus one weight matrix, not the base.

The adapter starts where one worker's starts. peft creates each LoRA weight on the CPU from the global RNG,
then moves it to the device and dtype of the layer it wraps; around a meta base that move would send it to the
meta device and lose its values. `adapters_on_cpu` shows peft a CPU stand-in of each wrapped weight instead,
so the move lands on the CPU with the base layer's dtype, as on one worker (peft's `autocast_adapter_dtype`
upcasts it to fp32 afterwards in both cases); FSDP2 then shards the real values. Adapter set-ups whose initial weights are computed from the
base weights (DoRA's magnitudes, PiSSA, OLoRA, LoftQ, EVA, CorDA) cannot be built on a meta base and are
refused before any weight loads (`raylora.config.sharded_adapter_problem`).

Why 4-bit layers stay bitsandbytes' (not torchao's `NF4Tensor`, which implements FSDP2's all-gather hooks):
the packed bytes are then the one-worker run's own, bit for bit, the one-GPU path does not change, and the
loss matches one worker's with every layer resharded. The price is the quantisation state, which
bitsandbytes reads from the module and every rank therefore keeps whole (about 1/32 of the packed bytes of the
whole base); BENCHMARKS.md ("Sharded bases") has the figures and when torchao would pay.

What loads this way: checkpoints stored as safetensors whose tensor names are the model's own parameter names
(Llama, Mistral, Qwen and most dense decoders). A checkpoint that transformers renames or fuses on load (older
layouts, MoE experts stored per expert), one stored as pickled `.bin` files, or one already quantised is
refused with the reason: it trains on one worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raylora.config import AdapterConfig, ConfigError, ModelConfig
from raylora.model import (
    attention_kernel,
    base_dtype,
    check_quantization,
    check_quantized,
    load_model_config,
    nf4_config,
    no_kv_cache,
    qlora_skip_modules,
    resolve_model_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from raylora.distributed import Workers

__all__ = [
    "adapters_on_cpu",
    "base_skeleton",
    "load_shards",
    "pack_for_sharding",
]


def base_skeleton(model: ModelConfig, *, qlora: bool) -> PreTrainedModel:
    """The base architecture with every parameter on the meta device, frozen, ready for `apply_lora`.

    Under QLoRA transformers' own bitsandbytes quantizer swaps in the 4-bit layers, as `from_pretrained` does
    on one worker; their weights stay meta until `load_shards` quantises them.

    Raises:
        ConfigError: the checkpoint cannot be found, is already quantised, or is not in safetensors; or
            QLoRA cannot be done (see `raylora.model.load_base_model`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model_config = load_model_config(model)
    prequantized = check_quantization(model_config, model, qlora=qlora)
    if prequantized or getattr(model_config, "quantization_config", None) is not None:
        raise ConfigError(
            f"`model.name_or_path` {model.name_or_path!r} is stored already quantised, which loads on one "
            "worker only (sharded loading quantises bf16/fp32 weights itself); set `resources.workers=1` or "
            "use the unquantised checkpoint"
        )
    _checkpoint_files(model)  # a checkpoint that cannot load sharded is refused before anything is built
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    dtype = base_dtype(model, qlora=qlora)
    if dtype != "auto":
        kwargs["dtype"] = dtype
    kwargs["attn_implementation"] = attention_kernel(model)
    # Parameters on meta, buffers (rotary frequencies) real: they are small and computed, not loaded.
    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(model_config, **kwargs)
    base.tie_weights()  # tied embeddings share one parameter, as after `from_pretrained` (not done on meta)
    if qlora:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(nf4_config(qlora_skip_modules(base)), pre_quantized=False)
        quantizer.preprocess_model(model=base, dtype=base.dtype, device_map=None, checkpoint_files=None)
        base.hf_quantizer = quantizer
        quantizer.postprocess_model(base)  # marks the model as loaded in 4-bit, which peft reads
        check_quantized(base, model)
    base.requires_grad_(False)
    no_kv_cache(base.config)
    base._raylora_sharded_from = model  # what `load_shards` reads the weights of
    return base


@contextlib.contextmanager
def adapters_on_cpu(model: torch.nn.Module, adapter: AdapterConfig) -> Iterator[None]:
    """Within the block, peft creates the adapter of a meta base on the CPU, with the values one worker gets.

    peft draws each LoRA weight on the CPU, then moves it to the device of the weight it wraps (casting it
    to that layer's dtype). Each weight `adapter` targets is replaced for the block by a CPU stand-in of its
    shape and dtype that holds one element (a broadcast view, no memory), so that move lands on the CPU;
    the meta weights come back at the end of the block.
    """
    from raylora.model import lora_config

    _, targets = lora_config(model, adapter)
    if targets.parameters:
        raise ConfigError(
            f"`adapter.target_modules` {adapter.target_modules!r} adapts routed experts "
            f"({len(targets.parameters)} fused expert weights, e.g. {targets.parameters[0]}), which sharded "
            "loading cannot build yet; set `resources.workers=1`, or target 'attention' to leave the experts out"
        )
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for path in targets.modules:
        module = model.get_submodule(path)
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                saved.append((module, name, param))
                module._parameters[name] = _stand_in(param)
    try:
        yield
    finally:
        for module, name, param in saved:
            module._parameters[name] = param


def _stand_in(param: torch.nn.Parameter) -> torch.nn.Parameter:
    data = torch.empty((), dtype=param.dtype).expand(param.shape)
    if type(param).__name__ == "Params4bit":  # peft reads its quantisation settings
        return type(param)(data, requires_grad=False, **{k: getattr(param, k) for k in _PARAMS4BIT_ARGS})
    return torch.nn.Parameter(data, requires_grad=False)


def pack_for_sharding(model: torch.nn.Module) -> int:
    """Give every meta 4-bit weight its stored shape (packed bf16 column), so that FSDP2 shards what is stored.

    A bitsandbytes `Linear4bit` built on the meta device holds a placeholder of the matrix's shape; once
    quantised its weight is a [rows x cols / values-per-element, 1] column of the storage dtype. The arguments
    of the quantisation are kept on the module for `load_shards`. Returns how many weights were packed.

    The layers also keep their training layout in evaluation. On CPUs with AVX512-BF16, bitsandbytes repacks
    a 4-bit weight for its CPU kernel at the first no-grad forward, replacing the weight's data and rewriting
    the layer's quantisation state in place. Under FSDP2 the repacked data is the gathered copy, dropped at
    the next reshard, while the rewritten state stays: every later gather would be read in the wrong layout
    (BENCHMARKS.md has the eval loss it gave on 2 workers).
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or not module.weight.is_meta:
            continue
        weight = module.weight
        args = {k: v for k, v in weight.__dict__.items() if k in _PARAMS4BIT_ARGS}
        storage = args.get("quant_storage", torch.uint8)
        per_element = 2 * torch.empty((), dtype=storage).element_size()  # 4-bit values per stored element
        rows = math.ceil(weight.numel() / per_element)
        module._raylora_quant_args = {**args, "shape": tuple(weight.shape)}
        packed = torch.empty((rows, 1), dtype=storage, device="meta")
        module.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, bnb_quantized=True, module=module, **args
        )
        module.support_avx512bf16_for_cpu = False
        count += 1
    return count


_PARAMS4BIT_ARGS = ("blocksize", "compress_statistics", "quant_type", "quant_storage")


def load_shards(model: torch.nn.Module, workers: Workers) -> None:
    """Fill this rank's shards of the base weights of a model sharded on the meta device, from safetensors.

    `model` comes from `base_skeleton` (with its adapter, `pack_for_sharding` and FSDP2 applied): its base
    parameters are meta DTensors; everything already real (the adapter, buffers) keeps its values.

    Raises:
        ConfigError: the checkpoint lacks a tensor the model needs, or holds it in another shape.
    """
    from raylora.model import unwrap

    base = unwrap(model)
    source: ModelConfig = base._raylora_sharded_from
    real = {
        name: _local(tensor).detach().clone()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if not _local(tensor).is_meta
    }
    from raylora.fastpath import Float8Linear

    for name, buffer in model.named_buffers():
        owner = model.get_submodule(name.rpartition(".")[0])
        if buffer.is_meta and not (isinstance(owner, Float8Linear) and name.endswith(".weight_scale")):
            raise RuntimeError(f"buffer {name} has no value on the meta skeleton and nothing loads it")
    model.to_empty(device=workers.device)  # FSDP2's own way to materialise a model sharded on meta
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in real:
                _local(tensor).copy_(real[name])
        with _Checkpoint(_checkpoint_files(source)) as checkpoint:
            for name, param in model.named_parameters():
                if name in real:
                    continue
                module_name, _, leaf = name.rpartition(".")
                module = model.get_submodule(module_name)
                _load_one(checkpoint, _checkpoint_key(name, base), module, leaf, param, workers, source)
    workers.barrier()


def _load_one(checkpoint, key, module, leaf, param, workers, source) -> None:
    from raylora.fastpath import Float8Linear, float8_weight

    local = _local(param)
    quant_args = getattr(module, "_raylora_quant_args", None)
    if leaf == "weight" and quant_args is not None:  # 4-bit: the whole matrix, quantised as on one worker
        import bitsandbytes as bnb

        args = {k: v for k, v in quant_args.items() if k != "shape"}
        full = checkpoint.read(key, expect=quant_args["shape"]).to(base_dtype(source, qlora=True))
        quantized = bnb.nn.Params4bit(full.to(workers.device), requires_grad=False, module=module, **args)
        quantized = quantized.to(workers.device)  # quantises, and sets `module.quant_state`
        del full
        _copy_rows(local, quantized.data, param.shape, workers)
        return
    if leaf == "weight" and isinstance(
        module, Float8Linear
    ):  # fp8: one per-tensor scale for the whole matrix
        full = checkpoint.read(key, expect=tuple(param.shape)).to(_fp8_source_dtype(source))
        weight, scale = float8_weight(full.to(workers.device))
        del full
        module.weight_scale.copy_(scale)
        _copy_rows(local, weight, param.shape, workers)
        return
    start, end = _own_rows(param.shape, workers, local)
    rows = checkpoint.read(key, expect=tuple(param.shape), rows=(start, end))
    local.copy_(rows.to(local.dtype))


def _fp8_source_dtype(source: ModelConfig) -> torch.dtype:
    # The dtype one worker's base holds before its fp8 conversion (`auto`: the checkpoint's, read as is).
    dtype = base_dtype(source, qlora=False)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def _copy_rows(local: torch.Tensor, full: torch.Tensor, shape: torch.Size, workers: Workers) -> None:
    start, end = _own_rows(shape, workers, local)
    local.copy_(full.reshape(shape)[start:end])


def _own_rows(shape: torch.Size, workers: Workers, local: torch.Tensor) -> tuple[int, int]:
    """The rows of dimension 0 that FSDP2 gives this rank (`torch.chunk` of the dimension into N parts)."""
    rows = shape[0]
    per_rank = math.ceil(rows / workers.world_size)
    start = min(workers.rank * per_rank, rows)
    end = min(start + per_rank, rows)
    if local.shape[0] != end - start:
        raise RuntimeError(
            f"FSDP2 gave rank {workers.rank} {local.shape[0]} rows of a {tuple(shape)} parameter where rows "
            f"{start}:{end} were expected; this torch shards differently from what raylora.shards assumes"
        )
    return start, end


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# The module wrappers peft and FSDP2 add around a base parameter: their names are not in the checkpoint.
_WRAPPER_PARTS = ("base_layer", "original_module", "modules_to_save.default")


def _checkpoint_key(name: str, base: torch.nn.Module) -> str:
    """The checkpoint tensor name of a parameter of the (peft-wrapped) model."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    for part in _WRAPPER_PARTS:
        name = name.replace(f".{part}.", ".")
    return name


class _Checkpoint:
    """The tensors of a safetensors checkpoint (one file or several with an index).

    Each read opens its file and closes it again: safetensors maps the file into memory, and the pages a
    read touches count in the process's resident set for as long as the map lives, so a rank that kept its
    files open would end up holding every page it read on top of the copies it keeps.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read(self, key: str, *, expect: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        path = self._files.get(key)
        if path is None:
            sample = ", ".join(sorted(self._files)[:3])
            raise ConfigError(
                f"the checkpoint has no tensor {key!r} (it holds e.g. {sample}): its tensor names are not the "
                "model's parameter names (transformers renames or fuses them on load), which only a one-worker "
                "trial loads; set `resources.workers=1`"
            )
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensor = handle.get_slice(key)
            shape = tuple(tensor.get_shape())
            if shape != tuple(expect):
                raise ConfigError(
                    f"the checkpoint's tensor {key!r} has shape {shape}, but the model built from its "
                    f"config.json expects {tuple(expect)}; check that config.json belongs to these weights"
                )
            return tensor[:] if rows is None else tensor[rows[0] : rows[1]]


def _checkpoint_files(model: ModelConfig) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint (downloaded from the hub first for a hub id).

    Raises:
        ConfigError: the checkpoint holds no safetensors files.
    """
    path = resolve_model_path(model)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            path, revision=model.revision, token=model.token, allow_patterns=["*.safetensors", "*.json"]
        )
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: root / name for key, name in weight_map.items()}
    single = root / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt", device="cpu") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise ConfigError(
        f"`model.name_or_path` {model.name_or_path!r} holds no safetensors weights (model.safetensors or "
        "model.safetensors.index.json); a sharded trial reads each rank's part from safetensors only; convert "
        "the checkpoint (`save_pretrained` writes safetensors) or set `resources.workers=1`"
    )
