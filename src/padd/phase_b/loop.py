"""`padd train`: the Phase B loop (docs/method.md §4). One rollout batch, top to bottom:

    collect:  prompts -> G completions each -> rewards (padd.grade) -> group advantages
              -> no-grad forward: π_old (at the sampling temperature), rollout-time top-K
              = one `Trajectory`
              (with M = 1 the update's own forward gives both, as the student has not moved since
              it sampled: this forward is skipped)
    update:   for each of its M mini-batches: student forward (+ per-token Γ on this forward's
              router inputs) -> teacher forward -> loss -> AdamW step -> routing-bias step (IV)
              (padd.phase_b.update.MiniBatchUpdate)
    sync:     the rollout backend samples the next batch from the updated student

Every method is a setting of `Objective` on this same loop (padd.methods).
"""

from __future__ import annotations

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
from padd.distributed import setup
from padd.errors import UserError
from padd.generation import rollout_backend
from padd.generation.vllm import check_engine_length, check_vllm_device
from padd.generation.vllm_server import ServerError, check_server
from padd.grading import grade
from padd.io import atomic_write_json, check_out_dir
from padd.losses import group_advantages, token_logps
from padd.memory import check_activation_checkpointing, check_equal_mini_batches, micro_slices
from padd.models import load_causal_lm
from padd.phase_b.checkpoint import CHECKPOINT, checkpoint_dir, load_trainer_state, save_checkpoint, save_student
from padd.phase_b.metrics_log import MetricsLog, stage_summary
from padd.phase_b.objective import objective_of, resolve
from padd.phase_b.phases import PhaseClock
from padd.phase_b.trajectory import Trajectory, completion_positions, forward_completion
from padd.phase_b.update import MiniBatchUpdate, StudentTraining
from padd.precision import autocast, teacher_dtype
from padd.routing import RouterRecorder, engine_routing, router_weights
from padd.vocab import shared_vocab

# config fields whose non-zero value makes a training-mode forward random
NOISE_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "router_jitter_noise")


def noisy_in_training(config) -> bool:
    """Whether the model's training-mode forward is random (dropout or router jitter above 0)."""
    return any(float(getattr(config, name, 0) or 0) > 0 for name in NOISE_FIELDS)


def check_rollout_backend(cfg: TrainConfig) -> None:
    """Refuse a --rollout backend that cannot sample for this run (the device, the engine's context,
    the model a server serves); before any model loads, so that it fails fast."""
    if cfg.rollout == "vllm":
        check_vllm_device(cfg.device)
        check_engine_length(cfg.student, cfg.vllm_max_model_len)
    if cfg.rollout == "vllm-server":
        check_server(cfg.vllm_server_url, cfg.student, cfg.max_new_tokens)


