"""This process's place among a trial's training workers, and FSDP2 sharding across them.

One worker is the common case and costs nothing here: with no `torch.distributed` process group up, every
collective below is the identity. Ray Train's `TorchTrainer` starts a process group for N-worker trials;
then the base loads straight into its shards (`raylora.shards`), each decoder layer, the embeddings and the
head become FSDP2 units, and the loop's sums run over every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from raylora.model import decoder_layers, unwrap

__all__ = ["Workers", "local_parameter_bytes", "return_freed_blocks", "shard_with_fsdp2"]


@dataclass
class Workers:
    """This process's place among the training workers (one worker when no process group is up)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def detect() -> Workers:
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        if torch.cuda.is_available():
            # Ray Train sets each worker's current device; a lone process uses the first visible GPU.
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return Workers(rank, world_size, device)

    def sum(self, value: float | int) -> float:
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def autocast(self, precision: str) -> torch.autocast:
        """bf16 autocast when asked, or by default (`auto`) on a GPU; a disabled context otherwise."""
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _all_reduce(self, value: float | int, op) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_with_fsdp2(model: torch.nn.Module) -> None:
    """FSDP2 units: each decoder layer (its frozen base and LoRA weights together), the input embeddings,
    the output head, then the root (the final norm and whatever else is left).

    Every unit reshards after its forward, 4-bit (QLoRA) layers too: bitsandbytes' 4-bit matmul saves the
    packed weight for its backward, and FSDP2 re-gathers into the same storage before the layer's backward
    runs, so the saved weight is whole again when it is read (the 2-worker QLoRA test checks the loss
    against one worker's). The head is the exception: it stays gathered from its forward to the end of the
    step, because the loss applies it a chunk at a time after the model's forward (`raylora.loss.forward`).
    Tied input and output embeddings share one weight, which FSDP2 keeps in one unit: they stay in the root,
    which does not reshard after forward either.

    Sharding on the meta device (before the weights load, `raylora.shards`) is the normal case for N workers.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    base = unwrap(model)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    if embeddings is not None and head is not None:
        shared = {id(p) for p in embeddings.parameters()} & {id(p) for p in head.parameters()}
        if not shared:
            fully_shard(embeddings)
            fully_shard(head, reshard_after_forward=False)
    fully_shard(model)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this process holds: its shards under FSDP2 (a shared parameter counts once)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def return_freed_blocks() -> bool:
    """Make glibc hand blocks of 1 MiB and more back to the OS when they are freed; returns whether it could.

    For sharded training on the CPU: FSDP2 gathers each layer's weights before its forward and frees them
    after, one layer after another. glibc raises its mmap threshold as such blocks are freed (up to 32 MiB),
    so it soon serves them from its heap, and a freed heap block of that size is kept for reuse, split and
    rarely given back: over one step the process's resident set grows towards the whole base even though
    no more than two layers are alive at once. A fixed threshold keeps every such block a mapping of its own,
    unmapped when freed. (On GPUs the gathered weights live in device memory and this does not arise.)
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 1 << 20))
