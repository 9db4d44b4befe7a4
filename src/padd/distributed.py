"""Multi-process runs: `torchrun --nproc_per_node=N -m padd ...` or `accelerate launch -m padd ...`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address); with WORLD_SIZE > 1
the process group is started here (gloo on CPU, NCCL on CUDA). A single process needs nothing.

Two data-parallel modes (`--parallel`): `ddp` replicates the weights and averages gradients;
`fsdp` shards weights, gradients and optimizer state with FSDP2 (`fully_shard` per decoder layer,
then the root), gathering each layer's weights only while it runs. Outside a forward an FSDP2
weight is a DTensor shard: `full_tensor` and `gather_state_dict` give the whole thing back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from padd.errors import UserError


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

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum of `tensor` over all ranks, in place (and returned); a no-op in a single process."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over all ranks (float64, one collective), by name."""
        names = list(values)
        summed = self.all_reduce_sum(torch.tensor([float(values[k]) for k in names], dtype=torch.float64))
        return dict(zip(names, summed.tolist(), strict=True))

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


PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def setup(device: str) -> Dist:
    """Join the launcher's process group when there is one; returns this rank's Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # NCCL for CUDA tensors and gloo for CPU ones, as padd reduces both: its logged sums and
        # checks are CPU tensors, and under --offload so are the shards the gradient norm reduces.
        # The timeout is long because the other ranks wait while rank 0 alone works: the router
        # start and the save at a warm-up's end, a vLLM server taking the weights.
        backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


PARALLEL_MODES = ("ddp", "fsdp")


def wrap_for_training(model: torch.nn.Module, ranks: Dist, mode: str, offload: bool = False) -> torch.nn.Module:
    """The module to run forwards/backwards through: `model` itself in one process, a DDP wrapper
    around it, or `model` sharded in place by FSDP2, with `offload` its shards in CPU memory (build
    the optimizer after this call); a model loaded sharded (padd.models.load_sharded_causal_lm, which
    took the offload policy then) is kept as it is."""
    if mode not in PARALLEL_MODES:
        raise UserError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if ranks.world == 1:
        return model
    if mode == "fsdp":
        if not is_sharded(model):
            shard(model, offload=offload)
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def shard(model: torch.nn.Module, offload: bool = False) -> None:
    """FSDP2 in place: one unit per decoder layer (gathered for its own forward/backward), one root.

    `offload`: FSDP2's CPUOffloadPolicy — the sharded weights, their gradients and so the optimizer's
    state live in (pinned, on CUDA) CPU memory and each unit is copied to the device only to run;
    the optimizer then steps on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()

    # Zero-size tensors (the empty shared expert of a student without one) have nothing to shard and
    # break the gradient reduce-scatter; they stay plain, replicated, gradient-free.
    empty = {p for p in model.parameters() if p.numel() == 0}
    for p in empty:
        p.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=empty, offload_policy=policy)
    fully_shard(model, ignored_params=empty, offload_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank must call it), else `tensor`."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """(model, optimizer) full state dicts of a sharded model on CPU, on rank 0 (empty elsewhere);
    a collective. The optimizer's is keyed by parameter name, as `load_sharded_optimizer` expects."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def whole_state_dict(model: torch.nn.Module, rank0_cpu: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with sharded tensors gathered whole, on every rank (a collective when
    sharded; an unsharded model's own tensors otherwise). `rank0_cpu` (sharded models only): each
    tensor is gathered, moved to rank 0's CPU memory and dropped from the GPU before the next, so no
    GPU holds more than its shards and one whole tensor; the other ranks get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """A plain (unsharded) model holding the sharded `model`'s whole weights, on CPU, on rank 0 only
    (None elsewhere); a collective. Rank 0 holds one whole copy: the gathered tensors become the
    copy's own weights (built on the meta device, loaded with `assign`), and the buffers, which FSDP2
    never shards, are taken from `model`."""
    from transformers import AutoModelForCausalLM

    state, _ = gather_state_dict(model)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(state, assign=True)
    del state
    own = dict(model.named_buffers())
    for name, _ in list(fresh.named_buffers()):  # non-persistent ones (rotary inv_freq) are not in `state`
        module, _, leaf = name.rpartition(".")
        fresh.get_submodule(module)._buffers[leaf] = own[name].detach().to("cpu", copy=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    if hasattr(model, "_weight_conversions"):  # how its checkpoint was converted: saved back the same way
        fresh._weight_conversions = model._weight_conversions
    return fresh.train(model.training)


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (from `gather_state_dict`) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
