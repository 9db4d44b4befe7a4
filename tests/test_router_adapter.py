"""The router adapter reproduces every supported architecture's stock router exactly (same experts,
weights within 1e-6), on tiny random instances built with transformers, read through forward hooks."""

import pytest
import torch
import transformers

from helpers import MOE_COMMON as COMMON
from helpers import MOE_CONFIGS as CONFIGS
from padd.errors import UserError
from padd.router_adapter import ROUTERS, log_scores, moe_layer_indices, route, router_kind, routers


def tiny_model(model_type: str):
    name, moe = CONFIGS[model_type]
    config = getattr(transformers, name)(**{**COMMON, **moe})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for gate in routers(model):  # routers start at zero in several classes: give them real scores
        torch.nn.init.normal_(gate.weight, std=0.5)
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape) * 0.05)
    return model


def _sorted(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selections as sets: indices sorted per token, weights permuted alike (some routers leave the
    top-K unsorted)."""
    order = indices.argsort(-1)
    return weights.gather(-1, order), indices.gather(-1, order)


def test_every_listed_architecture_is_in_the_table():
    assert set(CONFIGS) == set(ROUTERS)


@pytest.mark.parametrize("model_type", sorted(ROUTERS))
def test_the_adapter_reproduces_the_stock_router(model_type):
    model = tiny_model(model_type)
    seen = []
    handles = [g.register_forward_hook(lambda m, i, out: seen.append(out)) for g in routers(model)]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (3, 11)))
    for h in handles:
        h.remove()
    config = model.config
    assert len(seen) == len(moe_layer_indices(config)) >= 2
    for gate, (logits, weights, indices) in zip(routers(model), seen, strict=True):
        bias = getattr(gate, "e_score_correction_bias", None)
        ours_w, ours_i = route(config, logits, bias=bias)
        stock_w, stock_i = _sorted(weights.float(), indices)
        ours_w, ours_i = _sorted(ours_w, ours_i)
        assert torch.equal(ours_i, stock_i), model_type
        assert torch.allclose(ours_w, stock_w, atol=1e-6), (model_type, (ours_w - stock_w).abs().max())
        # a replayed selection gets the weights the router gives it
        replay_w, _ = route(config, logits, bias=bias, indices=indices)
        assert torch.allclose(replay_w, weights.float(), atol=1e-6)
        # log scores are normalised log-probabilities over all experts
        assert torch.allclose(log_scores(config, logits).exp().sum(-1), torch.ones(len(logits)), atol=1e-5)


def test_a_selection_bias_changes_the_selection_not_the_weights_of_the_selected():
    config = tiny_model("qwen3_moe").config
    logits = torch.randn(50, 8)
    big = torch.zeros(8)
    big[5] = 10.0
    weights, indices = route(config, logits, bias=big)
    assert (indices == 5).any(-1).all()  # expert 5 is always chosen
    plain, _ = route(config, logits, indices=indices)
    assert torch.allclose(weights, plain)


def test_an_unsupported_model_type_lists_the_supported_ones():
    config = transformers.LlamaConfig(**COMMON)
    with pytest.raises(UserError, match="supports deepseek_v2, deepseek_v3, glm4_moe, gpt_oss"):
        router_kind(config)


@pytest.mark.parametrize("model_type", sorted(ROUTERS))
def test_the_routing_hooks_work_on_every_architecture(model_type):
    """Through the adapter, padd's router hooks act on any supported student: replaying the model's
    own selection reproduces its logits, Γ against its own router weights is exactly 0, and uniform
    random routing sends every token to K experts."""
    from padd.routing import RouterRecorder, RoutingReplay, TokenGammaMeter, UniformRandomRouting, router_weights

    model = tiny_model(model_type)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), RouterRecorder(model, keep_logits=False) as rec:
        logits = model(input_ids=ids).logits
    topk = rec.selections(tuple(ids.shape))  # [L, B, T, K]
    with torch.no_grad(), RoutingReplay(model, topk, count_mask=torch.ones_like(ids)) as replay:
        replayed = model(input_ids=ids).logits
    assert replay.differ == 0 and torch.allclose(replayed, logits, atol=1e-5)
    n_prompt = 4
    old_topk = topk[:, :, n_prompt - 1 : ids.shape[1] - 1]
    n_completion = ids.shape[1] - n_prompt
    with torch.no_grad(), TokenGammaMeter(model, router_weights(model), old_topk, n_prompt, n_completion) as meter:
        model(input_ids=ids)
    assert float(meter.token_gamma().abs().max()) == 0.0
    uniform = UniformRandomRouting(model).draw(ids.numel())
    with torch.no_grad(), uniform.rows(), RouterRecorder(model, keep_logits=False) as rec:
        model(input_ids=ids)
    chosen = rec.selections(tuple(ids.shape))
    assert chosen.shape[-1] == model.config.num_experts_per_tok
    assert all(len(set(row.tolist())) == chosen.shape[-1] for row in chosen.reshape(-1, chosen.shape[-1]))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_recorded_router_distributions_and_the_distill_fit_use_the_architectures_scoring(model_type):
    """The recorder's log-probabilities and the warm-up's distill fit read each router as its model
    does: softmax for Qwen3-MoE (they once used normalised sigmoids for every architecture)."""
    from padd.routing import RouterRecorder
    from padd.stage1.warmup import _router_fit_kl

    model = tiny_model(model_type)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), RouterRecorder(model) as rec:
        model(input_ids=ids)
    logp, _ = rec.stacked(tuple(ids.shape))
    assert torch.allclose(logp[0].reshape(-1, logp.shape[-1]), log_scores(model.config, rec.logits[0]))
    if model_type == "qwen3_moe":
        assert torch.allclose(logp[0].exp().reshape(-1, logp.shape[-1]), torch.softmax(rec.logits[0], -1), atol=1e-6)
    h, weight = torch.randn(6, 32), torch.randn(8, 32)
    q = torch.softmax(h @ weight.T, dim=-1)  # exactly what a softmax router with `weight` gives
    kl = float(_router_fit_kl(model.config, h, q, weight))
    assert (kl < 1e-6) == (model_type == "qwen3_moe")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "glm4_moe"])
def test_a_selection_bias_on_every_architecture(model_type, tmp_path):
    """Stage IV's bias is the router's own where it has one, else a buffer padd adds: at zero it
    changes nothing, a large entry sends every token to that expert, the balancer moves it, and the
    saved student is still the stock class with no trace of it."""
    from padd.phase_b.balance import BiasBalancer
    from padd.routing import RouterRecorder, selection_biases

    model = tiny_model(model_type)
    for gate in routers(model):
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.zero_()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    biases = selection_biases(model)
    assert len(biases) == len(moe_layer_indices(model.config))
    assert selection_biases(model)[0] is biases[0]  # attached once
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # a zero bias changes nothing
    biases[0][5] = 100.0
    with torch.no_grad(), RouterRecorder(model, keep_logits=False) as rec:
        model(input_ids=ids)
    assert (rec.topk[0] == 5).any(-1).all()
    balancer = BiasBalancer(model, eta=0.1, reward_coef=0.0, clip=1000.0)
    topk = rec.selections(tuple(ids.shape))
    balancer.step(topk, torch.zeros(2), torch.ones(2, 7))
    assert float(biases[0][5]) < 100.0  # the overloaded expert is pushed down
    model.save_pretrained(tmp_path / "s")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert type(again) is type(model) and not any("padd" in k for k in again.state_dict())


def test_a_selection_bias_is_saved_beside_the_checkpoint_and_applied_on_load(tmp_path):
    """Without a native bias, the bias is written to padd_routing_bias.safetensors; load_causal_lm (every
    stage's loader: eval, resume, the study) applies it, while the stock class loads without it."""
    from padd.models import load_causal_lm
    from padd.routing import BIAS_FILE, save_selection_bias, selection_biases

    model = tiny_model("mixtral")
    biases = selection_biases(model)
    for bias in biases:
        bias.copy_(torch.randn(bias.shape))
    model.save_pretrained(tmp_path / "s")
    assert save_selection_bias(model, tmp_path / "s") and (tmp_path / "s" / BIAS_FILE).is_file()
    again = load_causal_lm(tmp_path / "s")
    assert all(torch.equal(a, b) for a, b in zip(selection_biases(again), biases, strict=True))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert not any(hasattr(g, "padd_selection_bias") for g in routers(stock))
    assert not save_selection_bias(tiny_model("qwen3_moe"), tmp_path)  # nothing added, nothing written


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_warmup_and_every_method_train_on_the_architecture(model_type, tmp_path, llama_teacher, capsys):
    """A tiny random student of the architecture, with the teacher's tokenizer: `padd warmup` and
    2 rollout batches of `padd train` for every method run, the trained student loads as its own
    stock class, says what a server ignoring its bias file would lose, and `padd eval` runs on it."""
    from padd.cli import main
    from padd.methods import METHODS

    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_teacher)
    name, moe = CONFIGS[model_type]
    vocab = transformers.AutoConfig.from_pretrained(llama_teacher).vocab_size
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, name)(**{**COMMON, **moe, "vocab_size": vocab, **special})
    student = transformers.AutoModelForCausalLM.from_config(config)
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    warm = tmp_path / "warm"
    flags = ["--teacher", str(llama_teacher), "--no-progress"]
    assert (
        main(
            ["warmup", "--student", str(tmp_path / "student"), "--corpus", "world", "--out", str(warm)]
            + ["--tokens", "256", "--seq-len", "32", *flags]
        )
        == 0
    )
    for method in METHODS:
        run = tmp_path / method
        assert (
            main(
                ["train", "--student", str(warm), "--data", "world:add", "--world-per-skill", "10", "--out", str(run)]
                + ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6"]
                + ["--method", method, *flags]
            )
            == 0
        ), method
        trained = transformers.AutoModelForCausalLM.from_pretrained(run / "student")
        assert type(trained) is type(student)
        said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
        assert ("top-K agreement" in said) == (not ROUTERS[model_type].native_bias), said
    assert (
        main(
            ["eval", "--model", str(tmp_path / "padd" / "student"), "--bench", "world:add"]
            + ["--world-per-skill", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "e.json"), "--no-progress"]
        )
        == 0
    )


