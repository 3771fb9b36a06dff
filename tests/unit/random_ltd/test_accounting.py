"""Layer-tokens: LT_t = G * ((L - n) * s + n * r_t), saving = 1 - consumed / (L * s * samples), plans."""

import pytest

from megatron.core.random_ltd import (
    LayerTokenCurve,
    MSLGSchedule,
    layer_tokens_per_iteration,
    plan_training,
    theoretical_saving,
)

PAPER = MSLGSchedule(2048, 128, 16, 200_000)


def test_layer_tokens_per_iteration():
    assert layer_tokens_per_iteration(512, 24, 22, 2048, 128) == 512 * (2 * 2048 + 22 * 128)
    dense = 512 * 24 * 2048
    assert layer_tokens_per_iteration(512, 24, 22, 2048, 2048) == dense
    assert layer_tokens_per_iteration(512, 24, 22, 2048, 4096) == dense, "r is capped at s"
    assert layer_tokens_per_iteration(512, 24, 0, 2048, 128) == dense, "no LTD layers"


def test_theoretical_saving():
    assert theoretical_saving(0, 24, 2048, 0) == 0.0
    assert theoretical_saving(24 * 2048 * 10, 24, 2048, 10) == 0.0
    lt = layer_tokens_per_iteration(8, 24, 22, 2048, 1024)
    assert theoretical_saving(lt, 24, 2048, 8) == pytest.approx((22 / 24) * (1 - 1024 / 2048))


def test_saving_of_a_run_is_the_mean_kept_fraction():
    rs = [PAPER.kept_length(t * 4000) for t in range(50)]
    consumed = sum(layer_tokens_per_iteration(4, 24, 22, 2048, r) for r in rs)
    mean_r = sum(rs) / 50
    assert theoretical_saving(consumed, 24, 2048, 200) == pytest.approx((22 / 24) * (1 - mean_r / 2048))


def test_curve_cumulative_and_inverse_match_brute_force():
    sched = MSLGSchedule(256, 32, 16, 300)
    curve = LayerTokenCurve(num_layers=6, seq_length=256, global_batch_size=3, num_ltd_layers=4, schedule=sched)
    running = [0]
    for t in range(700):
        running.append(running[-1] + curve.at(t))
    assert [curve.cumulative(n) for n in range(701)] == running
    for budget in [1, curve.at(0), curve.at(0) + 1, running[150], running[150] + 1, running[400] - 1, running[700]]:
        n = curve.iterations_to_reach(budget)
        assert running[n] >= budget > running[n - 1], budget
    assert curve.iterations_to_reach(0) == 0


def test_dense_curve():
    curve = LayerTokenCurve(24, 2048, 512)
    assert curve.cumulative(10) == 10 * 512 * 24 * 2048
    assert curve.iterations_to_reach(7200 * 10**9) == 286_103  # ceil(7200e9 / 25165824)


def test_plan_each_length_kind():
    curve = LayerTokenCurve(24, 2048, 512, 22, PAPER)
    by_iters = plan_training(curve, train_iters=1000)
    assert by_iters.iterations == 1000 and by_iters.raw_tokens == 1000 * 512 * 2048
    assert plan_training(curve, train_samples=512_000).iterations == 1000
    assert plan_training(curve, train_samples=512_001).iterations == 1001, "stop once samples reach N"
    assert plan_training(curve, train_tokens=1000 * 512 * 2048).iterations == 1000
    assert plan_training(curve, train_layer_tokens=by_iters.layer_tokens).iterations == 1000
    assert plan_training(curve, train_layer_tokens=by_iters.layer_tokens + 1).iterations == 1001
    assert by_iters.dense_layer_tokens == 24 * by_iters.raw_tokens
    assert by_iters.saving == pytest.approx(1 - by_iters.layer_tokens / by_iters.dense_layer_tokens)


def test_paper_gpt3_budget_is_closed_form_and_matches_reference(monkeypatch):
    curve = LayerTokenCurve(24, 2048, 512, 22, PAPER)
    calls = []  # every r_t evaluated: one per run of constant r in closed form, not one per iteration
    kept_length = MSLGSchedule.kept_length
    monkeypatch.setattr(MSLGSchedule, "kept_length", lambda self, t: calls.append(t) or kept_length(self, t))
    plan = plan_training(curve, train_layer_tokens=4800 * 10**9)
    assert len(list(PAPER.runs(plan.iterations))) == (2048 - 128) // 16 + 1  # 121 runs: 128, 144, ..., 2048
    assert len(calls) < 1000, f"{len(calls)} evaluations of r_t for a 277k-iteration plan"
    assert 277_000 <= plan.iterations <= 278_000  # reference: ~277.5k
    assert plan.iterations == 277_389
    assert 290e9 <= plan.raw_tokens <= 292e9  # reference: ~291B
    assert 4800e9 <= plan.layer_tokens < 4800e9 + curve.at(plan.iterations)
    assert 1 - plan.layer_tokens / 7200e9 == pytest.approx(1 / 3, abs=1e-4)  # the paper's budget ratio
    assert plan.full_length_iteration == 200_001
