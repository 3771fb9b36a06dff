"""Where this process runs and whom it talks to: backend, device, and the tp/pp/dp process groups.

Nothing else in the project names a device: gloo means CPU, NCCL means `cuda:LOCAL_RANK`. A process
group that already exists (a test launcher's, or one a caller set up) decides: its backend is taken and the
device follows from it. Otherwise `--distributed-backend` decides, and without it NCCL is picked when CUDA is
present, else gloo.

Rank layout is Megatron's (context and expert parallelism are 1 here), tensor-parallel fastest:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so TP groups are contiguous ranks, DP groups stride by tp, PP groups stride by tp * dp. Example, 8 ranks,
tp=2, pp=2, dp=2: TP [0,1] [2,3] [4,5] [6,7]; DP [0,2] [1,3] [4,6] [5,7]; PP [0,4] [1,5] [2,6] [3,7].
The embedding group is the first and last rank of each PP group (tied word embeddings).

Without `initialize_model_parallel` (one plain process) every size is 1, every rank 0 and every group
None, so the model code runs unchanged on one device.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

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


def existing_backend() -> Optional[str]:
    """The backend of the process group that already exists, as one of BACKENDS; None when there is none.

    A mixed group (`cpu:gloo,cuda:nccl`) counts as NCCL: its GPU tensors go through NCCL."""
    if not dist.is_initialized():
        return None
    name = str(dist.get_backend()).lower()
    for backend in ("nccl", "gloo"):
        if backend in name:
            return backend
    raise UserError(f"the existing process group uses the {name!r} backend; this project supports {BACKENDS}")


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 10) -> torch.device:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/MASTER_ADDR in the environment), or the one
    that already exists. Returns this rank's device.

    An existing group's backend wins over the default: a launcher that made a gloo group on a machine with
    CUDA must not get `cuda:LOCAL_RANK` (gloo ranks would then try to move GPU tensors, or four ranks would
    share one GPU). An explicit `backend` that disagrees with the existing group is a UserError. A plain
    process (no WORLD_SIZE, or 1, and no group) joins nothing.
    """
    existing = existing_backend()
    if existing is not None and backend is not None and backend != existing:
        raise UserError(f"--distributed-backend {backend}, but this process already joined a {existing} process "
                        f"group; drop the flag or pass --distributed-backend {existing}")
    backend = existing or backend or default_backend()
    device = device_for_backend(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if existing is None and world_size_from_env() > 1:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    _state.device = device
    return device


@dataclass
class _State:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None  # tp x pp: everything one model replica spans
    embedding_group: Optional[dist.ProcessGroup] = None
    pp_ranks: Optional[List[int]] = None  # global ranks of this rank's pipeline, first stage first
    embedding_ranks: Optional[List[int]] = None
    device: Optional[torch.device] = None
    initialized: bool = False


_state = _State()


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel size, or a UserError that every rank raises identically (no rank hangs)."""
    if tp < 1 or pp < 1:
        raise UserError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not divisible by tensor x pipeline parallel size "
                        f"{tp} x {pp}; launch a multiple of {tp * pp} processes")
    return world_size // (tp * pp)


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Create every group on every rank, in the same order (torch.distributed requires it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    dp = check_parallel_sizes(world, tp, pp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    s = _State(tp=tp, pp=pp, dp=dp, device=_state.device, initialized=True)
    if world == 1:
        s.pp_ranks, s.embedding_ranks = [0], [0]
        _replace(s)
        return

    def new(ranks):
        group = dist.new_group(ranks)
        return group if rank in ranks else None

    for p in range(pp):  # TP groups: contiguous
        for d in range(dp):
            ranks = [t + tp * (d + dp * p) for t in range(tp)]
            g = new(ranks)
            s.tp_group = g or s.tp_group
    for p in range(pp):  # DP groups: stride tp inside a pipeline stage
        for t in range(tp):
            ranks = [t + tp * (d + dp * p) for d in range(dp)]
            g = new(ranks)
            s.dp_group = g or s.dp_group
    for d in range(dp):  # PP groups: stride tp * dp
        for t in range(tp):
            ranks = [t + tp * (d + dp * p) for p in range(pp)]
            g = new(ranks)
            if g is not None:
                s.pp_group, s.pp_ranks = g, ranks
            emb = sorted({ranks[0], ranks[-1]})
            g = new(emb)
            if g is not None:
                s.embedding_group, s.embedding_ranks = g, emb
    for d in range(dp):  # model-parallel groups: one replica
        ranks = [t + tp * (d + dp * p) for p in range(pp) for t in range(tp)]
        g = new(ranks)
        s.mp_group = g or s.mp_group
    _replace(s)


def _replace(s: _State) -> None:
    global _state
    _state = s


def destroy_model_parallel() -> None:
    _replace(_State(device=_state.device))


def model_parallel_is_initialized() -> bool:
    return _state.initialized


def get_device() -> torch.device:
    return _state.device or device_for_backend(None)


def _rank_in(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def get_tensor_model_parallel_world_size() -> int:
    return _state.tp


def get_tensor_model_parallel_rank() -> int:
    return _rank_in(_state.tp_group)


def get_tensor_model_parallel_group():
    return _state.tp_group


def get_pipeline_model_parallel_world_size() -> int:
    return _state.pp


def get_pipeline_model_parallel_rank() -> int:
    return _rank_in(_state.pp_group)


def get_pipeline_model_parallel_group():
    return _state.pp_group


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == _state.pp - 1


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wraps around)."""
    r = get_pipeline_model_parallel_rank()
    return _state.pp_ranks[(r + 1) % _state.pp]


def get_pipeline_model_parallel_prev_rank() -> int:
    r = get_pipeline_model_parallel_rank()
    return _state.pp_ranks[(r - 1) % _state.pp]


def get_data_parallel_world_size() -> int:
    return _state.dp


def get_data_parallel_rank() -> int:
    return _rank_in(_state.dp_group)


def get_data_parallel_group():
    return _state.dp_group


def get_model_parallel_group():
    return _state.mp_group


def get_embedding_group():
    return _state.embedding_group


def is_rank_in_embedding_group() -> bool:
    return _state.embedding_group is not None
