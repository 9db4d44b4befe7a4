"""`padd train`: every method on the same loop, the metrics log, resume after SIGKILL, bad inputs."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from padd.cli import main
from padd.config import ConfigError, TrainConfig
from padd.phase_b.objective import objective_of

FAST = [
    "--data",
    "world:add+reverse",
    "--world-per-skill",
    "20",
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "6",
    "--temperature",
    "1.0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def student(llama_student):
    return llama_student


def small_config(student, teacher, out, **options) -> TrainConfig:
    """A TrainConfig for driving `Trainer` step by step: 4 prompts × 2 completions of 6 tokens, lr 1e-2."""
    base = dict(data="world:add+reverse", world_per_skill=20, prompts_per_step=4, group_size=2, max_new_tokens=6)
    return TrainConfig(
        student=str(student), teacher=str(teacher), out=str(out), **base, lr=1e-2, progress=False, **options
    )


def train(student, teacher, out, *extra):
    return main(
        ["train", "--student", str(student), "--teacher", str(teacher), "--out", str(out), *FAST, *map(str, extra)]
    )


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _objective(**kw):
    return objective_of(TrainConfig(student="s", teacher="t", data="d", out="o", **kw))


def test_objectives_of_methods_and_ablations():
    padd = _objective(method="padd", lam=0.5, kd_coef=0.2, balance_reward_coef=0.01)
    assert (padd.policy, padd.lam, padd.kd, padd.kd_coef, padd.balance_reward_coef) == (
        "grpo",
        0.5,
        "adaptive",
        0.2,
        0.01,
    )
    grpo = _objective(method="grpo")
    assert (grpo.policy, grpo.lam, grpo.kd, grpo.balance_reward_coef, grpo.rspo_floor) == ("grpo", 0.0, None, 0.0, None)
    assert grpo.eta > 0
    assert _objective(method="gspo").policy == "gspo" and _objective(method="rspo").rspo_floor == 0.8
    assert _objective(method="padd", no_kd=True).kd is None and _objective(method="padd", no_pr=True).lam == 0
    assert _objective(method="padd", no_reward_balance=True).balance_reward_coef == 0


def test_gspo_clips_at_its_papers_range():
    gspo = _objective(method="gspo")
    assert (gspo.eps_low, gspo.eps_high) == (3e-4, 4e-4)
    assert (_objective(method="grpo").eps_low, _objective(method="grpo").eps_high) == (0.2, 0.2)


def test_online_kd_is_pure_kd_at_temperature_one_with_its_own_weight():
    online = _objective(method="online-kd")
    assert (online.policy, online.kd, online.kd_coef) == (None, "fixed", 1.0)
    assert _objective(method="online-kd", kd_coef=0.3).kd_coef == 0.3


@pytest.mark.parametrize("switch", ["no_kd", "no_pr", "no_reward_balance"])
def test_ablation_switches_turn_on_from_the_command_line(switch):
    """argparse's BooleanOptionalAction reads every --no-… flag as False: `--no-kd` once trained with KD."""
    from padd.config import add_config_arguments, load_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    args = ["--student", "s", "--teacher", "t", "--data", "world", "--out", "o", "--" + switch.replace("_", "-")]
    assert getattr(load_config(TrainConfig, parser.parse_args(args)), switch) is True


def test_a_given_zero_is_kept_not_replaced_by_the_default():
    objective = _objective(method="padd", adv_ema=0.0, tau=0.0, lam=0.0, balance_reward_coef=0.0)
    assert (objective.adv_ema, objective.tau, objective.lam, objective.balance_reward_coef) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"method": "grpo", "kd_coef": 0.3}, "--kd-coef"),
        ({"method": "grpo", "lam": 2.0}, "--lam"),
        ({"method": "gspo", "balance_reward_coef": 0.1}, "--balance-reward-coef"),
        ({"method": "online-kd", "tau": 2.0}, "--tau"),
        ({"method": "online-kd", "eps_low": 0.1}, "--eps-low"),
        ({"method": "rspo", "shift_norm": "running-mean"}, "--shift-norm"),
        ({"method": "padd", "rspo_floor": 0.5}, "--rspo-floor"),
        ({"method": "padd", "no_kd": True, "kd_coef": 0.3}, "--kd-coef"),
        ({"method": "padd", "no_pr": True, "lam": 3.0}, "--lam"),
        ({"method": "padd", "no_reward_balance": True, "adv_ema": 0.5}, "--adv-ema"),
        ({"method": "grpo", "no_kd": True}, "--no-kd"),
        ({"method": "padd", "vllm_gpu_memory": 0.5}, "--vllm-gpu-memory"),
        ({"method": "padd", "updates_per_batch": 1}, "--updates-per-batch 1"),
        ({"method": "rspo", "updates_per_batch": 1}, "--updates-per-batch 1"),
    ],
)
def test_an_option_the_method_does_not_use_is_refused(flags, named):
    with pytest.raises(ConfigError, match=named) as err:
        _objective(**flags)
    assert flags["method"] in str(err.value) or named in ("--vllm-gpu-memory", "--no-kd")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"kd_coef": 0.0, "tau": 2.0}, "--kd-coef 0 turns its stage off, so --tau"),
        ({"kd_coef": 0.0, "t_min": 0.1}, "--kd-coef 0 turns its stage off, so --t-min"),
        ({"lam": 0.0, "shift_norm": "running-mean"}, "--lam 0 turns its stage off, so --shift-norm"),
        ({"eta": 0.0, "balance_rule": "sign"}, "--eta 0 turns its stage off, so --balance-rule"),
        ({"eta": 0.0, "balance_reward_coef": 0.3}, "--eta 0 turns its stage off, so --balance-reward-coef"),
        ({"eta": 0.0, "bias_clip": 0.5}, "--eta 0 turns its stage off, so --bias-clip"),
    ],
)
def test_an_option_a_zero_weight_leaves_without_effect_is_refused(flags, named):
    with pytest.raises(ConfigError, match=named):
        _objective(method="padd", **flags)
    _objective(method="padd", **{k: v for k, v in flags.items() if v != 0})  # fine with the stage on


