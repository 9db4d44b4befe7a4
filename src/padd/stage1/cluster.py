"""Cardinality-constrained (balanced) K-Means: every cluster gets exactly n / n_clusters points.

Lloyd's algorithm where the assignment step is an exact-capacity transportation problem, solved by
a vectorised auction (Bertsekas) with epsilon scaling. Cluster prices are kept between Lloyd
iterations, so once centroids settle each assignment needs only a few bidding rounds. Everything is
batched torch on the input's device (CPU or CUDA); no Python loop runs over points.
"""

from __future__ import annotations

import torch

__all__ = ["balanced_kmeans", "balanced_assign", "kmeans_objective"]

# The assignment's optimality gap, relative to the objective; far below what Lloyd's local
# optimum leaves on the table, so a looser bound only saves bidding rounds.
EPS_REL = 1e-3


def _sq_dists(x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, k]; the expanded form keeps it a single matmul."""
    d = x_sq[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(1)[None, :]
    return d.clamp_min_(0.0)


def kmeans_objective(x: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> float:
    """Sum of squared distances of each point to its cluster mean (the K-Means inertia).

    Args:
        x: points [n, d].
        labels: cluster of each point [n].
    """
    x = x.double()
    sums = torch.zeros(n_clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=n_clusters).clamp_min(1).to(x.dtype)
    centroids = sums / counts[:, None]
    return float(((x - centroids[labels]) ** 2).sum())


def balanced_assign(
    cost: torch.Tensor,
    capacity: int,
    prices: torch.Tensor | None = None,
    *,
    eps_final: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign n points to k clusters, exactly `capacity` each, minimising the total cost.

    A Jacobi auction: every unassigned point bids for its best cluster (net of price), a cluster
    keeps its `capacity` highest bids and its price becomes the lowest bid it keeps. The result is
    within n * eps_final of the optimum. `prices` warm-starts the auction (any start is valid
    because n == k * capacity, so every cluster ends full).

    Args:
        cost: [n, k] float cost of putting point i in cluster e; n must equal k * capacity.
        capacity: points per cluster.
        prices: [k] starting prices, or None for zeros.
        eps_final: final bid increment; defaults to EPS_REL of the mean per-point cost.

    Returns:
        (labels [n] long, prices [k]) — prices can warm-start the next call.
    """
    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"balanced_assign needs n == k * capacity, got n={n}, k={k}, capacity={capacity}")
    dev = cost.device
    cost = cost.to(torch.float64) if cost.device.type == "cpu" else cost.float()
    value = -cost
    if eps_final is None:
        # n * eps bounds the gap to the optimum: EPS_REL of the total cost.
        eps_final = max(float(cost.min(1).values.mean()) * EPS_REL, 1e-12)
    if prices is None:
        # Cold start: epsilon scaling from a coarse increment avoids long price wars.
        prices = torch.zeros(k, dtype=value.dtype, device=dev)
        eps = max(float(value.max() - value.min()) / 16.0, eps_final)
    else:
        # Warm start (prices from the previous Lloyd step are nearly right): refine directly.
        prices = prices.to(dev, value.dtype).clone()
        eps = eps_final
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=dev), prices

    arange_n = torch.arange(n, device=dev)
    while True:
        owner = torch.full((n,), -1, dtype=torch.long, device=dev)
        bid_of = torch.zeros(n, dtype=value.dtype, device=dev)
        unassigned = arange_n
        while unassigned.numel():
            net = value[unassigned] - prices
            top = net.topk(2, dim=1)
            best = top.indices[:, 0]
            bids = prices[best] + (top.values[:, 0] - top.values[:, 1]) + eps
            # Pool current holders of the bid-on clusters with the new bidders; each cluster keeps
            # its `capacity` highest bids.
            # Only clusters that received a bid can change hands this round.
            bid_on = torch.zeros(k, dtype=torch.bool, device=dev)
            bid_on[best] = True
            held = (bid_on[owner.clamp_min(0)] & (owner >= 0)).nonzero().squeeze(1)
            cand = torch.cat([held, unassigned])
            cand_cluster = torch.cat([owner[held], best])
            cand_bid = torch.cat([bid_of[held], bids])
            order = torch.argsort(cand_bid, descending=True, stable=True)
            order = order[torch.argsort(cand_cluster[order], stable=True)]
            sorted_cluster = cand_cluster[order]
            counts = torch.bincount(sorted_cluster, minlength=k)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=dev) - starts[sorted_cluster]
            keep = rank < capacity
            kept, lost = order[keep], order[~keep]
            owner[cand[lost]] = -1
            owner[cand[kept]] = cand_cluster[kept]
            bid_of[cand[kept]] = cand_bid[kept]
            full_idx = (counts >= capacity).nonzero().squeeze(1)
            prices[full_idx] = cand_bid[order[starts[full_idx] + capacity - 1]]
            unassigned = (owner < 0).nonzero().squeeze(1)
        if eps <= eps_final:
            return owner, prices
        eps = max(eps / 8.0, eps_final)


