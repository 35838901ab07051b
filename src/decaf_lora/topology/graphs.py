"""Communication graphs: who may talk to whom.

Every builder returns an undirected ``networkx.Graph`` on nodes ``0..n-1`` without self-loops. Random builders take
a seed and are deterministic for it. Mixing weights live in :mod:`decaf_lora.topology.mixing`, not here: the same
graph can be mixed by several rules.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import networkx as nx
import numpy as np

from ..config import MAX_AGENTS
from ..errors import TopologyError
from ..registry import GRAPHS


def _check_agents(n: int, minimum: int = 1, name: str = "agents") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise TopologyError(f"{name}={n!r} is invalid; use an integer >= {minimum}.")
    if name == "agents" and n > MAX_AGENTS:  # mixing matrices are dense agents x agents: refuse before allocating
        raise TopologyError(f"agents={n} is too large; use at most {MAX_AGENTS} agents (mixing matrices are dense).")
    return int(n)


def _check_seed(seed, graph: str) -> int:
    """The graph's own seed as the data and training seeds take it: an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise TopologyError(f"seed={seed!r} is invalid for {graph}; use an integer from 0 to {2**32 - 1}.")
    return int(seed)


def _empty(n: int) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(range(n))
    return g


def ring(n: int) -> nx.Graph:
    """Cycle 0-1-...-(n-1)-0: the sparsest connected regular graph, the paper's hardest setting."""
    n = _check_agents(n)
    g = _empty(n)
    g.add_edges_from((i, (i + 1) % n) for i in range(n) if n > 1 and i != (i + 1) % n)
    return g


def complete(n: int) -> nx.Graph:
    """Everyone talks to everyone: gossip with uniform weights equals exact averaging in one round."""
    return nx.complete_graph(_check_agents(n))


def _grid_shape(n: int, rows: int | None, cols: int | None, name: str) -> tuple[int, int]:
    if rows is None and cols is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        cols = n // rows
    elif rows is None:
        cols = _check_agents(cols, name="cols")
        rows = n // cols
    elif cols is None:
        rows = _check_agents(rows, name="rows")
        cols = n // rows
    if rows * cols != n:
        raise TopologyError(
            f"{name} rows={rows} x cols={cols} != agents={n}; pick rows and cols whose product is the number of agents."
        )
    return int(rows), int(cols)


def torus(n: int, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    """2-D grid with wrap-around (each agent has up to 4 neighbours); the most square shape by default."""
    n = _check_agents(n)
    rows, cols = _grid_shape(n, rows, cols, "torus")
    g = _empty(n)
    for i in range(rows):
        for j in range(cols):
            a = i * cols + j
            for b in (((i + 1) % rows) * cols + j, i * cols + (j + 1) % cols):
                if a != b:
                    g.add_edge(a, b)
    return g


def grid(n: int, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    """2-D grid without wrap-around."""
    n = _check_agents(n)
    rows, cols = _grid_shape(n, rows, cols, "grid")
    g = _empty(n)
    for i in range(rows):
        for j in range(cols):
            a = i * cols + j
            if i + 1 < rows:
                g.add_edge(a, a + cols)
            if j + 1 < cols:
                g.add_edge(a, a + 1)
    return g


def star(n: int) -> nx.Graph:
    """Agent 0 is the centre; every other agent talks only to it."""
    n = _check_agents(n)
    g = _empty(n)
    g.add_edges_from((0, i) for i in range(1, n))
    return g


def bipartite(n: int, hubs: int = 2) -> nx.Graph:
    """The paper's hub-and-spokes graph: agents ``0..hubs-1`` are hubs, each spoke talks to every hub.

    With 10 agents and 2 hubs, Metropolis-Hastings weights give spokes 7/9 = 0.78 on themselves and 1/9 = 0.11 to
    each hub, and hubs 1/9 on themselves: the paper's 0.78 / 0.11 / 0.12 up to its rounding.
    """
    n = _check_agents(n, 2)
    if isinstance(hubs, bool) or not isinstance(hubs, (int, np.integer)) or not 1 <= hubs < n:
        raise TopologyError(f"hubs={hubs!r} is invalid for {n} agents; use an integer from 1 to {n - 1}.")
    g = _empty(n)
    g.add_edges_from((h, s) for h in range(hubs) for s in range(hubs, n))
    return g


def exponential(n: int) -> nx.Graph:
    """Static exponential graph: agent i talks to i +- 2^k (mod n) for every power of two below n.

    Degree O(log n) with a spectral gap that stays bounded away from zero as n grows (Ying et al., 2021).
    """
    n = _check_agents(n)
    g = _empty(n)
    k = 1
    while k < n:
        g.add_edges_from((i, (i + k) % n) for i in range(n) if (i + k) % n != i)
        k *= 2
    return g


def erdos_renyi(n: int, p: float | None = None, seed: int = 0, max_tries: int = 1000) -> nx.Graph:
    """G(n, p), resampled (deterministically from ``seed``) until connected.

    Default ``p = min(1, 2 ln(n) / n)``: above the connectivity threshold, so few resamples are needed.
    """
    n = _check_agents(n)
    seed = _check_seed(seed, "erdos_renyi")
    if p is None:
        p = 1.0 if n <= 2 else min(1.0, 2 * math.log(n) / n)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise TopologyError(f"p={p!r} is invalid for erdos_renyi; use an edge probability in (0, 1].")
    for attempt in range(max_tries):
        g = nx.gnp_random_graph(n, float(p), seed=int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0]))
        if nx.is_connected(g):
            return g
    raise TopologyError(
        f"erdos_renyi with p={p} gave no connected graph on {n} agents in {max_tries} tries; raise p (try >= "
        f"{min(1.0, 2 * math.log(max(n, 2)) / n):.2f})."
    )


