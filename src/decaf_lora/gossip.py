"""Gossip from your own training loop: one agent per process under ``torch.distributed``, the library's exchange and
mixing, your optimizer steps.

    torchrun --nproc-per-node 4 train.py

    torch.manual_seed(0)                                  # the same LoRA A on every process
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gossip = Gossip(model, "ring", "decaf", every=8, optimizer=opt)
    for batch in my_private_batches:                      # this process's agent trains on its own data
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
        gossip.step()                                     # every 8th call: exchange with the neighbours, mix in place

Agent ``i`` is process ``i`` and the topology has one agent per process. Every ``every`` calls to :meth:`Gossip.step`
the process sends its LoRA factors (and trained head) to its neighbours in this round's graph, receives theirs and
mixes them into the model's LoRA slot in place, exactly as the distributed engine does: the same payload description
(:class:`~decaf_lora.payload.PayloadSpec`), the same point-to-point exchange with the same deadline handshake
(:func:`~decaf_lora.engine.distributed.point_to_point`: a neighbour that misses ``timeout`` is left out on both ends),
the same screening (shape, dtype, finite values, ``max_norm``; a rejected neighbour leaves the row, which is
renormalized), the same byte accounting, and the algorithm's own ``mix`` with the engine's stacking (own factors
first, then each received copy; parts a neighbour did not send are NaN). So the numbers are the library's mix of the
gathered factors. Each mix returns this agent's metrics row (columns of :data:`~decaf_lora.engine.loop.ROW_SCHEMA`
plus the algorithm's statistics); every process's rows are gathered, and process 0 rewrites ``metrics_path``.

A ``transformers.Trainer`` launched by torchrun would wrap the model in ``DistributedDataParallel`` and average every
process's gradients: one centralized model, not N agents. :func:`one_agent_per_process` joins torchrun's process
group for the gossip and then hides torchrun's environment from transformers and Accelerate, which then train each
process's agent alone; :meth:`Gossip.callback` mixes from the Trainer's step loop and refuses a Trainer that would
still run data-parallel. Any DDP wrapper found around the model (or a Trainer's ``model_wrapped``) is refused.
See docs/gossip.md.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

from . import algorithms
from .adapters import AgentStates, adapted_layers
from .algorithms import Algorithm, LayerInfo, RunFacts
from .engine.distributed import collect_rows, gathered, init_default_group, launched_by_torchrun, point_to_point
from .engine.loop import ROW_SCHEMA, Exchange, mix_agents
from .engine.screening import outgoing, renormalize_without
from .engine.transport import Transport
from .errors import DecafError
from .payload import PayloadSpec
from .rundir import write_jsonl
from .topology import LinkFailures, Network, Topology

# GossipCallback is served by the module's __getattr__ (built on first use), so it is not listed here.
__all__ = ["Gossip", "one_agent_per_process", "data_parallel_wrappers", "STATE_AFTER_MIX", "HIDDEN_ENV"]

#: What happens to the optimizer's moments of the LoRA factors and heads after a mix (the engine's policy).
STATE_AFTER_MIX = ("reset", "keep")
#: torchrun's variables that make transformers and Accelerate run data-parallel; hidden by one_agent_per_process.
HIDDEN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
)
#: The metrics columns a gossip call reports (plus the algorithm's declared statistics).
COLUMNS = (
    "round",
    "agent",
    "neighbors",
    "rejected",
    "timed_out",
    "payload_rejected",
    "bytes_sent",
    "bytes_received",
    "seconds",
)
COLLECTIVE_TIMEOUT = 1800.0
_instances = 0  # Gossip objects made in this process: each gets its own store keys (same order on every process)


def _dist():
    import torch.distributed as dist

    return dist


# --------------------------------------------------------------------------------------------- process set-up
def one_agent_per_process(*, timeout: float = COLLECTIVE_TIMEOUT) -> tuple[int, int]:
    """Make this torchrun process one independent agent: join the process group, then hide torchrun from the rest.

    Call it first in a script launched by ``torchrun``, before ``TrainingArguments``/``Trainer`` (or TRL's trainers)
    are built. It initializes the default process group from torchrun's environment (the gossip's only channel), then
    removes the variables (:data:`HIDDEN_ENV`) from which transformers and Accelerate decide to run data-parallel:
    they then see one process, never wrap the model in ``DistributedDataParallel``, never average gradients and never
    shard the data, so each process trains its own agent on its own data. On a machine with several GPUs it first
    restricts this process to its local rank's GPU (``CUDA_VISIBLE_DEVICES``), because a Trainer that sees one process
    puts it on ``cuda:0`` and would spread it over every visible GPU with ``nn.DataParallel``. The group is gloo:
    the gossip moves LoRA factors (megabytes), which need no NCCL, and gloo leaves every GPU to the Trainer.
    ``timeout``: seconds a collective (set-up, the metrics gather) may wait for every process. Returns
    ``(rank, world size)``: the agent id and the number of agents.
    """
    dist = _dist()
    if not dist.is_available():
        raise DecafError("one_agent_per_process() needs a PyTorch build with torch.distributed.")
    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise DecafError(
                "one_agent_per_process() found no torchrun environment (RANK, WORLD_SIZE) and no process group; launch "
                "the script with `torchrun --nproc-per-node N script.py`."
            )
        _pin_local_gpu()
        init_default_group("gloo", datetime.timedelta(seconds=timeout))
    for key in HIDDEN_ENV:
        os.environ.pop(key, None)
    return dist.get_rank(), dist.get_world_size()


def _pin_local_gpu() -> None:
    """Let this process see only its local rank's GPU, if it can still be done (CUDA not yet initialized)."""
    local, per_node = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node < 2 or torch.cuda.is_initialized():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        count = torch.cuda._device_count_nvml() if hasattr(torch.cuda, "_device_count_nvml") else -1
        ids = [str(i) for i in range(max(count, 0))]
    if len(ids) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local % len(ids)]


