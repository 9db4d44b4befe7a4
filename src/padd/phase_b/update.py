"""The update of Phase B (docs/method.md §4): one optimizer step per mini-batch of a rollout batch.

MiniBatchUpdate.step     [Γ of the whole mini-batch first, when III's running mean reads it]
                         -> MicroBatchPass.accumulate on each --micro-batch-size part: student forward
                            (+ per-token Γ on this forward's router inputs) -> teacher forward -> loss
                            -> backward, the gradients accumulating
                         -> gradient clip -> AdamW step -> routing-bias step (IV) -> the metrics row
StudentTraining          what the step trains: the student's data-parallel wrapper, AdamW, the warm-up
                         schedule and the bias balancer, bound again to a student a resumed run reloads
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from padd.config import TrainConfig
from padd.distributed import full_tensor, is_sharded, wrap_for_training
from padd.losses import token_logps
from padd.memory import enable_activation_checkpointing, micro_slices, no_gradient_sync
from padd.metrics import gamma_step, token_gamma_stats
from padd.phase_b.balance import BiasBalancer
from padd.phase_b.checkpoint import CHECKPOINT
from padd.phase_b.objective import (
    BatchTokens,
    Objective,
    ShiftScale,
    check_finite,
    combine_stats,
    objective_loss,
    term_shares,
)
from padd.phase_b.phases import PhaseClock
from padd.phase_b.trajectory import Trajectory, completion_positions, forward_completion
from padd.precision import autocast, experts_in_autocast_dtype, routers_in_fp32
from padd.routing import RouterRecorder, TokenGammaMeter, bias_action, engine_routing, router_weights


class StudentTraining:
    """The student as the update trains it: `student` (the bare model), `trained` (what the training
    forward runs: its DDP or FSDP2 wrapper, else the student), whether it is `sharded`, AdamW, the
    warm-up scheduler and stage IV's bias balancer, all bound to one student."""

    def __init__(self, student: torch.nn.Module, objective: Objective, cfg: TrainConfig, dist):
        """`dist`: padd.distributed.Dist."""
        self.objective, self.cfg, self.dist = objective, cfg, dist
        self.attach(student)

    def attach(self, student: torch.nn.Module) -> None:
        """Data-parallel wrapping, then optimizer, warm-up scheduler and bias balancer bound to `student`
        (FSDP2 replaces the parameters, so the optimizer must come after it); again on resume, for the
        student the checkpoint holds."""
        cfg = self.cfg
        routers_in_fp32(student)
        experts_in_autocast_dtype(student)  # a no-op outside autocast (--precision fp32)
        if cfg.activation_checkpointing:  # acts in training-mode forwards only: not in generation
            enable_activation_checkpointing(student)
        # Gradients are averaged over ranks by DDP or FSDP2; generation and no-grad forwards use the
        # bare model (under FSDP2 it is the sharded model itself).
        self.student = student
        self.trained = wrap_for_training(student, self.dist, cfg.parallel, offload=cfg.offload)
        self.sharded = is_sharded(student)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))
        self.balancer = BiasBalancer.of(student, self.objective, cfg, reduce=self.dist.all_reduce_sum)


class MicroBatchPass:
    """Forward, loss and backward of one micro-batch of a mini-batch, its gradient accumulating in the
    student's: the training-mode student forward (Γ per token, its routing recorded), the teacher's
    forward for KD, and the objective's loss as a share of the whole mini-batch's."""

    def __init__(
        self,
        training: StudentTraining,
        teacher: torch.nn.Module,
        vocab,
        shift_scale: ShiftScale,
        device: torch.device,
        sample_temperature: float,
    ):
        """`vocab`: padd.vocab.SharedVocab; `shift_scale`: the update's, whose running mean outlives
        any one mini-batch; `sample_temperature`: the rollouts', at which π_θ is measured."""
        self.training, self.teacher, self.vocab, self.shift_scale = training, teacher, vocab, shift_scale
        self.cfg, self.objective, self.dist = training.cfg, training.objective, training.dist
        self.device, self.sample_temperature = device, sample_temperature

    def forward(self, part: Trajectory, anchor: list[torch.Tensor], own_replay: bool = True):
        """The training-mode student forward on one micro-batch: (logits [n, C, V], Γ [n, C] (zero
        off the completion), the recorder of its routing). `anchor`: the router weights Γ is measured
        against (one [E, H] per MoE layer). `own_replay`: replay the engine's routing (R3) for this
        forward alone; False where the caller holds the replay open itself."""
        student, rollout, dev = self.training.student, part.rollout, self.device
        meter = TokenGammaMeter(
            student, anchor, part.old_topk, rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
        )
        recorder = RouterRecorder(student)
        replay = engine_routing(student, rollout, replay=self.cfg.routing_replay) if own_replay else None
        with autocast(dev, self.cfg.precision), replay or contextlib.nullcontext(), meter, recorder:
            logits = forward_completion(self.training.trained, rollout, dev)  # [n, C, V]
            token_gamma = meter.token_gamma() * part.completion_mask.to(dev)
        return logits, token_gamma, recorder

    def accumulate(
        self, part: Trajectory, last: bool, anchor, tokens: BatchTokens, observed: bool, clock: PhaseClock
    ) -> dict:
        """Forward, loss and backward of one micro-batch (gradients accumulate; DDP all-reduces them
        after the `last`); what the step and the metrics need of it. `tokens`: the whole mini-batch's
        denominators; `observed`: Γ's running mean has already seen the whole mini-batch."""
        cfg, obj, dev, student = self.cfg, self.objective, self.device, self.training.student
        rollout, mask, adv = part.rollout, part.completion_mask.to(dev), part.advantages.to(dev)
        # the engine-vs-trainer routing mismatch is counted here when no π_old forward did it; the
        # replay stays on through the backward, whose activation-checkpointing recompute must route
        # as the forward did (the recorder and Γ meter are off by then)
        engine = engine_routing(student, rollout, replay=cfg.routing_replay, count=part.old_logps is None)
        # DDP decides in the forward whether the backward all-reduces: no_sync covers both
        with no_gradient_sync(self.training.trained, last), engine:
            with clock("student"):
                logits, token_gamma, recorder = self.forward(part, anchor, own_replay=False)
                logp = token_logps(logits, rollout.completion_ids.to(dev), self.sample_temperature)  # [n, C]
            counts = (getattr(engine, "differ", 0), getattr(engine, "counted", 0))
            old_logps = logp.detach() if part.old_logps is None else part.old_logps.to(dev)
            where = completion_positions(rollout)
            topk_now = recorder.selections(tuple(rollout.input_ids.shape))[:, :, where]  # [L, n, C, K]

            teacher_logits = None
            if obj.kd:
                with clock("teacher"), torch.no_grad(), autocast(dev, cfg.precision):
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


