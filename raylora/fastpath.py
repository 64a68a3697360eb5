"""The loop's fast path: a LoRA branch that keeps less for backward, and compiled decoder layers.

Both compute what the plain peft + transformers modules compute; they change what is stored between the
forward and the backward pass and how many kernels run, not the function.

**The LoRA branch.** peft computes ``lora_B(lora_A(dropout(x.to(fp32)))) * scaling`` for every adapted
layer. Under bf16 autocast that casts the layer's input to fp32, drops it out in fp32, and autocast casts the
dropped copy back to bf16; autograd then keeps, per adapted layer, the dropout mask *and* a bf16 copy of the
dropped input (for lora_A's weight gradient). q, k and v read the same input, so an attention block keeps
three masks and three dropped copies of one tensor (BENCHMARKS.md, "Why the defaults", measures what that
costs on Llama shapes). `_lora_branch` keeps the
input itself (one tensor, shared by every layer that reads it) and the boolean mask, and recomputes the
dropped input in backward (one elementwise pass, no matmul). The arithmetic is peft's: the same masks from
the same random stream (`native_dropout`, which `F.dropout` calls), the same scale ``1 / (1 - p)``, the same
matmuls in the same dtype, with the result added to the base layer's output.

**Compiled decoder layers.** `torch.compile` of each decoder layer (`nn.Module.compile`, so the layer
objects, their hooks and state-dict names stay as they are) fuses the elementwise work around the matmuls:
RMSNorm, rotary embeddings, SiLU x up, the dropout and the residual adds, and lets the partitioner recompute
cheap elementwise results in backward instead of storing them. All decoder layers share one compiled graph
(two, since the first layer's input does not require grad); evaluation runs the same layers eagerly (see
`eager`), so a trial compiles once, for training, whatever its eval cadence. The fused kernels keep fp32
between elementwise ops where eager rounds each to bf16, so compiled and eager gradients differ at bf16's
rounding level; that is noise, not a different function, but AdamW's first step is a sign step and shows it
(BENCHMARKS.md, loss parity, has the measured gap).

**FP8 base layers** (a switch, `training.fp8`). Most of a LoRA step is the frozen weights' two matmuls per
linear layer: the forward product and the input gradient (no weight gradient: the base is frozen). On GPUs
with FP8 tensor cores (Hopper and newer) those run at up to twice the bf16 rate. `Float8Linear` stores a frozen
weight once in float8 e4m3 with one scale per tensor (half the bf16 bytes) and computes the forward product
from the input quantised to e4m3 and the input gradient from the output gradient quantised to e5m2 (its wider
range suits gradients), each with a per-tensor scale taken from its current maximum, all through
`torch._scaled_mm`. This is not the same function: the base's weights and activations are rounded to 3 (e4m3)
and 2 (e5m2) mantissa bits, so the adapter trains against an fp8-rounded base, the trade QLoRA makes with NF4.
BENCHMARKS.md measures what it costs in loss against the bf16 anchor and what it gains in speed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import types
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch._inductor.config
import torch.nn.functional as F

__all__ = [
    "DropoutSeeds",
    "Float8Linear",
    "compile_layers",
    "convert_to_float8",
    "eager",
    "float8_weight",
    "install_lean_lora",
    "seed_dropout",
]


# The LoRA branch is a custom operator rather than an autograd.Function so that `torch.compile` treats it as
# one opaque call: the partitioner then keeps exactly what `_save_for_backward` names (x and the mask). With
# the branch traced op by op, it found it cheaper to keep the dropped bf16 copy *and* the mask, which costs
# 2 more bytes per element of every adapted layer's input (BENCHMARKS.md, "Why the defaults", has the
# figure on Llama shapes). The `nondeterministic_seeded` tag tells the compiler
# that the operator draws random numbers: under activation checkpointing its recomputation in backward then
# replays the forward's random state, as eager checkpointing does, instead of drawing new masks.
@torch.library.custom_op("raylora::lora_branch", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _lora_branch(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    p: float,
    scaling: float,
    step_seed: torch.Tensor | None,
    layer_key: torch.Tensor | None,
    mask_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear(linear(dropout(x), A), B) * scaling``, with the dropout mask and ``linear(dropout(x), A)``.

    `weight_a` and `weight_b` arrive in the dtype the matmuls run in (the autocast dtype, or the adapter's
    own dtype without autocast); x keeps its own. `p` == 0 means no dropout (eval, or none configured), and
    the mask returned is then empty. With `step_seed` (int64 CPU tensor: seed, first row, rows; see
    `DropoutSeeds`) and `layer_key` the mask comes from a generator of its own (`_seeded_mask`); without them,
    from the global stream.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _branch_forward(x, weight_a, weight_b, p, scaling, step_seed, layer_key, mask_length)


def _branch_forward(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    p: float,
    scaling: float,
    seeds: torch.Tensor | None,
    layer_key: torch.Tensor | None,
    mask_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_lora_branch`'s arithmetic (autocast off): the output, the mask and the hidden activations."""
    mask, dropped = _drop(x, p, seeds, layer_key, mask_length)
    hidden = F.linear(dropped.to(weight_a.dtype), weight_a)
    return F.linear(hidden, weight_b) * scaling, mask, hidden


