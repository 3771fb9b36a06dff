"""Timers: off at level 0 (no work, no GPU synchronisation), each name at its level, Megatron's report."""

import time

import pytest
import torch

from megatron.core.timers import LEVELS, Timers


@pytest.fixture
def syncs(monkeypatch):
    """Counts torch.cuda.synchronize calls (a CUDA device is only named, never touched)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    return calls


def run_every_timer(timers):
    for name in LEVELS:
        with timers(name):
            pass


def test_level_0_adds_no_synchronisation_and_reports_nothing(syncs):
    timers = Timers(0, torch.device("cuda", 0))
    run_every_timer(timers)
    assert syncs == []
    assert timers.report(iterations=1) == (None, {})


@pytest.mark.parametrize("level", [1, 2])
def test_a_timer_synchronises_only_when_its_level_is_on(syncs, level):
    timers = Timers(level, torch.device("cuda", 0))
    run_every_timer(timers)
    on = [name for name, lv in LEVELS.items() if lv <= level]
    assert len(syncs) == 2 * len(on)  # start and stop of each timer that is on
    assert {"forward-backward", "optimizer"} <= set(on) and ("forward-compute" in on) == (level == 2)


def test_report_is_megatrons_block_in_ms_per_iteration_and_resets():
    timers = Timers(2)
    for _ in range(2):
        with timers("optimizer"):
            time.sleep(0.01)
    text, record = timers.report(iterations=2)
    lo, hi = record["optimizer"]
    assert lo == hi and 10.0 <= lo < 50.0  # ms per iteration; one rank: min = max
    assert set(record) == {"optimizer"}  # timers that never ran are not reported
    assert text.splitlines() == ["(min, max) time across ranks (ms):",
                                 f"    optimizer {'.' * 38}: ({lo:.2f}, {hi:.2f})"]
    assert timers.report(iterations=1) == (None, {})  # reset after each report


def test_start_stop_misuse_is_caught():
    timer = Timers(1)("optimizer")
    with pytest.raises(AssertionError):
        timer.stop()
    timer.start()
    with pytest.raises(AssertionError):
        timer.start()
