"""`padd train`: the Phase B loop (SPEC §4). One step, top to bottom:

    prompts -> G completions each -> rewards (padd.grade) -> group advantages
    -> no-grad forward: π_old, rollout-time router log-scores and top-K
    -> M mini-batch updates, each: student forward (+ Γ), teacher forward, loss, AdamW step,
       routing-bias update (IV), Γ_step

Every method of SPEC §4 is a setting of `Objective` on this same loop.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
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
from padd.phase_b.losses import adaptive_kd_loss, group_advantages, pr_grpo_loss, routing_shift
from padd.phase_b.objective import objective_of
from padd.phase_b.phases import PhaseClock
from padd.phase_b.rollout import Rollout, rollout_backend
from padd.precision import autocast, routers_in_fp32, teacher_dtype
from padd.routing import RouterRecorder, RoutingReplay, router_weights
from padd.vocab import common_vocab_size

CHECKPOINT = "checkpoint"


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: [B, T, V], [B, T] -> [B, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def forward_completion(model, rollout: Rollout, device, vocab: int) -> torch.Tensor:
    """Logits [N, C, vocab] predicting each completion token (positions from the attention mask)."""
    mask = rollout.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=rollout.input_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=False
    ).logits
    n_prompt, n_comp = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return logits[:, n_prompt - 1 : n_prompt + n_comp - 1, :vocab]


def completion_routing(rec: RouterRecorder, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded router log-scores [L, N, C, E] and top-K [L, N, C, K] at the completion positions."""
    n, width = rollout.input_ids.shape
    logp, topk = rec.stacked((n, width))
    n_prompt = rollout.prompt_ids.shape[1]
    return logp[:, :, n_prompt:], topk[:, :, n_prompt:]


