"""Evaluation metrics of docs/method.md §5 as pure functions on tensors.

- `nmi`: normalised mutual information of two labelings (arithmetic normalisation, as scikit-learn).
- `esi`: expert specialisation index, mean over experts of 1 - H(teacher cluster | expert) / log C.
- `gamma_step`: Γ_step, the L2 norm of the change of all router weights between two steps.
- `load_stats`: coefficient of variation and max/mean of per-expert loads.
- `dominant_cluster`: each token's teacher cluster with the largest activation mass (NMI/ESI labels).
- `paired_bootstrap`: the accuracy difference of two models on the same problems, with an interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def _contingency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten().long(), b.flatten().long()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.numel()} vs {b.numel()}")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    na, nb = int(ai.max()) + 1, int(bi.max()) + 1
    return torch.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb).double()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def nmi(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """Normalised mutual information I(a; b) / mean(H(a), H(b)) in [0, 1].

    Args:
        labels_a, labels_b: integer labels [n] (any values; only equality matters).
    """
    if labels_a.numel() == 0:
        raise ValueError("nmi of empty labelings")
    joint = _contingency(labels_a, labels_b)
    joint = joint / joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    ha, hb = _entropy(pa), _entropy(pb)
    if pa.numel() == 1 and pb.numel() == 1:
        return 1.0  # two identical trivial labelings
    if ha == 0 or hb == 0:
        return 0.0
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum()
    return float((mi / ((ha + hb) / 2)).clamp(0.0, 1.0))


def esi(expert_labels: torch.Tensor, cluster_labels: torch.Tensor, n_clusters: int | None = None) -> float:
    """Expert specialisation index: mean over used experts of 1 - H(cluster | expert) / log C.

    1 when every expert sees a single teacher cluster, 0 when each sees all clusters uniformly.

    Args:
        expert_labels: [n] the student expert of each token (e.g. its top-1 expert).
        cluster_labels: [n] the teacher cluster of each token.
        n_clusters: C; defaults to the number of distinct cluster labels.
    """
    expert_labels, cluster_labels = expert_labels.flatten().long(), cluster_labels.flatten().long()
    if expert_labels.shape != cluster_labels.shape:
        raise ValueError(f"labelings differ in length: {expert_labels.numel()} vs {cluster_labels.numel()}")
    c = n_clusters if n_clusters is not None else int(torch.unique(cluster_labels).numel())
    if c < 2:
        raise ValueError("esi needs at least two teacher clusters")
    joint = _contingency(expert_labels, cluster_labels)  # [experts used, clusters seen]
    cond = joint / joint.sum(1, keepdim=True)
    h = -(cond * cond.clamp_min(1e-300).log()).sum(1)
    return float((1.0 - h / torch.log(torch.tensor(float(c), dtype=torch.float64))).mean())


def gamma_step(
    prev_state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> float:
    """Γ_step = ||W_router(t) - W_router(t-1)||_2 over all MoE layers jointly.

    Args:
        prev_state, state: router weights per layer (dict name -> [E, H], or a list of [E, H]), same keys.
    """
    if isinstance(state, Mapping):
        if set(state) != set(prev_state):
            raise ValueError("router states hold different layers")
        pairs = [(prev_state[k], state[k]) for k in state]
    else:
        if len(state) != len(prev_state):
            raise ValueError("router states hold different numbers of layers")
        pairs = list(zip(prev_state, state, strict=True))
    total = sum(float(((b.double() - a.double().to(b.device)) ** 2).sum()) for a, b in pairs)
    return total**0.5


GAMMA_QUANTILES = (0.5, 0.9, 0.99)


def token_gamma_stats(values: torch.Tensor) -> dict[str, float]:
    """Mean and 50/90/99% quantiles of per-token Γ over completion tokens ([n] values): how far the
    router moved under the tokens stage III damps."""
    if not values.numel():
        return {"gamma_token_mean": 0.0}
    quantiles = torch.quantile(values.float(), torch.tensor(GAMMA_QUANTILES, device=values.device))
    return {
        "gamma_token_mean": float(values.float().mean()),
        **{f"gamma_token_p{round(100 * q)}": float(v) for q, v in zip(GAMMA_QUANTILES, quantiles, strict=True)},
    }


def load_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load balance of per-expert counts.

    Args:
        counts: [E] or [L, E] tokens (or token-slots) routed to each expert.

    Returns:
        {"cv": std/mean, "max_mean": max/mean}, each [] or [L]; population std. A layer that routed
        nothing has cv 0 and max_mean 1 (nothing is imbalanced).
    """
    c = counts.double()
    mean = c.mean(-1)
    safe = mean.clamp_min(1e-12)
    cv = torch.where(mean > 0, c.std(-1, correction=0) / safe, torch.zeros_like(mean))
    max_mean = torch.where(mean > 0, c.max(-1).values / safe, torch.ones_like(mean))
    return {"cv": cv, "max_mean": max_mean}


def dominant_cluster(activations: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Each token's teacher cluster with the largest activation mass sum_j∈cluster |a_j|.

    Args:
        activations: [T, d_ff] intermediate activations of one teacher FFN.
        experts: [C, S] neuron indices of each cluster (from padd_stage1.json).

    Returns:
        LongTensor [T] of cluster ids.
    """
    mass = activations.abs()[:, experts].sum(-1)  # [T, C]
    return mass.argmax(-1)


def paired_bootstrap(
    a: torch.Tensor,
    b: torch.Tensor,
    groups: torch.Tensor,
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Difference in accuracy of two models on the same problems, with a paired bootstrap interval.

    Accuracy is the mean over groups (benchmarks) of the per-group mean over problems and runs, as a
    table's average column is. Each replicate resamples the problems within each group, the same
    problems for both sides, and the runs (seeds) with replacement: paired by index when both sides
    have the same number of runs, else each side on its own (a single run, e.g. the teacher's
    greedy evaluation, stays as it is).

    Args:
        a, b: [runs, P] 0/1 correctness of each run on the P problems (runs may differ between a, b).
        groups: [P] group index of each problem.

    Returns:
        (difference of means a - b, lower, upper) of the `level` percentile interval.
    """
    if a.shape[1] != b.shape[1] or groups.shape[0] != a.shape[1]:
        raise ValueError(f"a {tuple(a.shape)}, b {tuple(b.shape)} and groups {tuple(groups.shape)} disagree on P")
    a, b = a.double(), b.double()
    gen = torch.Generator().manual_seed(seed)

    def accuracy(x: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
        """x: [..., P] per-problem accuracy -> [...] mean over groups of the mean over their columns."""
        return torch.stack([x[..., c].mean(-1) for c in columns]).mean(0)

    members = [torch.nonzero(groups == g).squeeze(1) for g in torch.unique(groups)]
    diff = float(accuracy(a.mean(0), members) - accuracy(b.mean(0), members))
    # resampled problems, the same for both sides: per group [n_boot, n_g] column indices
    columns = [m[torch.randint(len(m), (n_boot, len(m)), generator=gen)] for m in members]
    runs_a = torch.randint(a.shape[0], (n_boot, a.shape[0]), generator=gen)
    runs_b = runs_a if a.shape[0] == b.shape[0] else torch.randint(b.shape[0], (n_boot, b.shape[0]), generator=gen)
    mean_a, mean_b = a[runs_a].mean(1), b[runs_b].mean(1)  # [n_boot, P]
    reps = torch.stack([(mean_a.gather(1, c) - mean_b.gather(1, c)).mean(1) for c in columns]).mean(0)  # [n_boot]
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(reps, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return diff, lo, hi
