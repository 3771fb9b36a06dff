"""Run a function on several gloo ranks on loopback, each a forked process (about 1.5 s per test).

    run_distributed(fn, world_size=4, tp=2, pp=1)  # fn(rank, world_size) runs after the groups exist

A failing assertion on any rank fails the test (torch.multiprocessing re-raises it in the parent).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.core import parallel_state


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


def run_distributed(fn, world_size: int, tp: int = 1, pp: int = 1, args=()):
    mp.start_processes(_worker, args=(world_size, _free_port(), fn, tp, pp, args), nprocs=world_size,
                       join=True, start_method="fork")
