"""Mixed precision for the training forwards: bfloat16 autocast, float32 master weights and routers.

`--precision bf16` runs every student and teacher forward (generation included) under autocast,
keeps the student's weights, gradients and AdamW state in float32, and loads the forward-only
teacher in bfloat16. The MoE routers compute in float32 even then: transformers' router upcasts on
purpose (a bf16 rounding flips near-tied top-K choices), and autocast would silently undo that.
"""

from __future__ import annotations

import contextlib

import torch

from padd.errors import UserError
from padd.routing import moe_gates

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device` (a no-op for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def teacher_dtype(precision: str) -> torch.dtype:
    """The forward-only teacher is stored in bfloat16 under bf16 (half the memory), else float32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def routers_in_fp32(model: torch.nn.Module) -> None:
    """Turn autocast off inside every MoE router of `model` (hooks that stay for its lifetime)."""

    def enter(gate, inputs):
        kind = inputs[0].device.type
        gate._padd_autocast = torch.is_autocast_enabled(kind)
        torch.set_autocast_enabled(kind, False)

    def leave(gate, inputs, output):
        torch.set_autocast_enabled(inputs[0].device.type, gate._padd_autocast)

    for gate in moe_gates(model):
        gate.register_forward_pre_hook(enter)
        gate.register_forward_hook(leave)
