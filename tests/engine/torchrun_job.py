"""What the distributed tests run under torchrun, several runs in one process group (start-up is paid once):

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/engine/torchrun_job.py methods OUT m1,m2,...
... torchrun_job.py stop OUT        # a decaf run that every process stops at round 3, as a crash would
... torchrun_job.py resume RUN_DIR  # continue a run (made by any engine, any number of processes)
"""

import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import digits_task, method_config  # noqa: E402

import decaf_lora  # noqa: E402
from decaf_lora.engine import Engine  # noqa: E402


def main(mode: str, target: str, methods: str = "") -> None:
    dist.init_process_group("gloo")  # lent to the runs: none of them destroys it
    if mode == "methods":
        for name in methods.split(","):
            decaf_lora.run(method_config(os.path.join(target, name), name), task=digits_task(head=True))
    elif mode == "stop":
        real = Engine.run_round

        def stop(self, t):
            if t == 2:
                raise KeyboardInterrupt  # on every process at the same point: no collective is left waiting
            return real(self, t)

        Engine.run_round = stop
        try:
            decaf_lora.run(method_config(target, "decaf"), task=digits_task(head=True))
        except KeyboardInterrupt:
            pass
    elif mode == "resume":
        decaf_lora.resume(target, task=digits_task(head=True))
    # every process is past its last exchange before any tears gloo down: under a heavily loaded machine one rank
    # once aborted at exit (SIGABRT, "terminate called without an active exception") while its peer was closing
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
