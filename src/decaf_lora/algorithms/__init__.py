"""Aggregation methods, one file each, reachable by name.

>>> from decaf_lora import algorithms
>>> algo = algorithms.get("decaf", split="balanced")
>>> "decaf" in algorithms.available()
True

A new method is one file here with a dataclass of options and one ``@register`` line, plus its import below.
"""

# Importing a method's module registers it.
from . import decaf, dlora, dlora_fa, fedavg, local  # noqa: F401
from .base import (
    FACTORS,
    PARTS,
    REDUCTIONS,
    Algorithm,
    LayerContext,
    LayerInfo,
    MixingPlan,
    MixOutput,
    RunFacts,
)
from .decaf import DeCAF
from .dlora import DLoRA
from .dlora_fa import DLoRAFA
from .fedavg import FedAvg, server_weights
from .local import Local
from .registry import available, get, register

__all__ = [
    "FACTORS",
    "PARTS",
    "REDUCTIONS",
    "Algorithm",
    "LayerContext",
    "LayerInfo",
    "MixingPlan",
    "MixOutput",
    "RunFacts",
    "available",
    "get",
    "register",
    "DeCAF",
    "DLoRA",
    "DLoRAFA",
    "FedAvg",
    "Local",
    "server_weights",
]
