"""Teacher + neuron partition -> a standard transformers `Glm4MoeForCausalLM` student (docs/method.md §2).

Attention, norms, embeddings and the LM head are copied unchanged; each MoE layer's FFN neurons are
split into experts. Gate scaling keeps the decompression exact: the router starts at zero (every
sigmoid score 0.5), `norm_topk_prob` turns the K chosen scores into 1/K each, and
`routed_scaling_factor = E` makes that E/K. With K = E every expert gets weight 1 (the teacher's
FFN, exactly); with K < E and uniform random routing each expert is picked with probability K/E,
so the expected output is again the teacher's FFN.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from padd.errors import UserError

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "qwen3")


class TeacherError(UserError):
    """The teacher cannot be decomposed; the message says what is missing and what to do."""


@dataclass
class LayerPlan:
    """How one teacher FFN becomes one MoE layer.

    experts: per expert, the teacher neuron indices it holds (all the same length).
    shared: neurons of the always-on shared expert (may be empty).
    Neurons held by several experts (capacity growth) have their output split evenly between
    copies, so the sum over all experts is still the teacher's FFN.
    """

    experts: list[list[int]]
    shared: list[int] = field(default_factory=list)
    objective: float | None = None

    def to_json(self) -> dict:
        return {"experts": self.experts, "shared": self.shared, "objective": self.objective}


def validate_teacher(model: PreTrainedModel) -> None:
    """Raise TeacherError unless `model` is a dense causal LM with a gated (SwiGLU) MLP in every layer."""
    cfg = model.config
    family = getattr(cfg, "model_type", "?")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TeacherError(
            f"teacher ({type(model).__name__}, model_type={family}) has no `model.layers`: padd decomposes "
            f"decoder-only causal LMs of the families {', '.join(SUPPORTED_FAMILIES)}"
        )
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        missing = [
            n for n in ("gate_proj", "up_proj", "down_proj") if not isinstance(getattr(mlp, n, None), torch.nn.Linear)
        ]
        if missing:
            what = "already a Mixture-of-Experts" if hasattr(mlp, "experts") else "not a gated (SwiGLU) MLP"
            raise TeacherError(
                f"teacher layer {i} MLP ({type(mlp).__name__}) is {what}: it lacks {', '.join(missing)}. padd needs a "
                f"dense teacher whose MLP is down_proj(act(gate_proj(x)) * up_proj(x)) (Llama, Qwen2, Mistral, Qwen3)"
            )
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise TeacherError(f"teacher layer {i} MLP has biases (mlp_bias=True); the MoE student cannot hold them")
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if o_proj is None:
            raise TeacherError(f"teacher layer {i} has no self_attn.o_proj: unsupported attention layout")
        if o_proj.bias is not None:
            raise TeacherError(f"teacher layer {i} has an o_proj bias; the MoE student (GLM-4 MoE) has none")
    if family not in SUPPORTED_FAMILIES:
        raise TeacherError(
            f"teacher model_type={family!r} is not one of {', '.join(SUPPORTED_FAMILIES)}; its attention may differ "
            f"from the student's. Add it with an exactness test (docs/method.md §2) before decomposing it"
        )


def student_config(
    teacher_cfg,
    *,
    n_experts: int,
    top_k: int,
    expert_size: int,
    n_shared_experts: int,
    dense_layers: int,
) -> Glm4MoeConfig:
    """The `Glm4MoeConfig` that represents the teacher exactly (docs/method.md §2)."""
    rope = dict(getattr(teacher_cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    rope["partial_rotary_factor"] = 1.0
    head_dim = getattr(teacher_cfg, "head_dim", None) or teacher_cfg.hidden_size // teacher_cfg.num_attention_heads
    qkv_bias = bool(getattr(teacher_cfg, "attention_bias", False)) or teacher_cfg.model_type == "qwen2"
    return Glm4MoeConfig(
        vocab_size=teacher_cfg.vocab_size,
        hidden_size=teacher_cfg.hidden_size,
        intermediate_size=teacher_cfg.intermediate_size,
        num_hidden_layers=teacher_cfg.num_hidden_layers,
        num_attention_heads=teacher_cfg.num_attention_heads,
        num_key_value_heads=teacher_cfg.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=teacher_cfg.hidden_act,
        max_position_embeddings=teacher_cfg.max_position_embeddings,
        rms_norm_eps=teacher_cfg.rms_norm_eps,
        tie_word_embeddings=bool(getattr(teacher_cfg, "tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=qkv_bias,
        use_qk_norm=teacher_cfg.model_type == "qwen3",
        moe_intermediate_size=expert_size,
        num_experts_per_tok=top_k,
        n_routed_experts=n_experts,
        n_shared_experts=n_shared_experts,
        routed_scaling_factor=float(n_experts),
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=dense_layers,
        num_nextn_predict_layers=0,
        bos_token_id=teacher_cfg.bos_token_id,
        eos_token_id=teacher_cfg.eos_token_id,
        pad_token_id=getattr(teacher_cfg, "pad_token_id", None),
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def build_student(
    teacher: PreTrainedModel,
    plans: list[LayerPlan | None],
    *,
    top_k: int,
) -> Glm4MoeForCausalLM:
    """Make the MoE student from the teacher and one plan per layer (None: the layer stays dense).

    Leading `None` plans become `first_k_dense_replace` dense layers; all other layers need a plan.
    """
    validate_teacher(teacher)
    tcfg = teacher.config
    dense_layers = 0
    while dense_layers < len(plans) and plans[dense_layers] is None:
        dense_layers += 1
    moe_plans = plans[dense_layers:]
    if any(p is None for p in moe_plans):
        raise UserError("dense layers must come first: only a leading run of layers can stay dense")
    if not moe_plans:
        raise UserError("every layer is dense: nothing to decompose")
    n_experts = len(moe_plans[0].experts)
    expert_size = len(moe_plans[0].experts[0])
    max_shared = max(len(p.shared) for p in moe_plans)
    n_shared_experts = -(-max_shared // expert_size)  # the shared expert is padded with zero neurons
    for i, p in enumerate(moe_plans):
        if len(p.experts) != n_experts or any(len(e) != expert_size for e in p.experts):
            raise ValueError(
                f"layer {i + dense_layers}: every layer needs {n_experts} experts of {expert_size} neurons"
            )
    cfg = student_config(
        tcfg,
        n_experts=n_experts,
        top_k=top_k,
        expert_size=expert_size,
        n_shared_experts=n_shared_experts,
        dense_layers=dense_layers,
    )
    dtype = next(teacher.parameters()).dtype
    with no_init_weights(), _default_dtype(dtype):
        student = Glm4MoeForCausalLM(cfg)
    student.to(device=next(teacher.parameters()).device)

    # Everything outside the MLPs has the same name and shape in both models.
    t_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if ".mlp." not in name and name in t_state:
            tensor.copy_(t_state[name])
        elif (
            ".mlp." not in name
            and not name.endswith("inv_freq")
            and not (cfg.tie_word_embeddings and name == "lm_head.weight")
        ):
            raise TeacherError(f"student tensor {name} has no counterpart in the teacher")

    for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.model.layers, strict=True)):
        t_mlp, s_mlp = t_layer.mlp, s_layer.mlp
        plan = plans[i]
        if plan is None:
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(s_mlp, n).weight.copy_(getattr(t_mlp, n).weight)
            continue
        _fill_moe_layer(t_mlp, s_mlp, plan)
    student.eval()
    return student


def _fill_moe_layer(t_mlp: torch.nn.Module, s_mlp: torch.nn.Module, plan: LayerPlan) -> None:
    gate_w, up_w, down_w = t_mlp.gate_proj.weight, t_mlp.up_proj.weight, t_mlp.down_proj.weight
    d_ff = gate_w.shape[0]
    idx = torch.tensor(plan.experts, dtype=torch.long, device=gate_w.device)  # [E, S]
    # A neuron held by c experts contributes 1/c through each, keeping sum-over-experts exact.
    copies = torch.bincount(idx.flatten(), minlength=d_ff).clamp_min(1).to(down_w.dtype)
    down_scaled = down_w / copies[None, :]
    s_mlp.experts.gate_up_proj.copy_(torch.cat([gate_w[idx], up_w[idx]], dim=1))  # [E, 2S, H]
    s_mlp.experts.down_proj.copy_(down_scaled[:, idx].permute(1, 0, 2))  # [E, H, S]
    s_mlp.gate.weight.zero_()
    s_mlp.gate.e_score_correction_bias.zero_()
    shared = s_mlp.shared_experts
    width = shared.gate_proj.weight.shape[0]
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(shared, name).weight.zero_()  # zero-padded neurons contribute act(0) * 0 = 0
    if plan.shared:
        s = torch.tensor(plan.shared, dtype=torch.long, device=gate_w.device)
        if s.numel() > width:
            raise ValueError(f"{s.numel()} shared neurons do not fit a shared expert of width {width}")
        shared.gate_proj.weight[: s.numel()] = gate_w[s]
        shared.up_proj.weight[: s.numel()] = up_w[s]
        shared.down_proj.weight[:, : s.numel()] = down_w[:, s]
