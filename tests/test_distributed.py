"""`padd train` under torchrun: 2 CPU processes (gloo) against one process on the same global batch.

Decoding is greedy so both runs see the same completions, and one update per rollout batch makes
the mini-batch the whole global batch in both. The loss is a token mean over the global batch in
both runs, so the gradients agree up to float32 summation order (~1e-6 relative; the weights differ
by ~1e-7 after two steps here). AdamW divides by sqrt(v) + 1e-8, so on weights whose gradient is
near zero such rounding can be amplified; 1e-5 on the weights (1% of one lr-sized step) and 1e-4
relative on the logged losses leave room for that and still catch any real mismatch (a wrong loss
scaling or an un-reduced bias moves them by whole steps).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import save_moe_student

LR = 1e-3


@pytest.fixture(scope="module")
def student(llama_student):
    return llama_student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(student, teacher, out) -> list[str]:
    flags = dict(
        student=student,
        teacher=teacher,
        out=out,
        data="world:add+sub",
        world_per_skill=20,
        method="padd",
        steps=2,
        prompts_per_step=4,
        group_size=2,
        updates_per_batch=1,
        gamma_anchor="previous",  # one update per batch: Γ against the rollout router would be 0
        temperature=0,
        max_new_tokens=6,
        lr=LR,
        eta=0.01,
    )
    return ["train", *(x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))), "--no-progress"]


def _torchrun(args: list[str], launcher: str = "torchrun") -> None:
    """`padd ARGS` in 2 processes, started by torchrun or by `accelerate launch` (which sets the same
    environment; --multi_gpu is its multi-process mode, gloo here since there is no GPU)."""
    if launcher == "accelerate":
        start = ["accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1"]
        start += ["--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]
    else:
        start = ["torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        start += [f"--master_port={_free_port()}"]
    cmd = [sys.executable, "-m", *start, "-m", "padd", *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# the memory options under both modes: each rank's mini-batch of 4 completions in micro-batches
MEMORY = {
    "none": [],
    "micro": ["--micro-batch-size", "1"],
    "micro-ckpt-offload": ["--micro-batch-size", "2", "--activation-checkpointing", "--offload"],
}


@pytest.mark.parametrize(
    ("parallel", "resumed", "launcher", "memory"),
    [
        ("ddp", False, "torchrun", "none"),
        ("fsdp", False, "accelerate", "none"),
        ("fsdp", True, "torchrun", "none"),
        ("ddp", False, "torchrun", "micro"),
        ("fsdp", False, "torchrun", "micro-ckpt-offload"),
    ],
)
def test_two_processes_match_one_process(tmp_path, student, llama_teacher, parallel, resumed, launcher, memory):
    """FSDP2 shards weights, gradients and AdamW state but computes the same update as DDP: the
    same tolerances hold, and its checkpoint (gathered to whole tensors) loads like any other.
    Resumed: one batch, then the second from the checkpoint, whose AdamW moments were gathered
    from the shards and are scattered back; step 2 depends on them. With micro-batches (DDP syncing
    only the last one's gradients, FSDP2 reduce-scattering each), activation checkpointing and FSDP2's
    CPU offload, still the one-process update on the whole batch."""
    from padd.cli import main

    assert main(_args(student, llama_teacher, tmp_path / "one")) == 0
    two = [*_args(student, llama_teacher, tmp_path / "two"), "--parallel", parallel, *MEMORY[memory]]
    if resumed:
        _torchrun([*two, "--steps", "1"])
        # one process cannot take the sharded optimizer state: refused with what to do, nothing lost
        assert main([*two, "--resume", "--steps", "2"]) == 2
        assert [json.loads(x)["batch"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] == [1]
        _torchrun([*two, "--resume"])
    else:
        _torchrun(two, launcher)

    one, two = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")
    )
    assert len(one) == len(two) == 2
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["processes"] == 2
    for a, b in zip(one, two, strict=True):
        assert a["completion_tokens"] == b["completion_tokens"] and a["reward_mean"] == b["reward_mean"]
        for key in ("loss", "loss_kd", "kd_kl", "gamma_token_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
        for key in ("bias_min", "bias_max"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
    w1 = load_file(tmp_path / "one" / "student" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "student" / "model.safetensors")
    assert w1.keys() == w2.keys()
    moved = 0
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
        moved += int(not torch.equal(w1[name], load_file(student / "model.safetensors")[name]))
    assert moved > 0  # the runs trained something


def test_warmup_runs_data_parallel(tmp_path, student, llama_teacher, corpus_file):
    """Each rank warms up on half the windows (the random routing differs per rank by design, so the
    result is checked for soundness, not against one process): half the steps, a falling KL, only
    the experts trained. FSDP2 draws the same routing as DDP and must reach the same weights, here
    with micro-batches, activation checkpointing and CPU offload on."""
    flags = dict(student=student, teacher=llama_teacher, corpus=corpus_file, tokens=2048, seq_len=64, batch_size=4)
    args = ["warmup", *(x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))), "--no-progress"]
    start = load_file(student / "model.safetensors")
    weights = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        memory = ["--micro-batch-size", "2", "--activation-checkpointing", "--offload"] if parallel == "fsdp" else []
        _torchrun([*args, "--out", str(out), "--lr", "3e-3", "--parallel", parallel, *memory])
        record = json.loads((out / "padd_warmup.json").read_text())
        assert record["processes"] == 2 and record["steps"] == 32 // 2 // 4
        assert record["last_kl"] < record["first_kl"]
        weights[parallel] = load_file(out / "model.safetensors")
        for name, w in weights[parallel].items():
            if ".experts." in name and w.numel():
                assert not torch.equal(w, start[name]), name
            elif ".mlp.gate." not in name:  # the router is initialised after the warm-up
                assert torch.equal(w, start[name]), name
    for name, w in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][name], w, rtol=0, atol=1e-5, msg=name)


def test_stage1_shards_layers_across_ranks(tmp_path, llama_teacher, corpus_file):
    """Two ranks split the activation pass by batch and the clustering by layer; the statistics are
    sums of the same per-batch terms (projection rows drawn per global batch), so the partitions
    and hence the student's weights equal a single process's."""
    from padd.cli import main

    # 5 batches of 2 windows: the ranks get 3 and 2, so an uneven split is covered.
    flags = dict(teacher=llama_teacher, corpus=corpus_file, experts=4, top_k=2, tokens=640, seq_len=64, batch_size=2)
    args = ["decompose", *(x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / d / "padd_stage1.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["layers"]) > 1  # both ranks own a layer
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert a["experts"] == b["experts"]
        assert b["objective"] == pytest.approx(a["objective"], rel=1e-5)
    w1, w2 = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def _compare_sharded_load(rank: int, port: int, checkpoints: list[tuple[str, torch.dtype]]) -> None:
    """One rank of `test_sharded_load_equals_from_pretrained` (started by torch.multiprocessing)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from padd.distributed import setup, unsharded_copy, whole_state_dict
    from padd.models import load_causal_lm

    setup("cpu")
    for path, dtype in checkpoints:
        whole = load_causal_lm(path, dtype=dtype)
        sharded = load_causal_lm(path, dtype=dtype, sharded=True)
        for name, p in sharded.named_parameters():  # each rank holds its rows only
            if p.numel():
                assert isinstance(p, DTensor) and p.to_local().shape[0] == -(-p.shape[0] // 2) - rank * (
                    p.shape[0] % 2
                ), name
        expected, got = whole.state_dict(), whole_state_dict(sharded)
        assert got.keys() == expected.keys(), (path, set(got) ^ set(expected))
        for name, w in expected.items():
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), (path, dtype, name)
        buffers = dict(whole.named_buffers())  # non-persistent ones (rotary inv_freq) re-created
        for name, b in sharded.named_buffers():
            assert torch.equal(b, buffers[name]), (path, name)
        assert sharded.generation_config.to_dict() == whole.generation_config.to_dict()
        assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == whole.config.tie_word_embeddings
        ids = torch.arange(12).reshape(2, 6) % whole.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(sharded(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=0)
        copy = unsharded_copy(sharded)  # padd warmup's copy for its router start: rank 0 only
        if rank:
            assert copy is None
            continue
        for name, t in [*copy.state_dict().items(), *copy.named_buffers()]:
            assert torch.equal(t, buffers.get(name, expected.get(name))), (path, name)
        with torch.no_grad():
            torch.testing.assert_close(copy(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=0)


def test_sharded_load_equals_from_pretrained(tmp_path, student, llama_teacher):
    """Built on the meta device, sharded, then filled rank by rank from the safetensors files
    (transformers' key renaming and expert fusing included): the whole model gathered back equals
    `from_pretrained`'s bit for bit, buffers and tied embeddings too, for a decomposed GLM-4-MoE
    student (empty shared expert), Qwen3-MoE with tied embeddings, Mixtral with 5 experts (split 3 + 2)
    and the dense Llama teacher in float32 and bfloat16."""
    import torch.multiprocessing as mp

    qwen = save_moe_student(tmp_path / "qwen3", "qwen3_moe", llama_teacher, tie_word_embeddings=True)
    mixtral = save_moe_student(tmp_path / "mixtral", "mixtral", llama_teacher, num_local_experts=5)
    checkpoints = [(str(student), torch.float32), (str(qwen), torch.float32), (str(mixtral), torch.float32)]
    checkpoints += [(str(llama_teacher), torch.float32), (str(llama_teacher), torch.bfloat16)]
    mp.spawn(_compare_sharded_load, args=(_free_port(), checkpoints), nprocs=2)


def test_sharded_load_needs_safetensors(tmp_path, monkeypatch, capsys, student, llama_teacher):
    """A checkpoint with only a pytorch_model.bin, under --parallel fsdp on two processes: one line
    naming the flag and saying what to do, before any process group or model; the loader itself
    (reached by a hub name or a resume) says the same."""
    import shutil

    from padd.cli import main
    from padd.errors import UserError
    from padd.models import load_sharded_causal_lm

    legacy = tmp_path / "bin_teacher"
    shutil.copytree(llama_teacher, legacy)
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _args(student, legacy, tmp_path / "out")
    assert main([*args, "--parallel", "fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--teacher {legacy}: no model.safetensors" in err and "--parallel ddp" in err
    with pytest.raises(UserError, match="re-save the checkpoint"):
        load_sharded_causal_lm(legacy)


@pytest.mark.slow
def test_sharded_load_peak_memory_is_half_the_model(tmp_path, monkeypatch):
    """benchmarks/bench_sharded_load.py at its default size (a 1.4 GB float32 GLM-4-MoE, 2 processes):
    the sharded load peaks within 0.6 x the model over the runtime per process, the whole load it
    replaced at the whole model or more. Slow (about 2 min, 5 GB of RAM): `pytest -m slow`."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_sharded_load as bench

    size = bench.write_model(tmp_path, layers=3, hidden=1536, experts=32, moe_intermediate=512, vocab=32000)
    assert size > 1e9
    extra = bench.over_runtime(bench.measure(tmp_path))
    for (path, rank), over in extra.items():
        if path == "sharded":
            assert over <= bench.TARGET * size, (rank, over / size)
        else:
            assert over >= size, (rank, over / size)
