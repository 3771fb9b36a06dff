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

`checkpoint(function, *tensors, others=...)` is activation recomputation (Megatron's `CheckpointFunction`):
it snapshots the default generators and the tracker's streams so the rerun in backward draws the same masks.
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


# ---- activation recomputation ------------------------------------------------------------------------
# A recomputed layer must draw the dropout masks its first forward drew: hidden dropout from the default
# generator (CPU, and the accelerator's when the activations live there), attention dropout from the
# tracker's streams. So the forward snapshots all of them, the backward puts the snapshot back for the
# rerun and then restores whatever was current, leaving every stream where the no-recompute run leaves it.

def _get_all_rng_states(device: torch.device):
    accel = None if device.type == "cpu" else _get_state(device)
    return torch.get_rng_state(), accel, _TRACKER.get_states()


def _set_all_rng_states(states, device: torch.device) -> None:
    cpu, accel, tracker = states
    torch.set_rng_state(cpu)
    if accel is not None:
        _set_state(accel, device)
    _TRACKER.set_states(tracker)


class CheckpointFunction(torch.autograd.Function):
    """Forward runs `function` without keeping its activations (only its tensor inputs are saved) and
    snapshots the RNG; backward restores that RNG, reruns `function` with grad, backprops through the
    rerun, and puts back the RNG states that were current before. Megatron's `CheckpointFunction`."""

    @staticmethod
    def forward(ctx, function, num_tensors, *args):
        tensors, others = args[:num_tensors], args[num_tensors:]
        device = next((t.device for t in tensors if t.is_floating_point()), torch.device("cpu"))
        ctx.function, ctx.others, ctx.device = function, others, device
        ctx.rng_states = _get_all_rng_states(device)
        # autocast (the trainer's bf16/fp16) is off inside a backward: re-enter it for the rerun
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return function(*tensors, *others)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        before = _get_all_rng_states(ctx.device)
        _set_all_rng_states(ctx.rng_states, ctx.device)
        try:
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                outputs = ctx.function(*inputs, *ctx.others)
        finally:
            _set_all_rng_states(before, ctx.device)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(t.grad if t.requires_grad else None for t in inputs), *(None for _ in ctx.others))


def checkpoint(function, *tensors, others=()):
    """`function(*tensors, *others)` with its activations recomputed in backward (bit-identical, RNG
    included). `tensors` are saved for backward and get gradients; `others` (masks as non-differentiable
    tensors, a RandomLTDState, flags) are passed through as they are.

    Reentrant like Megatron's: parameter gradients flow only if some tensor input requires grad, so callers
    use it only then."""
    return CheckpointFunction.apply(function, len(tensors), *tensors, *others)