def check_batch_split(cfg: TrainConfig, world: int) -> None:
    """Refuse a rollout batch that the `world` processes or the mini-batches of equal size cannot
    split, and the memory options that each rank's mini-batch cannot take."""
    if cfg.prompts_per_step % world:
        raise UserError(
            f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the {world} processes, "
            "so that every rank holds whole groups"
        )
    per_rank = cfg.prompts_per_step // world * cfg.group_size
    check_equal_mini_batches(per_rank, cfg.updates_per_batch, cfg.micro_batch_size)
    cfg.check_memory_options(per_rank // cfg.updates_per_batch, "each rank's mini-batch of completions", world)
    if cfg.activation_checkpointing:
        check_activation_checkpointing(cfg.student)


def load_models(cfg: TrainConfig, device: torch.device, sharded: bool):
    """(the student's tokenizer, the student in training mode, the teacher at its --precision dtype,
    their padd.vocab.SharedVocab). `sharded`: both models are built sharded and load only this rank's
    shards, so no process ever holds a whole one (the forward-only teacher is as large as the student)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    student = load_causal_lm(cfg.student, device=device, train=True, sharded=sharded, offload=cfg.offload)
    teacher = load_causal_lm(cfg.teacher, dtype=teacher_dtype(cfg.precision), device=device, sharded=sharded)
    # Before step 1: distillation over logits needs one vocabulary (docs/method.md §4 II).
    vocab = shared_vocab(
        AutoTokenizer.from_pretrained(cfg.teacher), tokenizer, teacher.config.vocab_size, student.config.vocab_size
    )
    return tokenizer, student, teacher, vocab


class Trainer:
    """Holds the models, the update, the rollout backend and the data of one `padd train` run."""

    def __init__(self, cfg: TrainConfig, console: Console | None = None):
        cfg = resolve(cfg)  # the method's defaults filled in; options it would ignore refused
        check_rollout_backend(cfg)
        self.cfg, self.console = cfg, console or Console()
        self.objective = objective_of(cfg)
        # π_old and π_θ are the sampler's distribution: logits / T, as the rollouts drew the tokens
        self.sample_temperature = cfg.temperature if cfg.temperature > 0 else 1.0
        self.out = Path(cfg.out)
        self.dist = setup(cfg.device)
        deterministic_kernels(cfg.device)
        check_batch_split(cfg, self.dist.world)
        self.device = self.dist.device(cfg.device)
        self.fsdp = cfg.parallel == "fsdp" and self.dist.world > 1
        self.tokenizer, self.student, self.teacher, self.vocab = load_models(cfg, self.device, self.fsdp)
        self.problems = load_problems(cfg.data, split="train", world_per_skill=cfg.world_per_skill, seed=cfg.seed)
        self.training = StudentTraining(self.student, self.objective, cfg, self.dist)
        self.rollout = rollout_backend(cfg, self.student, self.tokenizer, dist=self.dist, sharded=self.training.sharded)
        self.batch = 0  # rollout batches done
        self.update = MiniBatchUpdate(self.training, self.teacher, self.vocab, self.device, self.sample_temperature)
        # One update per rollout batch: the student that sampled is the one that updates, so π_old and
        # the rollout-time top-K are the update forward's own (detached); a second forward would only
        # recompute them. Not where the training forward is noisy (dropout, router jitter): π_old and
        # the top-K then come from a no-grad forward in eval mode, as with M > 1.
        self.old_policy_forward = cfg.updates_per_batch > 1 or noisy_in_training(self.student.config)

    def step(self) -> list[dict]:
        """Run one rollout batch; returns one metrics row per optimizer step."""
        cfg = self.cfg
        # sampling and routing ties: resumable by count, distinct per rank
        torch.manual_seed((cfg.seed * 1_000_003 + self.batch) * self.dist.world + self.dist.rank)
        clock = PhaseClock(self.device, ("generation", "teacher", "student", "update"))
        trajectory, batch_metrics = self.collect(clock)
        rows = [
            {**self.update.step(minibatch, clock, self.batch), "minibatch": index}
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

    def amp(self):
        """Autocast for a forward under --precision bf16 (a no-op for fp32)."""
        return autocast(self.device, self.cfg.precision)

    def save_checkpoint(self) -> dict | None:
        """Write the checkpoint; returns the whole student state dict when sharded, else None."""
        counters = {"batch": self.batch, **self.update.state_dict()}
        optimizer, sharded = self.training.optimizer, self.training.sharded
        return save_checkpoint(
            self.out, self.student, self.tokenizer, optimizer, counters, sharded=sharded, dist=self.dist
        )

    def resume(self) -> None:
        """Continue from the run's checkpoint: the student it saved, then every other state."""
        ckpt = checkpoint_dir(self.out)
        self.student = load_causal_lm(
            ckpt / "student", device=self.device, train=True, sharded=self.fsdp, offload=self.cfg.offload
        )
        self.training.attach(self.student)
        self.rollout.sync_weights(self.student)
        state = load_trainer_state(ckpt, self.student, self.training.optimizer, sharded=self.training.sharded)
        self.batch = state["batch"]
        self.update.load_state_dict(state)


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
            f"train {cfg.method}: {trainer.batch} rollout batches, {trainer.update.opt_step} optimizer steps; "
            f"student in {out / 'student'}, metrics in {log.path}"
        )
        for line in stage_summary(logged, trainer.objective, bias_file=bias_file):
            console.print(line)
    trainer.dist.barrier()
    return out
