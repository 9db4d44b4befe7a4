"""`padd warmup` (docs/method.md §3 steps 5-6, 8): train the experts behind a frozen router, then start the router.

The loss is KL(teacher ‖ student) on the teacher's logits at temperature 1; only expert weights
train. The frozen router is `uniform` (every token to K experts drawn uniformly at random with equal
weights: the paper's, and the default for a student from padd decompose) or `frozen` (the student's
own router, unchanged: the default for a pretrained student, whose experts learnt behind it, and
for a seeded one, whose router padd seed pointed at the teacher's clusters). The router for Phase B
then starts `uniform` (zero weights plus a tiny random init that breaks ties), `centroid` (each
expert's row points at the mean router input of the tokens whose largest teacher activation mass
lies in its cluster), `distill` (the router is fitted so that its normalised scores predict each
token's teacher-cluster mass distribution) or `keep` (the router as it is: the default for a
pretrained or seeded student).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from tqdm.auto import tqdm

from padd.config import WarmupConfig, to_dict
from padd.corpus import sample_corpus
from padd.determinism import deterministic_kernels
from padd.distributed import is_sharded, setup, unsharded_copy, wrap_for_training
from padd.errors import UserError
from padd.io import atomic_save_dir, check_out_dir
from padd.losses import distill_kl_loss
from padd.memory import (
    check_activation_checkpointing,
    enable_activation_checkpointing,
    micro_slices,
    no_gradient_sync,
    peak_memory_gb,
)
from padd.models import load_causal_lm
from padd.precision import autocast, experts_in_autocast_dtype, routers_in_fp32, teacher_dtype
from padd.router_adapter import log_scores
from padd.routing import RouterRecorder, UniformRandomRouting, load_selection_bias, moe_gates, moe_layer_indices
from padd.stage1.reference import STAGE1_FILE, Reference, copy_reference, read_reference
from padd.vocab import shared_vocab

ROUTER_INITS = ("uniform", "centroid", "distill", "keep")


def expert_parameters(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The routed and shared expert weights of every MoE layer: what the warm-up trains."""
    params = []
    for index in moe_layer_indices(student):
        mlp = student.model.layers[index].mlp
        params += list(mlp.experts.parameters())
        # the always-on experts, named per architecture (DeepSeek/GLM `shared_experts`, Qwen2-MoE
        # `shared_expert` with its gate); Mixtral, OLMoE, Qwen3-MoE and gpt-oss have none
        for name in ("shared_experts", "shared_expert", "shared_expert_gate"):
            if hasattr(mlp, name):
                params += list(getattr(mlp, name).parameters())
    return params


