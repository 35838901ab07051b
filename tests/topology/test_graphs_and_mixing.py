"""Every graph and every mixing rule yields a matrix fit for gossip; the paper's numbers come out."""

import networkx as nx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decaf_lora.errors import TopologyError
from decaf_lora.topology import GRAPHS, Topology, build_graph, mixing_matrix, validate_mixing_matrix

RANDOM_GRAPHS = {"erdos-renyi", "small-world"}


def assert_gossip_matrix(w: np.ndarray, graph: nx.Graph) -> None:
    n = graph.number_of_nodes()
    assert w.shape == (n, n)
    assert (w >= -1e-12).all()
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    adj = nx.to_numpy_array(graph, nodelist=range(n)) > 0
    off_graph = ~adj & ~np.eye(n, dtype=bool)
    assert (w[off_graph] == 0).all()
    assert nx.is_connected(graph)


def test_paper_ring_of_ten_has_one_third_weights_and_lambda2_087():
    topo = Topology.build("ring", 10)
    assert np.allclose(topo.matrix[np.abs(topo.matrix) > 0], 1 / 3)
    assert topo.second_eigenvalue == pytest.approx(1 / 3 + 2 / 3 * np.cos(2 * np.pi / 10))
    assert round(topo.second_eigenvalue, 2) == 0.87


def test_paper_bipartite_of_ten_matches_078_011_012():
    topo = Topology.build("bipartite", 10)
    w = topo.matrix
    hubs, spokes = [0, 1], list(range(2, 10))
    assert np.allclose(np.diag(w)[spokes], 0.78, atol=0.005)
    assert np.allclose(w[np.ix_(spokes, hubs)], 0.11, atol=0.005)
    assert np.allclose(np.diag(w)[hubs], 0.12, atol=0.01)  # the paper's 0.12 is 1 - 8 x 0.11, rounded
    assert round(topo.second_eigenvalue, 2) == 0.78


def test_complete_graph_with_uniform_weights_averages_in_one_step():
    topo = Topology.build("complete", 7, mixing="uniform")
    assert np.allclose(topo.matrix, 1 / 7)
    assert topo.spectral_gap == pytest.approx(1.0)


@given(
    name=st.sampled_from(sorted(set(GRAPHS.names()) - {"edges"})),
    n=st.integers(3, 17),
    rule=st.sampled_from(["metropolis", "max-degree", "lazy"]),
    seed=st.integers(0, 5),
)
def test_every_graph_and_rule_gives_a_valid_matrix(name, n, rule, seed):
    params = {"seed": seed} if name in RANDOM_GRAPHS else {}
    if name == "small-world":
        params["k"] = 2
    topo = Topology.build(name, n, mixing=rule, **params)
    assert_gossip_matrix(topo.matrix, topo.graph)
    assert 0 < topo.spectral_gap <= 1 + 1e-12


@given(name=st.sampled_from(["ring", "complete", "torus", "exponential"]), n=st.integers(3, 16))
def test_uniform_rule_is_valid_on_regular_graphs(name, n):
    topo = Topology.build(name, n, mixing="uniform")
    assert_gossip_matrix(topo.matrix, topo.graph)


def test_uniform_rule_refuses_irregular_graphs():
    with pytest.raises(TopologyError, match="same degree"):
        Topology.build("star", 5, mixing="uniform")


def test_random_graphs_are_deterministic_in_their_seed():
    a = Topology.build("erdos_renyi", 20, seed=3)
    b = Topology.build("erdos_renyi", 20, seed=3)
    c = Topology.build("erdos_renyi", 20, seed=4)
    assert np.array_equal(a.matrix, b.matrix)
    assert not np.array_equal(a.matrix, c.matrix)


def test_erdos_renyi_is_resampled_until_connected():
    topo = Topology.build("erdos_renyi", 30, p=0.12, seed=0)
    assert nx.is_connected(topo.graph)


def test_torus_shape_and_degree():
    topo = Topology.build("torus", 12, rows=3, cols=4)
    assert set(topo.degrees) == {4}
    with pytest.raises(TopologyError, match="rows=5 x cols=3"):
        Topology.build("torus", 12, rows=5, cols=3)


