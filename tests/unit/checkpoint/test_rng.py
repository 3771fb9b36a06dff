"""RNG states through a checkpoint file: every generator resumes where it was saved, the TP tracker too."""

import random

import numpy as np
import torch

from megatron.checkpoint import protocol as ckpt
from megatron.checkpoint import rng
from megatron.core.tensor_parallel import get_rng_tracker


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint(str(tmp_path), 1, {"rng_state": rng.get_rng_state()})
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.set_rng_state(ckpt.load_checkpoint(str(tmp_path))["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_tracker_states_saved_under_tracker_and_restored(tmp_path):
    tracker = get_rng_tracker()
    saved_states = tracker.get_states()
    try:
        tracker.reset()
        tracker.add("model-parallel-rng", 1234)
        state = rng.get_rng_state_with_tracker()
        assert set(state) >= {"python", "numpy", "torch", "tracker"} and list(state["tracker"]) == ["model-parallel-rng"]
        ckpt.save_checkpoint(str(tmp_path), 1, {"rng_state": state})
        with tracker.fork():
            want = torch.rand(3)
        tracker.reset()
        tracker.add("model-parallel-rng", 99)
        rng.set_rng_state_with_tracker(ckpt.load_checkpoint(str(tmp_path))["rng_state"])
        with tracker.fork():
            assert torch.equal(torch.rand(3), want)
        no_tracker = {k: v for k, v in state.items() if k != "tracker"}
        before = tracker.get_states()
        rng.set_rng_state_with_tracker(no_tracker)  # an older checkpoint: the tracker is left as it is
        assert all(torch.equal(before[k], v) for k, v in tracker.get_states().items())
    finally:
        tracker.set_states(saved_states)
