"""A `padd train` checkpoint: the student (a stock checkpoint with its tokenizer) and everything else a
resumed run needs to continue as if never stopped — optimizer, scheduler, bias balancer, counters,
the router before the last optimizer step, Γ's running scale and the RNG states — written atomically.

The functions take and return the state itself, so nothing here calls back into the loop.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from padd.distributed import gather_state_dict, load_sharded_optimizer
from padd.errors import UserError
from padd.io import atomic_save_dir
from padd.routing import save_selection_bias

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(
    out: Path, student, tokenizer, optimizer, counters: dict, *, sharded: bool, dist
) -> dict[str, torch.Tensor] | None:
    """Write `out/checkpoint` (student, tokenizer, optimizer and `counters`: the loop's own state,
    picklable) with the RNG states. Returns the student's whole state dict when it is sharded
    (gathered on rank 0 for the write), else None."""
    model_state, optim_state = None, optimizer.state_dict()
    if sharded:  # whole tensors on rank 0, which writes
        model_state, optim_state = gather_state_dict(student, optimizer)

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp / "student", state_dict=model_state)
        tokenizer.save_pretrained(tmp / "student")
        save_selection_bias(student, tmp / "student")
        state = {
            **counters,
            "optimizer": optim_state,
            "sharded_optimizer": sharded,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        torch.save(state, tmp / TRAINER_STATE)

    if dist.main:
        atomic_save_dir(Path(out) / CHECKPOINT, write)
    dist.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
    return model_state


def checkpoint_dir(out: Path) -> Path:
    """The run's checkpoint folder, or a clear error when there is none to resume from."""
    ckpt = Path(out) / CHECKPOINT
    if not (ckpt / TRAINER_STATE).exists():
        raise UserError(f"--resume: no checkpoint in {ckpt}; start without --resume")
    return ckpt


def load_trainer_state(ckpt: Path, student, optimizer, *, sharded: bool) -> dict:
    """Restore the optimizer (into `optimizer`, bound to the reloaded `student`) and the RNG states;
    returns the loop's own counters as `save_checkpoint` got them."""
    state = torch.load(Path(ckpt) / TRAINER_STATE, weights_only=False)
    if state.pop("sharded_optimizer", False) != sharded:
        was = "one process or ddp" if sharded else "fsdp on several processes"
        raise UserError(
            f"--resume: the checkpoint in {ckpt} was written under {was}, whose optimizer state this run "
            "cannot load; resume with the same --parallel mode (and process count above one for fsdp)"
        )
    optim_state = state.pop("optimizer")
    if sharded:
        load_sharded_optimizer(student, optimizer, optim_state)
    else:
        optimizer.load_state_dict(optim_state)
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state


def save_student(out: Path, student, tokenizer, state_dict: dict | None = None) -> bool:
    """The trained student as a stock checkpoint with its tokenizer, written atomically; returns
    whether a routing-bias file was written beside it (padd.routing.BIAS_FILE)."""
    written = []

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        written.append(save_selection_bias(student, tmp))

    atomic_save_dir(Path(out), write)
    return bool(written and written[0])
