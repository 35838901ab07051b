"""decaf_lora.gossip: one agent per process from the user's own loop and from a transformers Trainer.

The torchrun tests launch this file as the worker (``python -m torch.distributed.run ... tests/test_gossip.py
SCENARIO OUT``) on a tiny random MLP with PEFT LoRA: two processes train on different data, save their factors just
before and just after each mix, and the test checks the mix against the library's ``Algorithm.mix`` of the gathered
factors, the metrics rows, the deadline and the screening, and that a Trainer's gradients are not averaged (and that
a data-parallel Trainer is refused). Every subprocess is bounded by a timeout, so CI never hangs. The refusals that
need no second process run in-process, in a one-process gloo group.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
TIMEOUT = 420
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
EVERY = 2
ALGOS = ("decaf", "dlora", "dlora-fa", "fedavg")


# --------------------------------------------------------------------------------------------- the tiny model
class TinyNet(torch.nn.Module):
    """8 inputs, 3 classes; LoRA on fc1, fc2 a trained head (PEFT's modules_to_save)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        if labels is None:
            return logits
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def tiny_peft(seed: int = 0):
    import peft

    torch.manual_seed(seed)  # the same seed on every process: the same LoRA A
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["fc2"])
    return peft.get_peft_model(TinyNet(), cfg)


def private_data(rank: int, n: int = 64):
    """Each agent's own data: different inputs and labels per process."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, 8, generator=g) + rank, torch.randint(0, 3, (n,), generator=g)


def snapshot(model) -> dict[str, torch.Tensor]:
    """The agent's trained state by stable names: LoRA factors and the head."""
    return {
        n: p.detach().clone().contiguous()
        for n, p in model.named_parameters()
        if ".lora_A." in n or ".lora_B." in n or "modules_to_save" in n
    }


# --------------------------------------------------------------------------------------------- the worker
def worker_own(out: pathlib.Path) -> None:
    """The plain-loop API: a refused set-up (different A), then three methods, each trained and mixed."""
    from safetensors.torch import save_file

    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip

    rank = int(os.environ["RANK"])
    try:  # process 1 seeds differently: both processes must refuse, neither may hang
        Gossip(tiny_peft(seed=rank), "ring", "decaf", every=EVERY, state_after_mix="keep")
        refused = None
    except DecafError as exc:
        refused = str(exc)
    (out / f"refused-{rank}.txt").write_text(refused or "")
    x, y = private_data(rank)
    for algo in ALGOS:
        model = tiny_peft()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        metrics = out / f"metrics-{algo}.jsonl" if algo == "decaf" else None
        gossip = Gossip(model, "ring", algo, every=EVERY, optimizer=opt, timeout=120, metrics_path=metrics)
        rounds = 3 if algo == "decaf" else 1
        for t in range(1, rounds + 1):
            for s in range(EVERY):
                batch = slice(8 * s, 8 * s + 8)
                loss = model(x[batch], y[batch])["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad()
                if s < EVERY - 1:
                    assert gossip.step() is None
            if t == 2:  # process 1 reaches the exchange after process 0's deadline: both mix alone
                gossip.transport.timeout = 2.0
                if rank == 1:
                    time.sleep(6)
            if t == 3 and rank == 1:  # process 1 sends garbage: process 0 rejects it, mixes without it
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if ".lora_B." in n:
                            p.add_(1e6)
            save_file(snapshot(model), str(out / f"{algo}-pre-{rank}-{t}.safetensors"))
            row = gossip.step()
            gossip.transport.timeout = 120
            save_file(snapshot(model), str(out / f"{algo}-post-{rank}-{t}.safetensors"))
            state = sum(len(opt.state.get(p, {})) for p in model.parameters() if p.requires_grad)
            (out / f"{algo}-row-{rank}-{t}.json").write_text(json.dumps({**row, "optimizer_state": state}))


class Recorder:
    """Saves the factors at every mixing step; listed before the gossip callback it sees them unmixed, after it
    mixed (with the optimizer state left for the mixed parameters)."""

    def __init__(self, out: pathlib.Path, when: str):
        self.out, self.when = out, when

    def __call__(self, args, state, control, model=None, optimizer=None, **kwargs):
        from safetensors.torch import save_file

        if state.global_step % EVERY:
            return
        rank = int(os.environ.get("GOSSIP_TEST_RANK", "0"))
        save_file(snapshot(model), str(self.out / f"trainer-{self.when}-{rank}-{state.global_step}.safetensors"))
        if self.when == "post":
            left = sum(len(optimizer.state.get(p, {})) for p in model.parameters() if p.requires_grad)
            (self.out / f"trainer-optstate-{rank}-{state.global_step}.txt").write_text(str(left))


def trainer_parts(out: pathlib.Path, rank: int, model, callbacks):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    x, y = private_data(rank)
    args = TrainingArguments(
        output_dir=str(out / f"trainer-{rank}"),
        per_device_train_batch_size=8,
        max_steps=2 * EVERY,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )

    def as_callback(rec):
        return type("Rec", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: rec(*a, **k)})()

    wrapped = [as_callback(c) if isinstance(c, Recorder) else c for c in callbacks]
    data = [{"x": x[i], "labels": y[i]} for i in range(len(y))]
    return Trainer(model=model, args=args, train_dataset=data, callbacks=wrapped)


