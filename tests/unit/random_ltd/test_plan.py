"""The plan: a whole iteration's indices drawn at once on the host, the same as drawing each micro-batch and
layer on its own with the torch reference, delivered as int32 on the batch's device."""

import torch

from megatron.core.datasets.samplers import global_sample_offsets
from megatron.core.random_ltd import MSLGSchedule, RandomLTDPlan, kept_indices
from megatron.core.random_ltd.sequence_parallel import kept_token_route


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


def test_sequence_parallel_routes_come_with_the_indices():
    """Under sequence parallelism each LTD layer's route between the TP ranks is made on the host with the
    draw; it is the route worked out from the layer's indices (what the layer would otherwise compute)."""
    s, b, tp, M = 64, 3, 4, 2
    schedule = MSLGSchedule(s, 16, 8, 10)
    for rank in range(tp):
        plan = RandomLTDPlan(5, s, schedule, frozenset({1, 3}), b, 0, 1, tp, rank)
        for state in plan.for_iteration(2, M, torch.device("cpu")):
            for layer in (1, 3):
                got = state.route_for(layer)
                want = kept_token_route(state.indices_for(layer, s).long(), s, tp, rank)
                assert (got.send_splits, got.recv_splits, got.per_rank) == (want.send_splits, want.recv_splits,
                                                                            want.per_rank)
                for name in ("send_sample", "send_local", "recv_slot"):
                    assert getattr(got, name).dtype == torch.int32
                    assert torch.equal(getattr(got, name).long(), getattr(want, name)), (rank, layer, name)
            assert state.route_for(0) is None
    plain = RandomLTDPlan(5, s, schedule, frozenset({1}), b, 0, 1).for_iteration(2, M, "cpu")
    assert plain[0].route_for(1) is None  # no sequence parallelism: nothing to route
