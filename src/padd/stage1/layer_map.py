"""Which teacher layer each student layer stands for (docs/method.md §3 step 8a), when the two differ in depth.

Linear CKA (Kornblith et al., 2019) compares the FFN inputs of a teacher layer and a student layer
on the same tokens, whatever their widths: with centred activations X [N, d1] and Y [N, d2],

    CKA(X, Y) = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) = ⟨K, L⟩_F / (‖K‖_F ‖L‖_F),   K = XXᵀ, L = YYᵀ.

The Gram form costs N² per pair instead of d1·d2, so one matrix product gives every teacher ×
student pair. The map is the best monotone path through that matrix with the ends pinned (first
layer to first, last to last): depth order is kept, and no student layer is left out.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def ffn_input_grams(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Centred, unit-Frobenius Gram matrices of every decoder layer's FFN input on `windows`.

    Args:
        model: a transformers causal LM whose `model.layers[i].mlp` takes the FFN input (dense or MoE).
        windows: [B, T] token ids; all B·T = N tokens enter each Gram.

    Returns:
        [L, N·N] float32: row l is the flattened K_l / ‖K_l‖_F of layer l, so that `a @ b.T` is CKA.
    """
    layers = model.model.layers
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: inputs[i].append(a[0].detach().float().reshape(-1, a[0].shape[-1]).cpu())
        )
        for i, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    grams = []
    for per_layer in inputs:
        x = torch.cat(per_layer).double()
        x = x - x.mean(0, keepdim=True)
        gram = x @ x.T
        grams.append((gram / gram.norm().clamp_min(1e-30)).float().flatten())
    return torch.stack(grams)


def cka_matrix(teacher_grams: torch.Tensor, student_grams: torch.Tensor) -> torch.Tensor:
    """Linear CKA of every teacher layer with every student layer: [L_t, N²] × [L_s, N²] -> [L_t, L_s]."""
    return teacher_grams @ student_grams.T


def monotone_layer_map(similarity: torch.Tensor) -> list[int]:
    """The teacher layer of each student layer: a non-decreasing map with the first student layer on
    the first teacher layer and the last on the last, maximising the summed similarity.

    Args:
        similarity: [L_t, L_s], e.g. `cka_matrix`.

    Returns:
        L_s teacher layer indices. A one-layer student takes the single most similar teacher layer.
    """
    n_t, n_s = similarity.shape
    sim = similarity.double()
    if n_s == 1:
        return [int(sim[:, 0].argmax())]
    # best[i]: the best score of a path over student layers 0..j that puts layer j on teacher layer i
    best = torch.full((n_t,), float("-inf"), dtype=torch.float64)
    best[0] = sim[0, 0]
    back = []
    for j in range(1, n_s):
        # the best predecessor of teacher layer i is the best of teacher layers 0..i (monotone)
        run_max, run_arg = torch.empty_like(best), torch.empty(n_t, dtype=torch.long)
        top, arg = float("-inf"), 0
        for i in range(n_t):
            if best[i] > top:
                top, arg = float(best[i]), i
            run_max[i], run_arg[i] = top, arg
        best = run_max + sim[:, j]
        back.append(run_arg)
    path = [n_t - 1]
    for run_arg in reversed(back):
        path.append(int(run_arg[path[-1]]))
    return path[::-1]


def proportional_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Student layer j on teacher layer round(j (L_t − 1) / (L_s − 1)): the same relative depth."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(j * (n_teacher - 1) / (n_student - 1)) for j in range(n_student)]
