"""Mixing matrices: how much agent i trusts what agent j sent.

Gossip converges to the true average only if the matrix is symmetric, doubly stochastic, supported on the graph
(plus the diagonal) and the graph is connected; how fast is set by the spectral gap ``1 - |lambda_2|``. Every
matrix that enters the library goes through :func:`validate_mixing_matrix`, so a bad one fails before training.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from ..errors import TopologyError
from ..registry import MIXING_RULES

ATOL = 1e-8


def _degrees(g: nx.Graph) -> np.ndarray:
    return np.array([g.degree(i) for i in range(g.number_of_nodes())], dtype=np.int64)


def _check_nodes(g: nx.Graph) -> int:
    n = g.number_of_nodes()
    if sorted(g.nodes) != list(range(n)):
        raise TopologyError(
            "the graph's nodes must be the integers 0..n-1; relabel it (networkx.convert_node_labels_to_integers)."
        )
    return n


def _fill_diagonal(w: np.ndarray) -> np.ndarray:
    np.fill_diagonal(w, 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def metropolis(g: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings: ``w_ij = 1 / (1 + max(d_i, d_j))`` on edges; symmetric, doubly stochastic on any graph."""
    n = _check_nodes(g)
    d = _degrees(g)
    w = np.zeros((n, n))
    for a, b in g.edges:
        w[a, b] = w[b, a] = 1.0 / (1.0 + max(d[a], d[b]))
    return _fill_diagonal(w)


def uniform(g: nx.Graph) -> np.ndarray:
    """``1 / (deg + 1)`` on self and every neighbour; doubly stochastic only on regular graphs (ring, torus, ...)."""
    n = _check_nodes(g)
    d = _degrees(g)
    if n and d.min() != d.max():
        raise TopologyError(
            f"mixing='uniform' needs every agent to have the same degree, but degrees range from {d.min()} to "
            f"{d.max()}; "
            "use mixing='metropolis' or 'max-degree' on irregular graphs."
        )
    w = np.zeros((n, n))
    for a, b in g.edges:
        w[a, b] = w[b, a] = 1.0 / (1.0 + d[a])
    return _fill_diagonal(w)


def max_degree(g: nx.Graph) -> np.ndarray:
    """``1 / (1 + max degree)`` on every edge: symmetric, doubly stochastic, but slow on graphs with one busy hub."""
    n = _check_nodes(g)
    dmax = int(_degrees(g).max()) if n else 0
    w = np.zeros((n, n))
    for a, b in g.edges:
        w[a, b] = w[b, a] = 1.0 / (1.0 + dmax)
    return _fill_diagonal(w)


def lazy(g: nx.Graph) -> np.ndarray:
    """``(I + W_metropolis) / 2``: all eigenvalues in [0, 1], which removes oscillation on bipartite graphs."""
    return make_lazy(metropolis(g))


def make_lazy(w: np.ndarray) -> np.ndarray:
    """``(I + W) / 2`` of any mixing matrix."""
    return 0.5 * (np.eye(w.shape[0]) + w)


MIXING_RULES.register(metropolis, name="metropolis", aliases=("mh", "metropolis-hastings"))
MIXING_RULES.register(uniform, name="uniform")
MIXING_RULES.register(max_degree, name="max-degree", aliases=("maxdegree",))
MIXING_RULES.register(lazy, name="lazy")
RULES = MIXING_RULES


def canonical_rule_name(rule: str) -> str:
    return MIXING_RULES.canonical(rule)


def mixing_matrix(g: nx.Graph, rule: str = "metropolis") -> np.ndarray:
    """The mixing matrix of ``g`` under a named rule, validated."""
    w = MIXING_RULES.get(rule)(g)
    validate_mixing_matrix(w, g)
    return w


