"""LR schedule against Megatron's formulas, and LayerToken LR == iteration LR when nothing is dropped."""

import math

import pytest

from megatron.core.errors import UserError
from megatron.training.lr_schedule import LRScheduleConfig, lr_at, progress_samples, schedule_lengths


def test_warmup_then_cosine_values():
    cfg = LRScheduleConfig(max_lr=1.0, min_lr=0.1, decay_style="cosine", warmup_samples=100, decay_samples=1100)
    assert lr_at(cfg, 0) == 0.0
    assert lr_at(cfg, 50) == pytest.approx(0.5)
    assert lr_at(cfg, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 600) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(cfg, 1100) == pytest.approx(0.1)
    assert lr_at(cfg, 5000) == 0.1


def test_linear_and_constant():
    lin = LRScheduleConfig(2.0, 0.0, "linear", 0, 1000)
    assert lr_at(lin, 0) == 2.0 and lr_at(lin, 250) == pytest.approx(1.5) and lr_at(lin, 1000) == 0.0
    const = LRScheduleConfig(2.0, 0.0, "constant", 10, 10)
    assert lr_at(const, 5) == 1.0 and lr_at(const, 10**6) == 2.0


def test_lengths_follow_megatron_units():
    # iterations x global batch; tokens / seq length; fraction of the decay length
    assert schedule_lengths(global_batch_size=8, seq_length=256, train_samples=800, warmup_iters=10) == (80.0, 800.0)
    assert schedule_lengths(global_batch_size=8, seq_length=256, train_samples=800, warmup_tokens=2560,
                            decay_tokens=256 * 400) == (10.0, 400.0)
    assert schedule_lengths(global_batch_size=8, seq_length=256, train_samples=800, warmup_fraction=0.1,
                            decay_iters=50) == (40.0, 400.0)
    with pytest.raises(UserError):
        schedule_lengths(global_batch_size=8, seq_length=256, train_samples=800, warmup_iters=1, warmup_samples=8)


def test_layer_token_progress_equals_sample_progress_when_dense():
    L, s, G = 6, 128, 16
    cfg = LRScheduleConfig(3e-4, 3e-5, "cosine", 10 * G, 1000 * G)
    for k in range(0, 1200, 7):
        samples = k * G
        dense_layer_tokens = samples * L * s
        a = lr_at(cfg, progress_samples(samples, dense_layer_tokens, L, s, False))
        b = lr_at(cfg, progress_samples(samples, dense_layer_tokens, L, s, True))
        assert a == b  # exactly, not approximately


def test_layer_token_progress_is_dense_equivalent():
    # Half the layer-tokens of dense training is half the progress.
    assert progress_samples(100, 100 * 4 * 64 // 2, 4, 64, True) == 50.0
    assert math.isclose(progress_samples(3, 1, 4, 64, True), 1 / 256)


def test_rejects_bad_configs():
    with pytest.raises(UserError):
        LRScheduleConfig(1.0, 2.0, "cosine", 0, 10)
    with pytest.raises(UserError):
        LRScheduleConfig(1.0, 0.0, "cosine", 10, 10)
    with pytest.raises(UserError):
        LRScheduleConfig(1.0, 0.0, "wsd-nope", 0, 10)