class MiniBatchUpdate:
    """One optimizer step on each mini-batch of a rollout batch, and what persists from step to step
    (checkpointed): the step count, the router before the last step (Γ's anchor under --gamma-anchor
    previous) and Γ's running scale (III)."""

    def __init__(self, training: StudentTraining, teacher: torch.nn.Module, vocab, device, sample_temperature: float):
        """`vocab`: padd.vocab.SharedVocab; `sample_temperature`: the rollouts', at which π_θ is measured."""
        self.training, self.device = training, device
        self.cfg, self.objective, self.dist = training.cfg, training.objective, training.dist
        self.opt_step = 0
        self.router_before_last_step = router_weights(training.student)
        self.shift_scale = ShiftScale(self.objective.shift_norm)
        self.micro = MicroBatchPass(training, teacher, vocab, self.shift_scale, device, sample_temperature)

    def step(self, mb: Trajectory, clock: PhaseClock, batch: int) -> dict:
        """One optimizer step on one mini-batch, its gradient accumulated over micro-batches of
        --micro-batch-size completions; returns its metrics row. Everything the loss reads across
        completions (the group advantages, Γ's running mean) and IV's loads are the whole mini-batch's,
        so the step is the one the whole mini-batch would take. `batch`: rollout batches done before."""
        cfg, obj, dev, training = self.cfg, self.objective, self.device, self.training
        mask = mb.completion_mask.to(dev)  # [n, C]
        router_before = router_weights(training.student)
        anchor = mb.rollout_router if mb.rollout_router is not None else self.router_before_last_step
        parts = [mb.select(torch.arange(p.start, p.stop)) for p in micro_slices(len(mb), cfg.micro_batch_size)]
        tokens = BatchTokens.of(mask, self.dist)

        training.student.train()
        damped = bool(obj.policy and obj.lam)
        observed = False
        if damped and len(parts) > 1 and self.shift_scale.reads_batch_mean:
            # Γ's running mean takes the whole mini-batch's Γ before the first micro-batch's loss:
            # one no-grad forward per micro-batch measures it first
            with clock("student"), torch.no_grad():
                gamma = torch.cat([self.micro.forward(part, anchor)[1] for part in parts])
            self.shift_scale.observe(gamma, mask, self.dist.sum_dict)
            observed = True
        training.optimizer.zero_grad(set_to_none=True)
        done = [
            self.micro.accumulate(p, i == len(parts) - 1, anchor, tokens, observed, clock) for i, p in enumerate(parts)
        ]

        terms = {k: sum(d["terms"][k] for d in done) for k in done[0]["terms"]}
        at = f"rollout batch {batch + 1}, optimizer step {self.opt_step + 1}"
        check_finite(terms, self.dist, f"{at}; the last good checkpoint is in {Path(cfg.out) / CHECKPOINT}")
        token_gamma = torch.cat([d["token_gamma"] for d in done])  # [n, C]
        topk_now = torch.cat([d["topk"] for d in done], dim=1)  # [L, n, C, K]
        with clock("update"):
            grad_norm = torch.nn.utils.clip_grad_norm_(training.student.parameters(), cfg.max_grad_norm)
            training.optimizer.step()
            training.scheduler.step()
            self.opt_step += 1
            self.router_before_last_step = router_before
            balance = training.balancer.step(topk_now, mb.advantages.to(dev), mask)
        rollout, valid = mb.rollout, mask.bool()
        router_logits = [torch.cat(layer) for layer in zip(*(d["router_logits"] for d in done), strict=True)]
        where = completion_positions(rollout)
        routing = bias_action(training.student, router_logits, tuple(rollout.input_ids.shape), where, valid)
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
            "gamma_step": gamma_step(router_before, router_weights(training.student)),
            **balance,
            "lr": training.scheduler.get_last_lr()[0],
        }

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the update besides the optimizer (picklable)."""
        return {
            "opt_step": self.opt_step,
            "scheduler": self.training.scheduler.state_dict(),
            "balancer": self.training.balancer.state_dict(),
            "router_before_last_step": self.router_before_last_step,
            "shift_scale": self.shift_scale.value,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's `state_dict`, once `training` is attached to its student."""
        self.training.scheduler.load_state_dict(state["scheduler"])
        self.training.balancer.load_state_dict(state["balancer"])
        self.opt_step = state["opt_step"]
        self.router_before_last_step = [w.to(self.device) for w in state["router_before_last_step"]]
        self.shift_scale.value = state["shift_scale"]
