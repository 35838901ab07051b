"""Aggregation methods, one file each, reachable by name.

>>> from decaf_lora import algorithms
>>> algo = algorithms.get("decaf", split="balanced")
>>> "decaf" in algorithms.available()
True

A new method is one file here: a dataclass of options and one ``@register`` line. Every module of this package is
imported below, and importing a method's module registers it.
"""

import importlib as _importlib
import pkgutil as _pkgutil

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

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")

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
