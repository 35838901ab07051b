"""Golden numbers: two rounds of every registered algorithm on the tiny digits ModuleTask, pinned at rtol 1e-5.

In the style of torchtune's recipe tests: a refactor of the engine must keep today's numbers. The expected values
live in ``golden_numbers.json`` beside this file; a method without an entry fails with the command that pins it
(``pytest tests/engine/test_golden.py --update-golden``), which is the one deliberate step of adding a method.
"""

import json
import os

import numpy as np
import pytest
from conftest import digits_task

from decaf_lora import algorithms
from decaf_lora.engine import run

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_numbers.json")
RTOL = 1e-5

# Beyond one default run per registered method: the paths where today's numbers depend on more than the method.
EXTRA = {
    "decaf+faults": (
        "decaf",
        {
            "lora": {"rank": 2, "dropout": 0.1},
            "faults": {"link_drop": 0.3, "agent_dropout": 0.25, "poison_agent": 1, "poison": "shape"},
        },
    ),
    "fedavg+dropout": ("fedavg", {"faults": {"agent_dropout": 0.3}, "agents": 6}),
    "dlora+keep": ("dlora", {"optim": {"lr": 5e-2, "state_after_mix": "keep"}, "topology": {"name": "complete"}}),
    "decaf+balanced+procrustes": ("decaf", {"algorithm_options": {"split": "balanced", "gauge": "procrustes"}}),
}


def cases() -> dict[str, tuple[str, dict]]:
    return {**{name: (name, {}) for name in algorithms.available()}, **EXTRA}


def config(algo: str, extra: dict) -> dict:
    cfg = {
        "agents": 4,
        "rounds": 2,
        "local_steps": 6,
        "eval_every": 2,
        "optim": {"lr": 5e-2},
        "lora": {"rank": 2},
        "algorithm": algo,
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_size": 16},
    }
    cfg.update(extra)
    return cfg


def numbers(algo: str, extra: dict) -> dict:
    metrics = run(config(algo, extra), task=digits_task(), write=False).metrics
    rounds = sorted({m["round"] for m in metrics})
    by = {(m["round"], m["agent"]): m for m in metrics}
    agents = sorted({m["agent"] for m in metrics})
    return {
        "train_loss": [[by[t, a]["train_loss"] for a in agents] for t in rounds],
        "eval_accuracy": [by[rounds[-1], a]["eval_accuracy"] for a in agents],
        "local_accuracy": [by[rounds[-1], a]["local_accuracy"] for a in agents],
    }


def close(got, want) -> bool:
    if want is None or got is None:
        return got is want
    if isinstance(want, list):
        return len(got) == len(want) and all(close(g, w) for g, w in zip(got, want))
    return bool(np.isclose(got, want, rtol=RTOL, atol=0))


@pytest.mark.parametrize("case", sorted(cases()))
def test_golden_numbers_are_unchanged(case, request):
    algo, extra = cases()[case]
    got = numbers(algo, extra)
    stored = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
    if request.config.getoption("--update-golden"):
        stored[case] = got
        from decaf_lora.rundir import write_json

        write_json(GOLDEN, dict(sorted(stored.items())))
        return
    assert case in stored, (
        f"no golden numbers for {case!r}; pin them with `pytest tests/engine/test_golden.py --update-golden -k {case}`"
    )
    for key, want in stored[case].items():
        assert close(got[key], want), f"{case}: {key} changed\n  now   {got[key]}\n  was   {want}"