@_lora_branch.register_fake
def _(x, weight_a, weight_b, p, scaling, step_seed, layer_key, mask_length):
    mask = x.new_empty(x.shape if p > 0 else (0,), dtype=torch.bool)
    hidden = x.new_empty((*x.shape[:-1], weight_a.size(0)), dtype=weight_a.dtype)
    return x.new_empty((*x.shape[:-1], weight_b.size(0)), dtype=weight_b.dtype), mask, hidden


def _drop(
    x: torch.Tensor, p: float, seeds: torch.Tensor | None, layer_key: torch.Tensor | None, mask_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout's keep-mask for `x` (empty when `p` is 0) and the dropped input.

    Seeded (`seeds` and `layer_key`): `_seeded_mask`. Otherwise the mask comes from the same random stream as
    `F.dropout`, which calls native_dropout for these inputs. On a GPU its output is the dropped input
    rounded once, as peft's; on the CPU its bf16 output rounds twice, so there the dropped values come from
    the backward op (one rounding).
    """
    if p == 0:
        return x.new_empty((0,), dtype=torch.bool), x
    if seeds is not None and layer_key is not None:
        mask = _seeded_mask(x, p, seeds, int(layer_key.item()), mask_length)
        return mask, _dropped(x, mask, p)
    dropped, mask = torch.ops.aten.native_dropout(x, p, True)
    return mask, _dropped(x, mask, p) if x.device.type == "cpu" else dropped


def _seeded_mask(
    x: torch.Tensor,
    p: float,
    seeds: torch.Tensor,
    layer_key: int,
    mask_length: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The keep-mask of dropout with rate `p` for `x`, a pure function of the seeds and of each element's place.

    `seeds` holds (seed, first row, rows): the micro-batch's seed, where this process's rows start in the
    global micro-batch (rank x batch size under FSDP, 0 otherwise) and how many rows the global micro-batch
    has. For a [rows, positions, features] input the mask is drawn for the global micro-batch and
    `mask_length` positions (at least the input's), and this process's rows and positions are cut out: the
    mask of a row then depends on neither the worker count nor how long the other rows of its batch are, so
    N workers draw the masks one worker draws, and a row padded to another length (a packed step's
    concatenated batch) draws the same mask.

    `out` (a contiguous bool tensor of x's shape) receives the mask; where x is the whole drawn block it is
    drawn there directly, without a copy.
    """
    seed, first, rows = (int(v) for v in seeds.tolist())
    generator = torch.Generator(device=x.device)
    generator.manual_seed((seed * 0x9E3779B97F4A7C15 + layer_key) % (2**63))
    if (
        x.dim() != 3 or x.size(0) + first > rows
    ):  # not a training micro-batch (or rows unknown): its own shape
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(
            1.0 - p, generator=generator
        )
    shape = (rows, max(mask_length, x.size(1)), x.size(2))
    if out is not None and first == 0 and tuple(x.shape) == shape:
        return out.bernoulli_(1.0 - p, generator=generator)
    mask = torch.empty(shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)
    mask = mask[first : first + x.size(0), : x.size(1)]
    return mask.contiguous() if out is None else out.copy_(mask)


def _dropped(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    if p == 0:
        return x
    # The backward op scales in fp32 and rounds once, as peft's dropout of the fp32-cast input followed by
    # autocast's cast to bf16 does (native_dropout's own CPU output for bf16 rounds twice).
    return torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))


def _save_for_backward(ctx, inputs, output) -> None:
    x, weight_a, weight_b, p, scaling, *_seeds = inputs
    _, mask, hidden = output
    ctx.save_for_backward(x, weight_a, weight_b, mask, hidden)
    ctx.p, ctx.scaling = p, scaling


