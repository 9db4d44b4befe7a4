"""`padd train`: every method on the same loop, the metrics log, resume after SIGKILL, bad inputs."""

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
from padd.config import TrainConfig
from padd.phase_b.objective import objective_of

FAST = [
    "--data",
    "world:add+reverse",
    "--world-size",
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


def train(student, teacher, out, *extra):
    return main(
        ["train", "--student", str(student), "--teacher", str(teacher), "--out", str(out), *FAST, *map(str, extra)]
    )


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_objectives_of_methods_and_ablations():
    def obj(**kw):
        return objective_of(TrainConfig(student="s", teacher="t", data="d", out="o", **kw))

    padd = obj(method="padd", lam=0.5, kd_coef=0.2, gamma=0.01)
    assert (padd.policy, padd.lam, padd.kd_coef, padd.gamma, padd.level) == (True, 0.5, 0.2, 0.01, "token")
    grpo = obj(method="grpo")
    assert (grpo.lam, grpo.kd_coef, grpo.gamma, grpo.rspo_floor) == (0.0, 0.0, 0.0, None) and grpo.eta > 0
    assert obj(method="gspo").level == "sequence" and obj(method="rspo").rspo_floor == 0.5
    assert not obj(method="online-kd").policy and obj(method="online-kd").kd_coef == 1.0
    assert obj(method="padd", no_kd=True).kd_coef == 0 and obj(method="padd", no_pr=True).lam == 0
    assert obj(method="padd", no_reward_balance=True).gamma == 0
    with pytest.raises(ValueError, match="trains nothing"):
        obj(method="online-kd", no_kd=True)


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


def test_gamma_anchor_previous_sees_the_last_step_in_on_policy_runs(tmp_path, student, llama_teacher):
    """With one update per batch the rollout-time router is the current one, so Γ is 0 against it;
    anchored on the router before the last optimizer step, Γ measures that step's shift."""
    flags = ("--steps", "3", "--updates-per-batch", "1", "--lr", "1e-2", "--method", "padd")
    assert train(student, llama_teacher, tmp_path / "rollout", *flags) == 0
    assert train(student, llama_teacher, tmp_path / "prev", *flags, "--gamma-anchor", "previous") == 0
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

    def broken_kd(*args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(loop, "adaptive_kd_loss", broken_kd)
    with pytest.raises(FloatingPointError, match="'kd'.*rollout batch 1"):
        loop.run_train(
            TrainConfig(
                student=str(student),
                teacher=str(llama_teacher),
                out=str(tmp_path / "nan"),
                data="world:add",
                world_size=10,
                prompts_per_step=2,
                group_size=2,
                max_new_tokens=4,
                progress=False,
                steps=1,
            )
        )
