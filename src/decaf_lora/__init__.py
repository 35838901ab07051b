"""decaf-lora: decentralized LoRA fine-tuning with DeCAF and its baselines.

The core layers are importable on their own: :mod:`decaf_lora.topology` (graphs, mixing matrices, schedules),
:mod:`decaf_lora.partition` (data splits), :mod:`decaf_lora.lowrank` (exact factored truncated SVD) and
:mod:`decaf_lora.algorithms` (local, dlora, dlora-fa, decaf, fedavg behind one interface).
"""

from . import algorithms, lowrank, partition, topology
from .errors import DecafError
from .lowrank import split_factors, truncated_svd_of_sum
from .partition import Partition, make_partition
from .topology import Topology

__version__ = "0.1.0"
__all__ = [
    "algorithms", "lowrank", "partition", "topology", "DecafError", "Topology", "Partition", "make_partition",
    "truncated_svd_of_sum", "split_factors", "__version__",
]
