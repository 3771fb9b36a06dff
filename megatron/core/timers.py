"""Where a step's time goes: Megatron's named timers, `--timing-log-level 0|1|2`, reported per log interval.

    timers = Timers(level, device)
    with timers("forward-backward"):          # or t = timers(name); t.start(); ...; t.stop()
        ...
    text, record = timers.report(iterations)  # every rank calls it: the min and max go over all of them

The trainer owns one `Timers` and hands it to the schedule, the pipeline's p2p and the gradient sync;
their default is `NO_TIMERS`, level 0.

Each name has one level (`LEVELS`); a timer whose level is above `--timing-log-level` is a no-op, and so
is every timer at level 0 (the default): timing off adds no synchronisation and no work. A timer that is
on synchronises the GPU when it starts and stops (so queued kernels are charged to the region that
launched them), which serialises what would overlap: a step is a little slower with timers on, most at
level 2, as in Megatron.

    level 1 (a few times per iteration)       level 2 (per micro-batch, or per pipeline message)
    forward-backward   the schedule            batch-generator    next micro-batch to the device
    optimizer          step (incl. params-     random-ltd-draw    the micro-batch's random-LTD state
                       all-gather)             forward-compute, backward-compute
    grads-all-reduce / grads-reduce-scatter   forward-recv, forward-send, backward-recv, backward-send,
                       the data-parallel       forward-send-backward-recv, backward-send-forward-recv
                       reduction's wait after  (pipeline p2p, `pipeline_parallel/p2p.py`)
                       the last backward
    params-all-gather  distributed optimizer: the updated shards (its waits in forward pre-hooks under
                       --overlap-param-gather are not timed)
    embedding-grads-all-reduce, layernorm-grads-all-reduce   tied embeddings (PP), sequence parallel

The report is Megatron's block, milliseconds per iteration, the min and max over the ranks that ran the
timer (a pipeline's first stage never receives a forward, for one):

    (min, max) time across ranks (ms):
        forward-backward ...............................: (812.43, 815.02)

Library code (`megatron/core`) takes any `timers` object with this call signature, or None.
"""

import time
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

LEVELS = {
    "forward-backward": 1, "optimizer": 1, "grads-all-reduce": 1, "grads-reduce-scatter": 1,
    "params-all-gather": 1, "embedding-grads-all-reduce": 1, "layernorm-grads-all-reduce": 1,
    "batch-generator": 2, "random-ltd-draw": 2, "forward-compute": 2, "backward-compute": 2,
    "forward-recv": 2, "forward-send": 2, "backward-recv": 2, "backward-send": 2,
    "forward-send-backward-recv": 2, "backward-send-forward-recv": 2,
}


class Timer:
    """Accumulated wall time of one region over a log interval."""

    def __init__(self, sync):
        self._sync = sync
        self.elapsed = 0.0  # seconds since the last report
        self._started: Optional[float] = None

    def start(self) -> None:
        assert self._started is None, "timer started twice"
        self._sync()
        self._started = time.perf_counter()

    def stop(self) -> None:
        assert self._started is not None, "timer stopped before it started"
        self._sync()
        self.elapsed += time.perf_counter() - self._started
        self._started = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class _NoTimer:
    """A timer that is off: start, stop and `with` do nothing."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


_OFF = _NoTimer()


class Timers:
    def __init__(self, level: int = 0, device: Optional[torch.device] = None):
        assert level in (0, 1, 2), "--timing-log-level is 0, 1 or 2"
        self.level = level
        self.device = device or torch.device("cpu")
        cuda = self.device.type == "cuda"
        self._sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        self._timers: Dict[str, Timer] = {}

    def __call__(self, name: str):
        """The timer `name` (one of LEVELS), or a no-op one if its level is above --timing-log-level."""
        if LEVELS[name] > self.level:
            return _OFF
        if name not in self._timers:
            self._timers[name] = Timer(self._sync)
        return self._timers[name]

    def report(self, iterations: int) -> Tuple[Optional[str], Dict[str, list]]:
        """Megatron's "(min, max) time across ranks (ms):" block and {name: [min, max]} in ms per iteration,
        over the iterations since the last report; resets the timers. Collective when distributed: every
        rank calls it at the same iteration. (None, {}) with timing off."""
        if self.level == 0:
            return None, {}
        names = [name for name, level in LEVELS.items() if level <= self.level]
        ms = torch.tensor([1000.0 * self._timers[n].elapsed / iterations if n in self._timers else 0.0
                           for n in names], dtype=torch.float64)  # [n]
        for timer in self._timers.values():
            timer.elapsed = 0.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            ms = ms.to(self.device)
            gathered = [torch.zeros_like(ms) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, ms)  # a few numbers once per log interval
            ms = torch.stack(gathered).cpu()  # [world, n]
        else:
            ms = ms.unsqueeze(0)  # [1, n]
        record = {}
        for i, name in enumerate(names):
            ran = ms[:, i][ms[:, i] > 0]  # the ranks that ran this timer
            if ran.numel():
                record[name] = [round(ran.min().item(), 3), round(ran.max().item(), 3)]
        if not record:
            return None, {}
        lines = ["(min, max) time across ranks (ms):"] + [
            f"    {(name + ' ').ljust(48, '.')}: ({lo:.2f}, {hi:.2f})" for name, (lo, hi) in record.items()]
        return "\n".join(lines), record


NO_TIMERS = Timers(0)  # every timer a no-op: the default of the modules that take `timers`
