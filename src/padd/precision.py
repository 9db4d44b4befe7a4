"""Mixed precision for the training forwards: bfloat16 autocast, float32 master weights and routers.

`--precision bf16` runs every student and teacher forward (generation included) under autocast,
keeps the student's weights, gradients and AdamW state in float32, and loads the forward-only
teacher in bfloat16. The MoE routers compute in float32 even then: transformers' router upcasts on
purpose (a bf16 rounding flips near-tied top-K choices), and autocast would silently undo that.
The routed experts compute in bfloat16 (`experts_in_autocast_dtype`): transformers' default
grouped_mm experts are outside autocast and would otherwise run in float32 — about half of an MoE
student's FLOPs.
"""

from __future__ import annotations

import contextlib

import torch

from padd.errors import UserError
from padd.routing import moe_gates, moe_layer_indices

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


class _ExpertsInDtype:
    """An experts module as transformers' grouped_mm forward reads it, its floating-point weights
    cast to `dtype`: a differentiable cast, as autocast's own for F.linear, so the gradients reach
    the float32 master weights."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Parameter) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def experts_in_autocast_dtype(model: torch.nn.Module) -> int:
    """Make the routed experts of `model` compute in autocast's dtype while autocast is on (and as
    before outside it); returns how many experts modules it changed.

    transformers' experts run one of its implementations (`config._experts_implementation`): eager
    (F.linear per expert) and batched_mm (bmm) are autocast ops already; grouped_mm, the default,
    is not (torch's grouped_mm has no autocast rule), and casts its input to the weights' dtype, so
    under autocast it computes in float32. For grouped_mm its forward gets the weights cast."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return 0
    changed = 0
    for index in moe_layer_indices(model):
        experts = getattr(model.model.layers[index].mlp, "experts", None)
        if experts is None:
            continue
        plain = experts.forward

        def forward(hidden_states, top_k_index, top_k_weights, _experts=experts, _plain=plain):
            kind = hidden_states.device.type
            if not torch.is_autocast_enabled(kind):
                return _plain(hidden_states, top_k_index, top_k_weights)
            cast = _ExpertsInDtype(_experts, torch.get_autocast_dtype(kind))
            return grouped_mm_experts_forward(cast, hidden_states, top_k_index, top_k_weights)

        experts.forward = forward
        changed += 1
    return changed
