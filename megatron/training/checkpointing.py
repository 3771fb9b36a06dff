"""Checkpoints in Megatron's legacy `torch` layout, written atomically.

    <save>/latest_checkpointed_iteration.txt          "100"
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt

The iteration folder is written under a temporary name and renamed when complete; the tracker file is
replaced last, so it never points at a partial checkpoint and a crash mid-write leaves the previous
checkpoint usable. Files hold only tensors and plain Python values (args as a dict, RNG states as
tensors) so they load with `torch.load(weights_only=True)`.
"""

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

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


def save_checkpoint(root: str, iteration: int, state: dict) -> str:
    """Write `state` as iteration `iteration` under `root`; return the file path."""
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    path = os.path.relpath(checkpoint_file(root, iteration), final_dir)
    tmp_file = os.path.join(tmp_dir, path)
    os.makedirs(os.path.dirname(tmp_file), exist_ok=True)
    try:
        torch.save({"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **state}, tmp_file)
        if os.path.exists(final_dir):  # re-saving the same iteration: swap the old one out
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    tracker_tmp = os.path.join(root, TRACKER + f".tmp-{os.getpid()}")
    with open(tracker_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    return os.path.join(final_dir, path)


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under `root`, or None when there is no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker} holds {text!r}, not an iteration number; fix or delete it")
    return int(text)


def load_checkpoint(root: str, iteration: Optional[int] = None) -> Optional[dict]:
    """Load the latest (or the given) checkpoint under `root` on CPU; None when there is none."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    path = checkpoint_file(root, iteration)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path} is missing; the checkpoint at {root} is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
