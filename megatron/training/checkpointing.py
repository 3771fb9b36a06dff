"""Checkpoints in Megatron's legacy `torch` layout, written atomically.

    <save>/latest_checkpointed_iteration.txt          "100"
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt

With pipeline parallelism the rank folders are `mp_rank_{tp:02d}_{pp:03d}`. The iteration folder is
written under a temporary name and renamed when complete; the tracker file is replaced last, so it never points at a partial checkpoint and a crash mid-write leaves the previous
checkpoint usable. Files hold only tensors and plain Python values (args as a dict, RNG states as
tensors) so they load with `torch.load(weights_only=True)`.
"""

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def checkpoint_file(root: str, iteration: int, tp_rank: int = 0, pp_rank: Optional[int] = None) -> str:
    rank = f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(checkpoint_dir(root, iteration), rank, "model_optim_rng.pt")


def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(root: str, iteration: int, state: dict, tp_rank: int = 0, pp_rank: Optional[int] = None,
                    writer: bool = True) -> str:
    """Write this rank's `state` as iteration `iteration` under `root`; every rank calls it.

    Ranks with `writer` (data-parallel rank 0 of each (tp, pp) pair) write their file into
    `iter_XXXXXXX.tmp/`; after a barrier rank 0 renames the folder into place and replaces the tracker.
    Returns the final path of this rank's file.
    """
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    rel = os.path.relpath(checkpoint_file(root, iteration, tp_rank, pp_rank), final_dir)
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a crashed save
    _barrier()
    if writer:
        tmp_file = os.path.join(tmp_dir, rel)
        os.makedirs(os.path.dirname(tmp_file), exist_ok=True)
        try:
            torch.save({"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **state}, tmp_file + ".part")
            os.replace(tmp_file + ".part", tmp_file)
        except BaseException:
            if not dist.is_initialized():
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    _barrier()
    if _is_rank0():
        if os.path.exists(final_dir):  # re-saving the same iteration: swap the old one out
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()
    return os.path.join(final_dir, rel)


def saved_layout(root: str, iteration: int) -> Optional[tuple]:
    """(tensor, pipeline) parallel sizes of a checkpoint, read off its rank folders; None if it has none."""
    folder = checkpoint_dir(root, iteration)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    ranks = [n[len("mp_rank_"):].split("_") for n in names if n.startswith("mp_rank_")]
    if not ranks:
        return None
    tp = 1 + max(int(r[0]) for r in ranks)
    pp = 1 + max((int(r[1]) for r in ranks if len(r) > 1), default=0)
    return tp, pp


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under `root`, or None when there is no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker} holds {text!r}, not an iteration number; fix or delete it")
    return int(text)


def load_checkpoint(root: str, iteration: Optional[int] = None, tp_rank: int = 0,
                    pp_rank: Optional[int] = None) -> Optional[dict]:
    """Load this rank's file of the latest (or the given) checkpoint under `root` on CPU; None when there
    is no checkpoint yet."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    path = checkpoint_file(root, iteration, tp_rank, pp_rank)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path} is missing; the checkpoint at {root} is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
