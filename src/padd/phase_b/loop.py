"""`padd train`: the Phase B loop (SPEC §4). One step, top to bottom:

    prompts -> G completions each -> rewards (padd.grade) -> group advantages
    -> no-grad forward: π_old (at the sampling temperature), rollout-time top-K and router weights
    -> M mini-batch updates, each: student forward (+ per-token Γ on this forward's router inputs),
       teacher forward, loss, AdamW step, routing-bias update (IV), Γ_step

Every method of SPEC §4 is a setting of `Objective` on this same loop.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from tqdm.auto import tqdm

from padd.config import TrainConfig, to_dict
from padd.data import build_prompt, load_problems
from padd.distributed import (
    full_tensor,
    gather_state_dict,
    is_sharded,
    load_sharded_optimizer,
    setup,
    shard,
    wrap_for_training,
)
from padd.grade import grade
from padd.io import atomic_save_dir, check_out_dir
from padd.metrics import load_stats, router_shift
from padd.phase_b.balance import BiasBalancer
from padd.phase_b.losses import (
    adaptive_kd_loss,
    distill_kl_loss,
    group_advantages,
    pr_grpo_loss,
    rspo_gmpo_loss,
    token_logps,
)
from padd.phase_b.objective import objective_of, resolve
from padd.phase_b.phases import PhaseClock
from padd.phase_b.rollout import Rollout, rollout_backend
from padd.precision import autocast, routers_in_fp32, teacher_dtype
from padd.routing import (
    RouterRecorder,
    RouterShiftMeter,
    RoutingReplay,
    moe_gates,
    router_weights,
    selection_stats,
)
from padd.vocab import common_vocab_size

CHECKPOINT = "checkpoint"
GAMMA_QUANTILES = (0.5, 0.9, 0.99)


def completion_positions(rollout: Rollout) -> slice:
    """Positions of the [N, P + C] sequence whose logits predict the C completion tokens: P-1 ... P+C-2.
    The routing at these positions is what produced each completion token's probability."""
    n_prompt, n_comp = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return slice(n_prompt - 1, n_prompt + n_comp - 1)


def forward_completion(model, rollout: Rollout, device, vocab: int) -> torch.Tensor:
    """Raw logits [N, C, vocab] predicting each completion token (positions from the attention mask)."""
    mask = rollout.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=rollout.input_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=False
    ).logits
    return logits[:, completion_positions(rollout), :vocab]


