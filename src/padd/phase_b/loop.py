"""`padd train`: the Phase B loop (docs/method.md §4). One rollout batch, top to bottom:

    collect:  prompts -> G completions each -> rewards (padd.grade) -> group advantages
              -> no-grad forward: π_old (at the sampling temperature), rollout-time top-K
              = one `Trajectory`
              (with M = 1 the update's own forward gives both, as the student has not moved since
              it sampled: this forward is skipped)
    update:   for each of its M mini-batches: student forward (+ per-token Γ on this forward's
              router inputs) -> teacher forward -> loss -> AdamW step -> routing-bias step (IV)
    sync:     the rollout backend samples the next batch from the updated student

Every method is a setting of `Objective` on this same loop (padd.methods).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from padd.config import TrainConfig, to_dict
from padd.data import batch_problems, build_prompt, load_problems
from padd.determinism import deterministic_kernels
from padd.distributed import full_tensor, is_sharded, setup, wrap_for_training
from padd.errors import UserError
from padd.generation import rollout_backend
from padd.generation.vllm import check_engine_length, check_vllm_device
from padd.generation.vllm_server import ServerError, check_server
from padd.grading import grade
from padd.io import atomic_write_json, check_out_dir
from padd.losses import group_advantages, token_logps
from padd.memory import check_activation_checkpointing, enable_activation_checkpointing, micro_slices, no_gradient_sync
from padd.metrics import gamma_step, token_gamma_stats
from padd.models import load_causal_lm
from padd.phase_b.balance import BiasBalancer
from padd.phase_b.checkpoint import CHECKPOINT, checkpoint_dir, load_trainer_state, save_checkpoint, save_student
from padd.phase_b.metrics_log import MetricsLog, stage_summary
from padd.phase_b.objective import (
    BatchTokens,
    ShiftScale,
    check_finite,
    combine_stats,
    objective_loss,
    objective_of,
    resolve,
    term_shares,
)
from padd.phase_b.phases import PhaseClock
from padd.phase_b.trajectory import Trajectory, completion_positions, forward_completion
from padd.precision import autocast, experts_in_autocast_dtype, routers_in_fp32, teacher_dtype
from padd.routing import RouterRecorder, TokenGammaMeter, bias_action, engine_routing, router_weights
from padd.vocab import shared_vocab

# config fields whose non-zero value makes a training-mode forward random
NOISE_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "router_jitter_noise")


def noisy_in_training(config) -> bool:
    """Whether the model's training-mode forward is random (dropout or router jitter above 0)."""
    return any(float(getattr(config, name, 0) or 0) > 0 for name in NOISE_FIELDS)


