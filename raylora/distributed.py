"""This process's place among a trial's training workers, and FSDP2 sharding across them.

One worker is the common case and costs nothing here: with no `torch.distributed` process group up, every
collective below is the identity. Ray Train's `TorchTrainer` starts a process group for N-worker trials;
then each decoder layer becomes one FSDP2 unit and the loop's sums run over every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from raylora.model import decoder_layers

__all__ = ["Workers", "shard_with_fsdp2"]


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


def shard_with_fsdp2(model: torch.nn.Module, *, qlora: bool) -> None:
    """FSDP2: one `fully_shard` unit per decoder layer (its frozen base and LoRA weights together), then the root.

    QLoRA layers stay gathered from forward to backward (`reshard_after_forward=False`): bitsandbytes' 4-bit
    matmul saves the packed weight for its backward, and FSDP2 freeing and re-gathering that storage in
    between was once seen to leave the input gradients wrong (a 2-rank CPU run's eval loss far from one
    worker's; BENCHMARKS.md keeps the figures). The packed weights are a quarter of bf16's, so holding a
    step's worth of them costs what sharding a bf16 base would save.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=not qlora)
    fully_shard(model)
