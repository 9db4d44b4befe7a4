"""`padd warmup`: only experts train, the loss falls, router inits, bad inputs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import padd
from padd.cli import main
from padd.routing import moe_gates


@pytest.fixture(scope="module")
def student(tmp_path_factory, qwen2_teacher, corpus_file):
    out = tmp_path_factory.mktemp("warm") / "student"
    flags = dict(teacher=qwen2_teacher, corpus=corpus_file, experts=4, top_k=2, tokens=1024, seq_len=64)
    assert padd("decompose", out=out, progress=False, **flags) == 0
    return out


def warmup(student, teacher, corpus, out, *extra):
    return main(
        [
            "warmup",
            "--student",
            str(student),
            "--teacher",
            str(teacher),
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--tokens",
            "2048",
            "--seq-len",
            "64",
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--no-progress",
            *map(str, extra),
        ]
    )


def test_only_experts_train_and_the_kl_falls(tmp_path, student, qwen2_teacher, corpus_file):
    out = tmp_path / "warm"
    assert warmup(student, qwen2_teacher, corpus_file, out, "--epochs", "2") == 0
    before = AutoModelForCausalLM.from_pretrained(student)
    after = AutoModelForCausalLM.from_pretrained(out)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {n for n in b if not torch.equal(b[n], a[n])}
    assert changed and all(".experts." in n or ".gate." in n for n in changed)
    assert any(".experts." in n for n in changed)
    log = [json.loads(line) for line in (out / "warmup_log.jsonl").read_text().splitlines()]
    assert len(log) == 16  # 2048 tokens / 64 per window / 4 per batch, two epochs
    first, last = sum(r["kl"] for r in log[:4]) / 4, sum(r["kl"] for r in log[-4:]) / 4
    assert last < first
    assert (out / "padd_stage1.json").exists() and json.loads((out / "padd_warmup.json").read_text())["steps"] == 16
    for gate in moe_gates(after):  # uniform router init: near zero, yet no exact ties
        assert gate.weight.abs().max() < 1e-2 and gate.weight.abs().max() > 0


@pytest.mark.parametrize("init", ["centroid", "distill"])
def test_fitted_router_inits(tmp_path, student, qwen2_teacher, corpus_file, init):
    out = tmp_path / init
    assert warmup(student, qwen2_teacher, corpus_file, out, "--router-init", init, "--router-tokens", "512") == 0
    after = AutoModelForCausalLM.from_pretrained(out)
    assert all(gate.weight.abs().max() > 0.01 for gate in moe_gates(after))
    record = json.loads((out / "padd_warmup.json").read_text())
    assert record["router_init"] == init
    if init == "distill":  # the fitted router predicts the teacher's cluster masses better than a flat one
        assert record["router_fit_kl"] < record["router_fit_kl_flat"]


def test_mismatched_tokenizers_are_refused(tmp_path, student, llama_teacher, corpus_file, capsys):
    from padd.tiny import make_tiny_teacher

    other = make_tiny_teacher(tmp_path / "other", "qwen2", texts=["completely different words here"] * 20)
    assert warmup(student, other, corpus_file, tmp_path / "o") == 2
    assert "tokenizers differ" in capsys.readouterr().err


def test_bf16_warmup_lowers_the_kl(tmp_path, student, qwen2_teacher, corpus_file):
    import json

    assert warmup(student, qwen2_teacher, corpus_file, tmp_path / "bf16", "--precision", "bf16") == 0
    record = json.loads((tmp_path / "bf16" / "padd_warmup.json").read_text())
    assert record["last_kl"] < record["first_kl"] and record["config"]["precision"] == "bf16"


def test_router_fit_is_measured_under_the_routing_phase_b_runs(tmp_path, student, qwen2_teacher, corpus_file):
    """The distill start is fitted layer by layer under the routing of the layers before it, and
    padd_warmup.json reports its fit on the hidden states of the saved student routing with every
    fitted router: recomputed here from the saved checkpoint, the numbers must agree."""
    from transformers import AutoTokenizer

    from padd.corpus import iter_texts, sample_windows
    from padd.routing import RouterRecorder, router_log_scores

    out = tmp_path / "fit"
    assert warmup(student, qwen2_teacher, corpus_file, out, "--router-init", "distill", "--router-tokens", "512") == 0
    record = json.loads((out / "padd_warmup.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    windows = sample_windows(iter_texts(str(corpus_file)), tok, n_tokens=2048, seq_len=64, seed=0)
    probe = windows[: 512 // 64]
    clusters = [torch.tensor(la["experts"]) for la in json.loads((out / "padd_stage1.json").read_text())["layers"]]
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    teacher = AutoModelForCausalLM.from_pretrained(qwen2_teacher).eval()
    masses = []
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: masses.append(a[0].reshape(-1, a[0].shape[-1])))
        for layer in teacher.model.layers
    ]
    with torch.no_grad(), RouterRecorder(saved, keep_inputs=True) as rec:
        teacher(input_ids=probe)
        saved(input_ids=probe)
    for h in hooks:
        h.remove()
    fits = []
    for gate, h, act, experts in zip(moe_gates(saved), rec.inputs, masses, clusters, strict=True):
        q = act.abs()[:, experts].sum(-1)
        q = q / q.sum(-1, keepdim=True)
        p_log = router_log_scores(h @ gate.weight.detach().T)
        fits.append(float((q * (q.log() - p_log)).sum(-1).mean()))
    assert sum(fits) / len(fits) == pytest.approx(record["router_fit_kl"], rel=1e-4)
    assert record["router_fit_kl_per_layer"] == pytest.approx(fits, rel=1e-4)
    assert all(f < record["router_fit_kl_flat"] for f in fits)


def test_epochs_zero_sets_only_the_router_start(tmp_path, student, qwen2_teacher, corpus_file):
    """--epochs 0 keeps every expert as it is and writes the router start alone."""
    out = tmp_path / "restart"
    assert warmup(student, qwen2_teacher, corpus_file, out, "--epochs", "0", "--router-init", "distill") == 0
    before, after = (dict(AutoModelForCausalLM.from_pretrained(d).named_parameters()) for d in (student, out))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".gate." in n for n in changed)
    record = json.loads((out / "padd_warmup.json").read_text())
    assert record["steps"] == 0 and record["router_init"] == "distill"
    assert warmup(student, qwen2_teacher, corpus_file, tmp_path / "bad", "--epochs", "-1") == 2
