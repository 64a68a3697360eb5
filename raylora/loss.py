"""The loss of one micro-batch: the forward pass, the output head applied a chunk at a time, cross-entropy.

`forward` runs the model and returns either its full logits or, where the loss may apply the output head
itself, the decoder's final hidden states with the head. `token_loss_sum` then returns the *sum* of
next-token cross-entropy over the trained positions (labels not -100), in fp32; the loop divides by the
step's token count (`count_targets`, summed over micro-batches and ranks), so that the step's loss is the
mean over every trained token whatever the batch shape, accumulation or worker count.

Why the head is applied here, in chunks: the fp32 logits of a whole micro-batch are tokens x vocab x 4 bytes
(8 GiB at 8 x 2048 tokens and a 128k vocabulary), and autograd would keep them for backward. A chunk of
`LOSS_CHUNK_TOKENS` tokens at a time keeps one chunk's logits alive (1 GiB at a 128k vocabulary). For a
frozen head (every real LoRA run), `_FrozenHeadCrossEntropy` takes each chunk's gradient with respect to the
hidden states right after its loss, so backward has nothing to recompute; `head_loss_and_grad` writes that
arithmetic out so that `torch.compile` fuses it.

Which head loss a run uses (`training.head_loss`, `choose_head_loss`): on a GPU with liger-kernel installed,
Liger's fused linear cross-entropy does the same job (the loss and the hidden states' gradient, chunked by
Liger); it measured at least as fast as the compiled chunked loss, with a shorter first step, since nothing
is compiled (BENCHMARKS.md, round 4). Elsewhere, raylora's own chunked loss.

Under FSDP2 the same chunked loss applies: the decoder's output is taken from the whole model's forward (the
root unit's forward must run), with the head applied to no position there, and the head's unit keeps its
weight gathered until the end of the step (`raylora.distributed.shard_with_fsdp2`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from raylora.config import ConfigError, TrainingConfig
from raylora.data import IGNORE_INDEX
from raylora.model import unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "LOSS_CHUNK_TOKENS",
    "ModelOutput",
    "choose_head_loss",
    "chunkable_head",
    "compiled_head_loss",
    "count_targets",
    "forward",
    "head_loss_and_grad",
    "liger_available",
    "liger_head_loss_and_grad",
    "token_loss_sum",
]

# Architectures whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`, with no logit
# soft-capping or scaling in between: for these the loss runs the head itself, a chunk of tokens at a time.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Tokens per loss chunk: the fp32 logits of one chunk are 2048 x vocab x 4 bytes (1 GiB at a 128k vocabulary)
# instead of tokens x vocab x 4 for the whole micro-batch (8 GiB at 8 x 2048 tokens).
LOSS_CHUNK_TOKENS = 2048


@dataclass
class ModelOutput:
    """What `forward` hands to `token_loss_sum`: the final hidden states and the output head to apply to
    them chunk by chunk, or (`head` None) the model's full logits."""

    hidden: torch.Tensor  # [batch, seq, d_model]; [batch, seq, vocab] logits when `head` is None
    head: torch.nn.Module | None
    autocast_dtype: torch.dtype | None  # the autocast the forward ran under, for the head; None: off


def forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, head: torch.nn.Module | None = None
) -> ModelOutput:
    """Run `model` on a collated batch (`raylora.data`) and return what the loss needs.

    `head` replaces the model's output head for the loss (a packed adapter's own copy of a trained head);
    it applies only where the loss applies the head itself (`chunkable_head`).
    """
    # Packed rows carry per-document position_ids and no padding: leaving attention_mask out lets
    # transformers build a block-diagonal causal mask from the position ids.
    mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    own_head = chunkable_head(model)
    if own_head is None:
        return ModelOutput(model(**inputs).logits, None, None)
    head = head if head is not None else own_head
    if _sharded(model):
        hidden = _hidden_through_root(model, inputs)
    else:
        # The decoder alone (LoRA layers sit inside it): the [tokens, vocab] logits are never built here.
        hidden = unwrap(model).get_decoder()(**inputs).last_hidden_state
    device_type = hidden.device.type
    autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return ModelOutput(hidden, head, autocast_dtype)


