import torch
from transformers import AutoModelForCausalLM

from padd.routing import RouterRecorder, expert_load, moe_gates, router_log_scores, router_weights
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