def _ensure_group() -> tuple[object, int, int]:
    """The default process group's store, rank and world size; joins torchrun's group if none is initialized."""
    dist = _dist()
    if not dist.is_available():
        raise DecafError("Gossip needs a PyTorch build with torch.distributed.")
    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise DecafError(
                "Gossip found no initialized process group and no torchrun environment; launch one process per agent "
                "with `torchrun --nproc-per-node N script.py` (or call torch.distributed.init_process_group first)."
            )
        store = init_default_group("gloo", datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    else:
        store = dist.distributed_c10d._get_default_store()
    return store, dist.get_rank(), dist.get_world_size()


def _transport_device() -> torch.device:
    """Where the group's collectives want their tensors: the current GPU under NCCL, else the CPU."""
    dist = _dist()
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- data parallelism
def _loaded_trainer_class():
    """transformers' Trainer if it is already imported (never import it here: it takes seconds)."""
    module = sys.modules.get("transformers.trainer")
    return getattr(module, "Trainer", None) if module is not None else None


def data_parallel_wrappers(model: torch.nn.Module) -> list[str]:
    """Every ``DistributedDataParallel`` around ``model`` or inside it, and every Trainer whose ``model_wrapped`` is
    one: each would average this agent's gradients with the other processes' and make the run centralized.

    A wrapper holds the model, not the other way round, so the model alone cannot tell; one pass over the objects
    the garbage collector tracks finds them wherever they are (a fraction of a second, done at set-up and at the
    first mix).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    mine = {id(m) for m in model.modules()}
    trainer_cls = _loaded_trainer_class()
    kinds = (DDP, trainer_cls) if trainer_cls is not None else (DDP,)
    found = []
    with warnings.catch_warnings():  # isinstance on deprecated torch objects (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        candidates = [obj for obj in gc.get_objects() if isinstance(obj, kinds)]
    for obj in candidates:
        if isinstance(obj, DDP):
            theirs = {id(m) for m in obj.module.modules()}
            if theirs & mine:
                found.append(f"a DistributedDataParallel around {type(obj.module).__name__}")
        elif isinstance(getattr(obj, "model_wrapped", None), DDP):
            theirs = {id(m) for m in obj.model_wrapped.module.modules()}
            if theirs & mine:
                found.append(f"a {type(obj).__name__} whose model_wrapped is a DistributedDataParallel")
    return found


def _refuse_wrapped(model) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        raise DecafError(
            "model is a DistributedDataParallel, which averages every process's gradients and would make the run "
            "centralized; pass the PEFT model itself and do not wrap it in DDP (one agent per process)."
        )
    found = data_parallel_wrappers(model)
    if found:
        raise DecafError(
            f"model is wrapped by {found[0]}, which averages every process's gradients and would make the run "
            "centralized; do not wrap it in DDP (for a Trainer, call decaf_lora.gossip.one_agent_per_process() before "
            "TrainingArguments)."
        )


# --------------------------------------------------------------------------------------------- the gossip
class Gossip:
    """One agent per process: exchange and mix the LoRA factors of ``model`` with the topology's neighbours.

    ``model``: a PEFT LoRA model (adapter ``"default"``), the same architecture and the same initial A on every process.
    ``topology``: a graph name (``ring``, ``torus``, ...; see :data:`decaf_lora.topology.GRAPHS`) with ``mixing`` and
    ``topology_params``, or a :class:`~decaf_lora.topology.Topology` of world-size agents. ``schedule``/``link_drop``:
    as ``topology.schedule``/``topology.link_drop`` of a run. ``algorithm``: a name (``decaf``, ``dlora``, ...) with
    ``algorithm_options``, or an :class:`~decaf_lora.algorithms.Algorithm`. ``every``: optimizer steps between two
    mixes (K >= 1). ``optimizer``/``state_after_mix``: ``reset`` (default, as the engine) drops the optimizer's state
    of the LoRA factors and heads after each mix, since the mix (an SVD for DeCAF) changes their basis; ``keep`` keeps
    it. ``data_size``: this agent's number of examples (only server methods such as ``fedavg`` weigh by it).
    ``timeout``: seconds to wait for a neighbour's process at the exchange before mixing without it; ``max_norm``:
    screening bound on a received tensor's norm. ``metrics_path``: a JSONL file process 0 rewrites atomically after
    every mix with every process's rows.

    Every process must build its Gossip at the same point and call :meth:`step` (or :meth:`mix`) the same number of
    times: set-up and each mix include a collective. A refusal is raised on every process alike.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        topology: str | Topology = "ring",
        algorithm: str | Algorithm = "decaf",
        *,
        every: int = 1,
        algorithm_options: dict | None = None,
        mixing: str = "metropolis",
        topology_params: dict | None = None,
        schedule: str = "static",
        link_drop: float = 0.0,
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        state_after_mix: str = "reset",
        data_size: int | None = None,
        timeout: float = 300.0,
        max_norm: float = 1e4,
        metrics_path: str | os.PathLike | None = None,
    ):
        global _instances
        problem = _argument_problem(every, state_after_mix, timeout, max_norm, link_drop, data_size)
        layers = [] if problem else adapted_layers(model) if _is_module(model) else []
        if not problem and not layers:
            problem = (
                f"model ({type(model).__name__}) is not a PEFT LoRA model (no LoRA layer with the adapter 'default'); "
                "wrap it with peft.get_peft_model(model, peft.LoraConfig(...)) first."
            )
        if not problem:
            _refuse_wrapped(model)  # same on every process: DDP's own set-up is collective
        if problem and not _dist().is_initialized():
            raise DecafError(problem)
        store, rank, world = _ensure_group()
        if not problem and rank == 0 and metrics_path is not None:
            problem = _metrics_path_problem(os.fspath(metrics_path))
        self.model, self.rank, self.world = model, rank, world
        self.every, self.optimizer, self.state_after_mix = every, optimizer, state_after_mix
        self.metrics_path = os.fspath(metrics_path) if metrics_path is not None else None
        if not problem:
            try:
                self.topology = _topology(topology, world, mixing, topology_params or {})
                self.schedule = self.topology.schedule(schedule, seed=seed, p=link_drop)
                if link_drop and not isinstance(self.schedule, LinkFailures):
                    raise DecafError(
                        f"link_drop={link_drop!r} drops links only under schedule='link-failures' (not {schedule!r}); "
                        "set schedule='link-failures' or leave link_drop at 0."
                    )
                self.algorithm = _algorithm(algorithm, algorithm_options or {})
            except DecafError as exc:
                problem = str(exc)
        facts = self._facts(layers, schedule, link_drop, seed, data_size) if not problem else {}
        problem, sizes = _agree(Transport(None, rank, world, _transport_device(), timeout), facts, problem, rank)
        if problem:
            raise DecafError(problem)
        self.network = Network(self.schedule, seed=seed, data_sizes=np.array(sizes, dtype=np.float64))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"decaf-gossip-{attempt}-{_instances}"
        _instances += 1
        self.transport = Transport(_dist().PrefixStore(prefix, store), rank, world, _transport_device(), timeout)
        self.max_norm = float(max_norm)
        algo = self.algorithm
        self.states = AgentStates(model, 1, base_correction=algo.corrects_base)
        infos = tuple(
            LayerInfo(l, x.name, x.B.shape[0], x.A.shape[1], x.A.shape[0], x.scale) for l, x in enumerate(layers)
        )
        algo.setup(RunFacts(world, self.network, None, infos, seed))
        # the algorithm's per-agent state, as the engine makes it for every agent, cut to this agent's row
        self.algo_state = [
            {k: v[rank : rank + 1].clone() for k, v in algo.init_state(info, world).items()} for info in infos
        ]
        self.states.set_trainable(algo.trainable(0))
        self.round, self.steps = 0, 0
        self._exchanges = 0  # names the deadline handshake's store keys: never reused, even if `round` is reset
        self.metrics: list[dict] = []
        self._start = self._own_factors() if "start_factors" in algo.needs else None
        self._last = time.perf_counter()
        self._checked_wrappers = False

    # ----------------------------------------------------------------------------------------- set-up helpers
    def _facts(self, layers, schedule, link_drop, seed, data_size) -> dict:
        """What every process must agree on, compared once at set-up: the LoRA A (a digest), the adapted layers, the
        gossip's configuration; plus this agent's data size for the network."""
        digest = hashlib.sha256()
        for layer in layers:
            digest.update(layer.A.detach().float().cpu().contiguous().numpy().tobytes())
        shapes = [[x.name, list(x.A.shape), list(x.B.shape)] for x in layers]
        shapes += [[n, list(p.shape)] for n, p in sorted(_heads(self.model).items())]
        config = {
            "topology": self.topology.name,
            "matrix": hashlib.sha256(np.ascontiguousarray(self.topology.matrix).tobytes()).hexdigest(),
            "algorithm": self.algorithm.name,
            "options": json.dumps(self.algorithm.options(), sort_keys=True, default=str),
            "every": self.every,
            "schedule": schedule,
            "link_drop": link_drop,
            "seed": seed,
            "state_after_mix": self.state_after_mix,
        }
        return {"A": digest.hexdigest(), "layers": shapes, "config": config, "data_size": data_size}

    def _own_factors(self) -> dict[str, list[torch.Tensor]]:
        return {"A": [A.clone() for A in self.states.A], "B": [B.clone() for B in self.states.B]}

    def _follow_device(self) -> None:
        """Keep the stacked copies on the model's device (a Trainer moves the model after the Gossip was built)."""
        st = self.states
        dev = st.layers[0].A.device
        if st.A[0].device == dev:
            return
        st.A = [A.to(dev) for A in st.A]
        st.B = [B.to(dev) for B in st.B]
        st.H = {n: h.to(dev) for n, h in st.H.items()}
        if st.E is not None:
            st.E = [E.to(dev) for E in st.E]
        if self._start is not None:
            self._start = {k: [x.to(dev) for x in v] for k, v in self._start.items()}

    # ----------------------------------------------------------------------------------------- the public calls
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Call after every optimizer step: every ``every``-th call mixes and returns this agent's metrics row
        (else None). ``optimizer`` replaces the one given at construction (a Trainer's is made later)."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.mix(optimizer)

    def mix(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Exchange with this round's neighbours and mix the model's LoRA factors (and head) in place, now.

        Returns this agent's metrics row: ``round`` (from 1), ``agent`` (the rank), ``neighbors`` (agents whose payload
        this row weighed), ``rejected`` (neighbours whose payload failed screening), ``timed_out`` (neighbours whose
        process missed the deadline), ``payload_rejected`` (why the neighbours refused this agent's payload, or
        None), ``bytes_sent``/``bytes_received`` (payload bytes, once per receiver), ``seconds`` (``train``: since
        the previous mix returned, ``mix``: this call) and the algorithm's statistics (e.g. DeCAF's ``tsvd_tail``).
        """
        if optimizer is not None:
            self.optimizer = optimizer
        if self.state_after_mix == "reset" and self.optimizer is None:
            raise DecafError(
                "state_after_mix='reset' needs the optimizer to reset after the mix; pass optimizer=... to Gossip or "
                "to step()/mix(), or use state_after_mix='keep'."
            )
        if not self._checked_wrappers:  # a wrapper built after the Gossip (e.g. a Trainer's) is still refused
            _refuse_wrapped(self.model)
            self._checked_wrappers = True
        t, me, algo, st = self.round, self.rank, self.algorithm, self.states
        t_train = time.perf_counter() - self._last
        t0 = time.perf_counter()
        self._follow_device()
        st.store(0)  # the model's LoRA slot, as trained, is this agent's state
        plan = algo.plan(t, self.network)
        spec = PayloadSpec.of(st, algo.sends(t))
        if spec:
            payloads = {me: outgoing(spec, spec.pack(st, 0), None)} if len(plan.receivers(me)) else {}
            owner = np.arange(self.world)
            if plan.server:
                ex = gathered(
                    self.transport, plan, spec, [me], payloads, self.max_norm, lambda i: spec.wire_nbytes(st, 0)
                )
            else:
                n = self._exchanges
                ex = point_to_point(self.transport, n, plan, spec, [me], owner, payloads, self.max_norm)
        else:
            ex = Exchange()
        W = renormalize_without(plan.W, ex.faults.left_out())
        stats = self._mix_own(t, W, ex.received, spec)
        st.load(0)
        if self.state_after_mix == "reset":
            for p in st.parameters():
                self.optimizer.state.pop(p, None)
        st.set_trainable(algo.trainable(t + 1))
        if "start_factors" in algo.needs:
            self._start = self._own_factors()
        row = {
            "round": t + 1,
            "agent": me,
            **stats,
            "neighbors": int(np.count_nonzero(W[me]) - (W[me, me] != 0)),
            "rejected": ex.faults.rejected.get(me, []),
            "timed_out": ex.faults.timed_out.get(me, []),
            "payload_rejected": ex.faults.reasons.get(me),
            "bytes_sent": int(ex.sent.get(me, 0)),
            "bytes_received": int(ex.received_bytes.get(me, 0)),
            "seconds": {"train": t_train, "mix": time.perf_counter() - t0},
        }
        rows = sorted(collect_rows(self.transport, [self._checked(row)], ex.faults), key=lambda r: r["agent"])
        self.metrics += rows
        if self.metrics_path and me == 0:
            try:
                write_jsonl(self.metrics_path, self.metrics)
            except OSError as exc:  # warned, not raised: raising on process 0 alone would leave the others waiting
                warnings.warn(
                    f"could not write metrics_path={self.metrics_path!r} ({exc.strerror or exc}); the rows stay in "
                    "Gossip.metrics.",
                    stacklevel=2,
                )
        self.round += 1
        self._exchanges += 1
        self._last = time.perf_counter()
        return next(r for r in rows if r["agent"] == me)

    def callback(self):
        """A ``transformers.TrainerCallback`` that mixes every ``every`` optimizer steps of a Trainer (see
        :class:`GossipCallback`)."""
        return _make_callback_class()(self)

    # ----------------------------------------------------------------------------------------- mixing
    def _checked(self, row: dict) -> dict:
        """Only declared columns, strict JSON (a non-finite number becomes null), as the engine's rows."""
        unknown = set(row) - set(ROW_SCHEMA) - set(self.algorithm.stats)
        if unknown:
            raise DecafError(f"metrics row has undeclared columns {sorted(unknown)}; declare them in the stats.")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}

    def _mix_own(self, t: int, W: np.ndarray, received: dict[int, list[torch.Tensor]], spec: PayloadSpec) -> dict:
        """The engine's mix (:func:`decaf_lora.engine.loop.mix_agents`) for the one agent this process holds: global
        id = rank, stacked in slot 0."""
        stats = mix_agents(
            self.algorithm, self.states, self.algo_state, [self.rank], [0], t, W, received, spec, start=self._start
        )
        return {k: v[self.rank] for k, v in stats.items()}


