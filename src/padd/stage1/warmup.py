"""`padd warmup` (SPEC §3 steps 5-6): train the experts behind a frozen uniform router, then start the router.

Every token goes to K experts drawn uniformly at random with equal weights; the loss is
KL(teacher ‖ student) on the teacher's logits at temperature 1; only expert weights train. The
router for Phase B then starts `uniform` (zero weights plus a tiny random init that breaks ties),
`centroid` (each expert's row points at the mean router input of the tokens whose largest teacher
activation mass lies in its cluster) or `distill` (the router is fitted so that its normalised
scores predict each token's teacher-cluster mass distribution).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from tqdm.auto import tqdm

from padd.config import WarmupConfig, to_dict
from padd.corpus import iter_texts, sample_windows
from padd.distributed import is_sharded, setup, unsharded_copy, wrap_for_training
from padd.io import atomic_save_dir, check_out_dir
from padd.phase_b.losses import distill_kl_loss
from padd.precision import autocast, routers_in_fp32, teacher_dtype
from padd.routing import moe_gates, router_log_scores, uniform_random_routing
from padd.stage1.decompose import STAGE1_FILE
from padd.vocab import common_vocab_size

ROUTER_INITS = ("uniform", "centroid", "distill")


def expert_parameters(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The routed and shared expert weights of every MoE layer: what the warm-up trains."""
    params = []
    for layer in student.model.layers:
        if hasattr(layer.mlp, "experts"):
            params += list(layer.mlp.experts.parameters()) + list(layer.mlp.shared_experts.parameters())
    return params


@torch.no_grad()
def collect_router_targets(
    student, teacher, windows: torch.Tensor, clusters: list[torch.Tensor], batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer: the student's router inputs h [N, H] and the teacher's cluster-mass shares [N, E].

    clusters[l]: [E, S] teacher neuron indices of each expert of MoE layer l (from padd_stage1.json).
    """
    moe_layers = [i for i, layer in enumerate(student.model.layers) if hasattr(layer.mlp, "gate")]
    inputs: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    masses: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    hooks = []
    for j, i in enumerate(moe_layers):
        hooks.append(
            student.model.layers[i].mlp.gate.register_forward_pre_hook(
                lambda m, a, j=j: inputs[j].append(a[0].reshape(-1, a[0].shape[-1]).float())
            )
        )
        hooks.append(
            teacher.model.layers[i].mlp.down_proj.register_forward_pre_hook(
                lambda m, a, j=j: masses[j].append(
                    a[0].reshape(-1, a[0].shape[-1]).float().abs()[:, clusters[j]].sum(-1)
                )
            )
        )
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(next(student.parameters()).device)
            student(input_ids=batch, use_cache=False)
            teacher(input_ids=batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    h = [torch.cat(x) for x in inputs]
    q = [torch.cat(m) for m in masses]
    return h, [m / m.sum(-1, keepdim=True).clamp_min(1e-12) for m in q]


def init_router(student, method: str, *, seed: int, targets=None, steps: int = 300, lr: float = 0.05) -> dict:
    """Set every router's weights for Phase B; returns a summary (with how well the router fits the teacher's
    cluster masses for the fitted inits)."""
    gen = torch.Generator().manual_seed(seed)
    gates = moe_gates(student)
    summary: dict = {"router_init": method}
    with torch.no_grad():
        for gate in gates:  # ties between experts are broken at random, not by expert index
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 1e-3)
    if method == "uniform":
        return summary
    h_all, q_all = targets
    for gate, h, q in zip(gates, h_all, q_all, strict=True):
        if method == "centroid":
            dominant = q.argmax(-1)
            unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            with torch.no_grad():
                for e in range(gate.weight.shape[0]):
                    members = unit[dominant == e]
                    if len(members):
                        centroid = members.mean(0)
                        gate.weight[e] = centroid / centroid.norm().clamp_min(1e-12) * 4.0
        else:  # distill: minimise KL(q ‖ p), p the normalised sigmoid scores of W h
            weight = gate.weight.detach().clone().float().requires_grad_()
            opt = torch.optim.Adam([weight], lr=lr)
            for _ in range(steps):
                loss = _router_fit_kl(h, q, weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                gate.weight.copy_(weight)
    with torch.no_grad():  # how well each start predicts the teacher's cluster masses, against a flat router
        fit = [float(_router_fit_kl(h, q, g.weight.float())) for g, h, q in zip(gates, h_all, q_all, strict=True)]
        flat = [
            float(_router_fit_kl(h, q, torch.zeros_like(g.weight, dtype=torch.float32)))
            for g, h, q in zip(gates, h_all, q_all, strict=True)
        ]
    summary["router_fit_kl"] = sum(fit) / len(fit)
    summary["router_fit_kl_flat"] = sum(flat) / len(flat)
    return summary


def _router_fit_kl(h: torch.Tensor, q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p): q the teacher-cluster mass shares [N, E], p the normalised router scores of W h."""
    return (q * (q.clamp_min(1e-12).log() - router_log_scores(h @ weight.T))).sum(-1).mean()