def test_grpo_with_kd_coef_fails_on_the_command_line(tmp_path, capsys):
    args = ["train", "--student", "s", "--teacher", "t", "--data", "world", "--out", str(tmp_path / "o")]
    assert main([*args, "--method", "grpo", "--kd-coef", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--method grpo does not use --kd-coef" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["padd", "grpo", "gspo", "rspo", "online-kd"])
def test_every_method_runs_on_the_same_loop(tmp_path, student, llama_teacher, method):
    run = tmp_path / method
    assert train(student, llama_teacher, run, "--method", method, "--steps", "2", "--updates-per-batch", "2") == 0
    log = rows(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["batch"] for r in log] == [1, 1, 2, 2]
    for key in (
        "reward_mean",
        "accuracy",
        "loss",
        "gamma_step",
        "gamma_token_mean",
        "load_cv",
        "load_max_mean",
        "bias_min",
        "bias_max",
        "tokens_per_s",
        "time_generation",
        "time_student",
        "time_update",
        "mem_generation_gb",
        "mem_update_gb",
        "routing_mismatch",
    ):
        assert key in log[0]
    assert ("loss_kd" in log[0]) == (method in ("padd", "online-kd"))
    assert ("loss_pg" in log[0]) == (method != "online-kd")
    assert len(log[0]["load_cv"]) == 2
    # An untrained teacher earns no reward, so only KD moves the router here; zero advantages give no PG gradient.
    assert (log[-1]["gamma_step"] > 0) == (method in ("padd", "online-kd"))
    assert AutoModelForCausalLM.from_pretrained(run / "student").config.model_type == "glm4_moe"
    assert list((run / "tensorboard").iterdir())


def test_routing_replay_runs_and_logs_the_engine_trainer_mismatch(tmp_path, student, llama_teacher):
    run = tmp_path / "r3"
    assert train(student, llama_teacher, run, "--steps", "2", "--routing-replay") == 0
    log = rows(run)
    assert json.loads((run / "train_config.json").read_text())["routing_replay"] is True
    assert all(0.0 <= r["routing_mismatch"] <= 1.0 and r["loss"] == r["loss"] for r in log)


def test_bf16_precision_trains_float32_weights_against_a_bf16_teacher(tmp_path, student, llama_teacher):
    from safetensors.torch import load_file

    run = tmp_path / "bf16"
    assert train(student, llama_teacher, run, "--steps", "2", "--precision", "bf16", "--lr", "1e-3") == 0
    log = rows(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and "loss_kd" in log[0]
    before, after = load_file(student / "model.safetensors"), load_file(run / "student" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_gamma_anchor_previous_sees_the_last_step_in_on_policy_runs(tmp_path, routed_student, llama_teacher):
    """With one update per batch the rollout-time router is the current one, so Γ would be 0 against
    it (refused: III would never act); anchored on the router before the last optimizer step, Γ
    measures that step's shift. --no-pr keeps Γ's measurement with nothing reading it."""
    flags = ("--steps", "3", "--updates-per-batch", "1", "--lr", "1e-2", "--method", "padd")
    assert train(routed_student, llama_teacher, tmp_path / "refused", *flags) == 2
    assert train(routed_student, llama_teacher, tmp_path / "rollout", *flags, "--no-pr") == 0
    assert train(routed_student, llama_teacher, tmp_path / "prev", *flags, "--gamma-anchor", "previous") == 0
    rollout, prev = rows(tmp_path / "rollout"), rows(tmp_path / "prev")
    assert all(r["gamma_token_mean"] < 1e-6 for r in rollout)
    assert prev[0]["gamma_token_mean"] < 1e-6  # no step before the first
    moved = [r for r, before in zip(prev[1:], prev, strict=False) if before["gamma_step"] > 0]
    assert moved and all(r["gamma_token_mean"] > 1e-6 for r in moved)


def comparable(log):
    volatile = ("tokens_per_s",)
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "mem_")) and k not in volatile} for r in log]


