import torch
from transformers import AutoModelForCausalLM

from padd.routing import RouterRecorder, RoutingReplay, expert_load, moe_gates, router_log_scores, router_weights
from padd.stage1.build import build_student
from padd.stage1.partition import plan_layer


def tiny_student(teacher_dir, n_experts=4, top_k=2):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    plans = [
        plan_layer(
            None, None, d_ff=128, n_experts=n_experts, expert_size=128 // n_experts, shared=0, init="random", seed=i
        )
        for i in range(teacher.config.num_hidden_layers)
    ]
    student = build_student(teacher, plans, top_k=top_k)
    with torch.no_grad():
        for gate in moe_gates(student):
            gate.weight.normal_(0, 0.5)  # a non-trivial router
    return student


def test_recorder_captures_each_layer_once_per_forward(llama_teacher):
    student = tiny_student(llama_teacher)
    ids = torch.randint(0, 100, (3, 5))
    with torch.no_grad(), RouterRecorder(student) as rec:
        student(ids)
        logp, topk = rec.stacked((3, 5))
    assert logp.shape == (2, 3, 5, 4) and topk.shape == (2, 3, 5, 2)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 3, 5))
    # the recorded top-K is what the gate selects from its own scores (zero selection bias here)
    assert torch.equal(logp.topk(2, -1).indices.sort(-1).values, topk.sort(-1).values)
    student(ids)  # outside the context nothing is recorded
    assert len(rec.logits) == 2


def test_recorder_can_keep_the_graph(llama_teacher):
    student = tiny_student(llama_teacher)
    with RouterRecorder(student, keep_grad=True) as rec:
        student(torch.randint(0, 100, (2, 4)))
    rec.logits[0].sum().backward()
    assert moe_gates(student)[0].weight.grad is not None


def test_log_scores_under_own_weights_reproduce_the_recording(llama_teacher):
    student = tiny_student(llama_teacher)
    with torch.no_grad(), RouterRecorder(student, keep_inputs=True) as rec:
        student(torch.randint(0, 100, (2, 6)))
        logp, _ = rec.stacked((2, 6))
        same = rec.log_scores_under(router_weights(student), (2, 6))
        zero = rec.log_scores_under([torch.zeros_like(w) for w in router_weights(student)], (2, 6))
    torch.testing.assert_close(same, logp)
    torch.testing.assert_close(zero, torch.full_like(zero, -torch.log(torch.tensor(4.0)).item()))


def test_router_log_scores_normalise_sigmoids():
    z = torch.tensor([[0.0, 1.0, -1.0]])
    s = torch.sigmoid(z)
    assert torch.allclose(router_log_scores(z).exp(), s / s.sum())


def test_expert_load_counts_slots_with_weights():
    topk = torch.tensor([[[0, 1], [1, 2]], [[3, 3], [0, 1]]])  # [L=2, N=2, K=2]
    assert expert_load(topk, 4).tolist() == [[1, 2, 1, 0], [1, 1, 0, 2]]
    weighted = expert_load(topk, 4, weights=torch.tensor([1.0, 0.0]))
    assert weighted.tolist() == [[1, 1, 0, 0], [0, 0, 0, 2]]


def test_router_weights_are_detached_copies(llama_teacher):
    student = tiny_student(llama_teacher)
    before = router_weights(student)
    with torch.no_grad():
        moe_gates(student)[0].weight.add_(1.0)
    assert not torch.equal(before[0], moe_gates(student)[0].weight)


def _own_selection(student, ids):
    with torch.no_grad(), RouterRecorder(student) as rec:
        logits = student(ids).logits
        _, topk = rec.stacked(tuple(ids.shape))
    return logits, topk


def test_replaying_the_own_selection_changes_nothing(llama_teacher):
    student = tiny_student(llama_teacher)
    ids = torch.randint(0, 100, (3, 5))
    plain, own = _own_selection(student, ids)
    with torch.no_grad(), RoutingReplay(student, own, count_mask=torch.ones(3, 5)) as replay:
        replayed = student(ids).logits
    torch.testing.assert_close(replayed, plain, rtol=0, atol=1e-6)
    assert (replay.differ, replay.counted) == (0, 2 * 3 * 5)


def test_replay_forces_the_selection_and_keeps_the_router_gradient(llama_teacher):
    student = tiny_student(llama_teacher)
    ids = torch.randint(0, 100, (2, 6))
    plain, own = _own_selection(student, ids)
    other = (own + 1) % 4  # a different pair of the 4 experts for every token
    mask = torch.ones(2, 6)
    mask[0, :2] = 0  # e.g. left padding: not counted
    with RoutingReplay(student, other, count_mask=mask) as replay, RouterRecorder(student) as rec:
        logits = student(ids).logits
        _, used = rec.stacked((2, 6))
    assert torch.equal(used, other)  # the recorder, hooked after the replay, sees what was used
    assert not torch.allclose(logits, plain)
    assert replay.differ == replay.counted == 2 * 10
    logits.sum().backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in moe_gates(student))


