"""Run a function on several gloo ranks on loopback, each a forked process (about 1.5 s per test).

    run_distributed(fn, world_size=4, tp=2, pp=1)  # fn(rank, world_size) runs after the groups exist

A failing assertion on any rank fails the test (torch.multiprocessing re-raises it in the parent).
Tests that launch the trainer add `GLOO` to its flags: the ranks share one machine, so they must stay on
the CPU even where CUDA is visible.
"""

import os
import socket
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.core import parallel_state

GLOO = ["--distributed-backend", "gloo"]  # trainer flags of every multi-rank test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, tp, pp, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    parallel_state.init_distributed("gloo")  # records the CPU as this rank's device, also on CUDA machines
    try:
        parallel_state.initialize_model_parallel(tp, pp)
        fn(rank, world_size, *args)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, tp: int = 1, pp: int = 1, args=(), hang_after_s: Optional[float] = None):
    """Run `fn` on every rank and wait for all of them. With `hang_after_s`, ranks still running after that
    long are killed and the test fails naming them: a rank stuck in a collective is a hang, not a slow run."""
    ctx = mp.start_processes(_worker, args=(world_size, _free_port(), fn, tp, pp, args), nprocs=world_size,
                             join=False, start_method="fork")
    deadline = None if hang_after_s is None else time.monotonic() + hang_after_s
    while not ctx.join(timeout=None if deadline is None else max(0.1, deadline - time.monotonic())):
        if deadline is not None and time.monotonic() >= deadline:
            stuck = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"ranks {stuck} of {world_size} were still running after {hang_after_s:.0f} s: a hang")
