"""RNG states in a checkpoint: Python, NumPy, torch (CPU), CUDA, and the tensor-parallel tracker.

    rng_state = {"python": (3, (...), None),              random.getstate()
                 "numpy": {"key": int64 [624], "pos": int, "has_gauss": int, "cached_gaussian": float},
                 "torch": uint8 tensor,                   torch.get_rng_state()
                 "cuda": [uint8 tensor per device],       only where CUDA is available
                 "tracker": {name: uint8 tensor}}         get_rng_tracker().get_states(); the trainer's

Only tensors and plain values, so the file loads with `torch.load(weights_only=True)`. The states are
per rank (each rank's position in the TP x PP x DP grid seeds its streams): a checkpoint converted to
another layout drops them (convert.py).
"""

import random

import numpy as np
import torch

from megatron.core.tensor_parallel import get_rng_tracker


def get_rng_state() -> dict:
    """Python, NumPy, torch and (where available) CUDA generator states."""
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
    """Inverse of `get_rng_state`; a saved "cuda" entry is skipped on a machine without CUDA."""
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_rng_state_with_tracker() -> dict:
    """`get_rng_state` plus the tensor-parallel tracker's streams under "tracker": what the trainer saves."""
    state = get_rng_state()
    state["tracker"] = get_rng_tracker().get_states()
    return state


def set_rng_state_with_tracker(state: dict) -> None:
    """Inverse of `get_rng_state_with_tracker`; a state without "tracker" leaves the tracker as it is."""
    set_rng_state(state)
    if "tracker" in state:
        get_rng_tracker().set_states(state["tracker"])


def _to_tuple(x):
    """random.setstate wants tuples; a round trip through torch.save may give lists."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
