"""Data splits: every example used exactly once, IID balanced, non-IID really skewed, seeds separate."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decaf_lora.errors import PartitionError
from decaf_lora.partition import make_partition

rng = np.random.default_rng(0)
LABELS = np.sort(rng.integers(0, 10, size=2000))  # sorted on purpose: contiguous blocks would be a silent bug


def assert_exact_cover(part, n):
    flat = np.concatenate(part.indices)
    assert len(flat) == n
    assert np.array_equal(np.sort(flat), np.arange(n))


def skew(hist: np.ndarray) -> float:
    """Mean total-variation distance between each agent's label distribution and the global one."""
    p = hist / hist.sum(1, keepdims=True)
    q = hist.sum(0) / hist.sum()
    return float(0.5 * np.abs(p - q).sum(1).mean())


@given(
    scheme=st.sampled_from(["iid", "dirichlet", "round_robin", "shards"]),
    n_agents=st.integers(1, 25),
    seed=st.integers(0, 100),
)
def test_every_example_is_used_exactly_once(scheme, n_agents, seed):
    part = make_partition(scheme, LABELS, n_agents, seed=seed)
    assert part.n_agents == n_agents
    assert_exact_cover(part, len(LABELS))
    assert part.histograms.sum() == len(LABELS)
    for ix, h in zip(part.indices, part.histograms):
        assert np.array_equal(np.bincount(LABELS[ix], minlength=10), h)


def test_iid_is_balanced_and_shuffled():
    part = make_partition("iid", LABELS, 8, seed=0)
    assert part.sizes.max() - part.sizes.min() <= 1
    assert skew(part.histograms) < 0.12  # sampling noise only; an unshuffled split of sorted labels gives ~0.8
    assert all(len(np.unique(LABELS[ix])) == 10 for ix in part.indices)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    skewed = make_partition("dirichlet", LABELS, 8, seed=0, alpha=0.1)
    near_iid = make_partition("dirichlet", LABELS, 8, seed=0, alpha=100.0)
    assert skew(skewed.histograms) > 0.5
    assert skew(near_iid.histograms) < 0.08
    assert skewed.sizes.min() >= 1


def test_dirichlet_respects_min_size():
    part = make_partition("dirichlet", LABELS, 10, seed=3, alpha=0.3, min_size=50)
    assert part.sizes.min() >= 50


def test_round_robin_gives_whole_classes():
    part = make_partition("round_robin", LABELS, 4, seed=0)
    for a, h in enumerate(part.histograms):
        assert set(np.nonzero(h)[0]) == {c for c in range(10) if c % 4 == a}


def test_round_robin_with_more_agents_than_classes_shares_classes():
    part = make_partition("round_robin", LABELS, 20, seed=0)
    for a, h in enumerate(part.histograms):
        assert set(np.nonzero(h)[0]) == {a % 10}
    assert part.sizes.min() > 0


def test_shards_limit_classes_per_agent():
    part = make_partition("shards", LABELS, 10, seed=0, shards_per_agent=2)
    assert max((h > 0).sum() for h in part.histograms) <= 4  # each of the 2 shards can straddle a class boundary
    assert skew(part.histograms) > 0.6


def test_natural_key_keeps_groups_together():
    keys = np.repeat(np.arange(40), 50)
    part = make_partition("natural", LABELS, 8, seed=0, keys=keys)
    assert_exact_cover(part, len(LABELS))
    for ix in part.indices:
        for k in np.unique(keys[ix]):
            assert set(ix) >= set(np.nonzero(keys == k)[0])
    assert part.sizes.max() - part.sizes.min() <= 50


def test_split_seed_alone_decides_the_split():
    a = make_partition("dirichlet", LABELS, 6, seed=7, alpha=0.5)
    b = make_partition("dirichlet", LABELS, 6, seed=7, alpha=0.5)
    c = make_partition("dirichlet", LABELS, 6, seed=8, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert any(not np.array_equal(x, y) for x, y in zip(a.indices, c.indices))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="zipf"), r"partition='zipf' is not known; choose one of: dirichlet"),
        (dict(scheme="dirichlet", alpha=0), r"alpha=0 is invalid"),
        (dict(scheme="dirichlet", alpha=0.5, min_size=500), r"min_size=500 is invalid"),
        (dict(scheme="iid", n_agents=5000), r"agents=5000 is more than the 2000 examples"),
        (dict(scheme="shards", shards_per_agent=0), r"shards_per_agent=0 is invalid"),
        (dict(scheme="natural", keys=np.zeros(3)), r"keys has 3 entries"),
        (dict(scheme="natural", keys=np.zeros(2000)), r"1 distinct values but agents=8"),
        (dict(scheme="iid", labels=np.array([0.5, 1.5])), r"non-negative integer class ids"),
        (dict(scheme="iid", foo=1), r"does not take foo"),
    ],
)
def test_bad_input_raises_one_clear_error(kwargs, match):
    kwargs = {"labels": LABELS, "n_agents": 8, **kwargs}
    scheme = kwargs.pop("scheme")
    with pytest.raises(PartitionError, match=match):
        make_partition(scheme, kwargs.pop("labels"), kwargs.pop("n_agents"), **kwargs)