def run_warmup(cfg: WarmupConfig, console: Console | None = None) -> dict:
    """Warm the student's experts up against the teacher and initialise its router; write cfg.out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or Console()
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    ranks = setup(cfg.device)
    device = ranks.device(cfg.device)
    if cfg.router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init must be one of {', '.join(ROUTER_INITS)}")
    stage1_file = Path(cfg.student) / STAGE1_FILE
    if cfg.router_init != "uniform" and not stage1_file.exists():
        raise FileNotFoundError(f"--router-init {cfg.router_init} needs {stage1_file} (written by padd decompose)")
    t0 = time.perf_counter()
    s_tok, t_tok = AutoTokenizer.from_pretrained(cfg.student), AutoTokenizer.from_pretrained(cfg.teacher)
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=teacher_dtype(cfg.precision)).to(device).eval()
    routers_in_fp32(student)
    vocab = common_vocab_size(t_tok, s_tok, teacher.config.vocab_size, student.config.vocab_size)
    windows = sample_windows(
        iter_texts(cfg.corpus, cfg.text_field, cfg.split),
        s_tok,
        n_tokens=cfg.tokens,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    for p in student.parameters():
        p.requires_grad_(False)
    for p in expert_parameters(student):
        p.requires_grad_(True)
    # Data parallel: each rank takes every world-th window, gradients averaged by DDP or FSDP2 (which
    # replaces the parameters, so they are collected after it). The teacher stays whole on each rank.
    trained = wrap_for_training(student, ranks, cfg.parallel)
    params = [p for p in expert_parameters(student) if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed * ranks.world + ranks.rank)
    order_gen = torch.Generator().manual_seed(cfg.seed + 1)
    log = []
    # Equal batches on every rank (DDP needs the same number of steps), so a remainder is dropped.
    per_rank = windows.shape[0] // ranks.world
    n_batches = -(-per_rank // cfg.batch_size)
    student.train()
    bar = tqdm(total=cfg.epochs * n_batches, desc="warm-up", disable=not (cfg.progress and ranks.main))
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(windows.shape[0], generator=order_gen)[: per_rank * ranks.world]
        local = order[ranks.rank :: ranks.world]
        for b in range(n_batches):
            batch = windows[local[b * cfg.batch_size : (b + 1) * cfg.batch_size]].to(device)
            with torch.no_grad(), autocast(device, cfg.precision):
                t_logits = teacher(input_ids=batch, use_cache=False).logits[..., :vocab]
            with uniform_random_routing(student, gen), autocast(device, cfg.precision):
                s_logits = trained(input_ids=batch, use_cache=False).logits[..., :vocab]
            loss = distill_kl_loss(s_logits, t_logits, torch.ones(batch.shape, device=batch.device))
            value = float(ranks.all_reduce_sum(loss.detach().clone()) / ranks.world)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"warm-up loss is {value} at step {step}; lower --lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            step += 1
            log.append({"step": step, "epoch": epoch, "kl": value})
            bar.update(1)
            bar.set_postfix(kl=f"{value:.4f}")
    bar.close()
    if is_sharded(student):  # the router init and the save below work on whole weights, on every rank
        student = unsharded_copy(student, AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32))
        student.to(device)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    warm_s = time.perf_counter() - t0

    targets = None
    if cfg.router_init != "uniform":
        layers = [la for la in json.loads(stage1_file.read_text())["layers"] if not la.get("dense")]
        clusters = [torch.tensor(la["experts"], device=device) for la in layers]
        probe = windows[: max(1, cfg.router_tokens // windows.shape[1])]
        targets = collect_router_targets(student, teacher, probe, clusters, cfg.batch_size)
    router = init_router(student, cfg.router_init, seed=cfg.seed, targets=targets)
    record = {
        "student": str(Path(cfg.student).resolve()),
        "teacher": str(Path(cfg.teacher).resolve()),
        "steps": step,
        "tokens": int(windows.numel()),
        "first_kl": log[0]["kl"] if log else None,
        "last_kl": log[-1]["kl"] if log else None,
        "warmup_seconds": round(warm_s, 2),
        "processes": ranks.world,
        **router,
        "config": to_dict(cfg),
    }

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        s_tok.save_pretrained(tmp)
        if stage1_file.exists():
            (tmp / STAGE1_FILE).write_text(stage1_file.read_text())
        (tmp / "padd_warmup.json").write_text(json.dumps(record, indent=1))
        (tmp / "warmup_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    if ranks.main:
        atomic_save_dir(out, write)
    ranks.barrier()
    console.print(
        f"warm-up: {step} steps over {record['tokens']} tokens, KL {record['first_kl']:.4f} -> "
        f"{record['last_kl']:.4f} in {warm_s:.1f}s; router init {cfg.router_init}; written to {out}"
    )
    return record