class Trainer:
    """Holds the models, optimizer, balancer and data of one `padd train` run."""

    def __init__(self, cfg: TrainConfig, console: Console | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = resolve(cfg)  # the method's defaults filled in; options it would ignore refused
        self.cfg, self.console = cfg, console or Console()
        self.objective = objective_of(cfg)
        # π_old and π_θ are the sampler's distribution: logits / T, as the rollouts drew the tokens
        self.sample_temperature = cfg.temperature if cfg.temperature > 0 else 1.0
        self.out = Path(cfg.out)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if cfg.rollout == "vllm" and cfg.device != "cuda":
            raise ValueError("--rollout vllm runs on a GPU: add --device cuda, or use --rollout transformers")
        self.dist = setup(cfg.device)
        if cfg.prompts_per_step % self.dist.world:
            raise ValueError(
                f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the {self.dist.world} processes, "
                "so that every rank holds whole groups"
            )
        self.device = self.dist.device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student)
        self.student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(self.device)
        t_dtype = teacher_dtype(cfg.precision)
        self.teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=t_dtype).to(self.device).eval()
        if cfg.parallel == "fsdp" and self.dist.world > 1:
            shard(self.teacher)  # forward-only, but a 7B teacher is as large as the student
        # Before step 1: distillation over logits needs one vocabulary (SPEC §4 II).
        self.vocab = common_vocab_size(
            AutoTokenizer.from_pretrained(cfg.teacher),
            self.tokenizer,
            self.teacher.config.vocab_size,
            self.student.config.vocab_size,
        )
        self.problems = load_problems(cfg.data, split="train", world_size=cfg.world_size, seed=cfg.seed)
        self._attach_training_state()
        self.rollout = rollout_backend(
            cfg, self.student, self.tokenizer, rank=self.dist.rank, main=self.dist.main, sharded=self.sharded
        )
        self.batch = 0  # rollout batches done
        self.opt_step = 0
        self.previous_router = router_weights(self.student)  # the router before the last optimizer step
        self.shift_scale: float | None = None  # running mean of Γ (--shift-norm running-mean)

    def _attach_training_state(self) -> None:
        """Data-parallel wrapping, then optimizer, warm-up scheduler and bias balancer bound to the
        current student (FSDP2 replaces the parameters, so the optimizer must come after it)."""
        cfg = self.cfg
        routers_in_fp32(self.student)
        # Gradients are averaged over ranks by DDP or FSDP2; generation and no-grad forwards use the
        # bare model (under FSDP2 it is the sharded model itself).
        self.trained = wrap_for_training(self.student, self.dist, cfg.parallel)
        self.sharded = is_sharded(self.student)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))
        self.balancer = BiasBalancer(
            self.student,
            eta=self.objective.eta,
            gamma=self.objective.gamma,
            clip=cfg.bias_clip,
            ema_decay=self.objective.adv_ema,
            rule=cfg.balance_rule,
            reduce=self.dist.all_reduce_sum,
        )

    # -- one rollout batch ------------------------------------------------------------------------

    def _prompts(self) -> list:
        """This rank's share of the batch's prompts: a seeded pass over the data, reshuffled each epoch;
        every rank draws the same global batch and keeps its contiguous slice (whole groups)."""
        n, k = len(self.problems), self.cfg.prompts_per_step
        epoch, offset = divmod(self.batch * k, n)
        order = list(range(n))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        picked = [order[(offset + i) % n] for i in range(k)]
        share = k // self.dist.world
        return [self.problems[i] for i in picked[self.dist.rank * share : (self.dist.rank + 1) * share]]

    def step(self) -> list[dict]:
        """Run one rollout batch; returns one metrics row per optimizer step."""
        cfg, dev = self.cfg, self.device
        # sampling and routing ties: resumable by count, distinct per rank
        torch.manual_seed((cfg.seed * 1_000_003 + self.batch) * self.dist.world + self.dist.rank)
        clock = PhaseClock(dev, ("generation", "teacher", "student", "update"))
        with clock("generation"), self.amp():
            problems = self._prompts()
            rollout = self.rollout.generate(
                [build_prompt(self.tokenizer, p.problem) for p in problems],
                cfg.group_size,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
            )
            answers = [p.answer for p in problems for _ in range(cfg.group_size)]
            rewards = torch.tensor([float(grade(t, a)) for t, a in zip(rollout.texts, answers, strict=True)])
            advantages = group_advantages(rewards, cfg.group_size)

        # Γ's anchor for this batch's updates: the router that made the rollouts (SPEC §4 III)
        rollout_router = router_weights(self.student) if cfg.gamma_anchor == "rollout" else None
        # replay (R3) before recording, so the recorder sees the selection the forward used
        engine = self._engine_routing(rollout, count=True)
        recorder = RouterRecorder(self.student, keep_logits=False)
        with clock("student"), torch.no_grad(), self.amp(), engine, recorder:
            self.student.eval()
            completion = rollout.completion_ids.to(dev)
            logits = forward_completion(self.student, rollout, dev, self.vocab)
            old_logp = token_logps(logits, completion, self.sample_temperature)  # [N, C]
            del logits
            topk_old = recorder.selections(tuple(rollout.input_ids.shape))[:, :, completion_positions(rollout)]

        totals = {
            "reward": float(rewards.sum()),
            "correct": float((rewards > 0).sum()),
            "completions": len(rewards),
            "tokens": float(rollout.completion_mask.sum()),
            "engine_differ": getattr(engine, "differ", 0),
            "engine_counted": getattr(engine, "counted", 0),
        }
        batch_metrics = {}
        if rollout.sampler_logps is not None:
            # π_old must be the distribution the sampler drew from: the largest gap, over all ranks
            valid = rollout.completion_mask.bool()
            gap = (old_logp.cpu() - rollout.sampler_logps)[valid].abs()
            gap = self.dist.all_reduce_max(torch.tensor([float(gap.max()) if gap.numel() else 0.0]))
            batch_metrics["sampler_logp_gap"] = float(gap[0])

        rows = []
        order = torch.randperm(len(rollout.texts))
        for index, chunk in enumerate(order.chunk(cfg.updates_per_batch)):
            mb = rollout.select(chunk)
            row = self._update(mb, old_logp[chunk], topk_old[:, chunk], advantages[chunk], rollout_router, clock)
            rows.append({**row, "minibatch": index})
        with clock("update"):
            self.rollout.sync_weights(self.student)  # the next batch samples from the updated student
        self.batch += 1
        totals = self.dist.sum_dict(totals)
        if totals["engine_counted"] > 0:
            # token-layer selections where the trainer's own router disagrees with the rollout engine's
            batch_metrics["routing_mismatch"] = totals["engine_differ"] / totals["engine_counted"]
        elapsed = sum(clock.seconds.values())
        for row in rows:
            row.update(
                batch=self.batch,
                reward_mean=totals["reward"] / totals["completions"],
                accuracy=totals["correct"] / totals["completions"],
                completion_tokens=int(totals["tokens"]),
                tokens_per_s=totals["tokens"] / max(elapsed, 1e-9),
                **batch_metrics,
                **clock.metrics(),
            )
        return rows

    def _shift_for_damping(self, token_gamma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Γ as stage III's damping reads it: as measured, or divided by its running mean
        (--shift-norm running-mean), so that λ is the same at every learning rate and model size.

        The mean is over the completion tokens of all ranks, and only mini-batches whose router has
        moved since the anchor update it (Γ is exactly 0 on the first, on-policy one)."""
        if self.objective.shift_norm != "running-mean":
            return token_gamma
        sums = self.dist.sum_dict({"gamma": float((token_gamma * mask).sum()), "tokens": float(mask.sum())})
        mean = sums["gamma"] / max(sums["tokens"], 1.0)
        if mean > 0:
            self.shift_scale = mean if self.shift_scale is None else 0.9 * self.shift_scale + 0.1 * mean
        return token_gamma / self.shift_scale if self.shift_scale else token_gamma

    def _policy_loss(self, logp, old_logp, adv, mask, token_gamma) -> tuple[torch.Tensor, dict, bool]:
        """(loss, stats, per_sequence) of the method's RL term; per_sequence: a mean over completions
        (RSPO's GMPO aggregation) rather than over tokens."""
        cfg, obj = self.cfg, self.objective
        clip = {"eps_low": obj.eps_low, "eps_high": obj.eps_high}
        if obj.policy == "rspo" and obj.rspo_base == "gmpo":
            loss, stats = rspo_gmpo_loss(logp, old_logp, adv, mask, token_gamma, floor=obj.rspo_floor, **clip)
            return loss, stats, True
        if obj.policy == "rspo":
            loss, stats = pr_grpo_loss(
                logp, old_logp, adv, mask, router_shift=token_gamma, rspo_floor=obj.rspo_floor, **clip
            )
            return loss, stats, False
        level = "sequence" if obj.policy == "gspo" else "token"
        shift = self._shift_for_damping(token_gamma, mask) if obj.lam else None
        loss, stats = pr_grpo_loss(logp, old_logp, adv, mask, router_shift=shift, lam=obj.lam, level=level, **clip)
        if cfg.method == "padd" and obj.lam and self.shift_scale is not None:
            stats["shift_scale"] = self.shift_scale
        return loss, stats, False

    def _update(self, mb: Rollout, old_logp, topk_old, adv, rollout_router, clock: PhaseClock) -> dict:
        cfg, obj, dev = self.cfg, self.objective, self.device
        mask = mb.completion_mask.to(dev).float()  # [n, C]
        adv = adv.to(dev)  # [n]
        prev_router = router_weights(self.student)
        anchor = rollout_router if rollout_router is not None else self.previous_router

        self.student.train()
        engine = self._engine_routing(mb)
        meter = RouterShiftMeter(self.student, anchor, topk_old, mb.prompt_ids.shape[1])
        recorder = RouterRecorder(self.student)
        with clock("student"), self.amp(), engine, meter, recorder:
            logits = forward_completion(self.trained, mb, dev, self.vocab)  # [n, C, V]
            logp = token_logps(logits, mb.completion_ids.to(dev), self.sample_temperature)  # [n, C]
            token_gamma = meter.token_gamma() * mask  # [n, C], no gradient
        where = completion_positions(mb)
        topk_now = recorder.selections(tuple(mb.input_ids.shape))[:, :, where]  # [L, n, C, K]

        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        per_sequence = False
        if obj.policy:
            terms["pg"], pg_stats, per_sequence = self._policy_loss(logp, old_logp.to(dev), adv, mask, token_gamma)
            stats.update(pg_stats)
        if obj.kd:
            with clock("teacher"), torch.no_grad(), self.amp():
                t_logits = forward_completion(self.teacher, mb, dev, self.vocab)
            if obj.kd == "adaptive":
                kd, kd_stats = adaptive_kd_loss(logits, t_logits, adv, mask, tau=obj.tau, t_min=obj.t_min)
            else:  # online KD: on-policy distillation at temperature 1
                kd = distill_kl_loss(logits, t_logits, mask, temperature=1.0)
                kd_stats = {"kd_temp_mean": 1.0, "kd_kl": float(kd.detach())}
            terms["kd"] = obj.kd_coef * kd
            stats.update(kd_stats)
        loss = sum(terms.values())
        # A token-mean term is rescaled by this rank's share of all ranks' tokens, so DDP's gradient
        # average becomes the gradient of the mean over the global mini-batch. A mean over
        # completions needs no rescaling: every rank holds the same number of them.
        local_tokens = mask.sum()
        global_tokens = self.dist.all_reduce_sum(local_tokens.detach().clone()).clamp_min(1.0)
        token_share = local_tokens * self.dist.world / global_tokens
        scaled = sum(v * (1.0 if (k == "pg" and per_sequence) else token_share) for k, v in terms.items())
        # Checked on every rank together, so that all stop rather than some waiting in a collective.
        bad = torch.tensor([float(not torch.isfinite(v)) for v in terms.values()])
        for (name, value), flagged in zip(terms.items(), self.dist.all_reduce_sum(bad), strict=True):
            if flagged:
                raise FloatingPointError(
                    f"loss term {name!r} is not finite (here: {value.item()}) at rollout batch {self.batch + 1}, "
                    f"optimizer step {self.opt_step + 1}; the last good checkpoint is in {self.out / CHECKPOINT}"
                )

        with clock("update"):
            self.optimizer.zero_grad(set_to_none=True)
            scaled.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.opt_step += 1
            self.previous_router = prev_router
            token_mask = mask.reshape(-1)
            token_adv = adv[:, None].expand_as(mask).reshape(-1)
            topk_flat = topk_now.reshape(topk_now.shape[0], -1, topk_now.shape[-1])
            bias = self.balancer.step(topk_flat, token_adv, token_mask)
            balance = load_stats(bias.pop("load"))
        stats.update(self._routing_stats(recorder, mb, token_gamma, mask))
        # Logged values are token-weighted means over all ranks (the same on every rank); for a
        # quantile that is the weighted mean of each rank's own.
        scalars = {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in terms.items()}, **stats}
        weighted = self.dist.sum_dict({k: v * float(local_tokens) for k, v in scalars.items()})
        return {
            "step": self.opt_step,
            **{k: v / float(global_tokens) for k, v in weighted.items()},
            "grad_norm": float(full_tensor(grad_norm)),
            "gamma_step": router_shift(prev_router, router_weights(self.student)),
            "load_cv": balance["cv"].tolist(),
            "load_max_mean": balance["max_mean"].tolist(),
            **bias,
            "lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def _routing_stats(self, recorder: RouterRecorder, mb: Rollout, token_gamma, mask) -> dict[str, float]:
        """What shows III and IV acting on this mini-batch: per-token Γ (mean and quantiles over the
        completion tokens) and, for the selection bias, the median top-K score gap it must bridge
        and the share of token-layer selections it changed."""
        valid = mask.bool()
        values = token_gamma[valid].float()
        out = {"gamma_token_mean": float(values.mean()) if values.numel() else 0.0}
        if values.numel():
            for q, v in zip(GAMMA_QUANTILES, torch.quantile(values, torch.tensor(GAMMA_QUANTILES)), strict=True):
                out[f"gamma_token_p{round(100 * q)}"] = float(v)
        gates = moe_gates(self.student)
        if not gates or gates[0].top_k >= gates[0].num_experts:
            return out
        n, width = mb.input_ids.shape
        where = completion_positions(mb)
        gaps, changed = [], []
        for gate, logits in zip(gates, recorder.logits, strict=True):
            per_token = logits.view(n, width, -1)[:, where][valid]  # [tokens, E]
            gap, flip = selection_stats(per_token, gate.e_score_correction_bias, gate.top_k)
            gaps.append(gap)
            changed.append(flip.float())
        out["router_gap_median"] = float(torch.cat(gaps).median()) if values.numel() else 0.0
        out["bias_changed_frac"] = float(torch.cat(changed).mean()) if values.numel() else 0.0
        return out

    def amp(self):
        """Autocast for a forward under --precision bf16 (a no-op for fp32)."""
        return autocast(self.device, self.cfg.precision)

    def _engine_routing(self, mb: Rollout, count: bool = False):
        """Over one forward on `mb`: replay the engine's expert selection (--routing-replay) and, with
        `count`, measure the trainer's disagreement with it; a no-op when the backend gave none."""
        if mb.routed_experts is None or not (count or self.cfg.routing_replay):
            return contextlib.nullcontext()
        mask = mb.attention_mask if count else None
        return RoutingReplay(self.student, mb.routed_experts, count_mask=mask, replay=self.cfg.routing_replay)

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> dict | None:
        """Student, optimizer, scheduler, balancer and RNG states, written atomically. Returns the
        student's whole state dict when it is sharded (gathered on rank 0 for the write), else None."""
        model_state, optim_state = None, self.optimizer.state_dict()
        if self.sharded:  # whole tensors on rank 0, which writes
            model_state, optim_state = gather_state_dict(self.student, self.optimizer)

        def write(tmp: Path) -> None:
            self.student.save_pretrained(tmp / "student", state_dict=model_state)
            self.tokenizer.save_pretrained(tmp / "student")
            torch.save(
                {
                    "batch": self.batch,
                    "opt_step": self.opt_step,
                    "optimizer": optim_state,
                    "sharded_optimizer": self.sharded,
                    "scheduler": self.scheduler.state_dict(),
                    "balancer": self.balancer.state_dict(),
                    "previous_router": self.previous_router,
                    "shift_scale": self.shift_scale,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                },
                tmp / "trainer_state.pt",
            )

        if self.dist.main:
            atomic_save_dir(self.out / CHECKPOINT, write)
        self.dist.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
        return model_state

    def load_checkpoint(self) -> None:
        from transformers import AutoModelForCausalLM

        ckpt = self.out / CHECKPOINT
        if not (ckpt / "trainer_state.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}; start without --resume")
        self.student = AutoModelForCausalLM.from_pretrained(ckpt / "student", dtype=torch.float32).to(self.device)
        self._attach_training_state()
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        if state.get("sharded_optimizer", False) != self.sharded:
            was = "fsdp on several processes" if state.get("sharded_optimizer") else "one process or ddp"
            raise ValueError(
                f"--resume: the checkpoint in {ckpt} was written under {was}, whose optimizer state this run "
                "cannot load; resume with the same --parallel mode (and process count above one for fsdp)"
            )
        if self.sharded:
            load_sharded_optimizer(self.student, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.rollout.sync_weights(self.student)
        self.batch, self.opt_step = state["batch"], state["opt_step"]
        self.previous_router = [w.to(self.device) for w in state["previous_router"]]
        self.shift_scale = state["shift_scale"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])


def stage_summary(rows: list[dict], objective) -> list[str]:
    """One line per stage that acts on the routing, from this session's metrics rows: III's damping
    on the updates where the router had moved (the first mini-batch of a batch is on-policy), and
    IV's bias against the score gaps it must bridge. A stage that stays inert is said to be."""
    lines = []
    damping = [
        r["pr_damping_median"]
        for r in rows
        if "pr_damping_median" in r and r.get("gamma_token_mean", 0) > 0 and r.get("pr_negative_frac", 0) > 0
    ]
    if damping:
        median = statistics.median(damping)
        note = " — inert: raise --lam or use --shift-norm running-mean" if median > 0.95 else ""
        lines.append(f"III: median damping exp(-λΓ) on A<0 tokens {median:.3f} over {len(damping)} updates{note}")
    if rows and "bias_spread_mean" in rows[-1] and (objective.eta or objective.gamma):
        last = rows[-1]
        gap = (
            statistics.median(r["router_gap_median"] for r in rows if "router_gap_median" in r)
            if any("router_gap_median" in r for r in rows)
            else float("nan")
        )
        lines.append(
            f"IV: bias spread {last['bias_spread_mean']:.3g} (median top-K score gap {gap:.3g}); "
            f"selections changed by the bias {100 * last.get('bias_changed_frac', 0.0):.1f}%"
        )
    return lines


def run_train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train for cfg.steps rollout batches; returns the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    console = console or Console()
    cfg = resolve(cfg)  # a refused option fails before anything is read or written
    out = Path(cfg.out)
    if not cfg.resume:
        check_out_dir(out, cfg.overwrite)
    trainer = Trainer(cfg, console)
    main = trainer.dist.main  # one writer: metrics, TensorBoard, checkpoints and the student
    metrics_file = out / "metrics.jsonl"
    if cfg.resume:
        trainer.load_checkpoint()
        if main:  # rows logged after the checkpoint belong to the lost part of the run: drop them
            kept = [x for x in metrics_file.read_text().splitlines() if json.loads(x)["batch"] <= trainer.batch]
            metrics_file.write_text("".join(line + "\n" for line in kept))
    elif main:
        shutil.rmtree(out, ignore_errors=True)  # check_out_dir allowed it: absent, empty or --overwrite
        out.mkdir(parents=True)
        metrics_file.write_text("")
    if main:
        (out / "train_config.json").write_text(
            json.dumps(
                {**to_dict(trainer.cfg), "objective": asdict(trainer.objective), "processes": trainer.dist.world},
                indent=1,
            )
        )
    log = metrics_file.open("a") if main else None
    writer = SummaryWriter(str(out / "tensorboard")) if main else None
    bar = tqdm(total=cfg.steps, initial=trainer.batch, desc=f"train {cfg.method}", disable=not (cfg.progress and main))
    logged: list[dict] = []
    while trainer.batch < cfg.steps:
        rows = trainer.step()
        logged += rows
        if main:
            for row in rows:
                log.write(json.dumps(row) + "\n")
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key not in ("step", "batch", "minibatch"):
                        writer.add_scalar(key, value, row["step"])
                    elif isinstance(value, list):  # per MoE layer
                        for layer, v in enumerate(value):
                            writer.add_scalar(f"{key}/layer{layer}", v, row["step"])
            log.flush()
        bar.update(1)
        bar.set_postfix(reward=f"{rows[-1]['reward_mean']:.2f}", gamma=f"{rows[-1]['gamma_step']:.2e}")
        if cfg.save_every and trainer.batch % cfg.save_every == 0:
            trainer.save_checkpoint()
    bar.close()
    model_state = trainer.save_checkpoint()  # gathered once, for the checkpoint and the final student
    if main:
        log.close()
        writer.close()

        def write(tmp: Path) -> None:
            trainer.student.save_pretrained(tmp, state_dict=model_state)
            trainer.tokenizer.save_pretrained(tmp)

        atomic_save_dir(out / "student", write)
        console.print(
            f"train {cfg.method}: {trainer.batch} rollout batches, {trainer.opt_step} optimizer steps; "
            f"student in {out / 'student'}, metrics in {metrics_file}"
        )
        for line in stage_summary(logged, trainer.objective):
            console.print(line)
    trainer.dist.barrier()
    return out
