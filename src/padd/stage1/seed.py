"""`padd seed` (docs/method.md §3 step 8): Stage I for a pretrained MoE student — its routers are
seeded from the dense teacher's neuron clusters, its experts are left as they are.

1. Layer map: each student layer gets a teacher layer (`padd.stage1.layer_map`: linear CKA of FFN
   inputs on the same tokens, best monotone path; or proportional depth).
2. Clusters: the teacher's neurons of each mapped layer, by co-activation (the features of
   `padd decompose`), into as many equal clusters as the student has routed experts.
3. Matching: C[c, e] = Σ_tokens q_t(c) p_t(e), q the token's share of teacher activation mass in
   cluster c, p the student router's probability of expert e; the Hungarian algorithm pairs each
   cluster with one expert, maximising the summed co-activation.
4. Router fit: each router minimises s · KL(q_matched ‖ p_W) + ‖W − W₀‖² / ‖W₀‖², s the seed
   strength, W₀ the pretrained weights. Layer l is fitted on the inputs it gets when the layers
   before it route with their seeded routers (as in `padd warmup --router-init distill`).
5. `padd_seed.json`: the map, the CKA matrix, the matchings, and on held-out tokens the NMI / ESI,
   top-K agreement with the pretrained router and LM loss before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from padd.analysis import expert_specialisation
from padd.config import SeedConfig, to_dict
from padd.corpus import sample_corpus
from padd.errors import UserError
from padd.io import atomic_save_dir, atomic_write_json, check_out_dir
from padd.models import load_causal_lm
from padd.router_adapter import log_scores, num_experts, top_k
from padd.routing import RouterRecorder, moe_gates, moe_layer_indices, save_selection_bias
from padd.stage1.activations import collect_layer_stats
from padd.stage1.cluster import balanced_kmeans
from padd.stage1.layer_map import cka_matrix, ffn_input_grams, monotone_layer_map, proportional_layer_map
from padd.stage1.reference import SEED_FILE, STAGE1_FILE
from padd.stage1.warmup import router_inputs, teacher_cluster_masses
from padd.vocab import shared_vocab

# The LM-loss rise on held-out text above which `padd seed` warns that seeding harms the student.
MAX_LOSS_RISE = 0.02


# -- the pure steps ---------------------------------------------------------------------------------


def cluster_neurons(features: torch.Tensor, active_frac: torch.Tensor, n_clusters: int, *, seed: int, iters: int):
    """[n_clusters, S] teacher neuron indices: balanced K-Means of the neurons' co-activation features.

    Teacher and student widths need not match: when n_clusters does not divide d_ff, the d_ff mod
    n_clusters least active neurons are left out (no cluster holds them).

    Args:
        features: [d_ff, p] L2-normalised co-activation features; active_frac: [d_ff] activity share.
    """
    d_ff = features.shape[0]
    if n_clusters > d_ff:
        raise UserError(f"the student has {n_clusters} experts per layer, more than the teacher's {d_ff} neurons")
    keep = torch.argsort(active_frac.cpu(), descending=True, stable=True)[: d_ff - d_ff % n_clusters].sort().values
    labels = balanced_kmeans(features[keep.to(features.device)], n_clusters, seed=seed, max_iter=iters).cpu()
    return torch.stack([keep[labels == c] for c in range(n_clusters)])


def coactivation(cluster_mass: torch.Tensor, router_probs: torch.Tensor) -> torch.Tensor:
    """C[c, e] = Σ_t q_t(c) p_t(e): [N, C] cluster-mass shares × [N, E] router probabilities -> [C, E]."""
    return cluster_mass.double().T @ router_probs.double()


def match_clusters(coact: torch.Tensor) -> torch.Tensor:
    """The cluster of each expert [E] under the one-to-one matching of maximal summed co-activation
    (the Hungarian algorithm, scipy's linear_sum_assignment) of a [C, E] matrix, C == E."""
    from scipy.optimize import linear_sum_assignment

    clusters, experts = linear_sum_assignment(coact.cpu().numpy(), maximize=True)
    of_expert = torch.empty(coact.shape[1], dtype=torch.long)
    of_expert[torch.as_tensor(experts)] = torch.as_tensor(clusters)
    return of_expert


def fit_router(
    config,
    weight: torch.Tensor,
    h: torch.Tensor,
    q: torch.Tensor,
    *,
    strength: float,
    bias: torch.Tensor | None = None,
    steps: int = 200,
) -> tuple[torch.Tensor, dict]:
    """argmin_W s·KL(q ‖ p_W(h)) + ‖W − W₀‖²_F / ‖W₀‖²_F, from W₀ = `weight` ([E, H]).

    p_W is the architecture's normalised router distribution (softmax, or normalised sigmoid
    scores) of h Wᵀ (+ the router's bias); q [N, E] the matched cluster-mass shares of inputs h [N, H].
    Strength 0 returns W₀. Adam with a step of a tenth of W₀'s RMS per element: scale-free.

    Returns:
        (fitted weight [E, H], {"kl_before", "kl_after", "relative_change"}).
    """
    w0 = weight.detach().float()
    scale = w0.pow(2).sum().clamp_min(1e-12)
    bias = None if bias is None else bias.detach().float()

    def kl(w: torch.Tensor) -> torch.Tensor:
        logp = log_scores(config, torch.nn.functional.linear(h, w, bias))
        return (q * (q.clamp_min(1e-12).log() - logp)).sum(-1).mean()

    w = w0.clone().requires_grad_()
    if strength > 0:
        opt = torch.optim.Adam([w], lr=0.1 * float(w0.pow(2).mean().sqrt().clamp_min(1e-6)))
        with torch.enable_grad():
            for _ in range(steps):
                loss = strength * kl(w) + (w - w0).pow(2).sum() / scale
                opt.zero_grad()
                loss.backward()
                opt.step()
    w = w.detach()
    with torch.no_grad():
        info = {
            "kl_before": float(kl(w0)),
            "kl_after": float(kl(w)),
            "relative_change": float((w - w0).norm() / scale.sqrt()),
        }
    return w, info


# -- measurements -----------------------------------------------------------------------------------


@torch.no_grad()
def lm_loss(model, windows: torch.Tensor, batch_size: int = 8) -> tuple[float, torch.Tensor]:
    """(mean next-token cross-entropy, greedy next token [B·(T−1)]) of `model` on windows [B, T]."""
    device = next(model.parameters()).device
    total, count, greedy = 0.0, 0, []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
        greedy.append(logits.argmax(-1).flatten().cpu())
    return total / count, torch.cat(greedy)


@torch.no_grad()
def selections(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Top-K experts [L, N, K] of every MoE layer on token windows [B, T] (N = B·T)."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        with RouterRecorder(model, keep_logits=False) as rec:
            model(input_ids=ids, use_cache=False)
        chunks.append(rec.selections(tuple(ids.shape)).flatten(1, 2).cpu())
    return torch.cat(chunks, dim=1)


def topk_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of the K selected experts two routings [L, N, K] have in common."""
    same = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float()
    return float(same.mean())


# -- the command ------------------------------------------------------------------------------------


def run_seed(cfg: SeedConfig, console: Console | None = None) -> dict:
    """Seed the pretrained student's routers from the teacher's clusters; write cfg.out; return the record."""
    console = console or Console()
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    _check_seed_options(cfg)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    device = torch.device(cfg.device)
    teacher, student, t_tok, s_tok = _load_teacher_and_student(cfg, device)
    fit, heldout = _fit_and_heldout_windows(cfg, t_tok)
    lap("load")

    layer_map, cka = _map_layers(cfg, teacher, student, fit)
    moe_layers = moe_layer_indices(student)
    teacher_layers = [layer_map[i] for i in moe_layers]
    lap("layer map")

    partitions = _cluster_teacher_layers(cfg, teacher, fit, sorted(set(teacher_layers)), num_experts(student.config))
    lap("cluster")

    # before: NMI / ESI do not depend on which cluster is matched to which expert, so the unmatched
    # partitions measure the pretrained routers (and no second copy of the student is loaded)
    before_topk = selections(student, heldout, cfg.batch_size)
    before_loss, before_greedy = lm_loss(student, heldout, cfg.batch_size)
    unmatched = [partitions[t].to(device) for t in teacher_layers]
    before_spec = expert_specialisation(student, teacher, heldout, unmatched, teacher_layers=teacher_layers)
    layers_record, matched = _match_and_fit_routers(
        cfg, student, teacher, fit, partitions, unmatched, moe_layers=moe_layers, teacher_layers=teacher_layers
    )
    lap("match and fit")

    after_loss, after_greedy = lm_loss(student, heldout, cfg.batch_size)
    after_topk = selections(student, heldout, cfg.batch_size)
    after_spec = expert_specialisation(student, teacher, heldout, matched, teacher_layers=teacher_layers)
    lap("measure")

    before = _Heldout(loss=before_loss, greedy=before_greedy, topk=before_topk, spec=before_spec)
    after = _Heldout(loss=after_loss, greedy=after_greedy, topk=after_topk, spec=after_spec)
    record = _seed_record(cfg, student, heldout, layer_map, cka, before, after, timings, layers_record)
    _save_seeded_student(out, student, s_tok, record)
    lap("save")
    record["timings_s"] = timings
    atomic_write_json(out / SEED_FILE, record)
    _print_summary(console, record, out)
    _warn_if_loss_rose(console, record["lm_loss"]["relative_rise"])
    return record


class _Heldout(NamedTuple):
    """The student's held-out measurements under one set of routers: LM loss, greedy next tokens
    (`lm_loss`), top-K selections (`selections`) and `expert_specialisation`'s summary."""

    loss: float
    greedy: torch.Tensor
    topk: torch.Tensor
    spec: dict


def _check_seed_options(cfg: SeedConfig) -> None:
    """Raise a UserError for a negative seed strength or a student padd decompose built (before any model loads)."""
    if cfg.seed_strength < 0:
        raise UserError(f"--seed-strength {cfg.seed_strength}: give 0 (keep the pretrained routers) or more")
    if (Path(cfg.student) / STAGE1_FILE).exists():
        raise UserError(
            f"--student {cfg.student} was built by padd decompose (its experts are the teacher's clusters "
            "already); padd seed is for a pretrained MoE student: give padd warmup this student instead"
        )


def _load_teacher_and_student(cfg: SeedConfig, device: torch.device):
    """(teacher, student, teacher's tokenizer, student's tokenizer), both models on `device`; raises
    when the teacher's token ids do not mean the same in the student's vocabulary."""
    from transformers import AutoTokenizer

    t_tok, s_tok = AutoTokenizer.from_pretrained(cfg.teacher), AutoTokenizer.from_pretrained(cfg.student)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    teacher = load_causal_lm(cfg.teacher, dtype=dtype, device=device)
    student = load_causal_lm(cfg.student, dtype=dtype, device=device)
    # One token sequence feeds both models: the teacher's tokenizer, whose ids mean the same in the
    # student's (checked here; the paper's pairs share their tokenizers).
    shared_vocab(t_tok, s_tok, teacher.config.vocab_size, student.config.vocab_size)
    return teacher, student, t_tok, s_tok


def _fit_and_heldout_windows(cfg: SeedConfig, t_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit windows, held-out windows): one corpus sample in the teacher's tokens, split into disjoint
    windows in the proportion of --tokens to --heldout-tokens; raises when none is left held out."""
    windows = sample_corpus(
        cfg.corpus,
        t_tok,
        text_field=cfg.text_field,
        split=cfg.split,
        n_tokens=cfg.tokens + cfg.heldout_tokens,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    n_fit = max(1, round(windows.shape[0] * cfg.tokens / (cfg.tokens + cfg.heldout_tokens)))
    fit, heldout = windows[:n_fit], windows[n_fit:]
    if heldout.shape[0] == 0:
        raise UserError("the corpus sample has no windows left for the held-out measurements; raise --heldout-tokens")
    return fit, heldout


def _map_layers(cfg: SeedConfig, teacher, student, fit: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
    """(the teacher layer of each student decoder layer, the CKA matrix it came from or None for the
    proportional map)."""
    if cfg.layer_map != "cka":
        return proportional_layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers), None
    cka_windows = fit[: max(1, cfg.cka_tokens // fit.shape[1])]
    cka = cka_matrix(
        ffn_input_grams(teacher, cka_windows, cfg.batch_size), ffn_input_grams(student, cka_windows, cfg.batch_size)
    )
    return monotone_layer_map(cka), cka


def _cluster_teacher_layers(
    cfg: SeedConfig, teacher, fit: torch.Tensor, layers: list[int], n_experts: int
) -> dict[int, torch.Tensor]:
    """{teacher layer: [n_experts, S] neuron indices}: each of `layers` clustered by co-activation on `fit`."""
    stats = collect_layer_stats(
        teacher,
        fit,
        proj_dim=cfg.proj_dim,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        layers=layers,
        progress=cfg.progress,
    )
    return {
        t: cluster_neurons(st.features, st.active_frac, n_experts, seed=cfg.seed + t, iters=cfg.kmeans_iters)
        for t, st in stats.items()
    }


def _match_and_fit_routers(
    cfg: SeedConfig,
    student,
    teacher,
    fit: torch.Tensor,
    partitions: dict[int, torch.Tensor],
    unmatched: list[torch.Tensor],
    *,
    moe_layers: list[int],
    teacher_layers: list[int],
) -> tuple[list[dict], list[torch.Tensor]]:
    """Seed every MoE layer's router in place, first layer first; returns (each layer's record, each
    layer's teacher neurons [E, S] in expert order, on cfg.device).

    unmatched: per MoE layer, the partition of its teacher layer (`partitions`) on cfg.device."""
    # the teacher's cluster masses do not depend on the student's routers: one pass for every layer
    masses = teacher_cluster_masses(teacher, fit, unmatched, cfg.batch_size, teacher_layers)
    layers_record, matched = [], []
    for j, (gate, t, q) in enumerate(zip(moe_gates(student), teacher_layers, masses, strict=True)):
        experts, layer_record = _seed_router(cfg, student, fit, j, gate, q, partitions[t])
        matched.append(experts.to(torch.device(cfg.device)))
        layers_record.append({"student_layer": moe_layers[j], "teacher_layer": t, **layer_record})
    return layers_record, matched


def _seed_router(
    cfg: SeedConfig, student, fit: torch.Tensor, layer: int, gate, q: torch.Tensor, partition: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Match MoE layer `layer`'s clusters to its experts and fit its router `gate` to them, in place,
    on the inputs the layer gets when the layers before it route with their seeded routers.

    q: [N, C] the fit tokens' cluster-mass shares; partition: [C, S] its teacher layer's clusters.

    Returns:
        (the teacher neurons [E, S] matched to each expert, the layer's record: the matching, its
        co-activation share, `fit_router`'s summary and the experts' neurons).
    """
    (h,) = router_inputs(student, fit, cfg.batch_size, layer=layer)
    bias = getattr(gate, "bias", None)
    with torch.no_grad():
        probs = log_scores(student.config, torch.nn.functional.linear(h, gate.weight.float(), bias)).exp()
    coact = coactivation(q.to(h.device), probs)
    of_expert = match_clusters(coact)
    q_matched = q.to(h.device)[:, of_expert]
    weight, fit_info = fit_router(
        student.config, gate.weight, h, q_matched, strength=cfg.seed_strength, bias=bias, steps=cfg.fit_steps
    )
    with torch.no_grad():
        gate.weight.copy_(weight.to(gate.weight.dtype))
    experts = partition[of_expert]
    share = float(coact[of_expert, torch.arange(num_experts(student.config))].sum() / coact.sum())
    return experts, {
        "cluster_of_expert": of_expert.tolist(),
        "matched_coactivation_share": share,  # 1/E when routing ignores the clusters
        **fit_info,
        "experts": experts.tolist(),
    }


def _seed_record(
    cfg: SeedConfig,
    student,
    heldout: torch.Tensor,
    layer_map: list[int],
    cka: torch.Tensor | None,
    before: _Heldout,
    after: _Heldout,
    timings: dict,
    layers_record: list[dict],
) -> dict:
    """The padd_seed.json record: the layer map, the held-out comparison of the pretrained (`before`)
    and seeded (`after`) routers, `timings` (the dict itself, so that phases timed later still show),
    the config and each layer's record."""
    rise = (after.loss - before.loss) / before.loss
    return {
        "teacher": str(Path(cfg.teacher).resolve()),
        "student": str(Path(cfg.student).resolve()),
        "layer_map_method": cfg.layer_map,
        "layer_map": layer_map,  # teacher layer of each student decoder layer
        "cka": None if cka is None else [[round(v, 4) for v in row] for row in cka.tolist()],
        "experts": num_experts(student.config),
        "top_k": top_k(student.config),
        "seed_strength": cfg.seed_strength,
        "heldout_tokens": int(heldout.numel()),
        "nmi": {"before": before.spec["nmi"], "after": after.spec["nmi"]},
        "esi": {"before": before.spec["esi"], "after": after.spec["esi"]},
        "topk_agreement_with_pretrained": topk_agreement(before.topk, after.topk),
        "lm_loss": {"before": before.loss, "after": after.loss, "relative_rise": rise},
        # the share of held-out positions whose greedy next token seeding left unchanged
        "next_token_agreement": float((before.greedy == after.greedy).float().mean()),
        "load_cv": {
            k: sum(v.spec["load_cv"]) / len(v.spec["load_cv"]) for k, v in (("before", before), ("after", after))
        },
        "timings_s": timings,
        "config": to_dict(cfg),
        "layers": layers_record,
    }


def _save_seeded_student(out: Path, student, s_tok, record: dict) -> None:
    """Write the seeded student, its tokenizer, generation config and selection bias, and `record` to
    `out`, atomically."""

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        s_tok.save_pretrained(tmp)
        if getattr(student, "generation_config", None) is not None:
            student.generation_config.save_pretrained(tmp)
        save_selection_bias(student, tmp)  # a stage IV bias the input student carried stays with it
        (tmp / SEED_FILE).write_text(json.dumps(record, indent=1))

    atomic_save_dir(out, write)


def _warn_if_loss_rose(console: Console, rise: float) -> None:
    """Warn when seeding raised the held-out LM loss (relative `rise`) by more than MAX_LOSS_RISE."""
    if rise > MAX_LOSS_RISE:
        console.print(
            f"[yellow]warning: seeding raised the student's held-out LM loss by {100 * rise:.1f}% (more than "
            f"{100 * MAX_LOSS_RISE:.0f}%); a lower --seed-strength keeps the routers nearer their pretrained weights"
        )


def _print_summary(console: Console, record: dict, out: Path) -> None:
    table = Table(title=f"padd seed -> {out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layer map", f"{record['layer_map_method']}: student layer -> teacher layer {record['layer_map']}")
    shares = [la["matched_coactivation_share"] for la in record["layers"]]
    table.add_row(
        "matching",
        f"{record['experts']} clusters <-> experts per layer; matched co-activation share "
        f"{sum(shares) / len(shares):.3f} (chance {1 / record['experts']:.3f})",
    )
    for key in ("nmi", "esi"):
        table.add_row(key.upper(), f"{record[key]['before']:.3f} -> {record[key]['after']:.3f} (held-out)")
    table.add_row("top-K agreement", f"{record['topk_agreement_with_pretrained']:.3f} with the pretrained routers")
    table.add_row("load CV", f"{record['load_cv']['before']:.3f} -> {record['load_cv']['after']:.3f} (top-K, held-out)")
    loss = record["lm_loss"]
    table.add_row("LM loss", f"{loss['before']:.4f} -> {loss['after']:.4f} ({100 * loss['relative_rise']:+.2f}%)")
    table.add_row("next token", f"{record['next_token_agreement']:.3f} of greedy predictions unchanged (held-out)")
    table.add_row("time", " | ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items()))
    console.print(table)