@torch.no_grad()
def teacher_cluster_masses(
    teacher, windows: torch.Tensor, clusters: list[torch.Tensor], batch_size: int, teacher_layers: list[int]
) -> list:
    """Per MoE layer, each token's share of the teacher's activation mass in each cluster: [N, E].

    clusters[l]: [E, S] teacher neuron indices of each expert of MoE layer l, whose clusters come
    from teacher layer teacher_layers[l] (padd.stage1.reference).
    """
    masses: list[list[torch.Tensor]] = [[] for _ in clusters]

    def record(j: int):
        def hook(module, args):
            masses[j].append(args[0].reshape(-1, args[0].shape[-1]).float().abs()[:, clusters[j]].sum(-1))

        return hook

    hooks = [
        teacher.model.layers[t].mlp.down_proj.register_forward_pre_hook(record(j)) for j, t in enumerate(teacher_layers)
    ]
    try:
        device = next(teacher.parameters()).device
        for start in range(0, windows.shape[0], batch_size):
            teacher(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    total = [torch.cat(m) for m in masses]
    return [m / m.sum(-1, keepdim=True).clamp_min(1e-12) for m in total]


class _StopForward(Exception):
    """Raised from a hook to end a forward once the layer it needs has run."""


@torch.no_grad()
def router_inputs(student, windows: torch.Tensor, batch_size: int, layer: int | None = None) -> list[torch.Tensor]:
    """Per MoE layer (or only MoE layer `layer`), the router's input h [N, H] on `windows`, the
    student routing with its routers as they are now (each layer's input depends on the routing of
    the layers before it). Keeping one layer holds N·H floats instead of L·N·H, and its forwards
    stop at that layer's router."""
    device = next(student.parameters()).device
    batches = [windows[start : start + batch_size].to(device) for start in range(0, windows.shape[0], batch_size)]
    if layer is not None:
        kept: list[torch.Tensor] = []

        def stop(module, args):
            kept.append(args[0].detach().float().reshape(-1, args[0].shape[-1]))
            raise _StopForward

        handle = moe_gates(student)[layer].register_forward_pre_hook(stop)
        try:
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    student.model(input_ids=batch, use_cache=False)
        finally:
            handle.remove()
        return [torch.cat(kept)]
    inputs: list[list[torch.Tensor]] = []
    for batch in batches:
        with RouterRecorder(student, keep_inputs=True, keep_logits=False) as rec:
            student(input_ids=batch, use_cache=False)
        inputs.append([h.float() for h in rec.inputs])
    return [torch.cat(per_layer) for per_layer in zip(*inputs, strict=True)]


def init_router(
    student, method: str, *, seed: int, probe=None, masses=None, batch_size: int = 8, steps: int = 300, lr: float = 0.05
) -> dict:
    """Set every router's weights for Phase B; returns a summary with how well the start predicts the
    teacher's cluster masses (`masses`, when given), measured under the routing Phase B will use.

    A fitted start (centroid / distill) is fitted layer by layer: layer l's router inputs are
    collected with layers 0..l-1 already routing by their fitted routers, as Phase B will run them.
    (Collecting them all at once under the uniform start would fit the later layers to the hidden
    states of a routing that no phase ever runs.)

    Args:
        probe: [N, T] token windows the fit is computed on; masses: per MoE layer [N·T, E]
            (`teacher_cluster_masses` on the same windows).
    """
    gen = torch.Generator().manual_seed(seed)
    gates = moe_gates(student)
    summary: dict = {"router_init": method}
    if method != "keep":
        with torch.no_grad():
            for gate in gates:  # ties between experts are broken at random, not by expert index
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 1e-3)
    if method in ("centroid", "distill"):
        for layer, (gate, q) in enumerate(zip(gates, masses, strict=True)):
            (h,) = router_inputs(student, probe, batch_size, layer=layer)
            with torch.no_grad():
                fitted = _fitted_router(student.config, method, gate.weight.detach().float(), h, q, steps=steps, lr=lr)
                gate.weight.copy_(fitted)
    if masses is None:
        return summary
    # how well the start predicts the teacher's cluster masses, against a flat router, on the inputs
    # of a forward that routes with every layer's start: what Phase B begins from
    h_all = router_inputs(student, probe, batch_size)
    with torch.no_grad():
        config = student.config
        fit = [
            float(_router_fit_kl(config, h, q, g.weight.float())) for g, h, q in zip(gates, h_all, masses, strict=True)
        ]
        flat = [
            float(_router_fit_kl(config, h, q, torch.zeros_like(h[:1]).expand(q.shape[1], -1)))
            for h, q in zip(h_all, masses, strict=True)
        ]
    summary["router_fit_kl"] = sum(fit) / len(fit)
    summary["router_fit_kl_per_layer"] = fit
    summary["router_fit_kl_flat"] = sum(flat) / len(flat)
    return summary


