"""Time-varying schedules: valid every round, identical for the same seed, connected over time."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decaf_lora.errors import TopologyError
from decaf_lora.topology import LinkFailures, OnePeerExponential, Topology, graph_of, validate_mixing_matrix


def assert_valid_round(w, base_graph=None):
    validate_mixing_matrix(w, base_graph, require_connected=False)


@given(n=st.integers(2, 20), t=st.integers(0, 50))
def test_one_peer_exponential_talks_to_at_most_one_peer(n, t):
    w = OnePeerExponential(n).matrix(t)
    assert_valid_round(w)
    assert ((w > 0).sum(1) <= 2).all()


def test_one_peer_exponential_averages_exactly_after_log2_n_rounds():
    n = 8
    sched = OnePeerExponential(n)
    x = np.random.default_rng(0).normal(size=n)
    y = x.copy()
    for t in range(3):
        y = sched.matrix(t) @ y
    np.testing.assert_allclose(y, x.mean(), atol=1e-12)
    sched.validate()


@given(
    kind=st.sampled_from(["random_matching", "link_failures"]),
    n=st.integers(3, 15),
    seed=st.integers(0, 9),
    t=st.integers(0, 40),
)
def test_random_schedules_are_valid_on_the_base_graph_and_reproducible(kind, n, seed, t):
    topo = Topology.build("ring", n)
    a = topo.schedule(kind, seed=seed, p=0.3)
    b = topo.schedule(kind, seed=seed, p=0.3)
    assert_valid_round(a.matrix(t), topo.graph)
    assert np.array_equal(a.matrix(t), b.matrix(t))
    # order of calls does not matter: each round is a pure function of (seed, round)
    assert np.array_equal(a.matrix(t + 1), Topology.build("ring", n).schedule(kind, seed=seed, p=0.3).matrix(t + 1))


def test_different_seeds_give_different_schedules():
    topo = Topology.build("complete", 10)
    a = [topo.schedule("random_matching", seed=0).matrix(t) for t in range(5)]
    b = [topo.schedule("random_matching", seed=1).matrix(t) for t in range(5)]
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_link_failures_drop_about_p_of_links_and_rebalance():
    topo = Topology.build("torus", 16)
    sched = topo.schedule("link_failures", seed=0, p=0.3)
    alive = [graph_of(sched.matrix(t)).number_of_edges() for t in range(200)]
    assert np.mean(alive) / topo.graph.number_of_edges() == pytest.approx(0.7, abs=0.03)
    # the surviving links get the surviving graph's Metropolis weights: above the base 1/5 when neighbours lost links
    assert max(sched.matrix(t).max(initial=0) for t in range(10)) <= 1.0
    sched.validate()


def test_link_failures_on_an_explicit_matrix_move_weight_to_the_diagonal():
    w = np.array([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5]])
    topo = Topology.from_matrix(w)
    sched = topo.schedule("link_failures", seed=2, p=0.5)
    for t in range(20):
        wt = sched.matrix(t)
        assert_valid_round(wt, topo.graph)
        off = ~np.eye(3, dtype=bool)
        assert np.all((wt[off] == 0) | np.isclose(wt[off], w[off]))


def test_static_schedule_is_the_topology_every_round():
    topo = Topology.build("ring", 5)
    sched = topo.schedule("static")
    assert all(np.array_equal(sched.matrix(t), topo.matrix) for t in range(3))


def test_schedule_errors():
    topo = Topology.build("ring", 5)
    with pytest.raises(TopologyError, match=r"schedule='daily' is not known"):
        topo.schedule("daily")
    with pytest.raises(TopologyError, match=r"p=1.5 is invalid"):
        LinkFailures(topo.graph, 1.5)
    with pytest.raises(TopologyError, match="round=-1"):
        topo.schedule("random_matching").matrix(-1)
