"""Expert specialisation of a student against its teacher's co-activation clusters (docs/method.md §5).

On held-out tokens, each token gets two labels per MoE layer: the teacher cluster with the largest
activation mass (`metrics.dominant_cluster`, clusters from a Stage I partition) and the student's
top-1 expert (the largest selection score, bias included). NMI and ESI of the two labelings are
averaged over layers; the per-layer top-K loads come from the same forward.
"""

from __future__ import annotations

import torch

from padd.metrics import dominant_cluster, esi, load_stats, nmi
from padd.models import load_causal_lm
from padd.router_adapter import selection_scores
from padd.routing import RouterRecorder, expert_load, moe_gates, moe_layer_indices, selection_biases


@torch.no_grad()
def max_logit_gap_all_experts(teacher_dir, student_dir, input_ids: torch.Tensor) -> float:
    """max |student - teacher| logits with every expert selected (top-k = E): Stage I's exactness.

    input_ids: [B, T] token ids (any; exactness holds for every input).
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(student_dir)
    cfg.num_experts_per_tok = cfg.n_routed_experts
    student = load_causal_lm(student_dir, config=cfg)
    teacher = load_causal_lm(teacher_dir)
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    ids = input_ids % vocab
    return float((student(ids).logits[..., :vocab] - teacher(ids).logits[..., :vocab]).abs().max())


@torch.no_grad()
def expert_specialisation(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    windows: torch.Tensor,
    clusters: list[torch.Tensor],
    batch_size: int = 8,
    teacher_layers: list[int] | None = None,
) -> dict:
    """NMI, ESI (means over MoE layers) and top-K load per layer of `student` on `windows`.

    Args:
        student: an MoE student; teacher: the dense teacher it came from.
        windows: [N, T] token ids of held-out text.
        clusters: per MoE layer, [C, S] teacher neuron indices of each reference cluster.
        teacher_layers: per MoE layer, the teacher layer its clusters come from (default: the same
            decoder index, as for a student built by padd decompose; `padd seed` writes its own map).

    Returns:
        {"nmi", "esi", "nmi_per_layer", "esi_per_layer", "load" ([L][E] shares), "load_cv"}.
    """
    gates, biases = moe_gates(student), selection_biases(student)
    moe_layers = moe_layer_indices(student)
    teacher_layers = moe_layers if teacher_layers is None else teacher_layers
    if not len(clusters) == len(moe_layers) == len(teacher_layers):
        raise ValueError(
            f"{len(clusters)} cluster sets and {len(teacher_layers)} teacher layers for {len(moe_layers)} MoE layers"
        )
    cluster_labels: list[list[torch.Tensor]] = [[] for _ in moe_layers]

    def label(j: int):
        def hook(module, args):
            cluster_labels[j].append(dominant_cluster(args[0].reshape(-1, args[0].shape[-1]).float(), clusters[j]))

        return hook

    # one hook per MoE layer; several may read the same teacher layer
    hooks = [
        teacher.model.layers[t].mlp.down_proj.register_forward_pre_hook(label(j)) for j, t in enumerate(teacher_layers)
    ]
    top1: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    topk: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    device = next(student.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            teacher(input_ids=batch, use_cache=False)
            with RouterRecorder(student) as rec:
                student(input_ids=batch, use_cache=False)
            for j, (bias, logits, chosen) in enumerate(zip(biases, rec.logits, rec.topk, strict=True)):
                choice = selection_scores(student.config, logits) + bias.float()
                top1[j].append(choice.argmax(-1))
                topk[j].append(chosen)
    finally:
        for h in hooks:
            h.remove()
    n_experts = gates[0].weight.shape[0]
    nmis, esis = [], []
    for j in range(len(moe_layers)):
        expert, cluster = torch.cat(top1[j]).cpu(), torch.cat(cluster_labels[j]).cpu()
        nmis.append(nmi(cluster, expert))
        esis.append(esi(expert, cluster, n_clusters=clusters[j].shape[0]))
    load = expert_load(torch.stack([torch.cat(t) for t in topk]), n_experts).cpu()
    return {
        "nmi": sum(nmis) / len(nmis),
        "esi": sum(esis) / len(esis),
        "nmi_per_layer": nmis,
        "esi_per_layer": esis,
        "load": (load / load.sum(-1, keepdim=True)).tolist(),
        "load_cv": load_stats(load)["cv"].tolist(),
    }
