"""Library kernels in place of raylora's hand-written pieces, for benchmark rows (issue 18).

Each swap goes through raylora's own loop (`raylora.training.train` -> `LoraRecipe`) and replaces one name
that `raylora.recipe` calls, for the duration of one run, so that a row measures the library doing the same
job as the piece it replaces and nothing else:

- The head loss is no longer a swap: Liger's fused linear cross-entropy measured faster than raylora's
  compiled chunked loss and became raylora's own (`training.head_loss`, `raylora.loss`); the rows
  `raylora-liger-ce` and `raylora-chunked-ce` set that field.
- `ao_fp8`: `training.fp8` through torchao's float8 training (`torchao.float8.convert_to_float8_training`,
  tensorwise dynamic scales) instead of raylora's `Float8Linear`, on the same layers (every frozen linear of
  the decoder layers, `raylora.fastpath.float8_ready`). torchao keeps each bf16 weight and casts it every
  step, and its backward also forms a weight gradient unless the compiler drops it (the weights are frozen).
- `liger_ops`: Liger's RMSNorm, RoPE and SwiGLU on the base model (`apply_liger_kernel_to_llama`). Liger
  swaps transformers' Llama classes and its rotary function *module-wide*, for every model made afterwards in
  the process, so `apply_liger_ops` is one-way: throughput.py runs the rows that use it in a process of
  their own, and loss_parity.py runs them last.

Nothing here is a user-facing setting: if a library measures faster than raylora's piece, it replaces the
piece in raylora (BENCHMARKS.md says which measured faster).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_LIGER_OPS_APPLIED = False


def check_liger() -> None:
    """Liger's fused linear cross-entropy takes the arguments raylora passes (`raylora.loss.liger_available`)."""
    from raylora.loss import liger_available

    if not liger_available():
        raise RuntimeError(
            "liger-kernel is not importable here or its fused_linear_cross_entropy_forward lacks the arguments "
            "raylora passes: this benchmark was written against liger-kernel 0.8.5 (benchmarks/device_wheels.sh)"
        )


def torchao_convert_to_float8(layers: list[torch.nn.Module]) -> int:
    """`raylora.fastpath.convert_to_float8` through torchao: every frozen linear of `layers` (the decoder
    layers) becomes a torchao `Float8Linear` (tensorwise dynamic scaling). Returns how many."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from raylora.fastpath import float8_ready

    count = 0

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal count
        ready = float8_ready(module)
        count += ready
        return ready

    # emulate: on a CPU (dry runs) the matmuls run in high precision after the fp8 casts.
    config = Float8LinearConfig(emulate=not torch.cuda.is_available())
    for layer in layers:
        convert_to_float8_training(layer, module_filter_fn=keep, config=config)
    return count


@contextlib.contextmanager
def patched(*, ao_fp8: bool = False) -> Iterator[None]:
    """Within the block, raylora's loop uses the named library kernels (see the module docstring)."""
    import raylora.recipe as recipe

    saved = {"convert_to_float8": recipe.convert_to_float8}
    try:
        if ao_fp8:
            recipe.convert_to_float8 = torchao_convert_to_float8
        yield
    finally:
        for name, value in saved.items():
            setattr(recipe, name, value)


def apply_liger_ops() -> None:
    """Liger's RMSNorm, RoPE and SwiGLU for every Llama model made from now on in this process (one-way)."""
    global _LIGER_OPS_APPLIED
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    _LIGER_OPS_APPLIED = True


def liger_ops_applied() -> bool:
    return _LIGER_OPS_APPLIED