def _kmeans_pp_init(x: torch.Tensor, x_sq: torch.Tensor, n_clusters: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (greedy variant: the best of 2 + log k candidates per step)."""
    n = x.shape[0]
    n_trials = 2 + int(torch.tensor(float(n_clusters)).log().item())
    first = int(torch.randint(n, (1,), generator=gen, device="cpu"))
    centroids = [x[first]]
    closest = _sq_dists(x, x[first][None], x_sq).squeeze(1)
    for _ in range(1, n_clusters):
        probs = (closest / closest.sum().clamp_min(1e-30)).cpu().double()
        cand = torch.multinomial(probs, n_trials, replacement=True, generator=gen).to(x.device)
        d_cand = _sq_dists(x, x[cand], x_sq)  # [n, trials]
        new_closest = torch.minimum(closest[:, None], d_cand)
        best = int(new_closest.sum(0).argmin())
        closest = new_closest[:, best]
        centroids.append(x[cand[best]])
    return torch.stack(centroids)


def balanced_kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 50,
    n_init: int = 1,
    tol: float = 1e-4,
) -> torch.LongTensor:
    """Partition the rows of `x` into `n_clusters` clusters of exactly n / n_clusters rows each.

    Minimises the K-Means objective (sum of squared distances to the cluster mean) under the
    equal-size constraint. Deterministic for a given seed and device.

    Args:
        x: float tensor [n, d] on CPU or CUDA; n must be divisible by n_clusters.
        n_clusters: number of clusters E.
        seed: seeds the k-means++ initialisations.
        max_iter: Lloyd iterations per initialisation.
        n_init: initialisations tried; the lowest objective wins.
        tol: stop when the relative objective improvement falls below this.

    Returns:
        LongTensor [n] of cluster labels in [0, n_clusters), on x's device.
    """
    if x.ndim != 2:
        raise ValueError(f"balanced_kmeans expects a 2-D tensor [n, d], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise ValueError(
            f"cannot split {n} points into {n_clusters} equal clusters: choose a number of clusters that divides {n}"
        )
    capacity = n // n_clusters
    x = x.float()
    x_sq = (x * x).sum(1)
    total_sq = float(x_sq.double().sum())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best_labels, best_obj = None, float("inf")
    for _ in range(max(1, n_init)):
        centroids = _kmeans_pp_init(x, x_sq, n_clusters, gen)
        prices, labels, obj = None, None, float("inf")
        for _ in range(max_iter):
            cost = _sq_dists(x, centroids, x_sq)
            new_labels, prices = balanced_assign(cost, capacity, prices)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / capacity
            # Inertia from norms: sum ||x||^2 - sum_e n_e ||c_e||^2, no [n, d] temporary.
            prev_obj, obj = obj, total_sq - capacity * float((centroids.double() ** 2).sum())
            if prev_obj - obj <= tol * abs(obj):
                break
        if obj < best_obj:
            best_labels, best_obj = labels, obj
    return best_labels
