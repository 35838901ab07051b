"""The package's layers (docs/architecture.md): every import points down, and no import cycle exists anywhere.

Imports are read from the source with ``ast`` (module level and inside functions alike: a lazy import is still an
import), so the check needs no import of the package. The one door upward is by design and by name only:
``decaf_lora.registry`` imports, by string, the module that fills each registry (plugin style).
"""

import ast
import pathlib

import networkx as nx

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "decaf_lora"

#: Lowest first. A module may import modules of lower layers, and modules of its own layer in its own package.
LAYERS = [
    ["errors"],
    ["registry"],
    ["config"],
    ["lowrank", "rundir", "data", "partition", "topology"],
    ["algorithms", "adapters", "report"],  # report reads run files only, so the engine may call it
    ["tasks", "payload"],
    [
        "engine.batches",
        "engine.screening",
        "engine.transport",
        "engine.checkpoint",
        "engine.training",
        "engine.split",
        "engine.build",
    ],
    ["engine.loop"],
    ["engine.simulation", "engine.distributed"],
    ["engine"],
    ["merge", "demo", "gossip", "methods"],
    ["export", "compare"],
    ["cli", ""],
    ["__main__"],
]


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the LAYERS entry it falls under) by the longest matching entry."""
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name and module.startswith(name + ".")):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    assert best is not None, f"decaf_lora.{module} is in no layer of LAYERS; add it where it belongs"
    return best


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Package-internal modules ``name`` imports (resolved to the most specific known module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("decaf_lora"):
                stem = node.module[len("decaf_lora") :].lstrip(".")
            else:
                continue
            targets = [f"{stem}.{a.name}".lstrip(".") for a in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("decaf_lora") :].lstrip(".") for a in node.names if a.name.startswith("decaf_lora")]
        for t in targets:
            if t in known:
                found.add(t)
                break
    found.discard(name)
    return found


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for target in imports(name, path, set(mods)):
            g.add_edge(name, target)
    return g


def test_there_is_no_import_cycle():
    cycles = list(nx.simple_cycles(graph()))
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_every_import_points_down_the_layers():
    upward = []
    for a, b in graph().edges:
        (la, na), (lb, nb) = layer_of(a), layer_of(b)
        same_package = na.split(".")[0] == nb.split(".")[0] != ""
        if lb > la or (lb == la and not same_package):
            upward.append(f"decaf_lora.{a} (layer {la}) imports decaf_lora.{b} (layer {lb})")
    assert upward == []


def test_the_checker_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """The check must not be blind: an import hidden inside a function counts."""
    fake = tmp_path / "decaf_lora"
    (fake / "engine").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("def f():\n    from .engine import loop\n")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "loop.py").write_text("from .. import config\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    g = graph()
    assert ("config", "engine.loop") in g.edges and list(nx.simple_cycles(g))
