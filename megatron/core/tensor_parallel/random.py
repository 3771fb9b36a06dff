"""Random streams for tensor parallelism: which dropout masks must agree across TP ranks, which must differ.

Rule (Megatron's):
  - replicated activations (embedding/hidden dropout, the residual path) draw from the default generator,
    seeded identically on every TP rank, so the replicas stay identical;
  - partitioned activations (attention-probability dropout inside this rank's heads) draw under
    `get_rng_tracker().fork()`, from the 'model-parallel-rng' stream seeded per TP rank, so shards differ
    as the slices of one unsplit mask would.

Seeds, from `model_parallel_manual_seed(seed)`:
    default generator    seed' = seed + 100 * pp_rank (+ 10 * dp_rank with data_parallel_random_init)
    'model-parallel-rng' seed' + 2718 + tp_rank

Device-agnostic: the tracker swaps the CPU default generator when `parallel_state.get_device()` is the
CPU, else the CUDA generator of that device. Its states go into checkpoints (`get_states`/`set_states`)
so a resumed run draws the same masks.
"""

import contextlib
from typing import Dict

import torch

from megatron.core import parallel_state

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _device() -> torch.device:
    return parallel_state.get_device()


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def _seeded_state(seed: int, device: torch.device) -> torch.Tensor:
    """The generator state `seed` produces, leaving the live generator as it was."""
    before = _get_state(device)
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    state = _get_state(device)
    _set_state(before, device)
    return state


class RNGStatesTracker:
    """Named generator states that can be swapped in for the default generator of this rank's device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states: Dict[str, torch.Tensor] = {}
        self.seeds = set()

    def add(self, name: str, seed: int) -> None:
        assert name not in self.states, f"RNG state {name!r} already exists"
        assert seed not in self.seeds, f"seed {seed} already used by another RNG state"
        self.seeds.add(seed)
        self.states[name] = _seeded_state(seed, _device())

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of every named state, for a checkpoint or an activation recompute."""
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block on stream `name`, then save where that stream got to and restore the default.

        In a single process that never seeded the tracker (tp == 1, nothing is partitioned) the block
        simply runs on the default generator.
        """
        if name not in self.states:
            assert parallel_state.get_tensor_model_parallel_world_size() == 1, \
                f"RNG state {name!r} was never added; call model_parallel_manual_seed first"
            yield
            return
        device = _device()
        default = _get_state(device)
        _set_state(self.states[name], device)
        try:
            yield
        finally:
            self.states[name] = _get_state(device)
            _set_state(default, device)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


get_cuda_rng_tracker = get_rng_tracker  # Megatron's name; the tracker here is not CUDA-only


def model_parallel_manual_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Seed the default generators (CPU and CUDA) and the tracker's 'model-parallel-rng' for this rank."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * parallel_state.get_data_parallel_rank()
    torch.manual_seed(seed)  # CPU and every CUDA device
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