def test_exponential_graph_links_powers_of_two():
    topo = Topology.build("exponential", 16)
    assert topo.neighbors(0) == sorted({1, 2, 4, 8, 15, 14, 12})


def test_edge_list_from_python_and_from_file(tmp_path):
    pairs = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]
    f = tmp_path / "edges.txt"
    f.write_text("# a square with one diagonal\n0 1\n1,2\n2 3\n3 0  # wrap\n0 2\n")
    from_list = Topology.build("edges", None, edges=pairs)
    from_file = Topology.build("edges", None, edges=str(f))
    assert from_list.n_agents == 4
    assert np.array_equal(from_list.matrix, from_file.matrix)


@pytest.mark.parametrize(
    "text, match",
    [("0 1\n1 two\n", "line 2"), ("0 1 2\n", "line 1")],
)
def test_malformed_edge_file_names_the_line(tmp_path, text, match):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(TopologyError, match=match):
        Topology.build("edges", None, edges=str(f))


def test_edge_list_errors():
    with pytest.raises(TopologyError, match="not a readable file"):
        Topology.build("edges", None, edges="/nonexistent/edges.txt")
    with pytest.raises(TopologyError, match="outside 0..2"):
        Topology.build("edges", 3, edges=[(0, 1), (1, 5)])
    with pytest.raises(TopologyError, match="not connected"):
        Topology.build("edges", 4, edges=[(0, 1), (2, 3)])


def test_explicit_matrix_defines_its_graph():
    w = np.array([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]])
    topo = Topology.from_matrix(w)
    assert topo.rule == "explicit"
    assert sorted(topo.graph.edges) == [(0, 1), (1, 2)]


@pytest.mark.parametrize(
    "matrix, match",
    [
        (np.ones((2, 3)) / 3, "square"),
        (np.array([[0.5, 0.6], [0.6, 0.5]]), "sums to"),
        (np.array([[0.7, 0.3], [0.2, 0.8]]), "not symmetric"),
        (np.array([[1.5, -0.5], [-0.5, 1.5]]), "negative"),
        (np.eye(3), "not connected"),
        (np.array([[np.nan, 1.0], [1.0, 0.0]]), "NaN"),
    ],
)
def test_bad_matrices_are_rejected_with_the_reason(matrix, match):
    with pytest.raises(TopologyError, match=match):
        Topology.from_matrix(matrix)


def test_matrix_off_the_graph_is_rejected():
    g = build_graph("ring", 4)
    with pytest.raises(TopologyError, match="not an edge"):
        validate_mixing_matrix(np.full((4, 4), 0.25), g)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Topology.build("hypercube", 4), r"topology='hypercube' is not known; choose one of: bipartite"),
        (
            lambda: Topology.build("ring", 4, mixing="magic"),
            r"mixing='magic' is not known; choose one of: .*metropolis",
        ),
        (lambda: Topology.build("ring", 0), r"agents=0 is invalid"),
        (lambda: Topology.build("ring", 4, hubs=2), r"does not take hubs"),
        (lambda: Topology.build("bipartite", 4, hubs=4), r"hubs=4 is invalid"),
        (lambda: Topology.build("small_world", 5, k=5), r"k=5 is invalid"),
        (lambda: Topology.build("erdos_renyi", 5, p=0), r"p=0 is invalid"),
        (lambda: Topology.build("erdos_renyi", 5, p=True), r"p=True is invalid"),
        (lambda: Topology.build("erdos_renyi", 5, seed=-1), r"seed=-1 is invalid for erdos_renyi; use an integer"),
        (lambda: Topology.build("small_world", 5, seed=2**32), r"seed=4294967296 is invalid for small_world"),
    ],
)
def test_bad_names_and_parameters_raise_one_clear_error(call, match):
    with pytest.raises(TopologyError, match=match):
        call()


def test_lazy_rule_is_half_identity_plus_metropolis():
    g = build_graph("star", 6)
    np.testing.assert_allclose(mixing_matrix(g, "lazy"), 0.5 * (np.eye(6) + mixing_matrix(g, "metropolis")))


def test_single_agent_is_a_trivial_but_valid_topology():
    topo = Topology.build("ring", 1)
    assert topo.matrix.tolist() == [[1.0]]
    assert topo.neighbors(0) == []
