"""Where this process runs: the backend and the device, decided in one place.

Nothing else in the project names a device. gloo means CPU; NCCL means `cuda:LOCAL_RANK`. Without an
explicit choice, NCCL is picked when CUDA is present, else gloo. (Process groups for tensor, pipeline and
data parallelism build on this in the parallelism issue.)
"""

import os
from typing import Optional

import torch

from megatron.core.errors import UserError

BACKENDS = ("nccl", "gloo")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for_backend(backend: Optional[str] = None) -> torch.device:
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise UserError(f"--distributed-backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "gloo":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--distributed-backend nccl needs a CUDA GPU; none is visible (use gloo on CPU)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
