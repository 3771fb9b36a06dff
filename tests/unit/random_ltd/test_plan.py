"""The plan: a whole iteration's indices drawn at once on the host, the same as drawing each micro-batch and
layer on its own with the torch reference, delivered as int32 on the batch's device."""

import torch

from megatron.core.datasets.samplers import global_sample_offsets
from megatron.core.random_ltd import MSLGSchedule, RandomLTDPlan, kept_indices


def test_iteration_draw_equals_each_micro_batch_and_layer_drawn_alone():
    s, b, dp, M = 64, 3, 2, 4
    schedule = MSLGSchedule(s, 16, 8, 10)
    for d in range(dp):
        plan = RandomLTDPlan(11, s, schedule, frozenset({1, 2, 5}), b, d, dp)
        for t in (0, 3, 9):
            states = plan.for_iteration(t, M, torch.device("cpu"))
            assert len(states) == M
            for m, state in enumerate(states):
                ids = torch.from_numpy(global_sample_offsets(m, b, d, dp))  # [b]
                assert torch.equal(state.sample_ids, ids) and state.kept_length == plan.kept_length(t) < s
                for layer in (1, 2, 5):
                    idx = state.indices_for(layer, s)  # [b, r]
                    assert idx.dtype == torch.int32
                    assert torch.equal(idx, kept_indices(11, t, ids, layer, s, plan.kept_length(t)))
                assert state.indices_for(0, s) is None, "not an LTD layer"


def test_nothing_drawn_when_nothing_drops():
    full = RandomLTDPlan(1, 32, None, frozenset({1}), 2, 0, 1)  # random-LTD off: r = s
    assert all(st.indices_for(1, 32) is None for st in full.for_iteration(0, 2, "cpu"))
    no_layers = RandomLTDPlan(1, 32, MSLGSchedule(32, 8, 4, 5), frozenset(), 2, 0, 1)
    assert no_layers.for_iteration(0, 3, "cpu") == [None] * 3