def graph_of(w: np.ndarray, atol: float = ATOL) -> nx.Graph:
    """The support of a mixing matrix as a graph (off-diagonal entries above ``atol``)."""
    n = w.shape[0]
    g = nx.Graph()
    g.add_nodes_from(range(n))
    rows, cols = np.nonzero(np.abs(w) > atol)
    g.add_edges_from((int(a), int(b)) for a, b in zip(rows, cols) if a < b)
    return g


def validate_mixing_matrix(
    w: np.ndarray,
    graph: nx.Graph | None = None,
    *,
    require_connected: bool = True,
    atol: float = ATOL,
    name: str = "mixing matrix",
) -> np.ndarray:
    """Check that ``w`` can drive gossip; raise one :class:`TopologyError` sentence naming the first problem found.

    Checks: square 2-D finite matrix, non-negative, symmetric, rows and columns summing to 1, zero wherever
    ``graph`` has no edge (when a graph is given), and a connected support (unless ``require_connected`` is False,
    as for one round of a time-varying schedule whose union is what must be connected). Returns ``w`` with the
    entries within ``atol`` of zero set to exactly zero.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise TopologyError(f"{name} has shape {tuple(w.shape)}; it must be a non-empty square agents x agents matrix.")
    n = w.shape[0]
    if not np.all(np.isfinite(w)):
        raise TopologyError(f"{name} contains NaN or infinite entries; every weight must be a finite number.")
    if w.min() < -atol:
        i, j = np.unravel_index(np.argmin(w), w.shape)
        raise TopologyError(f"{name} has a negative weight {w[i, j]:.3g} at ({i}, {j}); all weights must be >= 0.")
    asym = np.abs(w - w.T)
    if asym.max() > atol:
        i, j = np.unravel_index(np.argmax(asym), w.shape)
        raise TopologyError(
            f"{name} is not symmetric: w[{i},{j}]={w[i, j]:.6g} but w[{j},{i}]={w[j, i]:.6g}; use w_ij = w_ji."
        )
    rows = np.abs(w.sum(axis=1) - 1.0)
    if rows.max() > 1e-6:
        i = int(np.argmax(rows))
        raise TopologyError(
            f"{name} row {i} sums to {w[i].sum():.6g}; every row and column must sum to 1 (doubly stochastic)."
        )
    if graph is not None:
        if graph.number_of_nodes() != n:
            raise TopologyError(
                f"{name} is {n} x {n} but the graph has {graph.number_of_nodes()} agents; they must match."
            )
        allowed = nx.to_numpy_array(graph, nodelist=range(n)) > 0
        np.fill_diagonal(allowed, True)
        off = np.abs(w) * ~allowed
        if off.max() > atol:
            i, j = np.unravel_index(np.argmax(off), w.shape)
            raise TopologyError(
                f"{name} puts weight {w[i, j]:.3g} on ({i}, {j}), which is not an edge of the graph; weights must be "
                "zero off the graph."
            )
    if require_connected and n > 1 and not nx.is_connected(graph_of(w, atol) if graph is None else graph):
        raise TopologyError(
            f"the graph of the {name} is not connected, so agents can never agree; add edges so every agent can reach "
            "every other."
        )
    # entries within atol of zero are rounding noise of a user's matrix: exact zeros, so no mixing step sees a
    # "negative" weight that this check let through, and the support is the graph's
    return np.where(np.abs(w) <= atol, 0.0, w)


def second_eigenvalue(w: np.ndarray) -> float:
    """``|lambda_2|``: the second-largest eigenvalue magnitude of a symmetric mixing matrix (0 for one agent)."""
    w = np.asarray(w, dtype=np.float64)
    if w.shape[0] < 2:
        return 0.0
    mags = np.sort(np.abs(np.linalg.eigvalsh(0.5 * (w + w.T))))[::-1]
    return float(mags[1])


def spectral_gap(w: np.ndarray) -> float:
    """``1 - |lambda_2|``: the fraction of disagreement gossip removes per round, asymptotically."""
    return 1.0 - second_eigenvalue(w)
