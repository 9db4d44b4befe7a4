"""Multi-process runs: `torchrun --nproc_per_node=N -m padd ...` or `accelerate launch -m padd ...`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address); with WORLD_SIZE > 1
the process group is started here (gloo on CPU, NCCL on CUDA). A single process needs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, kind: str) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if kind == "cuda" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks in place (and return it); a no-op in a single process."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def reduce_sum(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum `tensor` over all ranks into rank `dst`'s copy (others keep a partial sum)."""
        if self.world > 1:
            dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device: str) -> Dist:
    """Join the launcher's process group when there is one; returns this rank's Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)
