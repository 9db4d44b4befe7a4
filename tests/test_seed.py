"""`padd seed` (Stage I for a pretrained MoE student): the layer map, the matching and the router fit
against references, and seed -> warmup -> train on tiny random students, experts untouched."""

import itertools
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from helpers import MOE_COMMON, MOE_CONFIGS, padd, save_moe_student
from padd.stage1.layer_map import cka_matrix, monotone_layer_map, proportional_layer_map
from padd.stage1.seed import cluster_neurons, coactivation, fit_router, match_clusters, topk_agreement


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    g = x @ x.T
    return (g / g.norm()).float().flatten()


def test_linear_cka_equals_the_feature_space_formula_and_its_invariances():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randn(40, 9)
    y = y + x @ torch.randn(6, 9)  # related, not identical
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    reference = (xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    cka = cka_matrix(torch.stack([_gram(x)]), torch.stack([_gram(y)]))
    assert cka.item() == pytest.approx(reference.item(), rel=1e-5)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    same = cka_matrix(torch.stack([_gram(x)]), torch.stack([_gram(3.0 * x @ rotation + 1.0)]))
    assert same.item() == pytest.approx(1.0, abs=1e-5)  # rotation, scale and shift do not change it


def test_the_monotone_layer_map_is_the_best_pinned_path():
    torch.manual_seed(1)
    for n_t, n_s in ((4, 5), (6, 3), (3, 3), (5, 2)):
        sim = torch.rand(n_t, n_s)
        best, best_score = None, -1.0
        for path in itertools.product(range(n_t), repeat=n_s):
            ok = path[0] == 0 and path[-1] == n_t - 1 and all(a <= b for a, b in itertools.pairwise(path))
            score = sum(float(sim[t, s]) for s, t in enumerate(path))
            if ok and score > best_score:
                best, best_score = list(path), score
        assert monotone_layer_map(sim) == best
    assert proportional_layer_map(4, 5) == [0, 1, 2, 2, 3]
    assert proportional_layer_map(28, 48)[::47] == [0, 27]


def test_the_hungarian_matching_finds_the_permutation_and_beats_every_other():
    torch.manual_seed(2)
    perm = torch.randperm(5)
    coact = torch.rand(5, 5) * 0.2
    coact[perm, torch.arange(5)] += 1.0  # expert e co-activates with cluster perm[e]
    assert match_clusters(coact).tolist() == perm.tolist()
    noisy = torch.rand(5, 5)
    found = match_clusters(noisy)
    best = max(itertools.permutations(range(5)), key=lambda p: sum(float(noisy[c, e]) for e, c in enumerate(p)))
    assert found.tolist() == list(best)
    q, p = torch.rand(7, 3), torch.rand(7, 4)
    assert torch.allclose(coactivation(q, p), (q.double()[:, :, None] * p.double()[:, None, :]).sum(0))


def test_clusters_are_equal_and_leave_out_the_least_active_neurons():
    torch.manual_seed(3)
    features = torch.nn.functional.normalize(torch.randn(70, 16), dim=-1)
    active = torch.rand(70)
    clusters = cluster_neurons(features, active, 8, seed=0, iters=10)
    assert clusters.shape == (8, 8)  # 70 // 8 neurons each; 6 left out
    left_out = set(range(70)) - set(clusters.flatten().tolist())
    assert left_out == set(torch.argsort(active)[:6].tolist())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_the_router_fit_trades_the_cluster_fit_against_the_pretrained_weights(model_type):
    name, moe = MOE_CONFIGS[model_type]
    config = getattr(transformers, name)(**{**MOE_COMMON, **moe})
    torch.manual_seed(4)
    w0, h = torch.randn(8, 32) * 0.1, torch.randn(256, 32)
    q = torch.softmax(h @ torch.randn(32, 8), dim=-1)
    kept, info = fit_router(config, w0, h, q, strength=0.0)
    assert torch.equal(kept, w0) and info["relative_change"] == 0.0
    changes, kls = [], []
    for strength in (0.1, 1.0, 10.0):
        _, info = fit_router(config, w0, h, q, strength=strength)
        changes.append(info["relative_change"])
        kls.append(info["kl_after"])
        assert info["kl_after"] < info["kl_before"]
    assert changes == sorted(changes) and kls == sorted(kls, reverse=True)


def test_topk_agreement_counts_shared_experts():
    a = torch.tensor([[[0, 1], [2, 3]]])
    b = torch.tensor([[[1, 0], [2, 4]]])
    assert topk_agreement(a, a) == 1.0 and topk_agreement(a, b) == 0.75


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_seed_warmup_train_on_a_pretrained_student(model_type, tmp_path, llama_teacher):
    """padd seed -> padd warmup -> padd train: padd_seed.json holds the map, the matchings and the
    before/after measurements; seeding moves only routers; the warm-up trains the experts behind the
    frozen seeded router and keeps it; Phase B runs from there."""
    student = save_moe_student(tmp_path / "pretrained", model_type, llama_teacher)
    seeded, warm, run = tmp_path / "seeded", tmp_path / "warm", tmp_path / "run"
    common = dict(teacher=llama_teacher, progress=False)
    budget = dict(tokens=1024, heldout_tokens=512, cka_tokens=256, seq_len=32, fit_steps=50)
    assert padd("seed", student=student, corpus="world", out=seeded, **budget, **common) == 0

    record = json.loads((seeded / "padd_seed.json").read_text())
    n_layers = transformers.AutoConfig.from_pretrained(student).num_hidden_layers
    assert len(record["layer_map"]) == n_layers and record["layer_map"][0] == 0 and record["layer_map"][-1] == 1
    assert len(record["cka"]) == 2 and len(record["cka"][0]) == n_layers
    for key in ("nmi", "esi"):
        assert 0.0 <= record[key]["before"] <= 1.0 and 0.0 <= record[key]["after"] <= 1.0
    assert record["lm_loss"]["before"] > 0 and record["lm_loss"]["relative_rise"] < 0.02  # at the default strength
    assert 0.0 < record["topk_agreement_with_pretrained"] <= 1.0
    assert 0.0 < record["next_token_agreement"] <= 1.0
    for layer in record["layers"]:
        assert sorted(layer["cluster_of_expert"]) == list(range(8))  # one-to-one
        assert layer["kl_after"] <= layer["kl_before"] and layer["relative_change"] > 0
        assert len({n for e in layer["experts"] for n in e}) == 8 * len(layer["experts"][0])

    before, after = load_file(student / "model.safetensors"), load_file(seeded / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("gate.weight") for k in moved), moved  # routers only: experts untouched

    assert padd("warmup", student=seeded, corpus="world", out=warm, tokens=512, seq_len=32, **common) == 0
    warmed = load_file(warm / "model.safetensors")
    w_record = json.loads((warm / "padd_warmup.json").read_text())
    assert w_record["warmup_routing"] == "frozen" and w_record["router_init"] == "keep"
    assert all(torch.equal(warmed[k], after[k]) for k in moved)  # the seeded router, frozen and kept
    assert any(not torch.equal(warmed[k], after[k]) for k in after if ".experts." in k)
    assert (warm / "padd_seed.json").exists()

    flags = dict(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, world_per_skill=10)
    assert padd("train", student=warm, data="world:add", out=run, **flags, **common) == 0
    assert (run / "student" / "config.json").exists()


def test_seed_refuses_a_decomposed_student_and_a_negative_strength(tmp_path, llama_teacher, llama_student, capsys):
    assert padd("seed", student=llama_student, teacher=llama_teacher, corpus="world", out=tmp_path / "x") == 2
    assert "padd decompose" in capsys.readouterr().err
    student = save_moe_student(tmp_path / "s", "qwen3_moe", llama_teacher)
    flags = dict(student=student, teacher=llama_teacher, corpus="world", out=tmp_path / "y", seed_strength=-1)
    assert padd("seed", **flags) == 2
    assert "--seed-strength" in capsys.readouterr().err


def test_an_option_the_chosen_layer_map_does_not_use_is_refused():
    from padd.config import ConfigError, SeedConfig

    base = dict(teacher="t", student="s", corpus="c", out="o")
    assert SeedConfig(**base).cka_tokens == 1024
    with pytest.raises(ConfigError, match="--cka-tokens"):
        SeedConfig(**base, layer_map="proportional", cka_tokens=512)
