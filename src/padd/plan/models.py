"""The models a plan reads: their configs (a checkpoint folder, a config JSON, a bundled copy of a
published config, or a world preset) and their parameter counts on a meta-device build."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from padd import flops
from padd.errors import UserError


class PlanError(UserError):
    """A model or setting the plan cannot read; the message says what to give."""


def bundled_configs() -> dict[str, Path]:
    """Config-only JSONs shipped with padd (the paper's models), by lower-cased name."""
    folder = resources.files("padd.presets").joinpath("models")
    return {Path(p.name).stem.lower(): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def world_config(preset: str, vocab_size: int = 512):
    """The config of a `padd teacher` world preset (its tokenizer's 512 tokens), without training it."""
    from padd.teacher import PRESETS, model_config

    return model_config(PRESETS[preset], vocab_size=vocab_size, eos_token_id=0, pad_token_id=1)


def load_model_config(spec: str) -> tuple[Any, str]:
    """(transformers config, where it came from) of a checkpoint folder, a config JSON, a world preset
    (padd.teacher.PRESETS), a shipped model (shipped:NAME) or a bundled config named by a path's last
    part (so a study's `/models/Qwen3-30B-A3B` plans without the weights being there)."""
    from transformers import AutoConfig

    from padd.shipped import resolve as resolve_shipped
    from padd.teacher import PRESETS

    path = Path(resolve_shipped(spec))
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path), f"{path}/config.json"
    if path.is_file() and path.suffix == ".json":
        return _config_from_json(path), str(path)
    if spec in PRESETS:
        return world_config(spec), f"padd teacher --preset {spec}"
    bundled = bundled_configs().get(path.name.lower().removesuffix(".json"))
    if bundled is not None:
        return _config_from_json(bundled), f"padd's copy of {path.name}'s config.json"
    raise PlanError(
        f"{spec}: no config.json there, and not a world preset ({', '.join(PRESETS)}) or a bundled config "
        f"({', '.join(sorted(bundled_configs()))}); give a checkpoint folder or a config JSON"
    )


def _config_from_json(path: Path):
    from transformers import AutoConfig

    raw = json.loads(path.read_text())
    if "model_type" not in raw:
        raise PlanError(f"{path}: a config JSON needs its model_type")
    raw.pop("auto_map", None)  # remote code is never run: transformers' own class of the model_type
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


@dataclass(frozen=True)
class ModelShape:
    """A model's parameter counts, from a meta-device build of its config.

    total: every parameter; active: those one token runs through (K of the E routed experts);
    experts: the routed and shared expert weights (what the warm-up trains); routed: the routed
    experts' alone; largest_unit: the largest FSDP2 unit (one decoder layer, or the root's
    embeddings and head); largest_tensor: the largest single weight; matmul: the weights a forward
    multiplies by (every layer's and the output head's, not the input embedding's or the float32
    routers'), which bf16 autocast casts; largest_layer_matmul: one decoder layer's, at most;
    head: the output head's.
    """

    name: str
    source: str
    config: Any = field(repr=False)
    total: int
    active: int
    experts: int
    routed: int
    largest_unit: int
    largest_tensor: int
    matmul: int = 0
    largest_layer_matmul: int = 0
    head: int = 0

    @property
    def moe(self) -> bool:
        return self.total != self.active or self.experts > 0

    def flops_per_token(self, context: int) -> float:
        return flops.forward_flops_per_token(self.config, context)


def student_to_teacher(student: ModelShape, teacher: ModelShape, context: int) -> dict[str, float]:
    """The student's size over the teacher's: total and active parameters, forward FLOPs per token
    at `context` tokens, and those of the FFNs alone (the part Stage I decompresses)."""
    return {
        "total": student.total / teacher.total,
        "active": student.active / teacher.active,
        "flops_per_token": student.flops_per_token(context) / teacher.flops_per_token(context),
        "ffn_flops_per_token": flops.ffn_flops_per_token(student.config) / flops.ffn_flops_per_token(teacher.config),
    }


def measure_model(config, name: str, source: str) -> ModelShape:
    """Count `config`'s parameters on a meta-device model (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from padd.routing import moe_gates, moe_layer_indices
    from padd.stage1.warmup import expert_parameters

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    root = total - sum(layers)
    moe = is_moe(config) and bool(moe_layer_indices(model))
    experts = sum(p.numel() for p in expert_parameters(model)) if moe else 0
    routed = 0
    if moe:
        routed = sum(
            p.numel() for i in moe_layer_indices(model) for p in model.model.layers[i].mlp.experts.parameters()
        )
    active = total - round(routed * (1 - active_share(config))) if moe else total
    largest_tensor = max(p.numel() for p in model.parameters())
    # routers compute in float32 (padd.precision.routers_in_fp32): autocast casts none of theirs
    routers = {id(p) for gate in (moe_gates(model) if moe else []) for p in gate.parameters()}
    per_layer = [
        sum(p.numel() for p in layer.parameters() if p.dim() >= 2 and id(p) not in routers)
        for layer in model.model.layers
    ]
    head = model.get_output_embeddings().weight.numel()
    return ModelShape(
        name,
        source,
        config,
        total,
        active,
        experts,
        routed,
        max(layers + [root]),
        largest_tensor,
        matmul=sum(per_layer) + head,
        largest_layer_matmul=max(per_layer),
        head=head,
    )


def is_moe(config) -> bool:
    from padd.router_adapter import ROUTERS

    return getattr(config, "model_type", None) in ROUTERS


def decomposed_student(teacher_config, *, experts: int, top_k: int, shared: int, expert_size: int | None, dense: int):
    """The Glm4Moe config `padd decompose` would write for this teacher (no weights needed)."""
    from padd.stage1.build import student_config
    from padd.stage1.partition import check_sizes

    size = check_sizes(teacher_config.intermediate_size, experts, top_k, shared, expert_size, "cluster")
    return student_config(
        teacher_config,
        n_experts=experts,
        top_k=top_k,
        expert_size=size,
        n_shared_experts=-(-shared // size),  # as padd decompose pads the shared expert
        dense_layers=dense,
    )


def active_share(cfg) -> float:
    from padd.router_adapter import num_experts, top_k

    return top_k(cfg) / num_experts(cfg)