def worker_trainer(out: pathlib.Path) -> None:
    """A Trainer after one_agent_per_process(): each process trains its own agent, the callback mixes."""
    from decaf_lora.gossip import HIDDEN_ENV, Gossip, one_agent_per_process

    rank, world = one_agent_per_process()
    os.environ["GOSSIP_TEST_RANK"] = str(rank)
    model = tiny_peft()
    gossip = Gossip(model, "ring", "decaf", every=EVERY, timeout=120)
    callbacks = [Recorder(out, "pre"), gossip.callback(), Recorder(out, "post")]
    trainer = trainer_parts(out, rank, model, callbacks)
    trainer.train()
    facts = {
        "rank": rank,
        "world": world,
        "hidden": [k for k in HIDDEN_ENV if k in os.environ],
        "parallel_mode": trainer.args.parallel_mode.value,
        "trainer_world_size": trainer.args.world_size,
        "model_wrapped": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "rounds": gossip.round,
        "rows": gossip.metrics,
    }
    (out / f"trainer-facts-{rank}.json").write_text(json.dumps(facts))


def worker_ddp(out: pathlib.Path) -> None:
    """A Trainer under torchrun WITHOUT one_agent_per_process(): the callback refuses it; the same Trainer without
    the callback does average the gradients (the pitfall is real), and a later mix refuses the DDP it left."""
    import torch.distributed as dist

    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip

    rank = int(os.environ["RANK"])
    os.environ["GOSSIP_TEST_RANK"] = str(rank)
    model = tiny_peft()
    gossip = Gossip(model, "ring", "decaf", every=EVERY, state_after_mix="keep")
    facts = {}
    try:
        trainer_parts(out, rank, model, [gossip.callback()])
        facts["refused"] = None
    except DecafError as exc:
        facts["refused"] = str(exc)
    trainer = trainer_parts(out, rank, model, [])
    trainer.train()
    facts["model_wrapped"] = type(trainer.model_wrapped).__name__
    B = [p.detach() for n, p in model.named_parameters() if ".lora_B." in n][0].contiguous()
    both = [torch.zeros_like(B) for _ in range(dist.get_world_size())]
    dist.all_gather(both, B)
    facts["B_identical"] = bool(torch.equal(both[0], both[1]))
    facts["B_trained"] = bool(B.abs().sum() > 0)
    try:
        gossip.mix()
        facts["mix_refused"] = None
    except DecafError as exc:
        facts["mix_refused"] = str(exc)
    (out / f"ddp-facts-{rank}.json").write_text(json.dumps(facts))