# --------------------------------------------------------------------------------------------- checks
def _is_module(model) -> bool:
    return isinstance(model, torch.nn.Module)


def _heads(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    from .adapters import head_parameters

    return head_parameters(model)


def _argument_problem(every, state_after_mix, timeout, max_norm, link_drop, data_size) -> str | None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        return f"every={every!r} is not a number of optimizer steps; use an integer >= 1 (mix every K steps)."
    if state_after_mix not in STATE_AFTER_MIX:
        return f"state_after_mix={state_after_mix!r} is not known; choose one of: {', '.join(STATE_AFTER_MIX)}."
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        return f"timeout={timeout!r} must be a positive number of seconds to wait for a neighbour at the exchange."
    if not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        return f"max_norm={max_norm!r} must be >= 0 (0 turns the norm bound off)."
    if not isinstance(link_drop, (int, float)) or not 0 <= link_drop < 1:
        return f"link_drop={link_drop!r} is not a probability in [0, 1)."
    if data_size is not None and (isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1):
        return f"data_size={data_size!r} must be this agent's number of training examples, an integer >= 1."
    return None


def _topology(topology, world: int, mixing: str, params: dict) -> Topology:
    if isinstance(topology, Topology):
        topo = topology
    elif isinstance(topology, str):
        topo = Topology.build(topology, world, mixing=mixing, **params)
    else:
        raise DecafError(f"topology={topology!r} is neither a graph name (e.g. 'ring') nor a Topology.")
    if topo.n_agents != world:
        raise DecafError(
            f"topology has {topo.n_agents} agents but {world} processes run; one process is one agent, so build the "
            f"topology for {world} agents (or launch {topo.n_agents} processes)."
        )
    return topo


def _algorithm(algorithm, options: dict) -> Algorithm:
    if isinstance(algorithm, Algorithm):
        if options:
            raise DecafError("algorithm_options apply to an algorithm given by name; set them on the instance instead.")
        algo = algorithm
    elif isinstance(algorithm, str):
        try:
            algo = algorithms.get(algorithm, **options)
        except ValueError as exc:  # ConfigError lists its problems; one sentence is enough here
            raise DecafError(" ".join(getattr(exc, "problems", None) or [str(exc)])) from None
    else:
        raise DecafError(f"algorithm={algorithm!r} is neither a method name (e.g. 'decaf') nor an Algorithm.")
    if "activations" in algo.needs:
        raise DecafError(
            f"algorithm={algo.name!r} needs each agent's layer activations on its own data, which the gossip API "
            "cannot sample from your loop; use it through decaf_lora.run, or choose another method."
        )
    return algo


def _metrics_path_problem(path: str) -> str | None:
    """The metrics file must be new (nothing is overwritten) and its folder writable, checked before training."""
    if os.path.exists(path) and (not os.path.isfile(path) or os.path.getsize(path) > 0):
        return f"metrics_path={path!r} already exists; name a new file (nothing is overwritten)."
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return f"metrics_path={path!r} is in a folder that does not exist or is not writable; name a writable file."
    return None


def _agree(transport: Transport, facts: dict, problem: str | None, rank: int) -> tuple[str | None, list]:
    """Compare every process's set-up once (one small all-gather), so that a refusal is raised on every process
    alike instead of leaving the others waiting in the first exchange: the first problem anywhere is everyone's.
    Returns the problem (or None) and every agent's data size."""
    everyone = transport.gather_json({"problem": problem, **facts})
    for r, part in enumerate(everyone):
        if part["problem"]:
            return (part["problem"] if r == rank else f"process {r} refused its set-up: {part['problem']}"), []
    first = everyone[0]
    given = [part["data_size"] is not None for part in everyone]
    if any(given) and not all(given):  # a missing size read as 1 would silently skew a server method's weights
        r = given.index(not given[0])
        return (
            f"process {r} {'gave' if given[r] else 'gave no'} data_size while process 0 "
            f"{'did' if given[0] else 'did not'}; give every agent's data_size, or none of them (equal weights)."
        ), []
    sizes = [part["data_size"] or 1 for part in everyone]
    for r, part in enumerate(everyone):
        if part["layers"] != first["layers"]:
            return (
                f"process {r} adapts other layers than process 0 ({part['layers'][:2]} vs {first['layers'][:2]}); "
                "every agent must wrap the same model with the same LoraConfig."
            ), sizes
        if part["config"] != first["config"]:
            diff = sorted(k for k in first["config"] if part["config"].get(k) != first["config"][k])
            return (
                f"process {r} was given another gossip configuration than process 0 (differs in {', '.join(diff)}); "
                "build Gossip with the same arguments on every process."
            ), sizes
    differ = [r for r, part in enumerate(everyone) if part["A"] != first["A"]]
    if differ:
        return (
            f"process {differ[0]} starts from another LoRA A than process 0; all agents must start from the same A "
            "(DeCAF and factor averaging assume it): call torch.manual_seed(S) with the same S on every process "
            "before peft.get_peft_model, and build Gossip before training."
        ), sizes
    return None, sizes


# --------------------------------------------------------------------------------------------- the Trainer callback
#: ``TrainingArguments.parallel_mode`` values under which a Trainer averages gradients over processes.
DATA_PARALLEL_MODES = ("distributed", "sagemaker_data_parallel", "tpu")


def data_parallel_problem(args) -> str | None:
    """Why a Trainer with these ``TrainingArguments`` would average the agents' gradients, or None."""
    world = int(getattr(args, "world_size", 1) or 1)
    mode = getattr(getattr(args, "parallel_mode", None), "value", None)
    if world > 1 or mode in DATA_PARALLEL_MODES:
        return (
            f"the Trainer runs data-parallel over {world} processes (parallel_mode={mode}), so it would wrap the "
            "model in DistributedDataParallel and average every agent's gradients into one centralized model; call "
            "decaf_lora.gossip.one_agent_per_process() at the top of the script, before TrainingArguments."
        )
    return None


_callback_class = None


def _make_callback_class():
    """Build GossipCallback on first use: importing transformers' Trainer machinery takes seconds, and ``import
    decaf_lora`` must not pay for it."""
    global _callback_class
    if _callback_class is not None:
        return _callback_class
    from transformers import TrainerCallback

    class GossipCallback(TrainerCallback):
        """Mix every ``gossip.every`` optimizer steps of a ``transformers.Trainer`` (and so of TRL's trainers).

        ``Trainer(model=model, args=args, train_dataset=my_shard, callbacks=[gossip.callback()])`` after
        :func:`one_agent_per_process`. It refuses, on every process alike and before the Trainer wraps anything, a
        Trainer that would run data-parallel (DDP averages gradients: a centralized run), a Trainer of another model,
        and any DDP around the model. The mix happens at the end of every K-th optimizer step (after the step, before
        logging and checkpointing), with the Trainer's optimizer for ``state_after_mix``; a Trainer resumed from a
        checkpoint continues the round count from its global step (the algorithm's own state is not checkpointed).
        """

        def __init__(self, gossip: Gossip):
            self.gossip = gossip

        def _check(self, args, model) -> None:
            problem = data_parallel_problem(args)
            if problem:
                raise DecafError(problem)
            if model is not None and model is not self.gossip.model:
                raise DecafError(
                    f"the Trainer trains a {type(model).__name__} that is not the model this Gossip mixes; pass the "
                    "same PEFT model to Gossip and to the Trainer."
                )

        def on_init_end(self, args, state, control, model=None, **kwargs):
            self._check(args, model)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._check(args, model)
            _refuse_wrapped(self.gossip.model)
            g = self.gossip
            g.steps, g.round = int(state.global_step), int(state.global_step) // g.every

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.gossip.step(optimizer=optimizer)

    _callback_class = GossipCallback
    return GossipCallback


def __getattr__(name: str):
    """``GossipCallback`` subclasses ``transformers.TrainerCallback``, so it is built on first access (PEP 562)."""
    if name == "GossipCallback":
        return _make_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
