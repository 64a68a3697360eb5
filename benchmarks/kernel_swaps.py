"""Library kernels in place of raylora's hand-written pieces, for benchmark rows (issue 18).

Each swap goes through raylora's own loop (`raylora.training.train` -> `LoraRecipe`) and replaces one name
that `raylora.recipe` calls, for the duration of one run, so that a row measures the library doing the same
job as the piece it replaces and nothing else:

- `liger_ce`: the loss of a frozen output head. raylora applies the head 2048 tokens at a time with the
  cross-entropy and its gradient written out and compiled (`raylora.loss.head_loss_and_grad`); here Liger's
  fused linear cross-entropy (`liger_kernel.ops.fused_linear_cross_entropy`) gets the whole micro-batch and
  chunks it itself. Same function: the summed next-token cross-entropy over the trained positions and its
  gradient with respect to the hidden states (the head is frozen, so no weight gradient is computed).
  Evaluation and trained heads keep raylora's path (`token_loss_sum`).
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
import inspect
from collections.abc import Iterator

import torch

IGNORE_INDEX = -100  # raylora.data.IGNORE_INDEX; the labels raylora's loop builds use it for padding

_LIGER_OPS_APPLIED = False


class _LigerFrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` by Liger, its gradient w.r.t. `hidden` taken in forward
    (as Liger does), so backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, label_smoothing, dtype):  # type: ignore[override]
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        out = fused_linear_cross_entropy_forward(
            hidden.detach().to(dtype).contiguous(),
            weight.detach().to(dtype),
            targets.contiguous(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
            reduction="sum",
            compute_gradients=True,  # the detached input does not require grad; its gradient is wanted
            weight_requires_grad=False,  # frozen head
        )
        loss, grad = out[0], out[4]
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return loss.float()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # Scale in fp32, as raylora's `_FrozenHeadCrossEntropy` does (the loop scales the loss by 1/tokens).
        return (grad.float() * grad_output).to(ctx.hidden_dtype), None, None, None, None


def _check_liger_signature() -> None:
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    wanted = {"compute_gradients", "weight_requires_grad", "reduction", "label_smoothing", "ignore_index"}
    missing = wanted - set(inspect.signature(fused_linear_cross_entropy_forward).parameters)
    if missing:
        raise RuntimeError(
            f"liger_kernel's fused_linear_cross_entropy_forward lacks {sorted(missing)}: this benchmark was "
            "written against liger-kernel 0.8.5 (benchmarks/device_wheels.sh)"
        )


def liger_token_loss_sum(original):
    """`raylora.loss.token_loss_sum` with Liger's fused linear cross-entropy for a frozen, plain head."""

    def token_loss_sum(output, labels, label_smoothing, *, head_loss=None):
        head = output.head
        if (
            head is None
            or not (torch.is_grad_enabled() and output.hidden.requires_grad)
            or type(head) is not torch.nn.Linear
            or head.bias is not None
            or head.weight.requires_grad
        ):
            return original(output, labels, label_smoothing, head_loss=head_loss)
        hidden = output.hidden[:, :-1].reshape(-1, output.hidden.size(-1))
        targets = labels[:, 1:].reshape(-1)
        dtype = output.autocast_dtype or head.weight.dtype
        return _LigerFrozenHeadCrossEntropy.apply(hidden, head.weight, targets, label_smoothing, dtype)

    return token_loss_sum


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
def patched(*, liger_ce: bool = False, ao_fp8: bool = False) -> Iterator[None]:
    """Within the block, raylora's loop uses the named library kernels (see the module docstring)."""
    import raylora.recipe as recipe

    saved = {"token_loss_sum": recipe.token_loss_sum, "convert_to_float8": recipe.convert_to_float8}
    try:
        if liger_ce:
            _check_liger_signature()
            recipe.token_loss_sum = liger_token_loss_sum(saved["token_loss_sum"])
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
