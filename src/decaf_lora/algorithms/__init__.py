"""Aggregation methods, one file each, reachable by name.

>>> from decaf_lora import algorithms
>>> algo = algorithms.get("decaf", split="balanced")
>>> algorithms.available()
['decaf', 'dlora', 'dlora-fa', 'fedavg', 'local']
"""

# Importing a method's module registers it.
from . import decaf, dlora, dlora_fa, fedavg, local  # noqa: E402,F401  (after the registry exists)
from .base import FACTORS, Algorithm, MixOutput
from .decaf import DeCAF
from .dlora import DLoRA
from .dlora_fa import DLoRAFA
from .fedavg import FedAvg, server_weights
from .local import Local
from .registry import available, get, register

__all__ = [
    "FACTORS",
    "Algorithm",
    "MixOutput",
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