def _lora_branch_backward(ctx, grad_out, _grad_mask, _grad_hidden):
    x, weight_a, weight_b, mask, hidden = ctx.saved_tensors
    with torch.autocast(x.device.type, enabled=False):
        grad_x, grad_a, grad_b = _branch_backward(
            x, weight_a, weight_b, mask, hidden, ctx.p, ctx.scaling, grad_out
        )
    return grad_x, grad_a, grad_b, None, None, None, None, None


def _branch_backward(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    mask: torch.Tensor,
    hidden: torch.Tensor,
    p: float,
    scaling: float,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `_branch_forward` for x, A and B (A and B in the matmul dtype; autocast off)."""
    grad_scaled = grad_out * scaling  # the backward of `* scaling`, in the output dtype
    rank, n_out = weight_a.size(0), weight_b.size(0)
    grad_b = grad_scaled.reshape(-1, n_out).t().mm(hidden.reshape(-1, rank))
    grad_hidden = grad_scaled.matmul(weight_b)
    # The dropped input again, from x and the mask: what forward multiplied into lora_A.
    dropped = _dropped(x, mask, p).to(weight_a.dtype).reshape(-1, x.size(-1))
    grad_a = grad_hidden.reshape(-1, rank).t().mm(dropped)
    # In x's dtype before the mask, as autocast's cast back from the matmul dtype comes first in peft.
    grad_x = _dropped(grad_hidden.matmul(weight_a).to(x.dtype), mask, p)
    return grad_x, grad_a, grad_b


_lora_branch.register_autograd(_lora_branch_backward, setup_context=_save_for_backward)


def _lean_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's `Linear.forward` for plain LoRA adapters, through `_lora_branch`.

    One active adapter applies to every row (a pack's layers take `_packed_forward` instead). Anything else
    (adapters disabled or merged, peft's own mixed batch, a variant added after install) takes peft's own
    forward, so that this path never has to know those cases.
    """
    active = self.active_adapters
    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or len(active) != 1
        or not _plain(self, active[0])
    ):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    x, dtype = _autocast_dtype(self, x)
    seed = getattr(self, "_raylora_step_seed", None)
    return (result + self._raylora_branch(active[0], x, dtype, seed)).to(result.dtype)


