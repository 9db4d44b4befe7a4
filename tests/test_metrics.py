import math

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from padd.metrics import dominant_cluster, esi, gamma_step, load_stats, nmi


@pytest.mark.parametrize("seed", range(5))
def test_nmi_matches_scikit_learn(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (500,), generator=g)
    b = torch.where(torch.rand(500, generator=g) < 0.6, a, torch.randint(0, 4, (500,), generator=g))
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a.numpy(), b.numpy()), abs=1e-10)


def test_nmi_limits():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert nmi(a, a + 7) == pytest.approx(1.0)
    assert nmi(a, torch.zeros(6)) == 0.0
    assert nmi(torch.zeros(4), torch.zeros(4)) == 1.0


def test_esi_hand_computed():
    # expert 0 sees clusters [0, 0, 0, 0] -> H = 0; expert 1 sees [0, 1, 0, 1] -> H = log 2; C = 2.
    experts = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    clusters = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1])
    assert esi(experts, clusters) == pytest.approx(((1 - 0) + (1 - math.log(2) / math.log(2))) / 2)
    # With C = 4 declared, expert 1's H = log 2 counts as half of log 4.
    assert esi(experts, clusters, n_clusters=4) == pytest.approx((1 + 0.5) / 2)


def test_gamma_step_is_joint_l2_norm():
    prev = {"a": torch.zeros(2, 3), "b": torch.ones(4, 3)}
    now = {"a": torch.full((2, 3), 1.0), "b": torch.ones(4, 3) + 2.0}
    assert gamma_step(prev, now) == pytest.approx(math.sqrt(6 * 1 + 12 * 4))
    assert gamma_step(list(prev.values()), list(now.values())) == pytest.approx(math.sqrt(54))
    with pytest.raises(ValueError):
        gamma_step(prev, {"a": now["a"]})


def test_load_stats():
    stats = load_stats(torch.tensor([[1.0, 1, 1, 1], [4, 0, 0, 0]]))
    assert stats["cv"].tolist() == pytest.approx([0.0, math.sqrt(3)])
    assert stats["max_mean"].tolist() == pytest.approx([1.0, 4.0])
    single = load_stats(torch.tensor([2.0, 6.0]))
    assert float(single["cv"]) == pytest.approx(0.5) and float(single["max_mean"]) == pytest.approx(1.5)


def test_dominant_cluster():
    acts = torch.tensor([[1.0, -3.0, 0.5, 0.1], [0.0, 0.1, -2.0, 2.0]])
    experts = torch.tensor([[0, 1], [2, 3]])
    assert dominant_cluster(acts, experts).tolist() == [0, 1]


def test_paired_bootstrap_difference_and_interval():
    from padd.metrics import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 30 + [1] * 10)  # unequal benchmarks: the mean is over groups
    a = (torch.rand(3, 40, generator=g) < 0.8).float()
    b = (torch.rand(3, 40, generator=g) < 0.3).float()
    diff, lo, hi = paired_bootstrap(a, b, groups, n_boot=2000)
    per_group = lambda x: (x[:, :30].double().mean() + x[:, 30:].double().mean()) / 2  # noqa: E731
    assert diff == pytest.approx(float(per_group(a) - per_group(b)), abs=1e-9)
    assert 0 < lo < diff < hi
    same = paired_bootstrap(a, a, groups, n_boot=500)
    assert same == (0.0, 0.0, 0.0)
    # one teacher run against three student runs; a reversed comparison flips the interval
    teacher = torch.ones(1, 40)
    d, lo2, hi2 = paired_bootstrap(b, teacher, groups, n_boot=500)
    assert hi2 < 0 and d == pytest.approx(float(per_group(b)) - 1.0)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:, :10], groups)
