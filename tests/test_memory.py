"""The memory options (--micro-batch-size, --activation-checkpointing, --offload): the same update in
less memory. One process here; under 2-process DDP and FSDP2 in test_distributed."""

import pytest
import torch

from padd.config import ConfigError, TrainConfig, WarmupConfig
from padd.errors import UserError
from padd.memory import micro_slices

TIMING = ("time_", "mem_", "tokens_per_s")


# As in test_distributed: the runs agree up to float32 summation order (the micro-batches sum the
# same terms in another order), which AdamW's division by sqrt(v) amplifies on weights whose gradient
# is near zero: 2e-5 on the weights is 2% of one lr-sized step over the 4 steps. A wrong weighting of
# the parts moves them by whole steps; a wrong overall scale, to which AdamW is blind, moves the logged
# grad_norm.
LR = 1e-3


def small_config(student, teacher, out, **options) -> TrainConfig:
    """8 completions per rollout batch (4 prompts × 2), two mini-batches of 4, 6 tokens each."""
    base = dict(data="world:add+reverse", world_per_skill=20, prompts_per_step=4, group_size=2, max_new_tokens=6)
    return TrainConfig(
        student=str(student), teacher=str(teacher), out=str(out), **base, lr=LR, eta=0.01, progress=False, **options
    )


def two_steps(cfg: TrainConfig):
    from padd.phase_b.loop import Trainer

    trainer = Trainer(cfg)
    log = trainer.step() + trainer.step()
    return log, {k: v.detach().clone() for k, v in trainer.student.named_parameters()}


def assert_same_run(a, b, what=""):
    """The same logged values (but quantiles: a micro-batch's median is not the batch's, so they are
    weighted means of the parts', as across ranks) and the same weights."""
    (log_a, weights_a), (log_b, weights_b) = a, b
    assert any(r["loss"] != 0 for r in log_a)
    for row_a, row_b in zip(log_a, log_b, strict=True):
        keys = {k for k in row_a if not k.startswith(TIMING)}
        assert keys == {k for k in row_b if not k.startswith(TIMING)}
        for key in keys - {k for k in keys if "median" in k or k.startswith("gamma_token_p")}:
            # the π_old check measures float rounding itself: both are at that level
            tolerance = 1e-5 if key == "sampler_logp_gap" else 1e-7
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=tolerance), (what, key)
    for name, weight in weights_a.items():
        gap = float((weights_b[name] - weight).abs().max()) if weight.numel() else 0.0
        assert gap <= 2e-5, (what, name, gap)