def chunkable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output head, when the loss may apply it itself; None to take the model's own logits.

    Not for architectures that transform the logits after the head (Gemma 2's soft-capping, Cohere's scale),
    and not for a head that trains under FSDP2 (`modules_to_save`, LoRA on the head): its gradients go through
    its FSDP2 unit's own forward and backward, so the model's own forward applies it.
    """
    base = unwrap(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    head = base.get_output_embeddings()
    if _sharded(model) and (head is None or any(p.requires_grad for p in head.parameters())):
        return None
    return head


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _hidden_through_root(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The decoder's final hidden states from the whole model's forward, the head applied to no position.

    Under FSDP2 the root unit's forward must run (it gathers the root's parameters, the final norm among
    them, and queues the end-of-backward work), so the decoder is not called alone: the model runs with
    `logits_to_keep` an empty index, which makes its head compute [batch, 0, vocab] logits, and the
    decoder's output is taken on the way. The head's own unit gathers its weight in that forward and keeps
    it gathered for the loss (`raylora.distributed.shard_with_fsdp2`).
    """
    captured: list[torch.Tensor] = []

    def keep(module, args, output) -> None:
        captured.append(output.last_hidden_state)

    handle = unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, logits_to_keep=no_position)
    finally:
        handle.remove()
    (hidden,) = captured
    return hidden


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Trained next-token positions of a batch: labels shifted by one, without the ignored ones."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(
    output: ModelOutput, labels: torch.Tensor, label_smoothing: float, *, head_loss=None
) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over trained positions, in fp32 for a stable softmax.

    With a head to apply (`forward` returned hidden states), the logits exist one chunk of
    `LOSS_CHUNK_TOKENS` tokens at a time, each upcast to fp32 for its own cross-entropy: the same numbers
    as the full-logits path, summed in a different order. `head_loss` is `compiled_head_loss(...)` or None
    for the eager path.
    """
    targets = labels[:, 1:].reshape(-1)
    if output.head is None:
        logits = output.hidden
        shifted = logits[:, :-1].float().reshape(-1, logits.size(-1))
        return F.cross_entropy(
            shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
        )
    hidden = output.hidden[:, :-1].reshape(-1, output.hidden.size(-1))
    head, dtype = output.head, output.autocast_dtype
    head_trains = any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and hidden.requires_grad and not head_trains:
        fused = head_loss if _plain_linear(head) else None
        return _FrozenHeadCrossEntropy.apply(hidden, targets, head, label_smoothing, dtype, fused)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), LOSS_CHUNK_TOKENS):
        chunk = (
            head,
            hidden[start : start + LOSS_CHUNK_TOKENS],
            targets[start : start + LOSS_CHUNK_TOKENS],
        )
        if torch.is_grad_enabled():
            # A trained head (`modules_to_save`, or LoRA on it) needs its own gradients: keep no chunk's
            # logits for backward, recompute them there instead.
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_cross_entropy, *chunk, label_smoothing, dtype, use_reentrant=False
            )
        else:
            total = total + _chunk_cross_entropy(*chunk, label_smoothing, dtype)
    return total


def _chunk_cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    # The head runs under the autocast the decoder ran under, as it would inside the model's forward.
    enabled = autocast_dtype is not None
    with torch.autocast(hidden.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        # A plain linear head by its weight, as its forward would: a sharded head's forward would gather it
        # again for every chunk, while its weight is already gathered here (`_hidden_through_root`).
        logits = F.linear(hidden, head.weight, head.bias) if _linear(head) else head(hidden)
    return F.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Chunked head + cross-entropy for a frozen head: each chunk's gradient w.r.t. the hidden states is
    taken in the forward pass, right after its loss, so backward only scales it; nothing is recomputed
    and no chunk's logits outlive its own iteration."""

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, autocast_dtype, head_loss):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        # Liger chunks the micro-batch itself: one call over all of it.
        tokens = max(hidden.size(0), 1) if head_loss is liger_head_loss_and_grad else LOSS_CHUNK_TOKENS
        for start in range(0, hidden.size(0), tokens):
            end = start + tokens
            if head_loss is not None:
                # The loss and its gradient in one call: `head_loss_and_grad` compiled, or Liger's kernel.
                dtype = autocast_dtype or head.weight.dtype
                loss, grad[start:end] = head_loss(
                    hidden[start:end].detach().to(dtype),
                    head.weight.detach().to(dtype),
                    targets[start:end],
                    label_smoothing,
                    IGNORE_INDEX,
                )
                total += loss
                continue
            chunk = hidden[start:end].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = _chunk_cross_entropy(head, chunk, targets[start:end], label_smoothing, autocast_dtype)
                (grad[start:end],) = torch.autograd.grad(loss, chunk)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # Scale in fp32: the loop scales the loss by 1/tokens, which bf16 would round by up to 0.4%.
        return (grad.float() * grad_output).to(grad.dtype), None, None, None, None, None