class Trainer:
    """Holds the models, optimizer, balancer and data of one `padd train` run."""

    def __init__(self, cfg: TrainConfig, console: Console | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.console = cfg, console or Console()
        self.objective = objective_of(cfg)
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
        self.anchor_router = router_weights(self.student)  # the router before the last optimizer step

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
            ema_decay=cfg.adv_ema,
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

        # replay (R3) before recording, so the recorder sees the selection the forward used
        engine = self._engine_routing(rollout, count=True)
        with clock("student"), torch.no_grad(), self.amp(), engine, RouterRecorder(self.student) as rec:
            self.student.eval()
            old_logp = token_logps(
                forward_completion(self.student, rollout, dev, self.vocab), rollout.completion_ids.to(dev)
            )
            router_old, topk_old = completion_routing(rec, rollout)

        rows = []
        n = len(rollout.texts)
        order = torch.randperm(n)
        for chunk in order.chunk(cfg.updates_per_batch):
            rows.append(
                self._update(
                    rollout.select(chunk),
                    old_logp[chunk],
                    router_old[:, chunk],
                    topk_old[:, chunk],
                    advantages[chunk],
                    clock,
                )
            )
        with clock("update"):
            self.rollout.sync_weights(self.student)  # the next batch samples from the updated student
        self.batch += 1
        totals = self.dist.all_reduce_sum(
            torch.tensor(
                [
                    float(rewards.sum()),
                    float((rewards > 0).sum()),
                    len(rewards),
                    rollout.completion_mask.sum(),
                    getattr(engine, "differ", 0),
                    getattr(engine, "counted", 0),
                ]
            )
        )
        # token-layer selections where the trainer's own router disagrees with the rollout engine's
        mismatch = {"routing_mismatch": float(totals[4] / totals[5])} if totals[5] > 0 else {}
        comp_tokens = int(totals[3])
        elapsed = sum(clock.seconds.values())
        for row in rows:
            row.update(
                batch=self.batch,
                reward_mean=float(totals[0] / totals[2]),
                accuracy=float(totals[1] / totals[2]),
                completion_tokens=comp_tokens,
                tokens_per_s=comp_tokens / max(elapsed, 1e-9),
                **mismatch,
                **clock.metrics(),
            )
        return rows

    def _update(self, mb: Rollout, old_logp, router_old, topk_old, adv, clock: PhaseClock) -> dict:
        cfg, obj, dev = self.cfg, self.objective, self.device
        mask = mb.completion_mask.to(dev).float()
        adv = adv.to(dev)
        prev_router = router_weights(self.student)

        self.student.train()
        anchored = cfg.gamma_anchor == "previous"
        engine = self._engine_routing(mb)
        with clock("student"), self.amp(), engine, RouterRecorder(self.student, keep_inputs=anchored) as rec:
            logits = forward_completion(self.trained, mb, dev, self.vocab)
            router_now, topk_now = completion_routing(rec, mb)
            if anchored:  # Γ against the router one optimizer step ago, on this forward's router inputs
                router_old = rec.log_scores_under(self.anchor_router, tuple(mb.input_ids.shape))
                router_old = router_old[:, :, mb.prompt_ids.shape[1] :]
            logp = token_logps(logits, mb.completion_ids.to(dev))
            gamma_tok = routing_shift(router_now, router_old.to(dev), topk_old.to(dev), mask)

        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        if obj.policy:
            terms["pg"], pg_stats = pr_grpo_loss(
                logp,
                old_logp.to(dev),
                adv,
                mask,
                router_shift=gamma_tok,
                lam=obj.lam,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
                level=obj.level,
                rspo_floor=obj.rspo_floor,
            )
            stats.update(pg_stats)
        if obj.kd_coef:
            with clock("teacher"), torch.no_grad(), self.amp():
                t_logits = forward_completion(self.teacher, mb, dev, self.vocab)
            kd, kd_stats = adaptive_kd_loss(logits, t_logits, adv, mask, tau=cfg.tau, t_min=cfg.t_min)
            terms["kd"] = obj.kd_coef * kd
            stats.update(kd_stats)
        loss = sum(terms.values())
        # Every term is a mean over this rank's completion tokens; rescaled by its share of all ranks'
        # tokens, DDP's gradient average becomes the gradient of the mean over the global mini-batch.
        local_tokens = mask.sum()
        global_tokens = self.dist.all_reduce_sum(local_tokens.detach().clone()).clamp_min(1.0)
        share = local_tokens * self.dist.world / global_tokens
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
            (loss * share).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.opt_step += 1
            self.anchor_router = prev_router
            token_mask = mask.reshape(-1)
            token_adv = adv[:, None].expand_as(mask).reshape(-1)
            topk_flat = topk_now.reshape(topk_now.shape[0], -1, topk_now.shape[-1])
            bias = self.balancer.step(topk_flat, token_adv, token_mask)
            balance = load_stats(bias.pop("load"))
        # Logged values are token-weighted means over all ranks (the same on every rank).
        scalars = {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in terms.items()}, **stats}
        names = list(scalars)
        weighted = torch.tensor([scalars[k] for k in names] + [float(gamma_tok.sum())], dtype=torch.float64)
        weighted[:-1] *= float(local_tokens)
        weighted = self.dist.all_reduce_sum(weighted) / float(global_tokens)
        return {
            "step": self.opt_step,
            **dict(zip(names, weighted[:-1].tolist(), strict=True)),
            "grad_norm": float(full_tensor(grad_norm)),
            "gamma_step": router_shift(prev_router, router_weights(self.student)),
            "gamma_token_mean": float(weighted[-1]),
            "load_cv": balance["cv"].tolist(),
            "load_max_mean": balance["max_mean"].tolist(),
            **bias,
            "lr": self.scheduler.get_last_lr()[0],
        }

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
                    "anchor_router": self.anchor_router,
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
        self.anchor_router = [w.to(self.device) for w in state["anchor_router"]]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])


def run_train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train for cfg.steps rollout batches; returns the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    console = console or Console()
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
                {**to_dict(cfg), "objective": asdict(trainer.objective), "processes": trainer.dist.world}, indent=1
            )
        )
    log = metrics_file.open("a") if main else None
    writer = SummaryWriter(str(out / "tensorboard")) if main else None
    bar = tqdm(total=cfg.steps, initial=trainer.batch, desc=f"train {cfg.method}", disable=not (cfg.progress and main))
    while trainer.batch < cfg.steps:
        rows = trainer.step()
        if main:
            for row in rows:
                log.write(json.dumps(row) + "\n")
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key not in ("step", "batch"):
                        writer.add_scalar(key, value, row["step"])
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
    trainer.dist.barrier()
    return out
