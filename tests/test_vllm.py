"""The vLLM rollout backend: the weight and routing conversions on CPU; the engine where a GPU is."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from padd.cli import main
from padd.generation.vllm import checkpoint_weights, engine_routing
from padd.routing import moe_gates, moe_layer_indices
from test_routing import tiny_student

needs_vllm_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("vllm")),
    reason="needs a CUDA GPU and vLLM (pip install 'padd[vllm]')",
)


def test_checkpoint_weights_are_what_save_pretrained_writes(tmp_path, llama_teacher):
    """vLLM's load_weights reads checkpoint names and layouts; the sync must send exactly those."""
    student = tiny_student(llama_teacher)
    with torch.no_grad():
        for gate in moe_gates(student):
            gate.e_score_correction_bias.uniform_(-0.1, 0.1)  # stage IV's bias travels too
    student.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    sent = dict(checkpoint_weights(student))
    assert sent.keys() == saved.keys()
    assert any(".experts.0.gate_proj." in k for k in sent)  # per-expert, not the fused in-memory tensors
    for name, tensor in saved.items():
        torch.testing.assert_close(sent[name], tensor, rtol=0, atol=0, msg=name)


def test_engine_routing_lines_up_with_left_padded_prompts():
    # two sequences, prompt widths 3 and 1 (P = 3), completions of 2 and 3 tokens (C = 3), L = 2, K = 1
    first = np.arange(4, dtype=np.uint8).reshape(4, 1, 1).repeat(2, 1)  # p + c - 1 = 4 rows, uint8 as vLLM's
    second = (10 + np.arange(3, dtype=np.uint8)).reshape(3, 1, 1).repeat(2, 1)
    out = engine_routing([first, second], [3, 1], [2, 3], prompt_width=3, width=6, moe_layers=[0, 1])
    assert out.shape == (2, 2, 6, 1) and out.dtype == torch.int16
    assert out[0, 0, :, 0].tolist() == [0, 1, 2, 3, -1, -1]  # last completion token never fed back
    assert out[1, 1, :, 0].tolist() == [-1, -1, 10, 11, 12, -1]  # two pad slots, then the sequence


def test_engine_routing_keeps_the_moe_layers_of_per_decoder_layer_arrays():
    arr = np.stack([np.full((2, 1), layer, dtype=np.uint8) for layer in range(3)], axis=1)  # [2, 3 layers, 1]
    out = engine_routing([arr], [2], [1], prompt_width=2, width=3, moe_layers=[1, 2])
    assert out[:, 0, :2, 0].tolist() == [[1, 1], [2, 2]]
    assert engine_routing([arr, None], [2, 2], [1, 1], 2, 3, [1, 2]) is None


def test_moe_layer_indices_cover_every_layer_of_a_stage1_student(llama_teacher):
    student = tiny_student(llama_teacher)
    assert moe_layer_indices(student) == list(range(student.config.num_hidden_layers))


def test_vllm_rollouts_on_cpu_say_what_to_do(tmp_path, llama_teacher, capsys):
    code = main(
        ["train", "--student", str(llama_teacher), "--teacher", str(llama_teacher), "--data", "world:add"]
        + ["--out", str(tmp_path / "run"), "--rollout", "vllm", "--no-progress"]
    )
    assert code != 0 and "add --device cuda" in capsys.readouterr().err


# -- on a GPU with vLLM installed ----------------------------------------------------------------


@needs_vllm_gpu
def test_vllm_matches_generate_and_follows_weight_sync(llama_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from padd.generation.rollout import TransformersRollout
    from padd.generation.vllm import VLLMRollout
    from padd.routing import RoutingReplay

    tok = AutoTokenizer.from_pretrained(llama_student)
    model = AutoModelForCausalLM.from_pretrained(llama_student, dtype=torch.float32).cuda().eval()
    engine = VLLMRollout(str(llama_student), tok, model, dtype="float32", gpu_memory_utilization=0.2, seed=0)
    prompts = ["1 + 2 =", "34 + 5 =", "7 + 80 ="]
    ours = engine.sample(prompts, 2, temperature=0.0, max_new_tokens=8)
    ref = TransformersRollout(model, tok).sample(prompts, 2, temperature=0.0, max_new_tokens=8)
    assert ours.completion_ids.shape[0] == 6 and torch.equal(ours.prompt_ids, ref.prompt_ids)
    same = [
        torch.equal(a[:4], b[:4]) for a, b in zip(ours.completion_ids, ref.completion_ids[:, :4].cpu(), strict=True)
    ]
    assert sum(same) >= 5, "greedy vLLM and transformers disagree beyond float noise"

    # the engine's expert selection is the trainer's own up to ties
    mask = ours.attention_mask.cuda()
    with torch.no_grad(), RoutingReplay(model, ours.routed_experts, count_mask=mask, replay=False) as check:
        model(input_ids=ours.input_ids.cuda(), attention_mask=mask)
    assert check.counted > 0 and check.differ / check.counted < 0.05

    # zero logits everywhere: greedy picks token 0, which only an engine holding the new weights does
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.embed_tokens.weight.zero_()
    engine.sync_weights(model)
    after = engine.sample(prompts, 1, temperature=0.0, max_new_tokens=4)
    assert (after.completion_ids == 0).all()


@needs_vllm_gpu
def test_train_with_vllm_rollouts_and_routing_replay(tmp_path, llama_student, llama_teacher):
    run = tmp_path / "run"
    args = ["--data", "world:add", "--world-per-skill", "20", "--prompts-per-step", "2", "--group-size", "2"]
    args += ["--max-new-tokens", "6", "--steps", "2", "--device", "cuda", "--no-progress"]
    args += ["--rollout", "vllm", "--vllm-gpu-memory", "0.2", "--routing-replay"]
    models = ["--student", str(llama_student), "--teacher", str(llama_teacher)]
    assert main(["train", *models, "--out", str(run), *args]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["routing_mismatch"] <= 1.0 and r["loss"] == r["loss"] for r in log)