def test_micro_slices_cover_the_batch_in_order():
    assert micro_slices(8, None) == [slice(0, 8)]
    assert micro_slices(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert micro_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


@pytest.mark.parametrize(
    "options",
    [
        dict(method="padd", lam=50.0),
        dict(method="padd", lam=1.0, shift_norm="running-mean"),  # Γ's mean over the whole mini-batch
        dict(method="grpo"),
        dict(method="gspo"),
        dict(method="rspo"),  # GMPO: a mean over completions, not tokens
        dict(method="online-kd"),
    ],
    ids=["padd", "padd-running-mean", "grpo", "gspo", "rspo", "online-kd"],
)
def test_micro_batches_give_the_whole_mini_batchs_update(
    tmp_path, routed_student, llama_teacher, varied_rewards, options
):
    """Two mini-batches of 4 completions per rollout batch, each as one forward or as micro-batches
    of 1 (and of 2 for PADD): the same losses, every logged statistic the loss reads (damping, KD
    temperature, IV's loads and biases), and the same weights after two rollout batches."""
    whole = two_steps(small_config(routed_student, llama_teacher, tmp_path / "whole", **options))
    for micro in (1, 2) if options["method"] == "padd" else (1,):
        out = tmp_path / f"m{micro}"
        assert_same_run(
            whole, two_steps(small_config(routed_student, llama_teacher, out, micro_batch_size=micro, **options)), micro
        )


def test_activation_checkpointing_gives_the_same_gradients(tmp_path, routed_student, llama_teacher, varied_rewards):
    """Recomputing the decoder layers in the backward, with PADD's hooks on (Γ meter, recorder,
    selection bias) and routing replay steering the recompute: the same run as without it."""
    options = dict(method="padd", lam=50.0, routing_replay=True)
    plain = two_steps(small_config(routed_student, llama_teacher, tmp_path / "plain", **options))
    recomputed = small_config(
        routed_student, llama_teacher, tmp_path / "ckpt", activation_checkpointing=True, micro_batch_size=2, **options
    )
    from padd.phase_b.loop import Trainer

    trainer = Trainer(recomputed)
    assert trainer.student.is_activation_checkpointing
    assert_same_run(plain, two_steps(recomputed))


def test_warmup_micro_batches_and_checkpointing_train_alike(tmp_path, llama_student, llama_teacher, corpus_file):
    """The warm-up's uniform routing is drawn per batch, so micro-batches (and checkpointing's
    recompute) route every token as the whole batch does: the same KL log and the same experts."""
    import json

    from safetensors.torch import load_file

    from helpers import padd

    flags = dict(student=llama_student, teacher=llama_teacher, corpus=corpus_file, tokens=1024, seq_len=64)
    runs = {}
    for name, extra in {
        "whole": {},
        "micro": dict(micro_batch_size=1),
        "ckpt": dict(micro_batch_size=2, activation_checkpointing=True),
    }.items():
        out = tmp_path / name
        assert padd("warmup", out=out, batch_size=4, lr=1e-3, progress=False, **flags, **extra) == 0
        log = [json.loads(x)["kl"] for x in (out / "warmup_log.jsonl").read_text().splitlines()]
        runs[name] = (log, load_file(out / "model.safetensors"))
    whole_log, whole_weights = runs["whole"]
    assert whole_log[-1] < whole_log[0]
    for name in ("micro", "ckpt"):
        log, weights = runs[name]
        assert log == pytest.approx(whole_log, rel=1e-4, abs=1e-7), name
        for key, w in whole_weights.items():
            torch.testing.assert_close(weights[key], w, rtol=0, atol=1e-5, msg=f"{name} {key}")


def test_bad_memory_options_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Each a one-line error naming what to give; the paths do not exist, so reaching a load would
    fail differently."""
    from padd.phase_b.loop import Trainer
    from padd.stage1.warmup import run_warmup

    missing = tmp_path / "no-model"
    cfg = small_config(missing, missing, tmp_path / "out", micro_batch_size=3)
    with pytest.raises(ConfigError, match="--micro-batch-size 3 must divide each rank's mini-batch"):
        Trainer(cfg)
    cfg = small_config(missing, missing, tmp_path / "out", micro_batch_size=1, updates_per_batch=3)
    with pytest.raises(UserError, match="--updates-per-batch 3"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="--offload is FSDP2's CPU offload: give --parallel fsdp"):
        Trainer(small_config(missing, missing, tmp_path / "out", offload=True))
    with pytest.raises(ConfigError, match="start 2[+] processes .* this run has 1"):  # one process shards nothing
        Trainer(small_config(missing, missing, tmp_path / "out", offload=True, parallel="fsdp"))
    warm = WarmupConfig(student=str(missing), teacher=str(missing), corpus="world", out=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="--micro-batch-size 3 must divide --batch-size"):
        run_warmup(warm.__class__(**{**warm.__dict__, "micro_batch_size": 3}))


def test_activation_checkpointing_on_a_model_without_it_is_refused(tmp_path, routed_student, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from padd.memory import check_activation_checkpointing

    check_activation_checkpointing(routed_student)  # Glm4Moe can
    model_class = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(routed_student))]
    monkeypatch.setattr(model_class, "supports_gradient_checkpointing", False)
    with pytest.raises(UserError, match="does not support activation checkpointing"):
        check_activation_checkpointing(routed_student)


def test_activation_checkpointing_keeps_only_each_layers_input(routed_student):
    """What the training forward saves for the backward, counted by autograd's saved-tensor hooks:
    with checkpointing, a few layer inputs instead of every layer's activations (the peak it lowers
    is measured by benchmarks/bench_memory.py)."""
    from padd.memory import enable_activation_checkpointing
    from padd.models import load_causal_lm

    def saved_bytes(model) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        ids = torch.randint(0, model.config.vocab_size, (4, 96))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False).logits.float().sum()
        return total

    plain = load_causal_lm(routed_student, train=True)
    recomputed = load_causal_lm(routed_student, train=True)
    enable_activation_checkpointing(recomputed)
    kept, everything = saved_bytes(recomputed), saved_bytes(plain)
    assert kept < 0.5 * everything, (kept, everything)