def _fitted_router(
    config, method: str, weight: torch.Tensor, h: torch.Tensor, q: torch.Tensor, *, steps: int, lr: float
):
    """A router weight [E, H] fitted to inputs h [N, H] and cluster-mass shares q [N, E]: `centroid`
    points each expert's row at the mean (unit) input of the tokens whose dominant cluster it is;
    `distill` minimises KL(q ‖ p), p the architecture's normalised router distribution of W h."""
    if method == "centroid":
        weight = weight.clone()
        dominant = q.argmax(-1)
        unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for e in range(weight.shape[0]):
            members = unit[dominant == e]
            if len(members):
                centroid = members.mean(0)
                weight[e] = centroid / centroid.norm().clamp_min(1e-12) * 4.0
        return weight
    if method != "distill":
        raise ValueError(f"router init must be one of {', '.join(ROUTER_INITS)}, got {method!r}")
    weight = weight.clone().requires_grad_()
    opt = torch.optim.Adam([weight], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = _router_fit_kl(config, h, q, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return weight.detach()


def _router_fit_kl(config, h: torch.Tensor, q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p): q the teacher-cluster mass shares [N, E], p the router's normalised distribution of
    W h (softmax, or normalised sigmoid scores: padd.router_adapter.log_scores)."""
    return (q * (q.clamp_min(1e-12).log() - log_scores(config, h @ weight.T))).sum(-1).mean()


def _accumulate_warmup_gradient(trained, teacher, vocab, batch, uniform, cfg: WarmupConfig, ranks) -> float:
    """The gradient of KL(teacher ‖ student) averaged over the tokens of `batch` ([B, T] windows),
    accumulated over its micro-batches (each one's mean weighted by its share of the tokens, so the
    sum is the whole batch's mean); returns that loss averaged over ranks."""
    device = batch.device
    if uniform is not None:
        uniform.draw(batch.numel())
    parts = micro_slices(batch.shape[0], cfg.micro_batch_size)
    total = torch.zeros((), device=device)
    for index, part in enumerate(parts):
        rows = batch[part]
        with torch.no_grad(), autocast(device, cfg.precision):
            t_logits = vocab.kd_view(teacher(input_ids=rows, use_cache=False).logits)
        # the uniform routing stays on through the backward: activation checkpointing's recompute
        # must route as the forward did; DDP decides in the forward whether the backward syncs
        routed = uniform.rows(part.start * batch.shape[1]) if uniform is not None else contextlib.nullcontext()
        with no_gradient_sync(trained, last=index == len(parts) - 1), routed:
            with autocast(device, cfg.precision):
                s_logits = vocab.kd_view(trained(input_ids=rows, use_cache=False).logits)
            share = rows.numel() / batch.numel()
            loss = distill_kl_loss(s_logits, t_logits, torch.ones(rows.shape, device=device)) * share
            del s_logits, t_logits
            loss.backward()
        total += loss.detach()
    return float(ranks.all_reduce_sum(total) / ranks.world)


def warmup_defaults(cfg: WarmupConfig) -> tuple[str, str]:
    """(warm-up routing, router start) of a run: as given, else by the student's kind — for a student
    padd decompose built, the paper's frozen uniform router and uniform start; for a pretrained or
    seeded one, its own router frozen and kept (docs/method.md §3 step 8)."""
    decomposed = (Path(cfg.student) / STAGE1_FILE).exists()
    routing = cfg.routing or ("uniform" if decomposed else "frozen")
    router_init = cfg.router_init or ("uniform" if decomposed else "keep")
    return routing, router_init


def run_warmup(cfg: WarmupConfig, console: Console | None = None) -> dict:
    """Warm the student's experts up against the teacher and initialise its router; write cfg.out."""
    console = console or Console()
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    ranks = setup(cfg.device)
    device = ranks.device(cfg.device)
    deterministic_kernels(device)
    routing, router_init, reference = _check_warmup_options(cfg, ranks)
    t0 = time.perf_counter()
    student, teacher, s_tok, vocab = _load_warmup_models(cfg, ranks, device)
    windows = sample_corpus(
        cfg.corpus,
        s_tok,
        text_field=cfg.text_field,
        split=cfg.split,
        # the same sample with or without training, so that a start set by --epochs 0 on a warmed-up
        # student is the one the full warm-up would have fitted
        n_tokens=cfg.tokens,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    trained, params, optim = _expert_training_setup(cfg, student, ranks)
    log = _train_experts(cfg, trained, student, teacher, vocab, windows, params, optim, routing=routing, ranks=ranks)
    warm_s = time.perf_counter() - t0
    peak_gb = peak_memory_gb(device)  # the warm-up's, on this rank (before the router fit below)

    probe = windows[: max(1, cfg.router_tokens // windows.shape[1])]
    # the start's fit to the teacher's clusters is reported for every init
    masses = _probe_cluster_masses(teacher, probe, reference, cfg.batch_size, device)
    del teacher
    sharded = is_sharded(student)
    if sharded:
        # The router init and the save below work on whole weights: rank 0 alone holds them (one
        # float32 copy, as the final save of `padd train` does), in CPU memory, where it runs the
        # router start's forwards (a GPU could not hold the paper's 30B student whole); the other
        # ranks wait for its result. The fit's layer-by-layer forwards stop inside the model, which
        # FSDP2 units cannot.
        del optim, trained
        student, masses = _whole_student_on_rank0(student, masses, cfg.student)
    router = None if student is None else _start_router(cfg, student, router_init, probe, masses)
    if sharded:
        router = ranks.all_gather_objects(router)[0]
    record = _warmup_record(cfg, log, windows, warm_s, peak_gb, ranks, routing, router)
    if ranks.main:
        _save_warmed_student(out, student, s_tok, cfg.student, record, log)
    ranks.barrier()
    _print_outcome(console, record, router, routing, router_init, warm_s, out)
    return record


def _check_warmup_options(cfg: WarmupConfig, ranks) -> tuple[str, str, Reference | None]:
    """(warm-up routing, router start, the student's cluster reference or None), once every option
    is checked against the others and the student's folder: before any model loads."""
    cfg.check_memory_options(cfg.batch_size, "--batch-size", ranks.world)
    if cfg.activation_checkpointing:
        check_activation_checkpointing(cfg.student)
    if cfg.epochs < 0:
        raise UserError(f"--epochs {cfg.epochs}: give 0 (router start only) or more passes")
    routing, router_init = warmup_defaults(cfg)
    reference = read_reference(cfg.student)
    if router_init in ("centroid", "distill") and reference is None:
        raise UserError(
            f"--router-init {router_init} fits the router to the teacher's clusters, which {cfg.student} does "
            f"not carry (no {STAGE1_FILE} or padd_seed.json): run padd decompose or padd seed first"
        )
    return routing, router_init, reference


def _load_warmup_models(cfg: WarmupConfig, ranks, device: torch.device):
    """(student, teacher, student's tokenizer, their shared vocabulary): the student in float32 for
    training (routers in fp32, experts in the autocast dtype, checkpointed if asked), the teacher in
    the precision's dtype."""
    from transformers import AutoTokenizer

    s_tok, t_tok = AutoTokenizer.from_pretrained(cfg.student), AutoTokenizer.from_pretrained(cfg.teacher)
    # Under FSDP2 both models are built sharded and load only this rank's shards (padd.models).
    fsdp = cfg.parallel == "fsdp" and ranks.world > 1
    student = load_causal_lm(cfg.student, device=device, train=True, sharded=fsdp, offload=cfg.offload)
    teacher = load_causal_lm(cfg.teacher, dtype=teacher_dtype(cfg.precision), device=device, sharded=fsdp)
    routers_in_fp32(student)
    experts_in_autocast_dtype(student)  # a no-op outside autocast (--precision fp32)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(student)
    vocab = shared_vocab(t_tok, s_tok, teacher.config.vocab_size, student.config.vocab_size)
    return student, teacher, s_tok, vocab


def _expert_training_setup(cfg: WarmupConfig, student, ranks) -> tuple[torch.nn.Module, list, torch.optim.Optimizer]:
    """(the module to train through, the trained expert parameters, their AdamW): every other weight
    of the student frozen."""
    for p in student.parameters():
        p.requires_grad_(False)
    for p in expert_parameters(student):  # a zero-size one (an absent shared expert) has nothing to train
        p.requires_grad_(p.numel() > 0)
    # Data parallel: each rank takes every world-th window, gradients averaged by DDP or FSDP2 (which
    # replaces the parameters, so they are collected after it).
    trained = wrap_for_training(student, ranks, cfg.parallel, offload=cfg.offload)
    params = [p for p in expert_parameters(student) if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    return trained, params, optim


def _train_experts(
    cfg: WarmupConfig,
    trained,
    student,
    teacher,
    vocab,
    windows: torch.Tensor,
    params: list,
    optim: torch.optim.Optimizer,
    *,
    routing: str,
    ranks,
) -> list[dict]:
    """Run cfg.epochs passes of the warm-up over `windows`, this rank's share of each batch; returns
    the log, one {"step", "epoch", "kl"} per optimizer step (the same on every rank)."""
    device = ranks.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed * ranks.world + ranks.rank)
    order_gen = torch.Generator().manual_seed(cfg.seed + 1)
    log = []
    # Equal batches on every rank (DDP needs the same number of steps), so a remainder is dropped.
    per_rank = windows.shape[0] // ranks.world
    n_batches = -(-per_rank // cfg.batch_size)
    student.train()
    bar = tqdm(total=cfg.epochs * n_batches, desc="warm-up", disable=not (cfg.progress and ranks.main))
    # the uniform routing of a batch is drawn whole, so its micro-batches route as the batch would
    uniform = UniformRandomRouting(student, gen) if routing == "uniform" else None
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(windows.shape[0], generator=order_gen)[: per_rank * ranks.world]
        local = order[ranks.rank :: ranks.world]
        for b in range(n_batches):
            batch = windows[local[b * cfg.batch_size : (b + 1) * cfg.batch_size]].to(device)
            value = _accumulate_warmup_gradient(trained, teacher, vocab, batch, uniform, cfg, ranks)
            if not math.isfinite(value):
                raise FloatingPointError(f"warm-up loss is {value} at step {step}; lower --lr")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            log.append({"step": step, "epoch": epoch, "kl": value})
            bar.update(1)
            bar.set_postfix(kl=f"{value:.4f}")
    bar.close()
    return log


def _probe_cluster_masses(
    teacher, probe: torch.Tensor, reference: Reference | None, batch_size: int, device: torch.device
) -> list[torch.Tensor] | None:
    """Per MoE layer, the probe tokens' shares of the teacher's activation mass in each reference
    cluster ([N, E], `teacher_cluster_masses`); None for a student without a cluster reference."""
    if reference is None:
        return None
    ref = reference.to(device)
    # on every rank: a sharded teacher's forwards are collectives
    return teacher_cluster_masses(teacher, probe, ref.clusters, batch_size, ref.teacher_layers)


def _whole_student_on_rank0(student, masses: list | None, student_path: str):
    """(rank 0's whole float32 CPU copy of the sharded `student`, with the selection bias its
    checkpoint carries, and `masses` moved to the CPU beside it); (None, `masses`) on the other
    ranks. A collective."""
    student = unsharded_copy(student)
    if student is not None:
        load_selection_bias(student, student_path)
        masses = None if masses is None else [m.cpu() for m in masses]
    return student, masses


def _start_router(cfg: WarmupConfig, student, router_init: str, probe: torch.Tensor, masses: list | None) -> dict:
    """Set the (whole) student's routers for Phase B by `router_init` (`init_router`); returns its summary."""
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    return init_router(student, router_init, seed=cfg.seed, probe=probe, masses=masses, batch_size=cfg.batch_size)


def _warmup_record(
    cfg: WarmupConfig, log: list[dict], windows: torch.Tensor, warm_s: float, peak_gb: float, ranks, routing, router
) -> dict:
    """The padd_warmup.json record: the run, its first and last KL, time, memory, the router start's
    summary `router` and the config."""
    return {
        "student": str(Path(cfg.student).resolve()),
        "teacher": str(Path(cfg.teacher).resolve()),
        "steps": len(log),
        "tokens": int(windows.numel()),
        "first_kl": log[0]["kl"] if log else None,
        "last_kl": log[-1]["kl"] if log else None,
        "warmup_seconds": round(warm_s, 2),
        "peak_memory_gb": round(peak_gb, 3),
        "processes": ranks.world,
        "warmup_routing": routing,
        **router,
        "config": to_dict(cfg),
    }


def _save_warmed_student(out: Path, student, s_tok, student_path: str, record: dict, log: list[dict]) -> None:
    """Write the student, its tokenizer, the input student's cluster reference, `record` and the
    step log (warmup_log.jsonl) to `out`, atomically."""

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        s_tok.save_pretrained(tmp)
        copy_reference(student_path, tmp)
        (tmp / "padd_warmup.json").write_text(json.dumps(record, indent=1))
        (tmp / "warmup_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    atomic_save_dir(out, write)


def _print_outcome(
    console: Console, record: dict, router: dict, routing: str, router_init: str, warm_s: float, out: Path
) -> None:
    """One line: what the warm-up trained, behind which router, how the router starts, where it went."""
    trained = (
        f"{record['steps']} steps over {record['tokens']} tokens, "
        f"KL {record['first_kl']:.4f} -> {record['last_kl']:.4f}"
        if record["steps"]
        else "no training (--epochs 0)"
    )
    fit = f" (fit to the teacher's clusters: KL {router['router_fit_kl']:.4f})" if "router_fit_kl" in router else ""
    console.print(
        f"warm-up: {trained} behind the {routing} router in {warm_s:.1f}s; router start {router_init}{fit}; "
        f"written to {out}"
    )
