"""Checks every registered algorithm must pass (PEFT-style table of cases), plus the registry's errors."""

import pytest
import torch

from decaf_lora import algorithms
from decaf_lora.algorithms import FACTORS
from decaf_lora.errors import DecafError, ShapeError
from decaf_lora.topology import Topology

CASES = [
    ("local", {}),
    ("dlora", {}),
    ("dlora-fa", {}),
    ("fedavg", {}),
    ("decaf", {}),
    ("decaf", {"split": "balanced"}),
    ("decaf", {"gauge": "procrustes"}),
    ("decaf", {"gauge": "lstsq", "method": "qr"}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in CASES]


def layer(gen, n=6, d=12, r=3, k=10, dtype=torch.float64, common_a=False):
    A = torch.randn(n, r, k, generator=gen, dtype=torch.float64)
    if common_a:
        A = A[:1].expand(n, r, k).clone()
    B = torch.randn(n, d, r, generator=gen, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def ring_w(n=6):
    return torch.from_numpy(Topology.build("ring", n).matrix)


def test_the_five_methods_are_registered():
    assert algorithms.available() == ["decaf", "dlora", "dlora-fa", "fedavg", "local"]


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_mix_keeps_shapes_dtypes_and_is_deterministic(gen, name, options):
    algo = algorithms.get(name, **options)
    A, B = layer(gen, dtype=torch.bfloat16)
    out1, out2 = algo.mix(A, B, ring_w()), algo.mix(A, B, ring_w())
    A1, B1 = out1
    assert A1.shape == A.shape and B1.shape == B.shape
    assert A1.dtype == torch.bfloat16 and B1.dtype == torch.bfloat16
    assert torch.isfinite(A1.float()).all() and torch.isfinite(B1.float()).all()
    assert torch.equal(out1.A, out2.A) and torch.equal(out1.B, out2.B)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_interface_declares_what_is_sent_and_trained(name, options):
    algo = algorithms.get(name, **options)
    for t in range(4):
        assert set(algo.sends(t)) <= set(FACTORS)
        assert set(algo.trainable(t)) <= set(FACTORS) and algo.trainable(t)
    assert algo.communication in ("gossip", "server", "none")
    numel = algo.payload_numel((3, 10), (12, 3))
    assert numel == 30 * ("A" in algo.sends()) + 36 * ("B" in algo.sends())


def test_decaf_and_dlora_send_the_same_bytes():
    shapes = ((8, 4096), (4096, 8))
    assert (
        algorithms.get("decaf").payload_numel(*shapes) == algorithms.get("dlora").payload_numel(*shapes) == 2 * 8 * 4096
    )
    assert algorithms.get("dlora-fa").payload_numel(*shapes) == 8 * 4096
    assert algorithms.get("local").payload_numel(*shapes) == 0


@pytest.mark.parametrize(
    "name, options", [c for c in CASES if c[0] != "fedavg"], ids=[i for i, c in zip(IDS, CASES) if c[0] != "fedavg"]
)
def test_identity_mixing_keeps_every_product(gen, name, options):
    A, B = layer(gen)
    A1, B1 = algorithms.get(name, **options).mix(A, B, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(B1 @ A1, B @ A, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "name, options",
    [c for c in CASES if c[0] not in ("fedavg", "local")],
    ids=[i for i, c in zip(IDS, CASES) if c[0] not in ("fedavg", "local")],
)
def test_a_rank_with_some_agents_computes_the_same_rows_as_the_simulator(gen, name, options):
    """What a distributed rank does: its own agents plus received neighbours, the matching rows of W."""
    algo = algorithms.get(name, **options)
    A, B = layer(gen, n=8, common_a=(name == "dlora-fa"))
    W = torch.from_numpy(Topology.build("ring", 8).matrix)
    full = algo.mix(A, B, W)
    own = [2, 3]
    stack = [1, 2, 3, 4]  # own agents and their ring neighbours, in the order they were received
    part = algo.mix(A[stack], B[stack], W[own][:, stack], self_index=[1, 2])
    torch.testing.assert_close(part.B @ part.A, (full.B @ full.A)[own], atol=1e-12, rtol=0)
    torch.testing.assert_close(part.A, full.A[own], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: algorithms.get("decaff"),
            r"algorithm='decaff' is not known; choose one of: decaf, dlora, dlora-fa, fedavg, local",
        ),
        (
            lambda: algorithms.get("decaf", splitt="balanced"),
            r"algorithm 'decaf' has no option splitt; its options are: gauge, method, skip_zero, split",
        ),
        (
            lambda: algorithms.get("dlora", split="balanced"),
            r"algorithm 'dlora' has no option split; its options are: none",
        ),
        (lambda: algorithms.get("decaf", split="half"), r"split='half' is not known"),
        (lambda: algorithms.get("decaf", gauge="spin"), r"gauge='spin' is not known"),
    ],
)
def test_registry_errors_name_the_allowed_values(call, match):
    with pytest.raises(DecafError, match=match):
        call()


def test_names_are_forgiving_about_case_and_underscores():
    assert isinstance(algorithms.get("DLoRA_FA"), algorithms.DLoRAFA)


@pytest.mark.parametrize(
    "A_shape, B_shape, W, self_index, match",
    [
        ((4, 3, 10), (4, 12, 2), torch.eye(4), None, r"do not fit"),
        ((4, 3, 10), (3, 12, 3), torch.eye(4), None, r"do not fit"),
        ((4, 3, 10), (4, 12, 3), torch.eye(3), None, r"W has shape \(3, 3\); it must be \(output agents, 4\)"),
        ((4, 3, 10), (4, 12, 3), torch.full((4, 4), 0.3), None, r"W row 0 sums to 1.2"),
        ((4, 3, 10), (4, 12, 3), torch.full((2, 4), 0.25), None, r"not square; pass self_index"),
        ((4, 3, 10), (4, 12, 3), torch.full((2, 4), 0.25), [0, 9], r"self_index must give"),
        ((4, 3, 10), (4, 12, 3), -torch.eye(4), None, r"non-negative"),
        ((3, 10), (12, 3), torch.eye(1), None, r"3-D tensors"),
    ],
)
@pytest.mark.parametrize("name", ["dlora", "dlora-fa", "decaf"])
def test_bad_layer_inputs_raise_shape_errors(name, A_shape, B_shape, W, self_index, match):
    with pytest.raises(ShapeError, match=match):
        algorithms.get(name).mix(torch.zeros(A_shape), torch.zeros(B_shape), W, self_index=self_index)


class Alternating(algorithms.DLoRA):
    """A phase-alternating method (ADF-LoRA's shape) needs only to override ``trainable``."""

    name = "test-alternating"

    def trainable(self, round_=0):
        return ("A",) if (round_ // 2) % 2 else ("B",)


def test_a_new_method_plugs_in_with_one_registration(monkeypatch):
    monkeypatch.setattr(
        algorithms.registry, "_REGISTRY", dict(algorithms.registry._REGISTRY)
    )  # leave the real one alone
    algorithms.register(Alternating)
    algo = algorithms.get("test-alternating")
    assert [algo.trainable(t) for t in range(4)] == [("B",), ("B",), ("A",), ("A",)]
    with pytest.raises(DecafError, match="registered twice"):
        algorithms.register(type("Other", (algorithms.DLoRA,), {"name": "test-alternating"}))
