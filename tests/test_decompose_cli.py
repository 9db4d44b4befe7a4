"""`padd decompose` end to end on tiny teachers, through the real CLI entry point."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import padd
from padd.cli import main


def run(*argv):
    return main(["decompose", *map(str, argv), "--no-progress"])


def decompose(teacher, corpus, out, **flags):
    return padd("decompose", teacher=teacher, corpus=corpus, out=out, progress=False, **flags)


@pytest.fixture(scope="module")
def cluster_student(tmp_path_factory, qwen2_teacher, corpus_file):
    out = tmp_path_factory.mktemp("students") / "cluster"
    assert decompose(qwen2_teacher, corpus_file, out, experts=4, top_k=2, tokens=2048, seq_len=64, seed=3) == 0
    return out


def test_writes_a_loadable_student_and_its_record(cluster_student, qwen2_teacher):
    student = AutoModelForCausalLM.from_pretrained(cluster_student)
    assert type(student).__name__ == "Glm4MoeForCausalLM"
    assert student.config.num_experts_per_tok == 2 and student.config.n_routed_experts == 4
    tok_s, tok_t = AutoTokenizer.from_pretrained(cluster_student), AutoTokenizer.from_pretrained(qwen2_teacher)
    assert tok_s.get_vocab() == tok_t.get_vocab()
    record = json.loads((cluster_student / "padd_stage1.json").read_text())
    assert record["experts"] == 4 and record["top_k"] == 2 and record["seed"] == 3 and record["init"] == "cluster"
    assert record["teacher"].endswith("teacher") and record["tokens"] == 2048
    assert {"sample", "load", "activations", "cluster", "build", "save"} <= set(record["timings_s"])
    for layer in record["layers"]:
        assert layer["objective"] > 0 and layer["shared"] == []
        assert [len(e) for e in layer["experts"]] == [32] * 4
        assert sorted(n for e in layer["experts"] for n in e) == list(range(128))  # a partition


def test_json_partition_is_what_the_checkpoint_holds(cluster_student, qwen2_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(qwen2_teacher)
    student = AutoModelForCausalLM.from_pretrained(cluster_student)
    record = json.loads((cluster_student / "padd_stage1.json").read_text())
    for t_layer, s_layer, plan in zip(teacher.model.layers, student.model.layers, record["layers"], strict=True):
        for e, neurons in enumerate(plan["experts"]):
            gate = s_layer.mlp.experts.gate_up_proj[e, : len(neurons)]
            assert torch.equal(gate, t_layer.mlp.gate_proj.weight[neurons])


def test_same_seed_same_partition(tmp_path, qwen2_teacher, corpus_file, cluster_student):
    again = tmp_path / "again"
    decompose(qwen2_teacher, corpus_file, again, experts=4, top_k=2, tokens=2048, seq_len=64, seed=3)
    layers = [json.loads((d / "padd_stage1.json").read_text())["layers"] for d in (cluster_student, again)]
    assert [la["experts"] for la in layers[0]] == [la["experts"] for la in layers[1]]


@pytest.mark.parametrize("init", ["random", "copy"])
def test_baseline_inits_through_the_same_path(tmp_path, llama_teacher, corpus_file, init):
    out = tmp_path / init
    assert decompose(llama_teacher, corpus_file, out, experts=4, top_k=1, tokens=512, init=init, shared_neurons=32) == 0
    record = json.loads((out / "padd_stage1.json").read_text())
    sizes = {len(e) for layer in record["layers"] for e in layer["experts"]}
    assert sizes == ({96} if init == "copy" else {24})
    assert all(len(layer["shared"]) == 32 for layer in record["layers"])
    assert record["layers"][0]["objective"] is None


def test_dense_layers_and_expert_size(tmp_path, llama_teacher, corpus_file):
    out = tmp_path / "grown"
    assert (
        decompose(llama_teacher, corpus_file, out, experts=4, top_k=2, tokens=512, dense_layers=1, expert_size=48) == 0
    )
    record = json.loads((out / "padd_stage1.json").read_text())
    assert record["layers"][0]["dense"] is True
    assert {len(e) for e in record["layers"][1]["experts"]} == {48}
    assert AutoModelForCausalLM.from_pretrained(out).config.first_k_dense_replace == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--experts", "5", "--top-k", "1"], "does not divide"),
        (["--experts", "4", "--top-k", "5"], "--top-k must be between 1 and --experts"),
        (["--experts", "8", "--top-k", "1", "--shared-neurons", "8"], "not a multiple of 8"),
        (["--experts", "4", "--top-k", "1", "--dense-layers", "2"], "--dense-layers"),
        (["--top-k", "1"], "missing --experts"),
    ],
)
def test_bad_geometry_fails_at_once(tmp_path, llama_teacher, corpus_file, capsys, extra, message):
    code = run("--teacher", llama_teacher, "--corpus", corpus_file, "--out", tmp_path / "o", *extra)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_teacher_corpus_and_out(tmp_path, llama_teacher, corpus_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    common = ["--experts", 4, "--top-k", 1]
    assert run("--teacher", gpt2, "--corpus", corpus_file, "--out", tmp_path / "o", *common) == 2
    assert "model.layers" in capsys.readouterr().err
    assert run("--teacher", tmp_path / "nowhere", "--corpus", corpus_file, "--out", tmp_path / "o", *common) == 2
    assert "config.json" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert run("--teacher", llama_teacher, "--corpus", empty, "--out", tmp_path / "o", *common) == 2
    assert "no text" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    assert run("--teacher", llama_teacher, "--corpus", corpus_file, "--out", taken, *common) == 2
    assert "--overwrite" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "precious"


def test_console_script_and_module_entry_points(tmp_path):
    for cmd in (["padd"], [sys.executable, "-m", "padd"]):
        exe = cmd if cmd[0] != "padd" else [str(__import__("pathlib").Path(sys.executable).parent / "padd")]
        res = subprocess.run([*exe, "decompose", "--help"], capture_output=True, text=True, check=True)
        assert "--shared-neurons" in res.stdout and "--init" in res.stdout
