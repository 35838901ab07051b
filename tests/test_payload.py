"""The payload: what goes on the wire, how many bytes, and what a receiver accepts back."""

import pytest
import torch
from conftest import cfg_for, digits_task

from decaf_lora import run
from decaf_lora.config import POISONS, load_config
from decaf_lora.engine import make_engine
from decaf_lora.engine.screening import outgoing, screen
from decaf_lora.payload import PayloadSpec, encode


@pytest.fixture
def states(tmp_path):
    cfg = load_config(cfg_for(tmp_path, lora={"rank": 4, "ranks": [2, 4]}))
    return make_engine(cfg, task=digits_task(), write=False, progress=False).states


def test_an_agent_sends_only_its_own_ranks_share_of_the_factors(tmp_path):
    rows = run(cfg_for(tmp_path, rounds=1, lora={"rank": 4, "ranks": [2, 4]}), task=digits_task(), write=False).metrics
    sent = {m["agent"]: m["bytes_sent"] for m in rows}
    per_rank = 4 * ((64 + 32) + (32 + 10))  # float32 A and B rows/columns of fc1 (64 -> 32) and fc2 (32 -> 10)
    ranks = 2 * 8  # the announced rank of each of the two layers, int64
    payload = {a: (2 if a % 2 == 0 else 4) * per_rank + ranks for a in range(4)}
    assert sent == {a: 2 * payload[a] for a in range(4)}  # a ring: two neighbours each


def test_a_lower_rank_payload_decodes_back_to_the_stored_width(states):
    spec = PayloadSpec.of(states, ("A", "B"))
    flat, counts = encode(spec.pack(states, 0))  # agent 0 has rank 2 of 4
    reason, parts = spec.decode(flat, counts)
    assert reason is None
    assert [tuple(p.shape) for p in parts] == [e.shape for e in spec.entries]
    for p, full in zip(parts, spec.rows(states, 0)):
        assert torch.equal(p, full)  # the padded slots come back as the zeros they are


def test_every_factor_must_have_exactly_the_announced_rank(states):
    spec = PayloadSpec.of(states, ("A", "B"))
    parts = spec.pack(states, 1)  # the ranks of every layer first, then A and B of layer 0 at rank 4, ...
    assert spec.entries[0].part == "ranks" and parts[0].tolist() == [4, 4]
    parts[2] = parts[2][:, :2]  # B of layer 0 cut to rank 2 while rank 4 is announced
    reason, _ = spec.decode(*encode(parts))
    assert reason == "a tensor of 256 bytes instead of B of layer 0 (32, 4) float32"


@pytest.mark.parametrize("parts_sent", [("B",), ("A", "B")])
@pytest.mark.parametrize("cut", [lambda t: t[..., :-1], lambda t: t.reshape(-1)[:-1]])
def test_a_cut_factor_is_refused_never_taken_for_a_lower_rank(states, parts_sent, cut):
    """The poisoned B of a B-only payload, one column short, looks exactly like a lower-rank B: the announced rank
    tells them apart (with equal ranks, the size must be the full one)."""
    spec = PayloadSpec.of(states, parts_sent)
    parts = spec.pack(states, 1)
    parts[1] = cut(parts[1]).contiguous()
    reason, _ = spec.decode(*encode(parts))
    assert reason.startswith("a tensor of") and "of layer 0" in reason


def test_with_equal_ranks_a_payload_carries_no_rank_and_must_be_full(tmp_path):
    engine = make_engine(load_config(cfg_for(tmp_path)), task=digits_task(), write=False, progress=False)
    spec = PayloadSpec.of(engine.states, ("B",))
    assert [e.part for e in spec.entries] == ["B", "B"]
    parts = spec.pack(engine.states, 0)
    parts[0] = parts[0][:, :1].contiguous()
    reason, _ = spec.decode(*encode(parts))
    assert reason == "a tensor of 128 bytes instead of B of layer 0 (32, 2) float32"


@pytest.mark.parametrize("kind", POISONS)
def test_the_screen_refuses_every_poison_and_accepts_the_honest_payload(states, kind):
    spec = PayloadSpec.of(states, ("A", "B"))
    honest, parts = screen(spec, *outgoing(spec, spec.pack(states, 1), None), max_norm=1e4)
    assert honest is None and all(torch.equal(p, r) for p, r in zip(parts, spec.rows(states, 1)))
    reason, parts = screen(spec, *outgoing(spec, spec.pack(states, 1), kind), max_norm=1e4)
    assert reason and parts == []