# --------------------------------------------------------------------------------------------- launching
def torchrun(scenario: str, out: pathlib.Path, procs: int = 2) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        str(HERE),
        scenario,
        str(out),
    ]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out)
    try:
        text, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        pytest.fail(f"torchrun {scenario} did not finish in {TIMEOUT} s:\n{text[-3000:]}")
    assert proc.returncode == 0, text[-4000:]
    return text


def load(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def library_mix(algo: str, pre: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """What the library's mix gives every agent from the gathered factors: ``Algorithm.mix`` on the stack of all
    agents with the round's plan on the ring (the simulator's call), the head by weighted averaging."""
    from decaf_lora import Topology, algorithms
    from decaf_lora.topology import Network

    method = algorithms.get(algo)
    W = torch.from_numpy(method.plan(0, Network(Topology.build("ring", len(pre)).schedule("static"))).W)
    out = [dict(p) for p in pre]
    for a_key in [k for k in pre[0] if ".lora_A." in k]:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        A = torch.stack([p[a_key] for p in pre])
        B = torch.stack([p[b_key] for p in pre])
        mixed = method.mix(A, B, W)
        for i in range(len(pre)):
            out[i][a_key], out[i][b_key] = mixed.A[i], mixed.B[i]
    for key in [k for k in pre[0] if "modules_to_save" in k]:
        H = torch.stack([p[key] for p in pre])
        for i in range(len(pre)):
            out[i][key] = torch.einsum("j,j...->...", W[i].to(H.dtype), H)
    return out


def assert_close(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(
            got[k], want[k], **{"rtol": 1e-5, "atol": 1e-6, **tol}, msg=lambda m, k=k: f"{k}: {m}"
        )


def assert_mixed(got: dict, want: dict) -> None:
    """``got`` is ``want`` up to the SVD's sign per direction: DeCAF's new factors come out of an SVD, whose signs
    depend on the order the factors were stacked in (the engine stacks the agent's own first, the reference stacks by
    agent id), while the product, the singular values and the head are the same. Linear methods match exactly."""
    assert got.keys() == want.keys()
    fixed = dict(got)
    for a_key in [k for k in got if ".lora_A." in k]:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        sign = torch.sign((got[a_key] * want[a_key]).sum(1))
        sign[sign == 0] = 1
        fixed[a_key], fixed[b_key] = got[a_key] * sign[:, None], got[b_key] * sign[None, :]
    assert_close(fixed, want, atol=1e-5, rtol=1e-4)
    assert_close(products(got), products(want), atol=1e-6, rtol=1e-4)


def products(state: dict) -> dict[str, torch.Tensor]:
    return {a: state[a.replace(".lora_A.", ".lora_B.")] @ state[a] for a in state if ".lora_A." in a}


def payload_bytes(state: dict, parts) -> int:
    keys = {
        "A": [k for k in state if ".lora_A." in k],
        "B": [k for k in state if ".lora_B." in k],
        "head": [k for k in state if "modules_to_save" in k],
    }
    return sum(state[k].numel() * state[k].element_size() for p in parts for k in keys.get(p, []))


# --------------------------------------------------------------------------------------------- torchrun tests
@pytest.mark.distributed
def test_own_loop_mixes_as_the_library_with_deadline_and_screening(tmp_path):
    from decaf_lora import algorithms

    torchrun("own", tmp_path)
    for r in (0, 1):
        assert "same A" in (tmp_path / f"refused-{r}.txt").read_text()
    for algo in ALGOS:
        pre = [load(tmp_path / f"{algo}-pre-{r}-1.safetensors") for r in (0, 1)]
        post = [load(tmp_path / f"{algo}-post-{r}-1.safetensors") for r in (0, 1)]
        rows = [json.loads((tmp_path / f"{algo}-row-{r}-1.json").read_text()) for r in (0, 1)]
        # no gradient averaging: the two agents trained apart on their own data
        assert not torch.equal(
            pre[0]["base_model.model.fc1.lora_B.default.weight"], pre[1]["base_model.model.fc1.lora_B.default.weight"]
        )
        want = library_mix(algo, pre)
        for r in (0, 1):
            check = assert_mixed if algo == "decaf" else assert_close
            check(post[r], want[r])
            sent = payload_bytes(pre[r], algorithms.get(algo).sends(0))
            row = rows[r]
            assert (row["round"], row["agent"], row["neighbors"]) == (1, r, 1)
            assert (row["rejected"], row["timed_out"], row["payload_rejected"]) == ([], [], None)
            assert row["bytes_sent"] == row["bytes_received"] == sent
            assert row["optimizer_state"] == 0  # state_after_mix='reset': the mixed parameters start afresh
            assert set(algorithms.get(algo).stats) <= set(row)
    # round 2: process 1 was late; both ends mixed alone (same product) and logged the other as timed out
    for r in (0, 1):
        row = json.loads((tmp_path / f"decaf-row-{r}-2.json").read_text())
        assert row["timed_out"] == [1 - r] and row["bytes_received"] == 0 and row["bytes_sent"] == 0
        pre = load(tmp_path / f"decaf-pre-{r}-2.safetensors")
        post = load(tmp_path / f"decaf-post-{r}-2.safetensors")
        assert_close(products(post), products(pre), atol=1e-6, rtol=1e-4)
    # round 3: process 1's payload fails screening; process 0 mixes without it, and process 1 learns why
    row0 = json.loads((tmp_path / "decaf-row-0-3.json").read_text())
    row1 = json.loads((tmp_path / "decaf-row-1-3.json").read_text())
    assert row0["rejected"] == [1] and row0["payload_rejected"] is None
    assert "norm" in row1["payload_rejected"] and row1["rejected"] == []
    pre0, post0 = load(tmp_path / "decaf-pre-0-3.safetensors"), load(tmp_path / "decaf-post-0-3.safetensors")
    assert_close(products(post0), products(pre0), atol=1e-6, rtol=1e-4)
    # the metrics file (written by process 0) holds both processes' rows of every round, as returned
    lines = [json.loads(s) for s in (tmp_path / "metrics-decaf.jsonl").read_text().splitlines()]
    assert [(m["round"], m["agent"]) for m in lines] == [(t, a) for t in (1, 2, 3) for a in (0, 1)]
    assert lines[5]["payload_rejected"] == row1["payload_rejected"]


@pytest.mark.distributed
def test_trainer_trains_one_agent_per_process_and_the_callback_mixes(tmp_path):
    torchrun("trainer", tmp_path)
    facts = [json.loads((tmp_path / f"trainer-facts-{r}.json").read_text()) for r in (0, 1)]
    for r, f in enumerate(facts):
        assert (f["rank"], f["world"], f["hidden"]) == (r, 2, [])
        assert (f["parallel_mode"], f["trainer_world_size"], f["model_wrapped"]) == ("not_parallel", 1, "PeftModel")
        assert (f["global_step"], f["rounds"]) == (2 * EVERY, 2)
    for step in (EVERY, 2 * EVERY):
        pre = [load(tmp_path / f"trainer-pre-{r}-{step}.safetensors") for r in (0, 1)]
        post = [load(tmp_path / f"trainer-post-{r}-{step}.safetensors") for r in (0, 1)]
        for key in pre[0]:  # different data and no gradient averaging: every trained tensor differs
            assert not torch.equal(pre[0][key], pre[1][key]), key
        want = library_mix("decaf", pre)
        for r in (0, 1):
            assert_mixed(post[r], want[r])
            assert (tmp_path / f"trainer-optstate-{r}-{step}.txt").read_text() == "0"
    rows = facts[0]["rows"]
    assert [(m["round"], m["agent"], m["neighbors"]) for m in rows] == [(t, a, 1) for t in (1, 2) for a in (0, 1)]


@pytest.mark.distributed
def test_a_data_parallel_trainer_is_refused_and_would_have_averaged(tmp_path):
    torchrun("ddp", tmp_path)
    for r in (0, 1):
        f = json.loads((tmp_path / f"ddp-facts-{r}.json").read_text())
        assert "data-parallel over 2 processes" in f["refused"] and "one_agent_per_process" in f["refused"]
        # the control: the same Trainer without the callback wraps the model in DDP and averages the gradients
        assert f["model_wrapped"] == "DistributedDataParallel"
        assert f["B_identical"] and f["B_trained"]
        assert "DistributedDataParallel" in f["mix_refused"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "script, args",
    [
        ("gossip_own_loop.py", ["--steps", "20", "--every", "5"]),
        ("gossip_trainer.py", ["--steps", "10", "--every", "5"]),
    ],
)
def test_the_examples_run_under_torchrun(tmp_path, script, args):
    """The documented launch commands work as written (shortened), offline, on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(ROOT / "examples" / script), *args]
    if script == "gossip_trainer.py":
        cmd += ["--out", str(tmp_path / "runs")]
    res = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    found = sorted(re.findall(r"agent (\d) \(decaf, .*?(\d+) mixes", res.stdout))
    mixes = "4" if script == "gossip_own_loop.py" else "2"  # steps / every
    assert found == [("0", mixes), ("1", mixes)], res.stdout[-2000:]
    if script == "gossip_trainer.py":
        assert res.stdout.count("Trainer world size 1)") == 2  # the Trainer saw one process, not two


# --------------------------------------------------------------------------------------------- in-process refusals
@pytest.fixture
def one_process_group():
    """A one-process gloo group (the refusals need one to be reached), torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def tiny_model():
    pytest.importorskip("peft")
    return tiny_peft()


def refusal(match: str, *args, **kwargs) -> str:
    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip

    with pytest.raises(DecafError, match=match) as info:
        Gossip(*args, **kwargs)
    return str(info.value)


def test_no_process_group_and_no_torchrun_is_refused(tiny_model, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    refusal("no initialized process group and no torchrun", tiny_model, "ring", "decaf")
    from decaf_lora import DecafError
    from decaf_lora.gossip import one_agent_per_process

    with pytest.raises(DecafError, match="torchrun"):
        one_agent_per_process()


def test_bad_arguments_are_refused_in_one_sentence(tiny_model, one_process_group):
    from decaf_lora import Topology

    refusal(r"every=0 .*>= 1", tiny_model, every=0)
    refusal(r"every=2\.5", tiny_model, every=2.5)
    refusal(r"state_after_mix='sometimes'", tiny_model, state_after_mix="sometimes")
    refusal(r"timeout=0", tiny_model, timeout=0)
    refusal(r"link_drop=0.3 drops links only under schedule='link-failures'", tiny_model, link_drop=0.3)
    refusal("not a PEFT LoRA model", TinyNet())
    refusal("topology has 4 agents but 1 processes", tiny_model, Topology.build("ring", 4))
    refusal("algorithm='magic' is not known", tiny_model, "ring", "magic")
    refusal("activations", tiny_model, "ring", "dimat")


def test_a_ddp_wrapped_model_is_refused(tiny_model, one_process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from decaf_lora.gossip import data_parallel_wrappers

    assert data_parallel_wrappers(tiny_model) == []
    ddp = DDP(tiny_model)
    refusal("is a DistributedDataParallel", ddp)
    message = refusal("wrapped by a DistributedDataParallel", tiny_model)  # the inner model: found around it
    assert "centralized" in message and "do not wrap it in DDP" in message
    del ddp


def test_a_model_wrapped_after_set_up_is_refused_at_the_first_mix(tiny_model, one_process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip

    gossip = Gossip(tiny_model, "ring", "dlora", every=1, state_after_mix="keep")
    ddp = DDP(tiny_model)
    with pytest.raises(DecafError, match="DistributedDataParallel"):
        gossip.step()
    del ddp


def test_a_single_agent_mix_keeps_its_product_and_needs_an_optimizer_to_reset(tiny_model, one_process_group, tmp_path):
    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip

    gossip = Gossip(tiny_model, "ring", "decaf", every=2, metrics_path=tmp_path / "m.jsonl")
    assert gossip.step() is None
    with pytest.raises(DecafError, match="state_after_mix='reset' needs the optimizer"):
        gossip.step()
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    x, y = private_data(0)
    tiny_model(x, y)["loss"].backward()
    opt.step()
    before = products(snapshot(tiny_model))
    row = gossip.mix(opt)
    assert_close(products(snapshot(tiny_model)), before, atol=1e-6, rtol=1e-4)
    assert opt.state == {} or all(not opt.state.get(p) for p in tiny_model.parameters())
    assert (row["round"], row["agent"], row["neighbors"], row["bytes_sent"]) == (1, 0, 0, 0)
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["round"] == 1


def test_an_existing_metrics_file_is_never_overwritten(tiny_model, one_process_group, tmp_path):
    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip

    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own notes\n")
    with pytest.raises(DecafError, match="already exists; name a new file"):
        Gossip(tiny_model, "ring", "decaf", every=2, metrics_path=mine)
    assert mine.read_text() == "my own notes\n"
    with pytest.raises(DecafError, match="not writable"):
        Gossip(tiny_model, "ring", "decaf", every=2, metrics_path=tmp_path / "no" / "such" / "m.jsonl")


def test_every_registered_method_runs_through_gossip_or_is_refused(one_process_group):
    """The plumbing every method may ask for (per-agent state, start factors, base corrections, rank changes,
    phases) works in a one-process group; only a method that needs activations from the agent's data is refused."""
    from decaf_lora import DecafError, algorithms
    from decaf_lora.engine import ROW_SCHEMA
    from decaf_lora.gossip import Gossip

    x, y = private_data(0)
    for name in algorithms.available():
        model = tiny_peft()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        if "activations" in algorithms.get(name).needs:
            with pytest.raises(DecafError, match="activations"):
                Gossip(model, "ring", name, optimizer=opt)
            continue
        gossip = Gossip(model, "ring", name, optimizer=opt)
        for _ in range(2):
            model(x[:8], y[:8])["loss"].backward()
            opt.step()
            opt.zero_grad()
            row = gossip.step()
        assert (row["round"], row["neighbors"]) == (2, 0), name
        assert set(row) <= set(ROW_SCHEMA) | set(algorithms.get(name).stats), name
        assert all(torch.isfinite(v).all() for v in snapshot(model).values()), name


def test_the_callback_refuses_data_parallel_arguments(tiny_model, one_process_group):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    from decaf_lora import DecafError
    from decaf_lora.gossip import Gossip, GossipCallback

    gossip = Gossip(tiny_model, "ring", "decaf", every=1, state_after_mix="keep")
    callback = gossip.callback()
    assert isinstance(callback, GossipCallback)
    args = SimpleNamespace(world_size=4, parallel_mode=ParallelMode.DISTRIBUTED)
    with pytest.raises(DecafError, match="data-parallel over 4 processes"):
        callback.on_init_end(args, None, None, model=tiny_model)
    single = SimpleNamespace(world_size=1, parallel_mode=ParallelMode.NOT_PARALLEL)
    callback.on_init_end(single, None, None, model=tiny_model)
    with pytest.raises(DecafError, match="not the model this Gossip mixes"):
        callback.on_init_end(single, None, None, model=tiny_peft())


# --------------------------------------------------------------------------------------------- entry point
if __name__ == "__main__":
    scenario, out = sys.argv[1], pathlib.Path(sys.argv[2])
    {"own": worker_own, "trainer": worker_trainer, "ddp": worker_ddp}[scenario](out)