def test_train_with_a_student_whose_tokenizer_extends_the_teachers(tmp_path, llama_teacher):
    """The Qwen2.5 -> Qwen3 case in miniature: the student's tokenizer adds four tokens after the
    teacher's; padd train (PADD, with KD over the shared ids) runs."""
    from padd.cli import main
    from test_vocab import qwen3_like

    student_tok = qwen3_like(transformers.AutoTokenizer.from_pretrained(llama_teacher))
    name, moe = CONFIGS["qwen3_moe"]
    special = {"eos_token_id": student_tok.eos_token_id, "pad_token_id": student_tok.pad_token_id}
    config = getattr(transformers, name)(**{**COMMON, **moe, "vocab_size": len(student_tok), **special})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "student")
    student_tok.save_pretrained(tmp_path / "student")
    assert (
        main(
            ["train", "--student", str(tmp_path / "student"), "--teacher", str(llama_teacher)]
            + ["--data", "world:add", "--world-per-skill", "10", "--out", str(tmp_path / "run"), "--steps", "2"]
            + ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--no-progress"]
        )
        == 0
    )


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_flops_of_every_standard_attention_architecture_match_the_counter(model_type):
    """Analytic per-token FLOPs (router, K active experts, shared experts) equal torch's flop counter
    on the architecture's own forward, with per-expert matmuls the counter sees."""
    from padd.flops import forward_flops_per_token
    from test_flops import counted_flops_per_token

    model = tiny_model(model_type)
    model.set_experts_implementation("eager")
    assert forward_flops_per_token(model.config, 16) == pytest.approx(counted_flops_per_token(model, 16), rel=1e-6)
