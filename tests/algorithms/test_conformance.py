"""Checks every registered algorithm must pass (a PEFT-style table of cases taken from the registry), plus the
registry's errors. A new method is in this table the moment it is registered."""

import dataclasses

import numpy as np
import pytest
import torch

from decaf_lora import algorithms
from decaf_lora.algorithms import PARTS, REDUCTIONS, LayerContext, LayerInfo, RunFacts
from decaf_lora.algorithms.base import NEEDS
from decaf_lora.errors import DecafError, ShapeError
from decaf_lora.topology import Network, Topology

#: Option variants beyond each method's defaults (methods not named here run with their defaults only).
VARIANTS = {
    "decaf": [{"split": "balanced"}, {"gauge": "procrustes"}, {"gauge": "lstsq", "method": "qr"}],
}


def cases():
    out = []
    for name in algorithms.available():
        out.append((name, {}))
        out += [(name, o) for o in VARIANTS.get(name, [])]
    return out


CASES = cases()
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in CASES]
N, D, R, K = 6, 12, 3, 10


def layer(gen, n=N, d=D, r=R, k=K, dtype=torch.float64, common_a=False):
    A = torch.randn(n, r, k, generator=gen, dtype=torch.float64)
    if common_a:
        A = A[:1].expand(n, r, k).clone()
    B = torch.randn(n, d, r, generator=gen, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def ring_w(n=N):
    return torch.from_numpy(Topology.build("ring", n).matrix)


def make(name, options, n=N, ranks=None):
    """An algorithm set up as the engine would (facts of a ring of n agents, one layer)."""
    algo = algorithms.get(name, **options)
    network = Network(Topology.build("ring", n).schedule("static"), data_sizes=np.arange(1, n + 1))
    algo.setup(RunFacts(n, network, ranks, (LayerInfo(0, "layer", D, K, R, 1.0),), 0))
    return algo


def context(algo, gen, A, B, agents, inputs, dtype=torch.float64):
    """What the engine hands ``mix`` for one layer: everything the method declares it needs."""
    ctx = LayerContext(layer=0, name="layer", scale=1.0, agents=torch.tensor(agents), inputs=torch.tensor(inputs))
    if "start_factors" in algo.needs:
        ctx.start_A = A[: len(agents)] + 0.1 * torch.randn(A[: len(agents)].shape, generator=gen, dtype=A.dtype)
        ctx.start_B = B[: len(agents)] + 0.1 * torch.randn(B[: len(agents)].shape, generator=gen, dtype=B.dtype)
    if "activations" in algo.needs:
        ctx.activations = torch.randn(len(agents), 32, K, generator=gen, dtype=dtype)
    if algo.corrects_base:
        ctx.E = torch.randn(len(inputs), D, K, generator=gen, dtype=dtype)
    state = algo.init_state(LayerInfo(0, "layer", D, K, R, 1.0), max(inputs) + 1)
    ctx.state = {k: v[torch.tensor(agents)] for k, v in state.items()}
    return ctx


def mix(algo, gen, A, B, W, agents=None, inputs=None, self_index=None, round_=0):
    agents = list(range(W.shape[0])) if agents is None else agents
    inputs = list(range(A.shape[0])) if inputs is None else inputs
    ctx = context(algo, gen, A, B, agents, inputs, dtype=A.dtype if A.dtype == torch.float64 else torch.float32)
    return algo.mix(A, B, W, round_=round_, self_index=self_index, context=ctx)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_mix_keeps_shapes_dtypes_and_is_deterministic(gen, name, options):
    algo = make(name, options)
    A, B = layer(gen, dtype=torch.bfloat16)
    out1 = mix(algo, torch.Generator().manual_seed(5), A, B, ring_w())
    out2 = mix(algo, torch.Generator().manual_seed(5), A, B, ring_w())
    A1, B1 = out1
    assert A1.shape == A.shape and B1.shape == B.shape
    assert A1.dtype == torch.bfloat16 and B1.dtype == torch.bfloat16
    assert torch.isfinite(A1.float()).all() and torch.isfinite(B1.float()).all()
    assert torch.equal(out1.A, out2.A) and torch.equal(out1.B, out2.B)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_interface_declares_what_is_sent_trained_reported_and_needed(name, options):
    algo = make(name, options)
    cls = type(algo)
    assert cls.summary and cls.paper and cls.__doc__
    for t in range(12):
        assert set(algo.sends(t)) <= set(PARTS)
        assert set(algo.trainable(t)) <= {"A", "B", "head"} and algo.trainable(t)
    assert set(cls.stats.values()) <= set(REDUCTIONS)
    assert set(cls.needs) <= set(NEEDS)
    for f in dataclasses.fields(algo):  # every option carries help text, shown by --help-config
        assert f.metadata.get("help"), f.name
    sends = set(algo.sends())
    numel = algo.payload_numel((3, 10), (12, 3))
    assert numel == 30 * ("A" in sends) + 36 * ("B" in sends) + 120 * ("E" in sends)


def test_decaf_and_dlora_send_the_same_bytes():
    shapes = ((8, 4096), (4096, 8))
    assert (
        algorithms.get("decaf").payload_numel(*shapes) == algorithms.get("dlora").payload_numel(*shapes) == 2 * 8 * 4096
    )
    assert algorithms.get("dlora-fa").payload_numel(*shapes) == 8 * 4096
    assert algorithms.get("local").payload_numel(*shapes) == 0


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_identity_mixing_keeps_every_product(gen, name, options):
    algo = make(name, options)
    A, B = layer(gen)
    A1, B1 = mix(algo, gen, A, B, torch.eye(N, dtype=torch.float64))
    torch.testing.assert_close(B1 @ A1, B @ A, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_a_rank_with_some_agents_computes_the_same_rows_as_the_simulator(name, options):
    """What a distributed rank does: its own agents plus received neighbours, the matching rows of W."""
    algo = make(name, options, n=8)
    gen = torch.Generator().manual_seed(7)
    A, B = layer(gen, n=8, common_a=(name == "dlora-fa"))
    W = torch.from_numpy(Topology.build("ring", 8).matrix)
    full = mix(algo, torch.Generator().manual_seed(1), A, B, W)
    own, stack = [2, 3], [2, 3, 1, 4]  # own agents first, then received neighbours, as the engine stacks them
    part = mix(algo, torch.Generator().manual_seed(1), A[stack], B[stack], W[own][:, stack], own, stack, [0, 1])
    if "activations" in algo.needs or algo.corrects_base or "start_factors" in algo.needs:
        return  # the context is drawn per call; shapes and finiteness are all that compare here
    # products, not factors: an SVD's signs depend on the order of the stacked inputs
    torch.testing.assert_close(part.B @ part.A, (full.B @ full.A)[own], atol=1e-12, rtol=0)


def unsent_part_violations(algo, gen, rounds=range(12)) -> list[str]:
    """Perturb every part of every neighbour's copy that ``sends(t)`` does not declare, and report each round in
    which some agent's mixed output changed: such a method would mix stale data under torchrun."""
    W = ring_w()
    violations = []
    for t in rounds:
        A, B = layer(gen)
        own = list(range(N))
        inputs = own + own  # own factors first, then every agent's received copy (as the engine stacks them)
        sent = set(algo.sends(t))
        off = W - torch.diag(torch.diag(W))
        rows = torch.cat([torch.diag(torch.diag(W)), off], dim=1)
        A2, B2 = torch.cat([A, A]), torch.cat([B, B])
        outputs = []
        for noise in (0.0, 1.0):
            A_in, B_in = A2.clone(), B2.clone()
            if "A" not in sent:
                A_in[N:] += noise * torch.randn(A.shape, generator=gen, dtype=A.dtype)
            if "B" not in sent:
                B_in[N:] += noise * torch.randn(B.shape, generator=gen, dtype=B.dtype)
            ctx = context(algo, torch.Generator().manual_seed(t), A_in, B_in, own, inputs)
            if algo.corrects_base and "E" not in sent:
                ctx.E[N:] += noise
            outputs.append(algo.mix(A_in, B_in, rows, round_=t, self_index=list(range(N)), context=ctx))
        a, b = outputs
        for part in (a.A, a.B) + (() if a.E is None else (a.E,)):
            assert torch.isfinite(part).all(), f"round {t}: non-finite output on finite inputs"
        # not bit-equality: MKL may round the same product differently at another memory alignment, and a unit
        # perturbation of a part the method reads moves the output by far more than 1e-9
        same = lambda x, y: torch.allclose(x, y, rtol=1e-9, atol=1e-9)  # noqa: E731
        if not (same(a.A, b.A) and same(a.B, b.B) and (a.E is None or same(a.E, b.E))):
            unsent = sorted({"A", "B"} - sent) + (["E"] if algo.corrects_base and "E" not in sent else [])
            violations.append(f"round {t}: output depends on a part that was not sent ({unsent})")
    return violations


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_every_method_reads_only_what_it_sends(gen, name, options):
    assert unsent_part_violations(make(name, options), gen) == []


@dataclasses.dataclass
class ReadsUnsentA(algorithms.DLoRA):
    """Deliberately broken: declares that it sends only B, yet averages its neighbours' A."""

    name = "test-reads-unsent-a"
    summary = "broken on purpose"
    paper = "none"

    def sends(self, round_=0):
        return ("B", "head")


def test_the_unsent_part_check_catches_a_method_that_reads_what_was_not_sent(gen):
    violations = unsent_part_violations(ReadsUnsentA(), gen, rounds=range(3))
    assert len(violations) == 3 and "['A']" in violations[0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: algorithms.get("decaff"), r"algorithm='decaff' is not known; choose one of: .*decaf, .*dlora"),
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