def small_world(n: int, k: int = 4, p: float = 0.1, seed: int = 0) -> nx.Graph:
    """Watts-Strogatz: a ring lattice with k nearest neighbours, each edge rewired with probability p; connected."""
    n = _check_agents(n, 3)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k < n:
        raise TopologyError(f"k={k!r} is invalid for small_world with {n} agents; use an integer from 2 to {n - 1}.")
    seed = _check_seed(seed, "small_world")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise TopologyError(f"p={p!r} is invalid for small_world; use a rewiring probability in [0, 1].")
    try:
        return nx.connected_watts_strogatz_graph(n, int(k), float(p), tries=1000, seed=int(seed))
    except nx.NetworkXError as exc:  # pragma: no cover - only for extreme p
        raise TopologyError(f"small_world with k={k}, p={p} gave no connected graph; lower p or raise k.") from exc


MAX_EDGE_FILE_BYTES = 64 << 20
MAX_LINE_CHARS = 256


def _parse_edge_file(path: str) -> list[tuple[int, int]]:
    """Pairs from a text file, reading at most a bounded line at a time so a damaged file cannot exhaust memory."""
    if not os.path.isfile(path):
        raise TopologyError(f"edges={path!r} is not a readable file; give a text file with one 'i j' pair per line.")
    if os.path.getsize(path) > MAX_EDGE_FILE_BYTES:
        raise TopologyError(
            f"edges file {path!r} is larger than {MAX_EDGE_FILE_BYTES >> 20} MiB; an edge list of "
            f"{MAX_AGENTS} agents fits well below that, so it is not an edge list."
        )
    pairs = []
    try:
        with open(path, encoding="utf-8") as fh:
            lineno = 0
            while raw := fh.readline(MAX_LINE_CHARS + 1):
                lineno += 1
                if len(raw) > MAX_LINE_CHARS and not raw.endswith("\n"):
                    raise TopologyError(
                        f"edges file {path!r} line {lineno} is longer than {MAX_LINE_CHARS} characters; "
                        "each line must be two agent ids like '0 1'."
                    )
                line = raw.split("#", 1)[0].replace(",", " ").strip()
                if not line:
                    continue
                parts = line.split()
                try:
                    if len(parts) != 2:
                        raise ValueError
                    pairs.append((int(parts[0]), int(parts[1])))
                except ValueError:
                    raise TopologyError(
                        f"edges file {path!r} line {lineno} reads {raw.strip()!r}; each line must be two agent ids "
                        "like '0 1'."
                    ) from None
    except UnicodeDecodeError:
        raise TopologyError(f"edges file {path!r} is not UTF-8 text; write one 'i j' pair per line.") from None
    return pairs


def edge_list(n: int | None = None, edges: str | os.PathLike | Iterable[Sequence[int]] = ()) -> nx.Graph:
    """A user graph from a list of pairs or a text file (one ``i j`` per line, ``#`` comments, commas allowed).

    ``n`` defaults to the largest id + 1; agents without edges make the graph disconnected, which mixing rejects.
    """
    pairs = _parse_edge_file(os.fspath(edges)) if isinstance(edges, (str, os.PathLike)) else [tuple(e) for e in edges]
    for e in pairs:
        if len(e) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in e):
            raise TopologyError(f"edge {e!r} is invalid; each edge must be a pair of integer agent ids.")
    if not pairs and n is None:
        raise TopologyError("edges is empty; give at least one pair of agent ids, or use another topology.")
    limit = MAX_AGENTS if n is None else n
    for a, b in pairs:  # before anything is sized by the largest id
        if not (0 <= a < limit and 0 <= b < limit):
            raise TopologyError(
                f"edge ({a}, {b}) names an agent outside 0..{limit - 1}; fix the edge list"
                + (" or raise agents." if n is not None else f" (at most {MAX_AGENTS} agents).")
            )
    top = max(max(e) for e in pairs) + 1 if pairs else 0
    n = _check_agents(top if n is None else n)
    g = _empty(n)
    for a, b in pairs:
        if a != b:  # self-loops carry no information: every agent always keeps a self weight
            g.add_edge(int(a), int(b))
    return g


for _name, _fn, _aliases in (
    ("ring", ring, ()),
    ("complete", complete, ("fully-connected", "full")),
    ("torus", torus, ()),
    ("grid", grid, ()),
    ("star", star, ()),
    ("bipartite", bipartite, ("hub",)),
    ("exponential", exponential, ()),
    ("erdos-renyi", erdos_renyi, ("er",)),
    ("small-world", small_world, ()),
    ("edges", edge_list, ("edge-list",)),
):
    GRAPHS.register(_fn, name=_name, aliases=_aliases)


def canonical_graph_name(name: str) -> str:
    return GRAPHS.canonical(name)


def build_graph(name: str, n_agents: int | None, **params) -> nx.Graph:
    """Build a named graph; unknown names or parameters raise one clear :class:`TopologyError`."""
    import inspect

    key = canonical_graph_name(name)
    fn = GRAPHS.get(key)

    accepted = [p for p in inspect.signature(fn).parameters if p != "n"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TopologyError(
            f"topology {key!r} does not take {', '.join(unknown)}; its parameters are: {', '.join(accepted) or 'none'}."
        )
    return fn(n_agents, **params)