def test_unknown_selections_keep_the_router_choice_and_measuring_alone_replays_nothing(llama_teacher):
    student = tiny_student(llama_teacher)
    ids = torch.randint(0, 100, (2, 4))
    plain, own = _own_selection(student, ids)
    with torch.no_grad(), RoutingReplay(student, torch.full_like(own, -1), count_mask=torch.ones(2, 4)) as replay:
        torch.testing.assert_close(student(ids).logits, plain, rtol=0, atol=1e-6)
    assert replay.counted == 0
    with torch.no_grad(), RoutingReplay(student, (own + 1) % 4, torch.ones(2, 4), replay=False) as replay:
        torch.testing.assert_close(student(ids).logits, plain, rtol=0, atol=1e-6)
    assert replay.differ == replay.counted == 2 * 8


def test_generation_records_the_engine_selection_of_every_fed_token(llama_teacher):
    """generate's KV-cached steps select what a full forward over the sequence selects (up to float
    noise near ties); the last completion token is never fed back, so it has no selection."""
    from transformers import AutoTokenizer

    from padd.generation.rollout import TransformersRollout

    student = tiny_student(llama_teacher)
    backend = TransformersRollout(student, AutoTokenizer.from_pretrained(llama_teacher), record_routing=True)
    rollout = backend.sample(["1 + 2 =", "the cat"], 2, temperature=0, max_new_tokens=5)
    experts = rollout.routed_experts
    n, width = rollout.input_ids.shape
    assert experts.shape == (2, n, width, 2)
    assert (experts[:, :, -1] == -1).all() and (experts[:, :, :-1] >= 0).all()
    with torch.no_grad(), RoutingReplay(student, experts, rollout.attention_mask, replay=False) as replay:
        positions = (rollout.attention_mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers them
        student(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions)
    assert replay.counted > 0 and replay.differ <= 0.02 * replay.counted


def test_routers_stay_float32_under_bf16_autocast(llama_teacher):
    from padd.precision import autocast, routers_in_fp32

    student = tiny_student(llama_teacher)
    ids = torch.randint(0, 100, (2, 5))
    amp = autocast(torch.device("cpu"), "bf16")
    with torch.no_grad(), amp, RouterRecorder(student) as rec:
        logits = student(ids).logits
    assert logits.dtype == torch.bfloat16 and rec.logits[0].dtype == torch.bfloat16  # autocast undoes the upcast
    routers_in_fp32(student)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"), RouterRecorder(student) as rec:
        logits = student(ids).logits
        assert torch.is_autocast_enabled("cpu")  # restored after each router
    assert logits.dtype == torch.bfloat16 and all(lg.dtype == torch.float32 for lg in rec.logits)


def test_token_gamma_meter_matches_the_reference_on_the_completion_positions(llama_teacher):
    """Γ from the meter equals RSPO's per-token formula (losses.token_gamma) on log-scores of the
    current and the anchor router, both on the same forward's router inputs, read at positions
    P-1 … P+C-2 (the routing that produced each completion token's probability)."""
    from padd.losses import token_gamma
    from padd.routing import TokenGammaMeter

    student = tiny_student(llama_teacher)
    n, p, c = 3, 4, 5
    ids = torch.randint(0, 100, (n, p + c))
    anchor = [w + 0.05 * torch.randn_like(w) for w in router_weights(student)]
    topk_old = torch.stack([torch.randperm(4)[:2] for _ in range(2 * n * c)]).view(2, n, c, 2)
    with torch.no_grad(), RouterRecorder(student, keep_inputs=True) as rec:
        student(ids)
        now, _ = rec.stacked((n, p + c))
        old = rec.log_scores_under(anchor, (n, p + c))
    window = slice(p - 1, p + c - 1)
    expected = token_gamma(now[:, :, window], old[:, :, window], topk_old, torch.ones(n, c))
    with torch.no_grad(), TokenGammaMeter(student, anchor, topk_old, n_prompt=p, n_completion=c) as meter:
        student(ids)
    torch.testing.assert_close(meter.token_gamma(), expected)
    assert expected.min() > 0  # the anchor differs, so every position moved
    with torch.no_grad(), TokenGammaMeter(student, router_weights(student), topk_old, p, c) as meter:
        student(ids)
    assert torch.equal(meter.token_gamma(), torch.zeros(n, c))

    # without a rollout-time top-K (one update per batch), the forward's own selection is read
    own = rec.selections((n, p + c))[:, :, window]
    expected = token_gamma(now[:, :, window], old[:, :, window], own, torch.ones(n, c))
    with torch.no_grad(), TokenGammaMeter(student, anchor, None, n_prompt=p, n_completion=c) as meter:
        student(ids)
    torch.testing.assert_close(meter.token_gamma(), expected)
