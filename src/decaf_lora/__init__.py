"""decaf-lora: decentralized LoRA fine-tuning with DeCAF and its baselines.

``decaf_lora.run(config)`` trains (config: a YAML path, a dict or a :class:`RunConfig`). The layers below it are
importable on their own: :mod:`decaf_lora.topology` (graphs, mixing matrices, schedules),
:mod:`decaf_lora.partition` (data splits), :mod:`decaf_lora.lowrank` (exact factored truncated SVD),
:mod:`decaf_lora.algorithms` (DeCAF, the baselines and the peer methods behind one interface; ``decaf methods``
lists them), :mod:`decaf_lora.tasks`.
"""

from . import algorithms, lowrank, partition, topology
from .compare import compare
from .config import ConfigError, RunConfig, load_config
from .engine import RunResult, make_engine, resume, run
from .errors import DecafError
from .gossip import Gossip, one_agent_per_process  # one agent per process from your own loop / a Trainer
from .lowrank import split_factors, truncated_svd_of_sum
from .merge import merge_adapters as merge_adapters  # explicit re-export; product-space merge of PEFT adapters
from .partition import Partition, make_partition
from .topology import Topology

__version__ = "0.1.0"
__all__ = [
    "algorithms",
    "lowrank",
    "partition",
    "topology",
    "DecafError",
    "ConfigError",
    "RunConfig",
    "RunResult",
    "load_config",
    "run",
    "resume",
    "make_engine",
    "compare",
    "merge_adapters",
    "Topology",
    "Gossip",
    "one_agent_per_process",
    "Partition",
    "make_partition",
    "truncated_svd_of_sum",
    "split_factors",
    "__version__",
]
