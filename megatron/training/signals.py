"""Stopping a run cleanly: SIGTERM/SIGINT, a wall-clock limit, and making every rank agree.

Clusters preempt a job with SIGTERM (SLURM, Kubernetes) and SIGKILL it after a grace period; a person
types Ctrl-C (SIGINT). With `--exit-signal-handler` the handler only records the signal. The iteration
in flight finishes, one small all-reduce per iteration (`any_rank_on_device`, read with the iteration's
loss) tells every rank on the same iteration that some rank was signalled or ran out of time, and the
run saves a checkpoint and exits 0.

Nothing is printed from inside the handler (a signal landing in the middle of a print would make the
print fail), and repeated signals are not escalated: SLURM and torchrun can both deliver the same
SIGTERM to a worker, and the second copy must not cut the checkpoint short. DataLoader workers ignore
both signals (`ignore_stop_signals`), so a signal sent to the whole process group does not kill them
under the main process before it has saved.
"""

import signal
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalRecorder:
    """Records the first SIGTERM/SIGINT instead of dying; `restore()` puts the previous handlers back."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "SignalRecorder":
        try:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._record)
        except ValueError:  # signal.signal outside the main thread
            self.restore()
            raise UserError("--exit-signal-handler needs pretrain() to run in the main thread")
        return self

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: leave SIGTERM/SIGINT to the main process, which shuts workers down."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class Deadline:
    """--exit-duration-in-mins, measured from the start of pretrain() on each rank's own clock."""

    def __init__(self, minutes: Optional[float], start: Optional[float] = None):
        self.minutes = minutes
        self.start = time.time() if start is None else start

    def passed(self) -> bool:
        return self.minutes is not None and (time.time() - self.start) / 60.0 >= self.minutes


def any_rank(flags: Sequence[bool]) -> List[bool]:
    """Each flag OR-ed over all ranks, in one all-reduce of a few numbers (none without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    return [bool(x) for x in any_rank_on_device(flags).tolist()]


def any_rank_on_device(flags: Sequence) -> torch.Tensor:
    """`any_rank` left on the device for the caller's one read of the iteration: [n] fp32, 1.0 where some
    rank's flag was set. A flag is a bool, or a [] tensor on the device (a verdict not read yet); a bool
    becomes a fill kernel, not a host-to-device copy (which would wait for the device)."""
    device = ps.get_device()
    t = torch.stack([f.float().reshape(()) if isinstance(f, torch.Tensor)
                     else torch.full((), float(bool(f)), device=device) for f in flags])  # [n]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