def test_sigkill_then_resume_logs_the_same_metrics(tmp_path, student, llama_teacher):
    whole = tmp_path / "whole"
    assert train(student, llama_teacher, whole, "--steps", "4", "--save-every", "1") == 0

    cut = tmp_path / "cut"
    cmd = [
        sys.executable,
        "-m",
        "padd",
        "train",
        "--student",
        str(student),
        "--teacher",
        str(llama_teacher),
        "--out",
        str(cut),
        *FAST,
        "--steps",
        "4",
        "--save-every",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["batch"] >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert train(student, llama_teacher, cut, "--steps", "4", "--save-every", "1", "--resume") == 0
    a, b = comparable(rows(whole)), comparable(rows(cut))
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key


def test_resume_without_checkpoint_and_mismatched_tokenizer(tmp_path, student, llama_teacher, capsys):
    from padd.tiny import make_tiny_teacher

    assert train(student, llama_teacher, tmp_path / "none", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    other = make_tiny_teacher(tmp_path / "other", "llama", texts=["entirely different words"] * 20)
    assert train(student, other, tmp_path / "o", "--steps", "1") == 2
    assert "tokenizers differ" in capsys.readouterr().err


def test_non_finite_loss_stops_with_the_term_named(tmp_path, student, llama_teacher, monkeypatch):
    import padd.phase_b.loop as loop
    import padd.phase_b.objective as objective

    def broken_kd(*args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(objective, "adaptive_kd_loss", broken_kd)
    with pytest.raises(FloatingPointError, match="'kd'.*rollout batch 1"):
        loop.run_train(
            TrainConfig(
                student=str(student),
                teacher=str(llama_teacher),
                out=str(tmp_path / "nan"),
                data="world:add",
                world_per_skill=10,
                prompts_per_step=2,
                group_size=2,
                max_new_tokens=4,
                progress=False,
                steps=1,
            )
        )


def test_policy_logps_are_the_samplers_at_a_temperature_other_than_one(tmp_path, routed_student, llama_teacher):
    """Rollouts sampled at 0.8: π_old must be log softmax(logits / 0.8), the distribution each
    token was drawn from (at temperature 1 the gap would be of order 0.1 here)."""
    run = tmp_path / "t08"
    assert (
        train(routed_student, llama_teacher, run, "--steps", "2", "--temperature", "0.8", "--max-new-tokens", "8") == 0
    )
    log = rows(run)
    assert all(r["sampler_logp_gap"] <= 1e-4 for r in log)
    assert json.loads((run / "train_config.json").read_text())["temperature"] == 0.8


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_token_gamma_compares_both_routers_on_the_same_inputs(tmp_path, routed_student, llama_teacher, precision):
    """Routers frozen, everything else trained hard: the second mini-batch sees other hidden states
    than the rollout did, but the same router weights, so Γ must be exactly 0 (scores recorded on
    rollout-time inputs would count the hidden-state change as a router shift). Under bf16 autocast
    both routers must still run in float32 (a bf16 anchor would measure rounding, not Γ)."""
    from padd.phase_b.loop import Trainer
    from padd.routing import moe_gates, router_weights

    cfg = small_config(
        routed_student,
        llama_teacher,
        tmp_path / "frozen",
        method="padd",
        eta=0.0,
        updates_per_batch=2,
        precision=precision,
    )
    trainer = Trainer(cfg)
    for gate in moe_gates(trainer.student):
        gate.weight.requires_grad_(False)
    before = router_weights(trainer.student)
    embed = trainer.student.model.embed_tokens.weight.detach().clone()
    log = trainer.step() + trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, router_weights(trainer.student), strict=True))
    assert not torch.equal(embed, trainer.student.model.embed_tokens.weight)
    assert [r["minibatch"] for r in log] == [0, 1, 0, 1]
    assert all(r["gamma_token_mean"] == 0.0 and r["gamma_token_p99"] == 0.0 for r in log)


def test_stage_three_and_four_log_what_shows_they_act(tmp_path, routed_student, llama_teacher, varied_rewards):
    """PADD logs III's damping and Γ's quantiles, IV's per-layer bias spread, the score gaps the bias
    must bridge and the share of selections it changed; the sign rule moves every bias by η."""
    run = tmp_path / "acting"
    flags = (
        "--steps",
        "2",
        "--lr",
        "1e-2",
        "--lam",
        "50",
        "--balance-rule",
        "sign",
        "--eta",
        "0.01",
        "--balance-reward-coef",
        "0",
    )
    assert train(routed_student, llama_teacher, run, *flags) == 0
    log = rows(run)
    for key in ("pr_damping_mean", "pr_damping_median", "gamma_token_p50", "gamma_token_p90", "gamma_token_p99"):
        assert key in log[-1], key
    off_policy = [r for r in log if r["minibatch"] == 1]
    assert all(r["gamma_token_p90"] > 0 for r in off_policy)
    damped = [r["pr_damping_mean"] for r in off_policy if r["pr_negative_frac"] > 0]
    assert damped and all(0.0 < d < 1.0 for d in damped)
    assert all(len(r["bias_spread"]) == len(r["load_cv"]) == 2 for r in log)
    assert all(0.0 <= r["bias_changed_frac"] <= 1.0 and r["router_gap_median"] >= 0 for r in log)
    # the sign rule moves each bias by exactly η per step (no clipping this early): spreads of 2η·steps at most
    assert log[0]["bias_spread_mean"] == pytest.approx(0.02, abs=1e-6)
    assert max(r["bias_spread_mean"] for r in log) <= 0.02 * len(log) + 1e-6
    with open(run / "train_config.json") as f:
        assert json.load(f)["balance_rule"] == "sign"


def test_running_mean_shift_norm_makes_lambda_scale_free(tmp_path, routed_student, llama_teacher, varied_rewards):
    """With --shift-norm running-mean, Γ is divided by its running mean: λ = 1 damps a typical A<0
    token by about exp(-1) whatever the learning rate, where the raw Γ (~1e-3 here) would not act."""
    run = tmp_path / "norm"
    flags = ("--steps", "3", "--lr", "1e-2", "--lam", "1", "--shift-norm", "running-mean")
    assert train(routed_student, llama_teacher, run, *flags) == 0
    off_policy = [r for r in rows(run) if r["minibatch"] == 1]
    assert all(r["shift_scale"] > 0 for r in off_policy)
    damped = [r["pr_damping_mean"] for r in off_policy if r["pr_negative_frac"] > 0]
    assert damped and all(0.01 < d < 0.9 for d in damped)


@pytest.mark.parametrize("method", ["grpo", "padd"])
def test_one_update_per_batch_skips_the_old_policy_forward_and_trains_alike(
    tmp_path, routed_student, llama_teacher, varied_rewards, method
):
    """With M = 1 the student that sampled is the one that updates: π_old and the rollout-time top-K
    come from the update's own forward, and the run equals one that recomputes them in a second
    forward (the loss, every logged value and the trained weights)."""
    from padd.phase_b.loop import Trainer

    runs = []
    for recompute in (False, True):
        cfg = small_config(
            routed_student,
            llama_teacher,
            tmp_path / f"run{recompute}",
            method=method,
            updates_per_batch=1,
            gamma_anchor="previous",
        )
        trainer = Trainer(cfg)
        assert trainer.old_policy_forward is False  # the tiny students have no dropout or router jitter
        trainer.old_policy_forward = recompute
        log = trainer.step() + trainer.step()
        runs.append((log, dict(trainer.student.named_parameters())))
    (fast, fast_weights), (slow, slow_weights) = runs
    timing = ("time_", "mem_", "tokens_per_s")
    for a, b in zip(fast, slow, strict=True):
        assert {k for k in a if not k.startswith(timing)} == {k for k in b if not k.startswith(timing)}
        for key, value in a.items():
            if not key.startswith(timing):
                assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert fast[-1]["gamma_step"] > 0  # the router moved, and Γ was measured against the previous one
    for name, weight in fast_weights.items():
        torch.testing.assert_close(weight, slow_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_noisy_training_forward_keeps_the_old_policy_forward():
    from types import SimpleNamespace

    from padd.phase_b.loop import noisy_in_training

    assert not noisy_in_training(SimpleNamespace(attention_dropout=0.0, router_jitter_noise=0))
    assert noisy_in_training(SimpleNamespace(attention_dropout=0.1))
    assert noisy_in_training(SimpleNamespace(router_jitter_noise=0.01))


def test_vllm_sleep_is_refused_where_it_cannot_act(tmp_path):
    """vLLM's sleep mode needs its CuMemAllocator (a GPU) and the colocated engine: elsewhere the
    flag would do nothing, so it is refused before anything loads."""
    base = dict(student="s", teacher="t", data="world:add", out=str(tmp_path / "r"), vllm_sleep=True)
    for extra in ({}, {"rollout": "vllm"}, {"rollout": "vllm-server", "vllm_server_url": "http://127.0.0.1:1"}):
        with pytest.raises(ConfigError, match="--vllm-sleep puts the colocated engine"):
            objective_of(TrainConfig(**base, **extra))