class Trainer:
    """Holds the models, optimizer, balancer and data of one `padd train` run."""

    def __init__(self, cfg: TrainConfig, console: Console | None = None):
        cfg = resolve(cfg)  # the method's defaults filled in; options it would ignore refused
        if cfg.rollout == "vllm":  # before any model loads
            check_vllm_device(cfg.device)
            check_engine_length(cfg.student, cfg.vllm_max_model_len)
        if cfg.rollout == "vllm-server":
            check_server(cfg.vllm_server_url, cfg.student, cfg.max_new_tokens)
        self.cfg, self.console = cfg, console or Console()
        self.objective = objective_of(cfg)
        # π_old and π_θ are the sampler's distribution: logits / T, as the rollouts drew the tokens
        self.sample_temperature = cfg.temperature if cfg.temperature > 0 else 1.0
        self.out = Path(cfg.out)
        self.dist = setup(cfg.device)
        deterministic_kernels(cfg.device)
        if cfg.prompts_per_step % self.dist.world:
            raise UserError(
                f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the {self.dist.world} processes, "
                "so that every rank holds whole groups"
            )
        per_rank = cfg.prompts_per_step // self.dist.world * cfg.group_size
        if cfg.micro_batch_size is not None and per_rank % cfg.updates_per_batch:
            raise UserError(
                f"--micro-batch-size cuts mini-batches of equal size: each rank's {per_rank} completions "
                f"(--prompts-per-step × --group-size / processes) must divide into --updates-per-batch "
                f"{cfg.updates_per_batch}; change one of them"
            )
        cfg.check_memory_options(
            per_rank // cfg.updates_per_batch, "each rank's mini-batch of completions", self.dist.world
        )
        if cfg.activation_checkpointing:
            check_activation_checkpointing(cfg.student)
        self.device = self.dist.device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student)
        # Under FSDP2 both models are built sharded and load only this rank's shards: no process
        # ever holds a whole one (the forward-only teacher is as large as the student).
        self.fsdp = cfg.parallel == "fsdp" and self.dist.world > 1
        self.student = load_causal_lm(
            cfg.student, device=self.device, train=True, sharded=self.fsdp, offload=cfg.offload
        )
        self.teacher = load_causal_lm(
            cfg.teacher, dtype=teacher_dtype(cfg.precision), device=self.device, sharded=self.fsdp
        )
        # Before step 1: distillation over logits needs one vocabulary (docs/method.md §4 II).
        self.vocab = shared_vocab(
            AutoTokenizer.from_pretrained(cfg.teacher),
            self.tokenizer,
            self.teacher.config.vocab_size,
            self.student.config.vocab_size,
        )
        self.problems = load_problems(cfg.data, split="train", world_per_skill=cfg.world_per_skill, seed=cfg.seed)
        self._attach_training_state()
        self.rollout = rollout_backend(cfg, self.student, self.tokenizer, dist=self.dist, sharded=self.sharded)
        self.batch = 0  # rollout batches done
        self.opt_step = 0
        self.router_before_last_step = router_weights(self.student)  # Γ's anchor under --gamma-anchor previous
        self.shift_scale = ShiftScale(self.objective.shift_norm)
        # One update per rollout batch: the student that sampled is the one that updates, so π_old and
        # the rollout-time top-K are the update forward's own (detached); a second forward would only
        # recompute them. Not where the training forward is noisy (dropout, router jitter): π_old and
        # the top-K then come from a no-grad forward in eval mode, as with M > 1.
        self.old_policy_forward = cfg.updates_per_batch > 1 or noisy_in_training(self.student.config)

    def _attach_training_state(self) -> None:
        """Data-parallel wrapping, then optimizer, warm-up scheduler and bias balancer bound to the
        current student (FSDP2 replaces the parameters, so the optimizer must come after it)."""
        cfg = self.cfg
        routers_in_fp32(self.student)
        experts_in_autocast_dtype(self.student)  # a no-op outside autocast (--precision fp32)
        if cfg.activation_checkpointing:  # acts in training-mode forwards only: not in generation
            enable_activation_checkpointing(self.student)
        # Gradients are averaged over ranks by DDP or FSDP2; generation and no-grad forwards use the
        # bare model (under FSDP2 it is the sharded model itself).
        self.trained = wrap_for_training(self.student, self.dist, cfg.parallel, offload=cfg.offload)
        self.sharded = is_sharded(self.student)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))
        self.balancer = BiasBalancer.of(self.student, self.objective, cfg, reduce=self.dist.all_reduce_sum)

    def step(self) -> list[dict]:
        """Run one rollout batch; returns one metrics row per optimizer step."""
        cfg = self.cfg
        # sampling and routing ties: resumable by count, distinct per rank
        torch.manual_seed((cfg.seed * 1_000_003 + self.batch) * self.dist.world + self.dist.rank)
        clock = PhaseClock(self.device, ("generation", "teacher", "student", "update"))
        trajectory, batch_metrics = self.collect(clock)
        rows = [
            {**self._update(minibatch, clock), "minibatch": index}
            for index, minibatch in enumerate(trajectory.minibatches(cfg.updates_per_batch))
        ]
        with clock("update"):
            self.rollout.sync_weights(self.student)  # the next batch samples from the updated student
        self.batch += 1
        elapsed = sum(clock.seconds.values())
        batch_metrics["tokens_per_s"] = batch_metrics["completion_tokens"] / max(elapsed, 1e-9)
        return [{**row, "batch": self.batch, **batch_metrics, **clock.metrics()} for row in rows]

    def collect(self, clock: PhaseClock) -> tuple[Trajectory, dict]:
        """Sample, grade and score one rollout batch: (its Trajectory, its metrics over all ranks)."""
        cfg = self.cfg
        with clock("generation"), self.amp():
            problems = batch_problems(
                self.problems, self.batch, cfg.prompts_per_step, cfg.seed, self.dist.rank, self.dist.world
            )
            prompts = [build_prompt(self.tokenizer, p.problem) for p in problems]
            rollout = self.rollout.sample(
                prompts, cfg.group_size, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens
            )
            answers = [p.answer for p in problems for _ in range(cfg.group_size)]
            rewards = torch.tensor([float(grade(t, a)) for t, a in zip(rollout.texts, answers, strict=True)])
        old_logps = old_topk = None
        engine_counts = (0, 0)
        if self.old_policy_forward:
            old_logps, old_topk, engine_counts = self._old_policy(rollout, clock)
        trajectory = Trajectory(
            rollout=rollout,
            rewards=rewards,
            advantages=group_advantages(rewards, cfg.group_size),
            old_logps=old_logps,
            old_topk=old_topk,
            # Γ's anchor for this batch's updates: the router that made the rollouts (§4 III)
            rollout_router=router_weights(self.student) if cfg.gamma_anchor == "rollout" else None,
        )
        return trajectory, trajectory.metrics(self.dist, *engine_counts)

    def _old_policy(self, rollout, clock: PhaseClock) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """π_old [N, C] at the sampling temperature and the rollout-time top-K [L, N, C, K] of a
        rollout batch, by no-grad forwards of --micro-batch-size sequences; and the engine-vs-trainer
        routing (differ, counted)."""
        cfg, dev = self.cfg, self.device
        logps, topks, differ, counted = [], [], 0, 0
        where = completion_positions(rollout)
        for part in micro_slices(len(rollout.texts), cfg.micro_batch_size):
            piece = rollout.select(torch.arange(part.start, part.stop))
            # replay (R3) before recording, so the recorder sees the selection the forward used
            engine = engine_routing(self.student, piece, replay=cfg.routing_replay, count=True)
            recorder = RouterRecorder(self.student, keep_logits=False)
            with clock("student"), torch.no_grad(), self.amp(), engine, recorder:
                self.student.eval()
                logits = forward_completion(self.student, piece, dev)
                logps.append(token_logps(logits, piece.completion_ids.to(dev), self.sample_temperature))  # [n, C]
                del logits
                topks.append(recorder.selections(tuple(piece.input_ids.shape))[:, :, where])
            differ, counted = differ + getattr(engine, "differ", 0), counted + getattr(engine, "counted", 0)
        return torch.cat(logps), torch.cat(topks, dim=1), (differ, counted)

    def _update(self, mb: Trajectory, clock: PhaseClock) -> dict:
        """One optimizer step on one mini-batch, its gradient accumulated over micro-batches of
        --micro-batch-size completions; returns its metrics row. Everything the loss reads across
        completions (the group advantages, Γ's running mean) and IV's loads are the whole mini-batch's,
        so the step is the one the whole mini-batch would take."""
        cfg, obj, dev = self.cfg, self.objective, self.device
        mask = mb.completion_mask.to(dev)  # [n, C]
        router_before = router_weights(self.student)
        anchor = mb.rollout_router if mb.rollout_router is not None else self.router_before_last_step
        parts = [mb.select(torch.arange(p.start, p.stop)) for p in micro_slices(len(mb), cfg.micro_batch_size)]
        tokens = BatchTokens.of(mask, self.dist)

        self.student.train()
        damped = bool(obj.policy and obj.lam)
        observed = False
        if damped and len(parts) > 1 and self.shift_scale.reads_batch_mean:
            # Γ's running mean takes the whole mini-batch's Γ before the first micro-batch's loss:
            # one no-grad forward per micro-batch measures it first
            with clock("student"), torch.no_grad():
                gamma = torch.cat([self._micro_forward(part, anchor)[1] for part in parts])
            self.shift_scale.observe(gamma, mask, self.dist.sum_dict)
            observed = True
        self.optimizer.zero_grad(set_to_none=True)
        done = [self._micro_step(p, i == len(parts) - 1, anchor, tokens, observed, clock) for i, p in enumerate(parts)]

        terms = {k: sum(d["terms"][k] for d in done) for k in done[0]["terms"]}
        at = f"rollout batch {self.batch + 1}, optimizer step {self.opt_step + 1}"
        check_finite(terms, self.dist, f"{at}; the last good checkpoint is in {self.out / CHECKPOINT}")
        token_gamma = torch.cat([d["token_gamma"] for d in done])  # [n, C]
        topk_now = torch.cat([d["topk"] for d in done], dim=1)  # [L, n, C, K]
        with clock("update"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.opt_step += 1
            self.router_before_last_step = router_before
            balance = self.balancer.step(topk_now, mb.advantages.to(dev), mask)
        rollout, valid = mb.rollout, mask.bool()
        router_logits = [torch.cat(layer) for layer in zip(*(d["router_logits"] for d in done), strict=True)]
        where = completion_positions(rollout)
        routing = bias_action(self.student, router_logits, tuple(rollout.input_ids.shape), where, valid)
        stats = combine_stats([(d["stats"], d["share"], d["completion_share"]) for d in done])
        if damped and self.shift_scale.value is not None:
            stats["shift_scale"] = self.shift_scale.value
        total = sum(terms.values())
        logged = {"loss": float(total), **{f"loss_{k}": float(v) for k, v in terms.items()}}
        scalars = {**logged, **stats, **token_gamma_stats(token_gamma[valid]), **routing}
        # Logged values are token-weighted means over all ranks (the same on every rank); for a
        # quantile that is the weighted mean of each rank's own (and of each micro-batch's).
        weighted = self.dist.sum_dict({k: v * float(tokens.local_tokens) for k, v in scalars.items()})
        checks = {}
        if mb.old_logps is None:  # the checks of π_old that the π_old forward would have given (all ranks)
            old_logps = torch.cat([d["old_logps"] for d in done])
            differ, counted = (sum(d["engine"][i] for d in done) for i in (0, 1))
            checks = mb.policy_checks(self.dist, differ, counted, old_logps)
        return {
            **checks,
            "step": self.opt_step,
            **{k: v / float(tokens.global_tokens) for k, v in weighted.items()},
            "grad_norm": float(full_tensor(grad_norm)),
            "gamma_step": gamma_step(router_before, router_weights(self.student)),
            **balance,
            "lr": self.scheduler.get_last_lr()[0],
        }

    def _micro_forward(self, part: Trajectory, anchor, own_replay: bool = True):
        """The training-mode student forward on one micro-batch: (logits [n, C, V], Γ [n, C] (zero
        off the completion), the recorder of its routing). `own_replay`: replay the engine's routing
        (R3) for this forward alone; False where the caller holds the replay open itself."""
        rollout, dev = part.rollout, self.device
        meter = TokenGammaMeter(
            self.student, anchor, part.old_topk, rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
        )
        recorder = RouterRecorder(self.student)
        replay = engine_routing(self.student, rollout, replay=self.cfg.routing_replay) if own_replay else None
        with self.amp(), replay or contextlib.nullcontext(), meter, recorder:
            logits = forward_completion(self.trained, rollout, dev)  # [n, C, V]
            token_gamma = meter.token_gamma() * part.completion_mask.to(dev)
        return logits, token_gamma, recorder

    def _micro_step(self, part: Trajectory, last: bool, anchor, tokens: BatchTokens, observed: bool, clock) -> dict:
        """Forward, loss and backward of one micro-batch (gradients accumulate); what the step and the
        metrics need of it."""
        cfg, obj, dev = self.cfg, self.objective, self.device
        rollout, mask, adv = part.rollout, part.completion_mask.to(dev), part.advantages.to(dev)
        # the engine-vs-trainer routing mismatch is counted here when no π_old forward did it; the
        # replay stays on through the backward, whose activation-checkpointing recompute must route
        # as the forward did (the recorder and Γ meter are off by then)
        engine = engine_routing(self.student, rollout, replay=cfg.routing_replay, count=part.old_logps is None)
        # DDP decides in the forward whether the backward all-reduces: no_sync covers both
        with no_gradient_sync(self.trained, last), engine:
            with clock("student"):
                logits, token_gamma, recorder = self._micro_forward(part, anchor, own_replay=False)
                logp = token_logps(logits, rollout.completion_ids.to(dev), self.sample_temperature)  # [n, C]
            counts = (getattr(engine, "differ", 0), getattr(engine, "counted", 0))
            old_logps = logp.detach() if part.old_logps is None else part.old_logps.to(dev)
            where = completion_positions(rollout)
            topk_now = recorder.selections(tuple(rollout.input_ids.shape))[:, :, where]  # [L, n, C, K]

            teacher_logits = None
            if obj.kd:
                with clock("teacher"), torch.no_grad(), self.amp():
                    teacher_logits = self.vocab.kd_view(forward_completion(self.teacher, rollout, dev))
            damping_gamma = None
            if obj.policy and obj.lam:
                if not observed:  # the whole mini-batch is this one part
                    self.shift_scale.observe(token_gamma, mask, self.dist.sum_dict)
                damping_gamma = self.shift_scale.apply(token_gamma)
            loss = objective_loss(
                obj,
                self.vocab.kd_view(logits),
                logp,
                old_logps,
                teacher_logits,
                adv,
                mask,
                token_gamma,
                damping_gamma,
                self.dist,
                tokens,
            )
            del logits, teacher_logits
            with clock("update"):
                loss.backward.backward()
        shares = term_shares(loss.per_sequence, mask, tokens)
        return {
            "terms": {k: v.detach() * shares["pg" if k == "pg" else "token"] for k, v in loss.terms.items()},
            "stats": loss.stats,
            "share": float(shares["token"]),
            "completion_share": float(shares["completions"]),
            "token_gamma": token_gamma,
            "topk": topk_now,
            "router_logits": recorder.logits,
            "old_logps": old_logps,
            "engine": counts,
        }

    def amp(self):
        """Autocast for a forward under --precision bf16 (a no-op for fp32)."""
        return autocast(self.device, self.cfg.precision)

    def save_checkpoint(self) -> dict | None:
        """Write the checkpoint; returns the whole student state dict when sharded, else None."""
        counters = {
            "batch": self.batch,
            "opt_step": self.opt_step,
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "router_before_last_step": self.router_before_last_step,
            "shift_scale": self.shift_scale.value,
        }
        return save_checkpoint(
            self.out, self.student, self.tokenizer, self.optimizer, counters, sharded=self.sharded, dist=self.dist
        )

    def resume(self) -> None:
        """Continue from the run's checkpoint: the student it saved, then every other state."""
        ckpt = checkpoint_dir(self.out)
        self.student = load_causal_lm(
            ckpt / "student", device=self.device, train=True, sharded=self.fsdp, offload=self.cfg.offload
        )
        self._attach_training_state()
        self.rollout.sync_weights(self.student)
        state = load_trainer_state(ckpt, self.student, self.optimizer, sharded=self.sharded)
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.batch, self.opt_step = state["batch"], state["opt_step"]
        self.router_before_last_step = [w.to(self.device) for w in state["router_before_last_step"]]
        self.shift_scale.value = state["shift_scale"]


def run_train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train for cfg.steps rollout batches; returns the run directory."""
    console = console or Console()
    cfg = resolve(cfg)  # a refused option fails before anything is read or written
    out = Path(cfg.out)
    if not cfg.resume:
        check_out_dir(out, cfg.overwrite)
    trainer = Trainer(cfg, console)
    main = trainer.dist.main  # one writer: metrics, TensorBoard, checkpoints and the student
    if cfg.resume:
        trainer.resume()
    elif main:
        shutil.rmtree(out, ignore_errors=True)  # check_out_dir allowed it: absent, empty or --overwrite
        out.mkdir(parents=True)
    if main:
        record = {**to_dict(trainer.cfg), "objective": asdict(trainer.objective), "processes": trainer.dist.world}
        atomic_write_json(out / "train_config.json", record)
    log = MetricsLog(out, main=main, resume_batch=trainer.batch if cfg.resume else None)
    bar = tqdm(total=cfg.steps, initial=trainer.batch, desc=f"train {cfg.method}", disable=not (cfg.progress and main))
    logged: list[dict] = []
    while trainer.batch < cfg.steps:
        try:
            rows = trainer.step()
        except ServerError as err:
            # Only sampling fails this way (a failed weight push waits for it): no part of this batch
            # was trained on, so the checkpoint holds every batch done, and --resume redoes this one.
            bar.close()
            trainer.save_checkpoint()
            log.close()
            done = {0: "the start", 1: "batch 1"}.get(trainer.batch, f"batches 1-{trainer.batch}")
            raise ServerError(
                f"{err}; stopped before rollout batch {trainer.batch + 1}, with {done} in {out / CHECKPOINT}: "
                "restart the server and run the same command with --resume"
            ) from err
        logged += rows
        log.write(rows)
        bar.update(1)
        bar.set_postfix(reward=f"{rows[-1]['reward_mean']:.2f}", gamma=f"{rows[-1]['gamma_step']:.2e}")
        if cfg.save_every and trainer.batch % cfg.save_every == 0:
            trainer.save_checkpoint()
    bar.close()
    model_state = trainer.save_checkpoint()  # gathered once, for the checkpoint and the final student
    log.close()
    if main:
        bias_file = save_student(out / "student", trainer.student, trainer.tokenizer, model_state)
        console.print(
            f"train {cfg.method}: {trainer.batch} rollout batches, {trainer.opt_step} optimizer steps; "
            f"student in {out / 'student'}, metrics in {log.path}"
        )
        for line in stage_summary(logged, trainer.objective, bias_file=bias_file):
            console.print(line)
    trainer.dist.barrier()
    return out
