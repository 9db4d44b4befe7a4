"""The memory options of the training commands (padd.config.MemoryOptions), on PyTorch's and
transformers' own mechanisms; docs/scale.md says what each one saves and costs.

- micro-batches: a batch's forward/backward in parts whose gradients accumulate (`micro_slices`,
  `no_gradient_sync`), every statistic the update reads (group advantages, the KD temperature, Γ's
  running mean, IV's loads) still taken over the whole batch by the caller;
- activation checkpointing: transformers' `activation_checkpointing_enable` (non-reentrant
  torch.utils.checkpoint around each decoder layer);
- offload: FSDP2's `CPUOffloadPolicy` (padd.distributed.shard).
"""

from __future__ import annotations

import contextlib

import torch

from padd.errors import UserError


def micro_slices(batch: int, micro_batch_size: int | None) -> list[slice]:
    """The consecutive parts of a batch of `batch` rows that run one forward/backward each (the last
    one shorter when the size does not divide the batch); one part for the whole batch when None."""
    size = micro_batch_size or batch
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def check_equal_mini_batches(
    per_rank: int, updates_per_batch: int, micro_batch_size: int | None, error: type[UserError] = UserError
) -> None:
    """Refuse micro-batches of a rank's `per_rank` completions that --updates-per-batch does not cut
    into mini-batches of equal size (padd train, and padd plan in its own error type)."""
    if micro_batch_size is not None and per_rank % updates_per_batch:
        raise error(
            f"--micro-batch-size cuts mini-batches of equal size: each rank's {per_rank} completions "
            f"(--prompts-per-step × --group-size / processes) must divide into --updates-per-batch "
            f"{updates_per_batch}; change one of them"
        )


def check_activation_checkpointing(model_dir) -> None:
    """Fail, before the model loads, when its transformers class cannot checkpoint its layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise UserError(
            f"--activation-checkpointing: {model_class.__name__} ({model_dir}) does not support activation "
            "checkpointing in transformers; drop the flag (and use --micro-batch-size to save memory)"
        )


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward. Non-reentrant checkpointing: it works with
    FSDP2, needs no input that requires grad (the warm-up trains the experts only), and replays
    forward hooks in the recompute, so hooks that steer the routing (uniform routing, routing replay,
    the selection bias) must give the same selection again, and hooks that record must be removed
    before the backward."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def no_gradient_sync(trained: torch.nn.Module, last: bool):
    """The context for one micro-batch's forward and backward (DDP decides in the forward whether
    the backward all-reduces): DDP skips its all-reduce on every micro-batch but
    the last (the gradients accumulate locally and are averaged once); FSDP2 reduce-scatters each
    micro-batch's gradients into the sharded ones (its own default: nothing unsharded is kept), and a
    single process has nothing to sync."""
    if isinstance(trained, torch.nn.parallel.DistributedDataParallel) and not last:
        return trained.no_sync()
    return contextlib.nullcontext()


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held so far (GiB): the CUDA allocator's peak on a GPU, the
    peak resident set size on a CPU (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
