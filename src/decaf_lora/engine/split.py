"""From one labelled pool to: a shared test set, and per agent a training split and a local evaluation split.

Everything here is driven by ``split_seed`` alone, so changing the training seed never changes who holds what.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, RunConfig
from ..errors import PartitionError
from ..partition import Partition, make_partition


@dataclass
class DataSplit:
    test: np.ndarray
    train: list[np.ndarray]  # per agent, indices into the task's examples
    local_eval: list[np.ndarray]  # per agent
    partition: Partition  # over the training pool, histograms per agent

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.train])


def split_data(
    labels: np.ndarray,
    cfg: RunConfig,
    keys: np.ndarray | None = None,
    test: np.ndarray | None = None,
    default_train: int = 0,
) -> DataSplit:
    """``test``: a fixed shared test set (a user's own); otherwise ``task.test_examples`` drawn at random.
    ``default_train``: examples drawn when ``task.train_examples`` is -1 (0 = all)."""
    n = len(labels)
    rng = np.random.default_rng([cfg.split_seed, 17])
    if test is not None:
        test = np.sort(np.asarray(test, dtype=np.int64))
        pool = rng.permutation(np.setdiff1d(np.arange(n), test))
    else:
        n_test = cfg.task.test_examples
        if n_test >= n:
            raise ConfigError(
                [f"task.test_examples={n_test} leaves no training data out of {n} examples; use fewer than {n}."]
            )
        perm = rng.permutation(n)
        test, pool = np.sort(perm[:n_test]), perm[n_test:]
    if cfg.task.shots:
        per_class = cfg.task.shots * cfg.agents
        picked = [pool[labels[pool] == c][:per_class] for c in np.unique(labels[pool])]
        pool = rng.permutation(np.concatenate(picked))
    else:
        wanted = default_train if cfg.task.train_examples < 0 else cfg.task.train_examples
        if wanted and wanted < len(pool):
            pool = pool[:wanted]
    if cfg.agents > len(pool):
        raise ConfigError(
            [
                f"agents={cfg.agents} is more than the {len(pool)} training examples; use fewer agents or raise "
                "task.train_examples."
            ]
        )
    scheme = cfg.partition.scheme
    params = {
        "dirichlet": {"alpha": cfg.partition.alpha, "min_size": min(cfg.partition.min_size, len(pool) // cfg.agents)},
        "shards": {"shards_per_agent": cfg.partition.shards_per_agent},
        "natural": {"keys": keys[pool] if keys is not None else None},
    }.get(scheme, {})
    if scheme == "natural" and keys is None:
        raise ConfigError(["partition.scheme=natural needs partition.key to name a column of the data set."])
    try:
        part = make_partition(scheme, labels[pool], cfg.agents, seed=cfg.split_seed, **params)
    except PartitionError as exc:
        raise ConfigError([_in_config_terms(str(exc), scheme, len(pool), cfg)]) from None
    train, local = [], []
    for a, ix in enumerate(part.indices):
        if len(ix) == 0:
            raise ConfigError(
                [
                    f"partition.scheme={scheme} left agent {a} without data; use fewer agents, more data or another "
                    "scheme."
                ]
            )
        mine = pool[ix][np.random.default_rng([cfg.split_seed, 23, a]).permutation(len(ix))]
        k = min(cfg.partition.local_eval, len(mine) // 5)
        local.append(np.sort(mine[:k]))
        train.append(np.sort(mine[k:]))
    return DataSplit(test, train, local, part)


def _in_config_terms(message: str, scheme: str, n: int, cfg: RunConfig) -> str:
    """A partition error in the words of the config: the fields to change, and the simplest way out."""
    import re

    message = re.sub(r"\b(alpha|min_size|shards_per_agent)=", r"partition.\1=", message)
    if scheme == "dirichlet" and "min_size" in message:
        return (
            f"partition.scheme=dirichlet could not give each of the {cfg.agents} agents partition.min_size="
            f"{min(cfg.partition.min_size, n // cfg.agents)} of the {n} training examples at partition.alpha="
            f"{cfg.partition.alpha}; lower partition.min_size, raise partition.alpha, use partition.scheme=iid, or "
            "draw more data (task.train_examples)."
        )
    return message
