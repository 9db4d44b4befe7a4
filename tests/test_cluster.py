import pytest
import torch

from padd import balanced_kmeans
from padd.metrics import nmi
from padd.stage1.cluster import balanced_assign, kmeans_objective


def mixture(n, d, k, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    truth = torch.randperm(n, generator=g) % k
    return centres[truth] + noise * torch.randn(n, d, generator=g), truth


@pytest.mark.parametrize("noise", [0.2, 5.0])
def test_every_cluster_has_exactly_n_over_k(noise):
    x, _ = mixture(960, 16, 12, noise)
    labels = balanced_kmeans(x, 12)
    assert labels.dtype == torch.long and labels.shape == (960,)
    assert torch.bincount(labels, minlength=12).tolist() == [80] * 12


def test_recovers_planted_equal_clusters():
    x, truth = mixture(1024, 32, 8, 0.3)
    assert nmi(balanced_kmeans(x, 8), truth) == pytest.approx(1.0)


def test_beats_a_random_equal_split_and_is_deterministic():
    x, _ = mixture(1024, 32, 16, 3.0)
    a, b = balanced_kmeans(x, 16, seed=3), balanced_kmeans(x, 16, seed=3)
    assert torch.equal(a, b)
    random_split = torch.randperm(1024) % 16
    assert kmeans_objective(x, a, 16) < 0.97 * kmeans_objective(x, random_split, 16)


def test_assignment_is_optimal_on_a_small_problem():
    # Brute force over all ways to put 6 points into 3 clusters of 2.
    import itertools

    g = torch.Generator().manual_seed(1)
    cost = torch.rand(6, 3, generator=g)
    labels, _ = balanced_assign(cost, 2, eps_final=1e-9)
    best = min(sum(cost[i, c] for i, c in enumerate(p)) for p in set(itertools.permutations([0, 0, 1, 1, 2, 2])))
    assert float(cost.gather(1, labels[:, None]).sum()) == pytest.approx(float(best), abs=1e-6)


def test_rejects_non_divisible_and_bad_shapes():
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(torch.randn(10, 3), 3)
    with pytest.raises(ValueError, match="2-D"):
        balanced_kmeans(torch.randn(10), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_sizes():
    x, truth = mixture(2048, 64, 16, 0.3)
    labels = balanced_kmeans(x.cuda(), 16)
    assert labels.is_cuda and torch.bincount(labels).eq(128).all()
    assert nmi(labels.cpu(), truth) == pytest.approx(1.0)