def _autocast_dtype(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """The input and the dtype the LoRA matmuls run in: autocast's, else the adapter's own (as peft casts)."""
    if torch.is_autocast_enabled(x.device.type):
        # Autocast runs the matmuls in its dtype; the dropout sees the input as it is (bf16 from a bf16
        # model; peft's fp32 cast of it is exact, so dropping out in fp32 and rounding once is the same).
        return x, torch.get_autocast_dtype(x.device.type)
    # peft casts the input to the adapter's dtype (fp32) first, and runs everything in it.
    dtype = next(iter(self.lora_A.values())).weight.dtype
    return x.to(dtype), dtype


@torch.compiler.disable
def _packed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA linear layer of a pack: the base layer once over every row, each adapter on its own rows.

    The row layout (`PackedRows`, set by the packed engine) changes whenever an adapter joins, leaves or
    pauses, so this function is never traced: compiled decoder layers break their graph around it and fuse
    the work between the linear layers (norms, rotary embeddings, SwiGLU, residuals), while the layout stays a
    Python value read at run time instead of a guard that would recompile the layer at every change.
    """
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    x, dtype = _autocast_dtype(self, x)
    plan, weights = [], []
    key = getattr(self, "_raylora_layer_key", None)
    mask_length = getattr(self, "_raylora_mask_length", 0)
    for name, start, end, seed in self._raylora_rows.rows:
        end = min(end, x.size(0))
        if name not in self.lora_A or start >= end:
            continue
        dropout = self.lora_dropout[name]
        p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        seeded = seed is not None and key is not None
        plan.append(
            _Rows(start, end, p, float(self.scaling[name]), seed if seeded else None, key, mask_length)
        )
        weights += [self.lora_A[name].weight, self.lora_B[name].weight]
    if not plan:
        return result
    return (result + _PackedBranches.apply(x, dtype, plan, *weights)).to(result.dtype)


class _Rows(NamedTuple):
    """One adapter's share of a packed batch in one layer: its rows and its dropout."""

    start: int
    end: int
    p: float
    scaling: float
    seed: torch.Tensor | None
    key: torch.Tensor | None
    mask_length: int


class _PackedBranches(torch.autograd.Function):
    """Every adapter's LoRA output on its own rows of a packed batch, as one autograd node per layer.

    Per adapter this is `_lora_branch` on its rows (the same masks, the same matmuls in the same dtypes),
    written into one output tensor. Computing each adapter's branch as its own autograd graph and adding it
    into a slice of the layer's output made autograd copy the whole output gradient once per adapter in
    backward (`CopySlices`) and cost a dozen autograd nodes per adapter and layer; this is one node, no
    full-size copy, and the rows of one adapter never meet another adapter's weights.

    When the adapters of a layer hold equally many consecutive rows (the usual sweep: one batch size), their
    products run as batched matmuls over the adapters (`_grouped_forward`), each adapter's A and B
    zero-padded to the largest rank: a zero row of A gives a zero hidden unit, so the padding adds only exact
    zeros to the output. That is a few kernels per layer instead of a few per adapter and layer: a pack
    is otherwise bound by launching them from Python. The scaling multiplies the (small) hidden activations
    rather than the output, so values round in another order than the solo branch, at the dtype's rounding
    level. Otherwise the adapters run one after another (`_one_by_one_forward`).
    """

    @staticmethod
    def forward(ctx, x, dtype, plan, *weights):  # type: ignore[override]
        rows = x.size(0)
        ctx.covered = sum(r.end - r.start for r in plan) == rows
        ctx.plan, ctx.dtype, ctx.grouped = plan, dtype, _groupable(plan)
        out = x.new_empty((*x.shape[:-1], weights[1].size(0)), dtype=dtype)
        if not ctx.covered:  # rows of adapters that do not adapt this layer get no LoRA output
            out.zero_()
        with torch.autocast(x.device.type, enabled=False):
            run = _grouped_forward if ctx.grouped else _one_by_one_forward
            saved = run(x, dtype, plan, weights, out)
        ctx.save_for_backward(x, *weights, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        plan, n = ctx.plan, len(ctx.plan)
        x, *rest = ctx.saved_tensors
        weights, saved = rest[: 2 * n], rest[2 * n :]
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        if grad_x is not None and not ctx.covered:
            grad_x.zero_()
        with torch.autocast(x.device.type, enabled=False):
            run = _grouped_backward if ctx.grouped else _one_by_one_backward
            grads = run(x, ctx.dtype, plan, weights, saved, grad_out, grad_x)
        return grad_x, None, None, *grads


def _groupable(plan: list[_Rows]) -> bool:
    """Equal, consecutive row blocks, dropout from the seeded masks (or none): one batched product serves."""
    size = plan[0].end - plan[0].start
    return all(
        r.end - r.start == size
        and (i == 0 or r.start == plan[i - 1].end)
        and (r.p == 0 or r.seed is not None)
        for i, r in enumerate(plan)
    )


def _one_by_one_forward(x, dtype, plan, weights, out) -> list[torch.Tensor]:
    masks, hiddens = [], []
    for r, weight_a, weight_b in zip(plan, weights[0::2], weights[1::2], strict=True):
        own = x[r.start : r.end]
        out[r.start : r.end], mask, hidden = _branch_forward(
            own, weight_a.to(dtype), weight_b.to(dtype), r.p, r.scaling, r.seed, r.key, r.mask_length
        )
        masks.append(mask)
        hiddens.append(hidden)
    return masks + hiddens


def _one_by_one_backward(x, dtype, plan, weights, saved, grad_out, grad_x) -> list[torch.Tensor]:
    n = len(plan)
    masks, hiddens = saved[:n], saved[n:]
    grads = []
    for i, r in enumerate(plan):
        weight_a, weight_b = weights[2 * i], weights[2 * i + 1]
        grad_own, grad_a, grad_b = _branch_backward(
            x[r.start : r.end],
            weight_a.to(dtype),
            weight_b.to(dtype),
            masks[i],
            hiddens[i],
            r.p,
            r.scaling,
            grad_out[r.start : r.end],
        )
        if grad_x is not None:
            grad_x[r.start : r.end] = grad_own
        grads += [grad_a.to(weight_a.dtype), grad_b.to(weight_b.dtype)]
    return grads


def _grouped_forward(x, dtype, plan, weights, out) -> list[torch.Tensor]:
    k, first, last = len(plan), plan[0].start, plan[-1].end
    own = x[first:last]
    mask = _grouped_masks(own, plan)
    dropped = _grouped_dropped(own, mask, plan).to(dtype).reshape(k, -1, own.size(-1))
    rank = max(w.size(0) for w in weights[0::2])
    weight_a = _stack_padded(weights[0::2], rank, dim=0).to(dtype)  # adapters x rank x in
    weight_b = _stack_padded(weights[1::2], rank, dim=1).to(dtype)  # adapters x out x rank
    scaling = _device_values(tuple(r.scaling for r in plan), x.device).view(k, 1, 1)
    hidden = (torch.bmm(dropped, weight_a.transpose(1, 2)) * scaling).to(dtype)
    out[first:last] = torch.bmm(hidden, weight_b.transpose(1, 2)).view(*own.shape[:-1], -1)
    return [mask, weight_a, weight_b, hidden, scaling]


def _grouped_backward(x, dtype, plan, weights, saved, grad_out, grad_x) -> list[torch.Tensor]:
    mask, weight_a, weight_b, hidden, scaling = saved
    k, first, last = len(plan), plan[0].start, plan[-1].end
    own = x[first:last]
    grad = grad_out[first:last].reshape(k, -1, grad_out.size(-1))
    grad_b = torch.bmm(grad.transpose(1, 2), hidden)  # adapters x out x rank
    grad_hidden = (torch.bmm(grad, weight_b) * scaling).to(dtype)
    dropped = _grouped_dropped(own, mask, plan).to(dtype).reshape(k, -1, own.size(-1))
    grad_a = torch.bmm(grad_hidden.transpose(1, 2), dropped)  # adapters x rank x in
    if grad_x is not None:
        grad_own = torch.bmm(grad_hidden, weight_a).to(x.dtype).view(own.shape)
        grad_x[first:last] = _grouped_dropped(grad_own, mask, plan)
    grads = []
    for i, w in enumerate(weights[0::2]):
        r = w.size(0)
        grads += [grad_a[i, :r].to(w.dtype), grad_b[i, :, :r].to(weights[2 * i + 1].dtype)]
    return grads


@functools.lru_cache(maxsize=256)
def _device_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`values` as an fp32 tensor on `device`, made once per distinct tuple (the pack's scalings change only
    when adapters join or leave). Building it from Python values at every layer would copy it from pageable
    host memory, a copy that first waits for the device's queue to drain: a pack then could not queue one
    layer's kernels while the device runs the previous layer's."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _grouped_masks(x: torch.Tensor, plan: list[_Rows]) -> torch.Tensor:
    """The keep-masks of every adapter's rows of `x` (the rows of `plan`, from its first), in one tensor."""
    if all(r.p == 0 for r in plan):
        return x.new_empty((0,), dtype=torch.bool)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    first = plan[0].start
    for r in plan:
        rows = slice(r.start - first, r.end - first)
        if r.p == 0:
            mask[rows] = True
        else:
            _seeded_mask(x[rows], r.p, r.seed, int(r.key.item()), r.mask_length, out=mask[rows])
    return mask


def _grouped_dropped(x: torch.Tensor, mask: torch.Tensor, plan: list[_Rows]) -> torch.Tensor:
    """Dropout of every adapter's rows of `x` by its mask and its own rate (`_dropped` per block)."""
    rates = {r.p for r in plan}
    if len(rates) == 1:
        return _dropped(x, mask, rates.pop())
    out = torch.empty_like(x)
    first = plan[0].start
    for r in plan:
        rows = slice(r.start - first, r.end - first)
        out[rows] = _dropped(x[rows], mask[rows], r.p)
    return out


def _stack_padded(weights: list[torch.Tensor], rank: int, *, dim: int) -> torch.Tensor:
    """The adapters' A (rank on `dim` 0) or B (rank on `dim` 1) matrices stacked, zero-padded to `rank`."""
    if all(w.size(dim) == rank for w in weights):
        return torch.stack(weights)
    padded = []
    for w in weights:
        pad = (0, rank - w.size(1)) if dim == 1 else (0, 0, 0, rank - w.size(0))
        padded.append(F.pad(w, pad))
    return torch.stack(padded)


def _branch(self, name: str, x: torch.Tensor, dtype: torch.dtype, seed: torch.Tensor | None) -> torch.Tensor:
    """Adapter `name`'s LoRA output for `x` (dropout seeded by `seed` and this layer's key when given)."""
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    p = p if dropout.training else 0.0
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    key = getattr(self, "_raylora_layer_key", None) if seed is not None else None
    mask_length = getattr(self, "_raylora_mask_length", 0)
    scaling = float(self.scaling[name])
    return _lora_branch(x, weight_a.to(dtype), weight_b.to(dtype), p, scaling, seed, key, mask_length)[0]


def _plain(module: torch.nn.Module, name: str) -> bool:
    """One vanilla LoRA pair: no DoRA or other variant, no LoRA bias, dropout or nothing in front of it."""
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    if getattr(module, "lora_bias", {}).get(name, False):
        return False
    if type(module.lora_A[name]) is not torch.nn.Linear or type(module.lora_B[name]) is not torch.nn.Linear:
        return False
    return isinstance(module.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity))


class DropoutSeeds:
    """Where the LoRA dropout masks of one adapter come from: a pure function of (seed, step, micro-batch,
    row of the global micro-batch, layer).

    The loop sets the step and micro-batch before each forward (`set`); every routed layer combines them with
    its own key (a hash of its module path) inside `_lora_branch`. So a mask depends on nothing else: not on
    the order in which layers or adapters run, not on what ran before, not on how many workers share the
    global batch, not on the other rows of a packed batch. That makes a resumed run, an activation
    checkpointing recomputation, N workers and an adapter trained in a pack (`raylora.packed`) draw exactly
    the masks of the plain one-worker run. The seeds live in a CPU tensor that the compiled layers read as an
    input, so a new step does not recompile them.

    Args:
        seed: the run's seed (`training.seed`).
        first_row: where this process's rows start in the global micro-batch (rank x batch size).
        rows: the rows of the global micro-batch (workers x batch size).
    """

    def __init__(self, seed: int, *, first_row: int = 0, rows: int = 0) -> None:
        self.seed = seed
        self.tensor = torch.tensor([0, first_row, rows], dtype=torch.int64)

    def set(self, step: int, micro_batch: int) -> None:
        self.tensor[0] = _mix(self.seed, step, micro_batch)


def _mix(*parts: int | str) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def seed_dropout(model: torch.nn.Module, seeds: DropoutSeeds | None, mask_length: int) -> int:
    """Give every routed LoRA layer of `model` its key and `seeds` (None: the global stream); returns how many.

    `mask_length` is the longest row the run draws masks for (`data.max_length`; see `_seeded_mask`).
    """
    count = 0
    for path, module in model.named_modules():
        if getattr(module, "_raylora_branch", None) is None:
            continue
        module._raylora_step_seed = None if seeds is None else seeds.tensor
        module._raylora_layer_key = torch.tensor([_mix(path)], dtype=torch.int64)
        module._raylora_mask_length = mask_length
        count += 1
    return count


def install_lean_lora(model: torch.nn.Module, *, routed: bool = False) -> int:
    """Route every plain LoRA linear layer of a peft model through `_lora_branch`; returns how many.

    Only peft's `lora.Linear` and its bitsandbytes 4-bit twin are routed (the layers raylora's presets
    target); embeddings, convolutions, 8-bit layers and DoRA keep peft's forward. The routing is an
    instance attribute: the module tree, parameter names and saved adapters do not change.

    With `routed`, every LoRA linear layer is routed whatever number of adapters it holds (a pack: each
    adapter then applies to its own rows, see `PackedRows`), and a layer holding an adapter that the lean
    branch does not compute (DoRA, a LoRA bias, another variant) is an error rather than left to peft,
    which would apply it to every row.
    """
    types_ = _lean_types()
    count = 0
    for path, module in model.named_modules():
        if type(module) not in types_ or not module.lora_A:
            continue
        plain = all(_plain(module, name) for name in module.lora_A)
        if routed and not plain:
            raise ValueError(
                f"{path} holds an adapter that packed LoRA layers do not compute (DoRA or a variant)"
            )
        if routed:
            module.forward = types.MethodType(_packed_forward, module)
            module._raylora_branch = types.MethodType(_branch, module)
            count += 1
        elif len(module.lora_A) == 1 and plain:
            module.forward = types.MethodType(_lean_forward, module)
            module._raylora_branch = types.MethodType(_branch, module)
            count += 1
    return count


def _lean_types() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear

    types_: tuple[type, ...] = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        types_ += (Linear4bit,)
    except ImportError:  # peft without bitsandbytes support installed
        pass
    return types_


def compile_layers(layers: list[torch.nn.Module], backend: str) -> None:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`), with `backend`.

    The layers share their compiled code: dynamo traces the layer class once per input signature (the first
    layer's input needs no grad, the others' do) and reuses the graph for every layer object.
    """
    options = None
    if backend == "inductor" and hasattr(torch._inductor.config, "emulate_precision_casts"):
        # Round where the eager code casts to bf16 (RMSNorm's `.to(input_dtype)`, autocast's casts), so that
        # the fused kernels' numbers stay as close to the eager layers' as fusion allows.
        options = {"emulate_precision_casts": True}
    for layer in layers:
        layer.compile(backend=backend, options=options)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside this block (evaluation): no-grad graphs are never compiled."""
    with torch.compiler.set_stance("force_eager"):
        yield


# ---- FP8 base layers ----------------------------------------------------------------------------------

E4M3 = torch.float8_e4m3fn  # weights and inputs: more mantissa
E5M2 = torch.float8_e5m2  # output gradients: more range


def _quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` scaled so that its largest magnitude is fp8's largest value, cast; and the scale back (fp32).

    The clamp matters: a cast to float8_e4m3fn turns values past its maximum into NaN, not into the maximum,
    and fp32 rounding of ``t * scale`` can land a hair above it.
    """
    top = torch.finfo(dtype).max
    amax = t.abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


class _Float8Matmul(torch.autograd.Function):
    """``x @ weight.T`` from fp8 operands, forward and input gradient; the frozen weight gets no gradient.

    Nothing of x is saved for backward: the input gradient needs only the weight, which is already fp8.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, out_dtype):  # type: ignore[override]
        x2 = x.reshape(-1, x.size(-1))
        x_fp8, x_scale = _quantize(x2, E4M3)
        # _scaled_mm wants its second operand column-major: weight.t() of a row-major [out, in] weight is.
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype = x.dtype
        return out.reshape(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        weight, weight_scale = ctx.saved_tensors
        grad2 = grad_out.reshape(-1, grad_out.size(-1))
        grad_fp8, grad_scale = _quantize(grad2, E5M2)
        # grad [M, out] @ weight [out, in], the weight column-major: a transposed copy, one layer at a time
        # (the same bytes as the weight, freed after this product).
        weight_cm = weight.t().contiguous().t()
        grad_x = torch._scaled_mm(
            grad_fp8, weight_cm, scale_a=grad_scale, scale_b=weight_scale, out_dtype=ctx.x_dtype
        )
        return grad_x.reshape(*grad_out.shape[:-1], weight.size(1)), None, None, None


def float8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen weight as `Float8Linear` stores it: e4m3 values (row-major) and the fp32 scale back."""
    fp8, scale = _quantize(weight, E4M3)
    return fp8.contiguous(), scale


class Float8Linear(torch.nn.Module):
    """A frozen `nn.Linear` whose weight is stored in float8 e4m3 and whose matmuls run in FP8.

    `weight` keeps its name (state-dict paths do not change) but holds fp8 values; ``weight * weight_scale``
    is the bf16 weight to within e4m3 rounding. The output has autocast's dtype under autocast, else the
    input's.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear) -> Float8Linear:
        weight, scale = float8_weight(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight.contiguous(), scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            out = _Float8Matmul.apply(x, self.weight, self.weight_scale, dtype)
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn"


def float8_ready(linear: torch.nn.Module) -> bool:
    """A frozen plain `nn.Linear` whose shape `torch._scaled_mm` takes (both sides multiples of 16)."""
    return (
        type(linear) is torch.nn.Linear
        and not linear.weight.requires_grad
        and linear.in_features % 16 == 0
        and linear.out_features % 16 == 0
    )


def convert_to_float8(layers: list[torch.nn.Module]) -> int:
    """Replace every frozen linear layer inside `layers` (the decoder layers) with a `Float8Linear`.

    Both kinds are converted: plain linears (those no adapter targets) and the `base_layer` under each of
    peft's LoRA layers, whose adapters stay as they are, in their own dtype. Call it after the adapters are
    applied (peft wraps only `nn.Linear`). The output head and embeddings are outside `layers` and stay as
    they are. Returns how many layers were converted; each bf16 weight is freed as its fp8 copy is made.
    """
    count = 0
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if float8_ready(child):
                    setattr(parent, name, Float8Linear.from_linear(child))
                    count += 1
    return count
