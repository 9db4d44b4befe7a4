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
    from transformers import AutoTokenizer

    console = console or Console()
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    if cfg.seed_strength < 0:
        raise UserError(f"--seed-strength {cfg.seed_strength}: give 0 (keep the pretrained routers) or more")
    if (Path(cfg.student) / STAGE1_FILE).exists():
        raise UserError(
            f"--student {cfg.student} was built by padd decompose (its experts are the teacher's clusters "
            "already); padd seed is for a pretrained MoE student: give padd warmup this student instead"
        )
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    device = torch.device(cfg.device)
    t_tok, s_tok = AutoTokenizer.from_pretrained(cfg.teacher), AutoTokenizer.from_pretrained(cfg.student)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    teacher = load_causal_lm(cfg.teacher, dtype=dtype, device=device)
    student = load_causal_lm(cfg.student, dtype=dtype, device=device)
    # One token sequence feeds both models: the teacher's tokenizer, whose ids mean the same in the
    # student's (checked here; the paper's pairs share their tokenizers).
    shared_vocab(t_tok, s_tok, teacher.config.vocab_size, student.config.vocab_size)
    # one sample, split into disjoint windows: the fit's and the held-out measurements'
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
    lap("load")

    n_t, n_s = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    cka = None
    if cfg.layer_map == "cka":
        cka_windows = fit[: max(1, cfg.cka_tokens // fit.shape[1])]
        cka = cka_matrix(
            ffn_input_grams(teacher, cka_windows, cfg.batch_size), ffn_input_grams(student, cka_windows, cfg.batch_size)
        )
        layer_map = monotone_layer_map(cka)
    else:
        layer_map = proportional_layer_map(n_t, n_s)
    moe_layers = moe_layer_indices(student)
    teacher_layers = [layer_map[i] for i in moe_layers]
    lap("layer map")

    stats = collect_layer_stats(
        teacher,
        fit,
        proj_dim=cfg.proj_dim,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        layers=sorted(set(teacher_layers)),
        progress=cfg.progress,
    )
    n_experts = num_experts(student.config)
    partitions = {
        t: cluster_neurons(st.features, st.active_frac, n_experts, seed=cfg.seed + t, iters=cfg.kmeans_iters)
        for t, st in stats.items()
    }
    del stats
    lap("cluster")

    # before: NMI / ESI do not depend on which cluster is matched to which expert, so the unmatched
    # partitions measure the pretrained routers (and no second copy of the student is loaded)
    before_topk = selections(student, heldout, cfg.batch_size)
    before_loss, before_greedy = lm_loss(student, heldout, cfg.batch_size)
    unmatched = [partitions[t].to(device) for t in teacher_layers]
    before_spec = expert_specialisation(student, teacher, heldout, unmatched, teacher_layers=teacher_layers)
    # the teacher's cluster masses do not depend on the student's routers: one pass for every layer
    masses = teacher_cluster_masses(teacher, fit, unmatched, cfg.batch_size, teacher_layers)
    gates = moe_gates(student)
    layers_record, matched = [], []
    for j, (gate, t, q) in enumerate(zip(gates, teacher_layers, masses, strict=True)):
        (h,) = router_inputs(student, fit, cfg.batch_size, layer=j)
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
        experts = partitions[t][of_expert]
        matched.append(experts.to(device))
        share = float(coact[of_expert, torch.arange(n_experts)].sum() / coact.sum())
        layers_record.append(
            {
                "student_layer": moe_layers[j],
                "teacher_layer": t,
                "cluster_of_expert": of_expert.tolist(),
                "matched_coactivation_share": share,  # 1/E when routing ignores the clusters
                **fit_info,
                "experts": experts.tolist(),
            }
        )
    lap("match and fit")

    after_loss, after_greedy = lm_loss(student, heldout, cfg.batch_size)
    after_topk = selections(student, heldout, cfg.batch_size)
    after_spec = expert_specialisation(student, teacher, heldout, matched, teacher_layers=teacher_layers)
    lap("measure")

    rise = (after_loss - before_loss) / before_loss
    record = {
        "teacher": str(Path(cfg.teacher).resolve()),
        "student": str(Path(cfg.student).resolve()),
        "layer_map_method": cfg.layer_map,
        "layer_map": layer_map,  # teacher layer of each student decoder layer
        "cka": None if cka is None else [[round(v, 4) for v in row] for row in cka.tolist()],
        "experts": n_experts,
        "top_k": top_k(student.config),
        "seed_strength": cfg.seed_strength,
        "heldout_tokens": int(heldout.numel()),
        "nmi": {"before": before_spec["nmi"], "after": after_spec["nmi"]},
        "esi": {"before": before_spec["esi"], "after": after_spec["esi"]},
        "topk_agreement_with_pretrained": topk_agreement(before_topk, after_topk),
        "lm_loss": {"before": before_loss, "after": after_loss, "relative_rise": rise},
        # the share of held-out positions whose greedy next token seeding left unchanged
        "next_token_agreement": float((before_greedy == after_greedy).float().mean()),
        "load_cv": {
            k: sum(v["load_cv"]) / len(v["load_cv"]) for k, v in (("before", before_spec), ("after", after_spec))
        },
        "timings_s": timings,
        "config": to_dict(cfg),
        "layers": layers_record,
    }

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        s_tok.save_pretrained(tmp)
        if getattr(student, "generation_config", None) is not None:
            student.generation_config.save_pretrained(tmp)
        save_selection_bias(student, tmp)  # a stage IV bias the input student carried stays with it
        (tmp / SEED_FILE).write_text(json.dumps(record, indent=1))

    atomic_save_dir(out, write)
    lap("save")
    record["timings_s"] = timings
    atomic_write_json(out / SEED_FILE, record)
    _print_summary(console, record, out)
    if rise > MAX_LOSS_RISE:
        console.print(
            f"[yellow]warning: seeding raised the student's held-out LM loss by {100 * rise:.1f}% (more than "
            f"{100 * MAX_LOSS_RISE:.0f}%); a lower --seed-strength keeps the routers nearer their pretrained weights"
        )
    return record


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