def _linear(head: torch.nn.Module) -> bool:
    """An `nn.Linear` itself, or the class FSDP2 derives from it for a sharded head (FSDPLinear)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(head)
    return cls is torch.nn.Linear or (isinstance(head, FSDPModule) and cls.__bases__[-1] is torch.nn.Linear)


def _plain_linear(head: torch.nn.Module) -> bool:
    return _linear(head) and head.bias is None


def head_loss_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` and its gradient w.r.t. `hidden`, written out.

    The same numbers as ``F.cross_entropy(linear(hidden, weight).float(), ...)`` and its backward (fp32
    logits, log-sum-exp, the gradient ``softmax - target distribution`` rounded to the matmul dtype before
    the head's backward matmul), in a form `torch.compile` fuses: eager materialises the fp32 logits, their
    log-softmax and the fp32 gradient, one [tokens, vocab] tensor each; compiled, the bf16 logits are read
    twice and the bf16 gradient written once.
    """
    logits = (hidden @ weight.t()).float()
    valid = targets != ignore_index
    index = torch.where(valid, targets, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    per_token = lse - logits.gather(1, index).squeeze(1)
    if label_smoothing > 0:
        per_token = (1.0 - label_smoothing) * per_token + label_smoothing * (lse - logits.mean(dim=-1))
    loss = torch.where(valid, per_token, 0.0).sum()
    grad = torch.exp(logits - lse.unsqueeze(1)) - label_smoothing / logits.size(-1)
    grad = grad.scatter_add(1, index, torch.full_like(index, -(1.0 - label_smoothing), dtype=grad.dtype))
    grad = torch.where(valid.unsqueeze(1), grad, 0.0).to(hidden.dtype)
    return loss, grad @ weight


def compiled_head_loss(backend: str):
    """`head_loss_and_grad` compiled with `backend` (dynamic shapes: the last chunk of a batch is shorter)."""
    return torch.compile(head_loss_and_grad, backend=backend, dynamic=True)


# The keyword arguments of Liger's fused linear cross-entropy that `liger_head_loss_and_grad` passes.
_LIGER_ARGUMENTS = frozenset(
    {"ignore_index", "label_smoothing", "reduction", "compute_gradients", "weight_requires_grad"}
)


@functools.cache
def liger_available() -> bool:
    """liger-kernel is installed (`pip install 'raylora[gpu]'`) and its fused linear cross-entropy takes the
    arguments `liger_head_loss_and_grad` passes (it has taken them since liger-kernel 0.8.5)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward
    except ImportError:  # e.g. no Triton on this machine
        return False
    return set(inspect.signature(fused_linear_cross_entropy_forward).parameters) >= _LIGER_ARGUMENTS


def liger_head_loss_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_loss_and_grad` by Liger's fused linear cross-entropy, over a whole micro-batch (Liger chunks it
    itself, keeping no logits): the summed loss in fp32 and the gradient w.r.t. `hidden`. The head is frozen,
    so Liger forms no weight gradient."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    out = fused_linear_cross_entropy_forward(
        hidden.contiguous(),
        weight,
        targets.contiguous(),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
        compute_gradients=True,  # `hidden` is detached: its gradient is wanted all the same
        weight_requires_grad=False,
    )
    # out: (loss, z_loss, accuracy, predicted tokens, grad input, grad weight, grad bias)
    return out[0].float(), out[4]


def choose_head_loss(training: TrainingConfig, device: torch.device, backend: str | None) -> Callable | None:
    """The function a run's frozen head takes its loss and gradient with (`_FrozenHeadCrossEntropy`), per
    `training.head_loss`: Liger's (`auto` on a GPU with liger-kernel installed, without label smoothing, the
    setting its loss parity was measured at), else the chunked loss, compiled with `backend` or eager (None).

    Raises:
        ConfigError: `liger` asked for where it cannot run (no GPU, or liger-kernel missing).
    """
    choice = training.head_loss
    if choice == "liger":
        if device.type != "cuda":
            raise ConfigError(
                f"`training.head_loss` is 'liger', but this run trains on the {device.type}: Liger's kernels "
                "run on GPUs; use 'auto' (Liger on GPUs, the chunked loss elsewhere) or 'chunked'"
            )
        if not liger_available():
            raise ConfigError(
                "`training.head_loss` is 'liger', but liger-kernel (>= 0.8.5) is not importable on this "
                "worker; install it (`pip install 'raylora[gpu]'`) or use 'auto' or 'chunked'"
            )
    use_liger = choice == "liger" or (
        choice == "auto" and device.type == "cuda" and training.label_smoothing == 0 and liger_available()
    )
    if use_liger:
        logger.info("head loss: Liger's fused linear cross-entropy (training.head_loss=%s)", choice)
        return liger_head_loss_and_grad
    return compiled_head_loss(backend) if backend is not None else None
